"""Timestep samplers of the VSD regulariser (SPEC §2, §3.4, §6.2). Every draw is made on the CPU from a
``torch.Generator``; results are int64 (B,).

* OSEDiff VSD:            t ~ U_int[20, 980), i.e. 20..979, per sample                       (``sample_timesteps``)
* Regulariser ε-MSE:      t ~ U_int[0, 1000)                                                  (``VSDConfig.reg_t_*``)
* TADSR TAVSD (Eq. 5):    t_v = ⌊λ·t_s + γ⌋, λ = 0.5, γ = 0, with the per-sample teacher CFG 7.5 + t_v / 200 of the
                          released code (not in the paper)                                   (``tavsd_timesteps``)
* RCOD DAS (Eq. 7):       t_r ~ U_int[max(20, t − k), min(980, t + k)], inclusive, t the sample's LDG timestep
                          (``das_timesteps``; the draw itself is ``osd_core.ldg.sample_das_timestep``)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from osd_core.ldg import DEFAULT_LDG, LDGConfig, sample_das_timestep

T_COUNT = 1000


@dataclass(frozen=True)
class VSDConfig:
    """Timestep ranges [min, max) of the VSD loss (OSEDiff: [20, 980)) and of the regulariser loss ([0, 1000))."""

    t_min: int = 20
    t_max: int = 980
    reg_t_min: int = 0
    reg_t_max: int = T_COUNT

    def __post_init__(self) -> None:
        for low, high, name, default in ((self.t_min, self.t_max, "t", "[20, 980)"),
                                         (self.reg_t_min, self.reg_t_max, "reg_t", "[0, 1000)")):
            if not 0 <= low < high <= T_COUNT:
                raise ValueError(f"`vsd.{name}_min` and `vsd.{name}_max` must satisfy 0 <= min < max <= {T_COUNT} "
                                 f"(max exclusive); got [{low}, {high}). OSEDiff uses {default}.")


def uniform_timesteps(batch_size: int, low: int, high: int, generator: torch.Generator) -> torch.Tensor:
    """t ~ U_int[low, high) per sample: (B,) int64 on the CPU."""
    return torch.randint(low, high, (batch_size,), generator=generator)  # (B,)


def sample_timesteps(config: VSDConfig, batch_size: int, generator: torch.Generator) -> torch.Tensor:
    """OSEDiff's VSD timesteps U_int[t_min, t_max) (20..979 by default): (B,) int64 on the CPU."""
    return uniform_timesteps(batch_size, config.t_min, config.t_max, generator)


def tavsd_timesteps(t_s: torch.Tensor, *, lam: float = 0.5, gamma: float = 0.0, cfg_base: float = 7.5,
                    cfg_slope: float = 1.0 / 200.0) -> tuple[torch.Tensor, torch.Tensor]:
    """TADSR's TAVSD: t_v = ⌊λ t_s + γ⌋ and CFG = cfg_base + cfg_slope · t_v, per sample.

    t_s (B,) integer-valued -> (t_v (B,) int64, cfg (B,) float32), on t_s's device.
    """
    t_v = torch.floor(lam * t_s.double() + gamma).long()  # (B,)
    if bool(((t_v < 0) | (t_v >= T_COUNT)).any()):
        raise ValueError(f"TAVSD t_v = floor({lam}·t_s + {gamma}) leaves [0, {T_COUNT - 1}] for t_s = "
                         f"{t_s.tolist()}; keep λ·t_s + γ in [0, 999] (TADSR: λ = 0.5, γ = 0).")
    cfg = (cfg_base + cfg_slope * t_v.double()).float()  # (B,)
    return t_v, cfg


def das_timesteps(t: torch.Tensor, generator: torch.Generator, config: LDGConfig = DEFAULT_LDG) -> torch.Tensor:
    """RCOD's DAS: t_r ~ U_int[max(20, t − k), min(980, t + k)] inclusive; t (B,) -> (B,) int64 on t's device."""
    return sample_das_timestep(t, generator, config).long()  # (B,)

"""Latent domain grouping (LDG) and degradation-aware sampling (DAS) ranges of RCOD (SPEC.md §6.1–6.2).

Paper: "Realism Control One-step Diffusion for Real-World Image Super-Resolution" (RCOD), §Methodology, Alg. 1.

Symbols:

* ``z_lq``, ``z_hq``: the VAE latents z_L and z_H of the LQ and HQ image (B, 4, h, w).
* ``m``: the latent metric M_L = cos(vec(z_L), vec(z_H)) per sample (Eq. 6).
* ``m_min``, ``m_max``: M_L-min and M_L-max, the extremes of M_L over the training data (Eq. 5).
* ``k``: the timestep interval; ``n``: the number of groups; ``q``: the group index.
* ``t``: the generator timestep k·(n − q) (Eq. 5); ``t_r``: the VSD teacher/regulariser timestep (Eq. 7).

Reconstruction choices ([RECON] in SPEC.md):

* M_min = 0.25 and M_max = 1.0 are inferred from the paper's worked example (M_L = 0.621 lies in [0.5, 0.75) and gives
  t = 500), which holds for n = 3 only with these bounds. ``scan_bounds`` measures them on a data scan instead.
* The group index is clamped to [0, n − 1]: without it M_L = M_max would give t = 0 and M_L < M_min would give t > k·n.

Named levels: the paper's n = 3 levels are Fidelity (t = 250), Neutral (500) and Realism (750). For any config,
"fidelity" is the smallest timestep k, "realism" the largest k·n, and "neutral" the middle group k·⌈n/2⌉ (the lower
middle when n is even; for n < 3 it coincides with a neighbour).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from .config_dict import DictConfig

DAS_T_MIN = 20
DAS_T_MAX = 980
LEVEL_NAMES = ("fidelity", "neutral", "realism")


@dataclass(frozen=True)
class LDGConfig(DictConfig):
    """Eq. 5 hyperparameters: timestep interval ``k``, group count ``n`` and the M_L bounds [m_min, m_max]."""

    k: int = 250
    n: int = 3
    m_min: float = 0.25
    m_max: float = 1.0

    def __post_init__(self) -> None:
        for name in ("k", "n"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"`{name}` must be a positive integer; got {value!r}. The paper uses k=250, n=3.")
        if self.k * self.n > 999:
            raise ValueError(
                f"`k * n` must be at most 999 (the largest DDPM timestep); got k={self.k}, n={self.n} "
                f"(k * n = {self.k * self.n}). Lower k or n, e.g. k=250, n=3."
            )
        for name in ("m_min", "m_max"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
                raise ValueError(f"`{name}` must be a finite number; got {value!r}.")
        if not self.m_min < self.m_max:
            raise ValueError(
                f"`m_min` must be smaller than `m_max`; got m_min={self.m_min}, m_max={self.m_max}. "
                "Use the extremes of M_L over the training data (default 0.25 and 1.0)."
            )

    @property
    def timesteps(self) -> tuple[int, ...]:
        """The n level timesteps in increasing order: k, 2k, ..., n·k."""
        return tuple(self.k * (i + 1) for i in range(self.n))


DEFAULT_LDG = LDGConfig()


def level_timesteps(config: LDGConfig = DEFAULT_LDG) -> dict[str, int]:
    """The named inference levels of ``config``: fidelity = k, neutral = k·⌈n/2⌉, realism = k·n."""
    return {"fidelity": config.k, "neutral": config.k * ((config.n + 1) // 2), "realism": config.k * config.n}


LEVELS = level_timesteps(DEFAULT_LDG)  # {"fidelity": 250, "neutral": 500, "realism": 750}


def named_timestep(name: str, config: LDGConfig = DEFAULT_LDG) -> int:
    """The timestep of the level ``name`` ("fidelity", "neutral" or "realism") under ``config``."""
    levels = level_timesteps(config)
    if name not in levels:
        raise ValueError(f"`level` must be one of {list(levels)}; got {name!r}.")
    return levels[name]


def latent_similarity(z_lq: torch.Tensor, z_hq: torch.Tensor) -> torch.Tensor:
    """Eq. 6: per-sample cosine of the flattened latents, (B, ...) x 2 -> (B,) float32 on the inputs' device."""
    if z_lq.shape != z_hq.shape or z_lq.ndim < 2 or z_lq.shape[0] == 0:
        raise ValueError(
            f"`z_lq` and `z_hq` must be non-empty batches of one shape (B, C, h, w); got {tuple(z_lq.shape)} and "
            f"{tuple(z_hq.shape)}. Encode the LQ and HQ images at the same size."
        )
    # fp32: the dot product sums C·h·w terms, and fp16 rounding would move M_L across the group boundaries.
    a = z_lq.flatten(1).float()  # (B, C*h*w)
    b = z_hq.flatten(1).float()  # (B, C*h*w)
    return F.cosine_similarity(a, b, dim=1, eps=1e-8)  # (B,)


def _check_metric(m: torch.Tensor) -> torch.Tensor:
    if not isinstance(m, torch.Tensor) or m.ndim != 1:
        shape = tuple(m.shape) if isinstance(m, torch.Tensor) else type(m).__name__
        raise ValueError(f"`m` must be a 1-D tensor of per-sample M_L values (B,); got {shape}.")
    if not bool(torch.isfinite(m).all()):
        raise ValueError(f"`m` must be finite; got {m.tolist()}. Check the latents for NaN/inf.")
    return m.float()


def group_index(m: torch.Tensor, config: LDGConfig = DEFAULT_LDG) -> torch.Tensor:
    """Eq. 5 group q = clamp(⌊n·(M_L − m_min)/(m_max − m_min)⌋, 0, n − 1), (B,) -> (B,) int64."""
    m = _check_metric(m)  # (B,)
    scaled = config.n * (m - config.m_min) / (config.m_max - config.m_min)  # (B,)
    return torch.floor(scaled).clamp(0, config.n - 1).long()  # (B,)


def level_timestep(m: torch.Tensor, config: LDGConfig = DEFAULT_LDG) -> torch.Tensor:
    """Eq. 5 timestep t = k·(n − q) from M_L, (B,) -> (B,) float32: high similarity -> small t (fidelity)."""
    q = group_index(m, config)  # (B,)
    return (config.k * (config.n - q)).float()  # (B,)


def das_range(t: torch.Tensor, config: LDGConfig = DEFAULT_LDG) -> tuple[torch.Tensor, torch.Tensor]:
    """Eq. 7 inclusive bounds [max(20, t − k), min(980, t + k)] per sample, (B,) -> two (B,) int64 tensors."""
    if not isinstance(t, torch.Tensor) or t.ndim != 1:
        raise ValueError(f"`t` must be a 1-D tensor of per-sample timesteps (B,); got {t!r}.")
    t_int = t.round().long()  # (B,)
    lo = (t_int - config.k).clamp(min=DAS_T_MIN)  # (B,)
    hi = (t_int + config.k).clamp(max=DAS_T_MAX)  # (B,)
    if bool((lo > hi).any()):
        raise ValueError(
            f"DAS range is empty for `t`={t.tolist()} with k={config.k}: [max(20, t - k), min(980, t + k)] needs "
            f"t + k >= 20 and t - k <= 980. Use LDG timesteps in [{config.k}, {config.k * config.n}] with k >= 10."
        )
    return lo, hi


def sample_das_timestep(t: torch.Tensor, generator: torch.Generator, config: LDGConfig = DEFAULT_LDG) -> torch.Tensor:
    """Eq. 7 t_r ~ U_int[max(20, t − k), min(980, t + k)] per sample, (B,) -> (B,) float32 integer values.

    Drawn on the CPU from ``generator`` (one uniform per sample, in order) and moved to ``t``'s device.
    """
    if not isinstance(generator, torch.Generator) or generator.device.type != "cpu":
        raise ValueError(f"`generator` must be a CPU torch.Generator; got {generator!r}. Use torch.Generator('cpu').")
    lo, hi = das_range(t, config)  # (B,), (B,)
    lo, hi = lo.cpu(), hi.cpu()
    # float64 uniforms: u·span stays strictly below span, so floor never lands one past hi.
    u = torch.rand(lo.shape, generator=generator, dtype=torch.float64)  # (B,)
    t_r = lo + torch.floor(u * (hi - lo + 1)).long()  # (B,)
    return t_r.clamp(max=hi).to(device=t.device, dtype=torch.float32)  # (B,)


def scan_bounds(similarities: torch.Tensor | Iterable[torch.Tensor]) -> tuple[float, float]:
    """(M_min, M_max) over a data scan: a tensor of M_L values or an iterable of such tensors (e.g. per batch).

    Use the result as ``LDGConfig(m_min=..., m_max=...)``; the paper defines both as training-set extremes.
    """
    chunks = [similarities] if isinstance(similarities, torch.Tensor) else similarities
    lo, hi, count = math.inf, -math.inf, 0
    for chunk in chunks:
        values = torch.as_tensor(chunk).detach().flatten().double()  # (N,)
        if values.numel() == 0:
            continue
        if not bool(torch.isfinite(values).all()):
            raise ValueError("`similarities` must be finite; the scan contains NaN or inf. Check the latents.")
        lo, hi = min(lo, float(values.min())), max(hi, float(values.max()))
        count += values.numel()
    if count == 0:
        raise ValueError("`similarities` is empty; scan at least one LQ/HQ pair to measure M_min and M_max.")
    return lo, hi

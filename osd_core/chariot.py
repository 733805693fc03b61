"""CHARIOT: anchored rescheduling of the timestep and energy-normalised noise mixing (SPEC.md §5.4).

Paper: "Adaptive Inversion and Degradation-aware Sampling for Real-ISR" (IDaS-SR), §3.3 Eq. 7–8 and supp. F.3
Eq. 18–21. With MINE's timestep τ and inversion noise ε_inv, a steering scalar s ∈ [0, 1] and noise ε:

    t′      = τ + s (t_max − τ)                                       Eq. 8 / 18, t_max = 999
    ε_raw   = (1 − s) ε_inv + s ε                                     Eq. 19
    σ_tgt   = (1 − s) std_b(ε_inv) + s                                Eq. 20 ("std" energy mode)
            = √((1 − s) std_b(ε_inv)² + s)                            ("var" energy mode, equally plausible)
    ε_mix   = σ_tgt · ε_raw / (std_b(ε_raw) + δ)                      Eq. 7 / 21

std_b is the per-sample std over (C, H, W). At s = 0: t′ = τ and ε_mix = ε_inv · std/(std + δ) (the deterministic
MINE path); at s = 1: t′ = t_max and ε_mix = ε / (std(ε) + δ), unit energy (the fully generative prior).
The noisy latent is then z_t = α(t′) z_L + σ(t′) ε_mix (Eq. 22), built by the caller with ``NoiseSchedule``.

Reconstruction choices ([RECON] in SPEC): the linear mix (the paper's "variance shrinkage" sentence rules out
√(1−s²) weights), δ = 1e-6, t_max = 999, and the std guard √(mean((x − x̄)²) + 1e-8), whose gradient stays finite at
zero variance (ε_inv *is* zero for a freshly initialised MINE, where torch.std's gradient would be infinite). The
normalisation rescales only; it does not remove the mean. ``s_max`` = 0.9 is the cap the UI applies (the paper's
Tab. 5 and Fig. 6 stop there); the functions here accept the whole of [0, 1].

ε is an input: any unit-variance noise source can be mixed in place of plain N(0, I), e.g. CODSR's Sobel-weighted
region-adaptive noise. When ε is not given, it is drawn on the CPU from a seed or a CPU ``torch.Generator``.

Tiled inference (§5.7) applies this per latent tile with the tile's slice of one full-size ε; std_b is then per tile.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .config_dict import DictConfig
from .noise import gaussian_noise

ENERGY_MODES = ("std", "var")


@dataclass(frozen=True)
class ChariotConfig(DictConfig):
    """CHARIOT constants (SPEC §5.4): t_max, δ, the std guard, the target-energy form and the UI cap on s."""

    t_max: float = 999.0
    delta: float = 1e-6
    std_eps: float = 1e-8
    energy_mode: str = "std"
    s_max: float = 0.9

    def __post_init__(self) -> None:
        if not (math.isfinite(self.t_max) and self.t_max > 0):
            raise ValueError(f"`t_max` must be a positive finite timestep; got {self.t_max!r}. Use 999.")
        if not (math.isfinite(self.delta) and self.delta >= 0):
            raise ValueError(f"`delta` must be finite and >= 0; got {self.delta!r}. Use 1e-6.")
        if not (math.isfinite(self.std_eps) and self.std_eps > 0):
            raise ValueError(f"`std_eps` must be finite and > 0 (it keeps the std gradient finite); got "
                             f"{self.std_eps!r}. Use 1e-8.")
        if self.energy_mode not in ENERGY_MODES:
            raise ValueError(f"`energy_mode` must be one of {ENERGY_MODES}; got {self.energy_mode!r}.")
        if not 0 <= self.s_max <= 1:
            raise ValueError(f"`s_max` must be in [0, 1]; got {self.s_max!r}. Use 0.9.")


def _steering(s: float | torch.Tensor, batch: int, like: torch.Tensor) -> torch.Tensor:
    """Validate s (a number, a 0-d tensor or one value per sample) -> (B,) in ``like``'s device and float dtype."""
    s = torch.as_tensor(s).to(device=like.device, dtype=like.dtype if like.is_floating_point() else torch.float32)
    if s.ndim > 1 or (s.ndim == 1 and s.shape[0] not in (1, batch)):
        raise ValueError(f"`s` must be a number or a ({batch},) tensor, one value per sample; got shape "
                         f"{tuple(s.shape)}.")
    bad = torch.isnan(s) | (s < 0) | (s > 1)
    if bool(bad.any()):
        raise ValueError(f"`s` must be in [0, 1]; got {s.detach().flatten().tolist()[:4]}. "
                         "Use 0 for pure restoration, up to 0.9 for more generated detail.")
    return s.expand(batch)  # (B,)


def reschedule(tau: torch.Tensor, s: float | torch.Tensor, t_max: float = 999.0) -> torch.Tensor:
    """t′ = τ + s (t_max − τ) (Eq. 8 / 18); τ (B,) float, s a number or (B,) -> (B,). d t′/d τ = 1 − s."""
    if tau.ndim != 1 or not tau.is_floating_point():
        raise ValueError(f"`tau` must be a (B,) float tensor; got shape {tuple(tau.shape)}, dtype {tau.dtype}.")
    s = _steering(s, tau.shape[0], tau)  # (B,)
    return tau + s * (t_max - tau)  # (B,)


def safe_std(x: torch.Tensor, std_eps: float = 1e-8) -> torch.Tensor:
    """Per-sample std over all but the batch dim, √(mean((x − x̄)²) + std_eps), float32 -> (B,).

    Upcast to float32 because the 1e-8 guard is below fp16's smallest subnormal.
    """
    flat = x.float().flatten(1)  # (B, C·H·W)
    var = (flat - flat.mean(dim=1, keepdim=True)).square().mean(dim=1)  # (B,)
    return (var + std_eps).sqrt()  # (B,)


def mix_noise(
    eps_inv: torch.Tensor,
    eps: torch.Tensor,
    s: float | torch.Tensor,
    *,
    energy_mode: str = "std",
    delta: float = 1e-6,
    std_eps: float = 1e-8,
) -> torch.Tensor:
    """ε_mix = σ_tgt · ε_raw / (std_b(ε_raw) + δ) (Eq. 19–21); ε_inv, ε (B, C, H, W), s a number or (B,).

    Computed in float32, returned in ε_inv's dtype.
    """
    if eps.shape != eps_inv.shape:
        raise ValueError(f"`eps` must have the shape of `eps_inv` {tuple(eps_inv.shape)}; got {tuple(eps.shape)}.")
    if energy_mode not in ENERGY_MODES:
        raise ValueError(f"`energy_mode` must be one of {ENERGY_MODES}; got {energy_mode!r}.")
    inv = eps_inv.float()  # (B, C, H, W)
    s = _steering(s, inv.shape[0], inv)  # (B,)
    std_inv = safe_std(inv, std_eps)  # (B,)
    if energy_mode == "std":
        sigma_tgt = (1 - s) * std_inv + s  # (B,)
    else:
        sigma_tgt = ((1 - s) * std_inv.square() + s).sqrt()  # (B,)
    s4 = s.view(-1, 1, 1, 1)  # (B, 1, 1, 1)
    eps_raw = (1 - s4) * inv + s4 * eps.to(device=inv.device, dtype=torch.float32)  # (B, C, H, W)
    scale = sigma_tgt / (safe_std(eps_raw, std_eps) + delta)  # (B,)
    return (scale.view(-1, 1, 1, 1) * eps_raw).to(eps_inv.dtype)  # (B, C, H, W)


def _draw(eps_inv: torch.Tensor, generator: torch.Generator | None, seed: int | None) -> torch.Tensor:
    """N(0, I) like ``eps_inv``, drawn on the CPU from exactly one of ``generator`` and ``seed``."""
    if (generator is None) == (seed is None):
        raise ValueError("pass exactly one noise source to `chariot`: `eps`, `generator` (a CPU torch.Generator) "
                         "or `seed`; got none or several.")
    if seed is not None:
        per_item = tuple(eps_inv.shape[1:])
        return gaussian_noise(per_item, seed, batch=eps_inv.shape[0], device=eps_inv.device, dtype=eps_inv.dtype)
    if generator.device.type != "cpu":
        raise ValueError(f"`generator` must be a CPU torch.Generator (noise is drawn on the CPU so a seed gives the "
                         f"same image on any device); got one on {generator.device}.")
    eps = torch.randn(tuple(eps_inv.shape), generator=generator, device=generator.device)  # (B, C, H, W)
    return eps.to(device=eps_inv.device, dtype=eps_inv.dtype)  # (B, C, H, W)


def chariot(
    tau: torch.Tensor,
    eps_inv: torch.Tensor,
    s: float | torch.Tensor,
    *,
    eps: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    seed: int | None = None,
    config: ChariotConfig = ChariotConfig(),
) -> tuple[torch.Tensor, torch.Tensor]:
    """(t′ (B,), ε_mix (B, C, H, W)) from τ (B,), ε_inv (B, C, H, W) and s (a number or (B,) in [0, 1]).

    The noise ε is ``eps`` when given (any unit-variance source, e.g. CODSR's Sobel-weighted noise), otherwise
    N(0, I) drawn on the CPU from ``generator`` or from ``seed`` (with a seed every batch item gets the noise of its
    single-item run, see :func:`osd_core.noise.gaussian_noise`). Give exactly one of the three.
    """
    if eps_inv.ndim != 4 or eps_inv.shape[0] != tau.shape[0]:
        raise ValueError(f"`eps_inv` must be (B, C, H, W) with B = len(tau) = {tau.shape[0]}; got shape "
                         f"{tuple(eps_inv.shape)}.")
    if eps is None:
        eps = _draw(eps_inv, generator, seed)  # (B, C, H, W)
    elif generator is not None or seed is not None:
        raise ValueError("pass exactly one noise source to `chariot`: `eps`, `generator` or `seed`; got `eps` and "
                         "another.")
    t_prime = reschedule(tau, s, config.t_max)  # (B,)
    eps_mix = mix_noise(eps_inv, eps, s, energy_mode=config.energy_mode, delta=config.delta,
                        std_eps=config.std_eps)  # (B, C, H, W)
    return t_prime, eps_mix

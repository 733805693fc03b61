"""The x̂₀ parameterisations of the one-step generators (SPEC.md §0.6).

z_L is the LQ latent, z_in the U-Net input at timestep t, ε̂ = UNet(z_in, t, c), ε the injected noise (if any):

    (S) standard ε→x₀     x̂₀ = (z_in − σ_t ε̂) / α_t        OSEDiff (t = 999), RCOD, IDaS-SR, HYPIR
    (R) scaled residual    x̂₀ = z_L / α_t − ε̂               TADSR (what its released weights expect)
    (P) plain residual     x̂₀ = z_L − ε̂                     PiSA-SR (t = 1)
    (N) noise residual     x̂₀ = z_L + w_t (ε − ε̂)           CODSR; equals (S) when z_in = α_t z_L + σ_t ε

z_in = z_L when no noise is injected, else α_t z_L + σ_t ε.
"""

from __future__ import annotations

from enum import Enum

import torch

from .schedule import NoiseSchedule, per_sample


class Parameterisation(str, Enum):
    """How a bundle's U-Net output ε̂ becomes x̂₀; the value is the letter stored in bundle metadata."""

    STANDARD = "S"
    SCALED_RESIDUAL = "R"
    PLAIN_RESIDUAL = "P"
    NOISE_RESIDUAL = "N"

    @classmethod
    def parse(cls, value: str | Parameterisation) -> Parameterisation:
        """Accept a member, its letter ("S") or its name ("standard", "scaled_residual", ...)."""
        if isinstance(value, cls):
            return value
        text = str(value).strip()
        name = text.lower().replace("-", "_").replace(" ", "_")
        for member in cls:
            if text.upper() == member.value or name == member.name.lower():
                return member
        choices = ", ".join(f"{m.value} ({m.name.lower()})" for m in cls)
        raise ValueError(f"unknown x0 parameterisation {value!r}; expected one of {choices}.")


def noisy_latent(
    z_lq: torch.Tensor, t: torch.Tensor, schedule: NoiseSchedule, noise: torch.Tensor | None = None
) -> torch.Tensor:
    """z_in: z_lq (B, 4, h, w) itself, or α_t z_lq + σ_t ε when ``noise`` (B, 4, h, w) is given."""
    if noise is None:
        return z_lq
    return per_sample(schedule.alpha(t), z_lq) * z_lq + per_sample(schedule.sigma(t), z_lq) * noise  # (B, 4, h, w)


def predict_x0(
    kind: Parameterisation | str,
    *,
    z_in: torch.Tensor,
    z_lq: torch.Tensor,
    eps_hat: torch.Tensor,
    t: torch.Tensor,
    schedule: NoiseSchedule,
    noise: torch.Tensor | None = None,
) -> torch.Tensor:
    """x̂₀ (B, 4, h, w) by parameterisation ``kind``; t (B,) float, all latents (B, 4, h, w).

    ``z_in`` is only read by (S), ``noise`` only by (N) (None there means ε = 0); ``kind`` is a member or anything
    :meth:`Parameterisation.parse` accepts.
    """
    kind = Parameterisation.parse(kind)
    if kind is Parameterisation.STANDARD:
        alpha, sigma = per_sample(schedule.alpha(t), z_in), per_sample(schedule.sigma(t), z_in)
        return (z_in - sigma * eps_hat) / alpha
    if kind is Parameterisation.SCALED_RESIDUAL:
        return z_lq / per_sample(schedule.alpha(t), z_lq) - eps_hat
    if kind is Parameterisation.PLAIN_RESIDUAL:
        return z_lq - eps_hat
    w = per_sample(schedule.w(t), z_lq)  # (B, 1, 1, 1)
    if noise is None:  # no injected noise: ε = 0
        return z_lq - w * eps_hat
    return z_lq + w * (noise - eps_hat)

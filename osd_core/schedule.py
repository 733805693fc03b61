"""The DDPM noise schedule of SD 2.1-base at integer and continuous timesteps (SPEC.md §0.1, §5.3).

Symbols: ᾱ_t = ``alphas_cumprod[t]``, α_t = √ᾱ_t, σ_t = √(1 − ᾱ_t), w_t = σ_t / α_t.

Continuous t (IDaS-SR Eq. 16): α and σ are interpolated *separately* and piecewise-linearly between the integer
tables, k₀ = clamp(⌊t⌋, 0, T−2), frac = t − k₀ (the floor is detached, so d α/d t = α_{k₀+1} − α_{k₀}):

    α(t) = (1 − frac) α_{k₀} + frac α_{k₀+1},    σ(t) likewise.

At integer t this is exactly the table. We never call ``DDPMScheduler.step`` (x̂₀ is computed in closed form), so the
scheduler's ``clip_sample`` flag, which would clamp x̂₀ to ±1 and destroy latents, plays no part here.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch

BETA_SCHEDULES = ("scaled_linear", "linear")


@dataclass(frozen=True)
class ScheduleConfig:
    """The betas of a DDPM schedule (SD 2.1-base defaults: scaled_linear, 0.00085 → 0.012, T = 1000)."""

    num_train_timesteps: int = 1000
    beta_start: float = 0.00085
    beta_end: float = 0.012
    beta_schedule: str = "scaled_linear"

    def __post_init__(self) -> None:
        steps = self.num_train_timesteps
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 2:
            raise ValueError(f"`num_train_timesteps` must be an integer of at least 2; got {steps!r}. SD uses 1000.")
        if not 0 < self.beta_start < self.beta_end < 1:
            raise ValueError(
                f"betas must satisfy 0 < beta_start < beta_end < 1; got {self.beta_start} and {self.beta_end}."
            )
        if self.beta_schedule not in BETA_SCHEDULES:
            raise ValueError(f"`beta_schedule` must be one of {BETA_SCHEDULES}; got {self.beta_schedule!r}.")

    @classmethod
    def from_diffusers(cls, config: dict) -> ScheduleConfig:
        """Read a diffusers ``scheduler_config.json`` dict; keys that do not define the betas are ignored.

        ``clip_sample`` (True by DDPMScheduler's default) is ignored on purpose: it only acts inside
        ``scheduler.step``, which we never call, since x̂₀ is computed in closed form (parameterisation.py).
        """
        prediction = config.get("prediction_type", "epsilon")
        if prediction != "epsilon":
            raise ValueError(
                f"the scheduler's `prediction_type` is {prediction!r}; one-step SR here needs an epsilon-prediction "
                "model such as SD 2.1-base or SD-Turbo (not the 768-v model)."
            )
        if config.get("trained_betas") is not None:
            raise ValueError(
                "the scheduler config sets `trained_betas`; only the `linear` and `scaled_linear` beta schedules are "
                "supported. Use SD 2.1-base's scheduler_config.json."
            )
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in config.items() if k in names})


class NoiseSchedule:
    """ᾱ tables and α/σ/w at float timesteps; tables are cached per device in float32."""

    def __init__(self, config: ScheduleConfig = ScheduleConfig()) -> None:
        self.config = config
        t_count = config.num_train_timesteps
        if config.beta_schedule == "scaled_linear":
            betas = torch.linspace(config.beta_start ** 0.5, config.beta_end ** 0.5, t_count, dtype=torch.float64) ** 2
        else:
            betas = torch.linspace(config.beta_start, config.beta_end, t_count, dtype=torch.float64)
        self.alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)  # (T,) float64
        self._alpha_table = self.alphas_cumprod.sqrt()  # (T,)
        self._sigma_table = (1.0 - self.alphas_cumprod).sqrt()  # (T,)
        self._cache: dict[tuple[torch.device, torch.dtype], tuple[torch.Tensor, torch.Tensor]] = {}

    @property
    def t_max(self) -> int:
        return self.config.num_train_timesteps - 1

    def _tables(self, device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        key = (device, dtype)
        if key not in self._cache:
            self._cache[key] = (self._alpha_table.to(device, dtype), self._sigma_table.to(device, dtype))
        return self._cache[key]

    def _check(self, t: torch.Tensor) -> torch.Tensor:
        if not torch.is_tensor(t):
            t = torch.as_tensor(t, dtype=torch.float32)
        if not t.is_floating_point():
            t = t.float()
        bad = ~torch.isfinite(t) | (t < 0) | (t > self.t_max)
        if bool(bad.any()):
            raise ValueError(
                f"`timestep` must be finite and in [0, {self.t_max}]; got {t.detach()[bad].flatten()[:4].tolist()}. "
                f"Clamp it to [0, {self.t_max}] (e.g. 999 for OSEDiff)."
            )
        return t

    def _interpolate(self, t: torch.Tensor, which: int) -> torch.Tensor:
        t = self._check(t)
        dtype = torch.float64 if t.dtype == torch.float64 else torch.float32
        table = self._tables(t.device, dtype)[which]
        k0 = t.detach().floor().clamp(0, self.t_max - 1).long()  # (B,)
        frac = t.to(dtype) - k0.to(dtype)  # (B,) keeps the gradient in t
        return (1 - frac) * table[k0] + frac * table[k0 + 1]  # (B,)

    def alpha(self, t: torch.Tensor) -> torch.Tensor:
        """α(t) = √ᾱ, piecewise linear in t; t (B,) float -> (B,) on t's device."""
        return self._interpolate(t, 0)

    def sigma(self, t: torch.Tensor) -> torch.Tensor:
        """σ(t) = √(1 − ᾱ), piecewise linear in t; t (B,) float -> (B,)."""
        return self._interpolate(t, 1)

    def w(self, t: torch.Tensor) -> torch.Tensor:
        """w(t) = σ(t) / α(t)."""
        return self.sigma(t) / self.alpha(t)


def per_sample(x: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Reshape a per-sample (B,) tensor to broadcast over ``like`` (B, C, H, W): (B, 1, 1, 1) in like's dtype.

    This is the schedule's broadcast helper: ``per_sample(schedule.alpha(t), z) * z`` scales each item by its own α_t.
    """
    return x.reshape(-1, *([1] * (like.ndim - 1))).to(like.dtype)

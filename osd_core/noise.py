"""Seeded Gaussian noise drawn on the CPU, so a seed gives the same image on any device.

Every item of a batch gets the noise its single-item run would get with the same seed: a batch then equals its
single runs, and the frames of a video share one noise pattern (less flicker).
"""

from __future__ import annotations

import torch

MAX_SEED = 2**64 - 1


def cpu_generator(seed: int) -> torch.Generator:
    """A CPU generator for ``seed`` in [0, 2**64 - 1] (ComfyUI's seed widget range)."""
    if not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed <= MAX_SEED:
        raise ValueError(f"`seed` must be an integer in [0, 2**64 - 1]; got {seed!r}.")
    return torch.Generator("cpu").manual_seed(seed)


def gaussian_noise(
    shape: tuple[int, ...], seed: int, *, batch: int, device: torch.device | str, dtype: torch.dtype
) -> torch.Tensor:
    """N(0, I) of per-item ``shape`` (C, h, w), the same draw for each of ``batch`` items -> (batch, C, h, w)."""
    if batch < 1:
        raise ValueError(f"`batch` must be at least 1; got {batch}.")
    eps = torch.randn(tuple(shape), generator=cpu_generator(seed), dtype=torch.float32)  # (C, h, w)
    return eps.expand(batch, *eps.shape).to(device=device, dtype=dtype)  # (batch, C, h, w)

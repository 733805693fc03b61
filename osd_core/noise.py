"""Seeded Gaussian noise drawn on the CPU, so a seed gives the same image on any device.

Every item of a batch gets the noise its single-item run would get with the same seed: a batch then equals its
single runs, and the frames of a video share one noise pattern (less flicker). This is a deliberate choice; a
caller who wants different noise per item passes different seeds.
"""

from __future__ import annotations

import operator

import torch

MAX_SEED = 2**64 - 1


def cpu_generator(seed: int) -> torch.Generator:
    """A CPU generator for ``seed`` in [0, 2**64 - 1] (ComfyUI's seed widget range)."""
    try:
        value = None if isinstance(seed, bool) else operator.index(seed)
    except TypeError:
        value = None
    if value is None or not 0 <= value <= MAX_SEED:
        raise ValueError(f"`seed` must be an integer in [0, 2**64 - 1]; got {seed!r}.")
    return torch.Generator("cpu").manual_seed(value)


def gaussian_noise(
    shape: tuple[int, ...], seed: int, *, batch: int, device: torch.device | str, dtype: torch.dtype
) -> torch.Tensor:
    """N(0, I) of per-item ``shape`` (C, h, w), the same draw for each of ``batch`` items -> (batch, C, h, w).

    Drawn in float32 on the CPU, then moved to ``device`` and cast to ``dtype``; the result is a fresh contiguous
    tensor (safe for in-place use).
    """
    if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
        raise ValueError(f"`batch` must be an integer of at least 1; got {batch!r}.")
    shape = tuple(shape)
    if not shape or any(isinstance(n, bool) or not isinstance(n, int) or n < 1 for n in shape):
        raise ValueError(f"`shape` must be the per-item shape, e.g. (4, h, w), of positive integers; got {shape}.")
    eps = torch.randn(shape, generator=cpu_generator(seed), dtype=torch.float32)  # (C, h, w)
    eps = eps.to(device=device, dtype=dtype)  # (C, h, w) moved once, before the batch copy
    return eps.unsqueeze(0).repeat(batch, *([1] * len(shape)))  # (batch, C, h, w)

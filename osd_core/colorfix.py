"""Colour correction of the SR output against the upsampled LQ image (SPEC.md §9; StableSR's wavelet_color_fix).

AdaIN:    out = (target − μ_t) / σ_t · σ_s + μ_s per channel, σ from the unbiased variance + 1e-5.
Wavelet:  five levels i = 0..4 of a dilated (r = 2^i) 3×3 binomial blur with replicate padding split an image into
          high = Σ (img − blur(img)) and the final low-pass; out = high(target) + low(source).
Both clamp to [0, 1]. Inputs (B, 3, H, W) in [0, 1] of the same size; computed in float32, returned in the target's
dtype.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

METHODS = ("adain", "wavelet", "none")
ADAIN_EPS = 1e-5
WAVELET_LEVELS = 5


def _check(target: torch.Tensor, source: torch.Tensor) -> None:
    if target.shape[-2:] != source.shape[-2:] or target.shape[1] != source.shape[1]:
        raise ValueError(
            f"colour fix needs a reference of the output's size; got output {tuple(target.shape)} and reference "
            f"{tuple(source.shape)}. Resize the reference to the output size first."
        )


def adain_color_fix(target: torch.Tensor, source: torch.Tensor) -> torch.Tensor:
    _check(target, source)
    t, s = target.float(), source.float()
    t_mean, s_mean = t.mean(dim=(-2, -1), keepdim=True), s.mean(dim=(-2, -1), keepdim=True)  # (B, 3, 1, 1)
    t_std = (t.var(dim=(-2, -1), keepdim=True) + ADAIN_EPS).sqrt()  # (B, 3, 1, 1)
    s_std = (s.var(dim=(-2, -1), keepdim=True) + ADAIN_EPS).sqrt()  # (B, 3, 1, 1)
    out = (t - t_mean) / t_std * s_std + s_mean  # (B, 3, H, W)
    return out.clamp(0.0, 1.0).to(target.dtype)


def _binomial_blur(x: torch.Tensor, radius: int) -> torch.Tensor:
    kernel = torch.tensor([[1.0, 2.0, 1.0], [2.0, 4.0, 2.0], [1.0, 2.0, 1.0]], device=x.device) / 16.0
    kernel = kernel.expand(x.shape[1], 1, 3, 3)  # (C, 1, 3, 3) depthwise
    x = F.pad(x, (radius,) * 4, mode="replicate")
    return F.conv2d(x, kernel, groups=x.shape[1], dilation=radius)  # (B, C, H, W)


def wavelet_decomposition(x: torch.Tensor, levels: int = WAVELET_LEVELS) -> tuple[torch.Tensor, torch.Tensor]:
    """(high, low) with high + low == x: the summed detail bands and the final low-pass."""
    high = torch.zeros_like(x)
    for i in range(levels):
        low = _binomial_blur(x, 2**i)
        high = high + (x - low)
        x = low
    return high, x


def wavelet_color_fix(target: torch.Tensor, source: torch.Tensor) -> torch.Tensor:
    _check(target, source)
    high, _ = wavelet_decomposition(target.float())
    _, low = wavelet_decomposition(source.float())
    return (high + low).clamp(0.0, 1.0).to(target.dtype)


def color_fix(target: torch.Tensor, source: torch.Tensor, method: str) -> torch.Tensor:
    """Apply ``method`` in {"adain", "wavelet", "none"}."""
    if method == "adain":
        return adain_color_fix(target, source)
    if method == "wavelet":
        return wavelet_color_fix(target, source)
    if method == "none":
        return target
    raise ValueError(f"`method` must be one of {METHODS}; got {method!r}.")

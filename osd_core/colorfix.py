"""Colour correction of the SR output against the upsampled LQ image (SPEC.md §9; StableSR's wavelet_color_fix).

AdaIN:    out = (target − μ_t) / σ_t · σ_s + μ_s per channel, σ from the unbiased variance + 1e-5.
Wavelet:  five levels i = 0..4 of a dilated (r = 2^i) 3×3 binomial blur with replicate padding split an image into
          high = Σ (img − blur(img)) and the final low-pass; out = high(target) + low(source).
Both clamp to [0, 1]. Inputs (B, 3, H, W) in [0, 1] of the same size (a single reference may serve a whole batch);
computed in float32, returned in the target's dtype.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

METHODS = ("adain", "wavelet", "none")
ADAIN_EPS = 1e-5
WAVELET_LEVELS = 5


def _check(target: torch.Tensor, source: torch.Tensor) -> None:
    if target.ndim != 4 or source.ndim != 4:
        raise ValueError(
            f"colour fix takes (B, C, H, W) images; got output {tuple(target.shape)} and reference "
            f"{tuple(source.shape)}."
        )
    if target.shape[1:] != source.shape[1:]:
        raise ValueError(
            f"colour fix needs a reference of the output's size; got output {tuple(target.shape)} and reference "
            f"{tuple(source.shape)}. Resize the reference to the output size first."
        )
    if source.shape[0] not in (1, target.shape[0]):
        raise ValueError(
            f"the reference batch has {source.shape[0]} images but the output has {target.shape[0]}; "
            "give one reference per image (or a single reference for all)."
        )


def adain_color_fix(target: torch.Tensor, source: torch.Tensor) -> torch.Tensor:
    """Per-channel mean/std transfer from source to target; (B, C, H, W) in [0, 1] -> target's dtype, clamped."""
    _check(target, source)
    if target.shape[-2] * target.shape[-1] < 2:
        raise ValueError(
            f"AdaIN colour fix needs at least 2 pixels (it uses the unbiased variance); got a "
            f"{target.shape[-1]}x{target.shape[-2]} image. Use `wavelet` or `none`."
        )
    t, s = target.float(), source.float()
    t_mean, s_mean = t.mean(dim=(-2, -1), keepdim=True), s.mean(dim=(-2, -1), keepdim=True)  # (B, C, 1, 1)
    t_std = (t.var(dim=(-2, -1), keepdim=True) + ADAIN_EPS).sqrt()  # (B, C, 1, 1) unbiased variance
    s_std = (s.var(dim=(-2, -1), keepdim=True) + ADAIN_EPS).sqrt()  # (B, C, 1, 1)
    out = (t - t_mean) / t_std * s_std + s_mean  # (B, C, H, W)
    return out.clamp(0.0, 1.0).to(target.dtype)


def _binomial_blur(x: torch.Tensor, radius: int) -> torch.Tensor:
    """Per-channel 3×3 binomial blur [[1, 2, 1], [2, 4, 2], [1, 2, 1]] / 16, dilation and replicate padding ``radius``.

    The kernel is the outer product of [1, 2, 1] / 4 with itself, so it runs as two 1-D passes of shifted slices:
    the same operator as the depthwise dilated conv, about twice as fast on the CPU and with no kernel to place.
    """
    r = radius
    x = F.pad(x, (r, r, r, r), mode="replicate")  # (B, C, H + 2r, W + 2r)
    x = x[..., : -2 * r, :] + 2 * x[..., r:-r, :] + x[..., 2 * r :, :]  # (B, C, H, W + 2r)
    x = x[..., : -2 * r] + 2 * x[..., r:-r] + x[..., 2 * r :]  # (B, C, H, W)
    return x / 16.0


def wavelet_decomposition(x: torch.Tensor, levels: int = WAVELET_LEVELS) -> tuple[torch.Tensor, torch.Tensor]:
    """(high, low) with high + low == x: the summed detail bands and the final low-pass."""
    high = torch.zeros_like(x)
    for i in range(levels):
        low = _binomial_blur(x, 2**i)
        high = high + (x - low)
        x = low
    return high, x


def wavelet_color_fix(target: torch.Tensor, source: torch.Tensor) -> torch.Tensor:
    """Target's detail bands plus the source's low-pass; (B, C, H, W) in [0, 1] -> target's dtype, clamped."""
    _check(target, source)
    high, _ = wavelet_decomposition(target.float())
    _, low = wavelet_decomposition(source.float())
    return (high + low).clamp(0.0, 1.0).to(target.dtype)


def color_fix(target: torch.Tensor, source: torch.Tensor, method: str) -> torch.Tensor:
    """Apply ``method`` in {"adain", "wavelet", "none"}; "none" returns ``target`` unchanged."""
    if method == "adain":
        return adain_color_fix(target, source)
    if method == "wavelet":
        return wavelet_color_fix(target, source)
    if method == "none":
        return target
    raise ValueError(f"`method` must be one of {METHODS}; got {method!r}.")

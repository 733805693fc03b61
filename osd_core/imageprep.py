"""Image preparation for the VAE: upsample by a float factor, pad to a multiple of 8, crop back (SPEC.md §0.3).

The references resize the upsampled image to a multiple of 8 (aspect drift, PEERS.md failure 10); we reflect-pad the
bottom/right edges instead and crop the result back, so the output is exactly round(H·f) × round(W·f). Grayscale
inputs are repeated to RGB; an alpha channel is upsampled on its own (bicubic, clamped) and kept for re-attachment.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

MIN_SIDE_PX = 8
DEFAULT_MAX_OUTPUT_PIXELS = 8192 * 8192


@dataclass(frozen=True)
class PixelFrame:
    """The exact output size (out_h, out_w) and the padded size (padded_h, padded_w) the VAE sees."""

    out_h: int
    out_w: int
    padded_h: int
    padded_w: int


@dataclass(frozen=True)
class PreparedImage:
    """x (B, 3, Hp, Wp) float32 in [-1, 1]; x_up01 (B, 3, H, W) in [0, 1]; alpha (B, 1, H, W) in [0, 1] or None."""

    x: torch.Tensor
    x_up01: torch.Tensor
    alpha: torch.Tensor | None
    frame: PixelFrame


def to_unit_range(x: torch.Tensor) -> torch.Tensor:
    """[-1, 1] -> [0, 1]."""
    return (x + 1.0) / 2.0


def to_signed_range(x: torch.Tensor) -> torch.Tensor:
    """[0, 1] -> [-1, 1]."""
    return x * 2.0 - 1.0


def resize_image(x: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """Bicubic resize of (B, C, H, W) in [0, 1] to (B, C, h, w) float32, clamped to [0, 1] (bicubic overshoots).

    At the same size the pixels are copied without interpolation (still clamped, never aliasing ``x``).
    """
    x = x.float()
    if tuple(x.shape[-2:]) != (h, w):
        x = F.interpolate(x, size=(h, w), mode="bicubic", align_corners=False)  # (B, C, h, w)
    return x.clamp(0.0, 1.0)


def _check_image(image: torch.Tensor) -> None:
    if not torch.is_tensor(image) or image.ndim != 4 or image.shape[0] == 0:
        shape = tuple(image.shape) if torch.is_tensor(image) else type(image).__name__
        raise ValueError(f"`image` must be a non-empty batch (B, C, H, W); got {shape}. Connect an IMAGE.")
    _, c, h, w = image.shape
    if c not in (1, 3, 4):
        raise ValueError(f"`image` must have 1 (gray), 3 (RGB) or 4 (RGBA) channels; got {c}. Convert it to RGB.")
    if not image.is_floating_point():
        raise ValueError(f"`image` must be float in [0, 1]; got dtype {image.dtype}. Divide 8-bit data by 255.")
    bad = int((~torch.isfinite(image)).sum().item())
    if bad:
        raise ValueError(
            f"`image` contains {bad} NaN or Inf values; fix the node that produced it (or clamp it) first."
        )
    if min(h, w) < MIN_SIDE_PX:
        raise ValueError(
            f"`image` is {w}x{h} px; one-step SR needs at least {MIN_SIDE_PX} px per side. Resize it first."
        )


def _largest_factor(h: int, w: int, max_output_pixels: int) -> float:
    """The largest factor, in steps of 0.01, whose rounded output round(h·f) × round(w·f) fits the cap."""

    def fits(step: int) -> bool:
        return round(h * step / 100) * round(w * step / 100) <= max_output_pixels

    step = math.floor(math.sqrt(max_output_pixels / (h * w)) * 100)  # near the answer; rounding moves it a little
    while step > 1 and not fits(step):
        step -= 1
    while fits(step + 1):
        step += 1
    return step / 100


def _validate(image: torch.Tensor, factor: float, max_output_pixels: int, multiple: int) -> tuple[int, int]:
    _check_image(image)
    h, w = image.shape[-2:]
    if isinstance(factor, bool) or not isinstance(factor, (int, float)) or not math.isfinite(factor) or factor <= 0:
        raise ValueError(f"`upscale_factor` must be a positive number; got {factor}. Use e.g. 4.0 (or 1.0 to restore).")
    if isinstance(multiple, bool) or not isinstance(multiple, int) or multiple < 1:
        raise ValueError(f"`multiple` must be a positive integer; got {multiple!r}. The SD VAE needs 8.")
    out_h, out_w = round(h * factor), round(w * factor)
    if min(out_h, out_w) < MIN_SIDE_PX:
        raise ValueError(
            f"`upscale_factor` {factor} makes the {w}x{h} image {out_w}x{out_h} px; the output needs at least "
            f"{MIN_SIDE_PX} px per side. Use a larger factor."
        )
    if out_h * out_w > max_output_pixels:
        raise ValueError(
            f"`upscale_factor` {factor} makes a {out_w}x{out_h} output ({out_h * out_w / 1e6:.1f} MP), above the "
            f"cap of {max_output_pixels / 1e6:.1f} MP ({max_output_pixels} px). Use a factor of at most "
            f"{_largest_factor(h, w, max_output_pixels)} or raise `max_output_megapixels`."
        )
    return out_h, out_w


def _reflect_pad(x: torch.Tensor, pad_h: int, pad_w: int) -> torch.Tensor:
    """Reflect-pad bottom/right; pads longer than the side are done in reflect steps (then replicate for 1-px)."""
    while pad_h or pad_w:
        step_h, step_w = min(pad_h, x.shape[-2] - 1), min(pad_w, x.shape[-1] - 1)
        if step_h == 0 and step_w == 0:
            return F.pad(x, (0, pad_w, 0, pad_h), mode="replicate")
        x = F.pad(x, (0, step_w, 0, step_h), mode="reflect")
        pad_h, pad_w = pad_h - step_h, pad_w - step_w
    return x


def prepare_image(
    image: torch.Tensor,
    factor: float,
    *,
    max_output_pixels: int = DEFAULT_MAX_OUTPUT_PIXELS,
    multiple: int = 8,
) -> PreparedImage:
    """Upsample image (B, C, H, W) float in [0, 1] by ``factor`` and pad it to a multiple of ``multiple`` for the VAE.

    C is 1 (gray, repeated to RGB), 3, or 4 (RGB + alpha; alpha is upsampled on its own). The output frame is exactly
    round(H·factor) × round(W·factor); a factor of 1 at the same size copies the pixels without interpolation.
    """
    out_h, out_w = _validate(image, factor, max_output_pixels, multiple)
    image = image.float()
    rgb, alpha = image[:, :3], image[:, 3:] if image.shape[1] == 4 else None
    if rgb.shape[1] == 1:
        rgb = rgb.expand(-1, 3, -1, -1)  # (B, 3, H, W)
    x_up01 = resize_image(rgb, out_h, out_w)  # (B, 3, out_h, out_w)
    if alpha is not None:
        alpha = resize_image(alpha, out_h, out_w)  # (B, 1, out_h, out_w)
    padded_h, padded_w = math.ceil(out_h / multiple) * multiple, math.ceil(out_w / multiple) * multiple
    x = _reflect_pad(to_signed_range(x_up01), padded_h - out_h, padded_w - out_w)  # (B, 3, Hp, Wp)
    return PreparedImage(x=x, x_up01=x_up01, alpha=alpha, frame=PixelFrame(out_h, out_w, padded_h, padded_w))


def crop_to_frame(x: torch.Tensor, frame: PixelFrame) -> torch.Tensor:
    """(B, C, Hp, Wp) -> (B, C, out_h, out_w): drop the padding."""
    if tuple(x.shape[-2:]) != (frame.padded_h, frame.padded_w):
        raise ValueError(
            f"the decoded image is {tuple(x.shape[-2:])} px but its frame expects "
            f"{(frame.padded_h, frame.padded_w)}; decode the latent that came from this frame."
        )
    return x[..., : frame.out_h, : frame.out_w]

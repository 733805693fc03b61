"""CODSR's region-adaptive generative prior activation (RGPA): Sobel-weighted noise for the LQ latent (SPEC.md §4.1).

Paper: "CODSR: Controllable One-step Diffusion for Image Super-Resolution" (CODSR), §3.1; constants from the released
inference code (Chanson94/CODSR@68cad3c codsr.py).

    g      = 0.299 R + 0.587 G + 0.114 B               grey x_L, mapped from [-1, 1] to [0, 1]
    g_mag  = |g ⋆ G_x| + |g ⋆ G_y|                      3×3 Sobel, replicate-padded, "fast" L1 magnitude
    p      = AvgPool_16×16(g_mag)                       bottom/right replicate-padded to a multiple of 16
    W(p)   = floor                        p <= low
             floor + slope (p − low)      low < p <= high          (UPSR-like piecewise map, continuous)
             ceiling                      p > high
    ε_a    = W ⊙ ε,  ε ~ N(0, I)                         W repeated 2×2 per patch (16 image px = 2 latent px)

The weight map and noise are computed once on the whole (padded) image; the denoise loop only slices them per tile.
Compare UPSR (SPEC §7.3), which has no dead zone below ``low`` and a 0.4 floor instead of 0.3.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .config_dict import DictConfig
from .noise import gaussian_noise

LATENT_FACTOR = 8  # the SD VAE's spatial downscale
GRAY_COEFFS = (0.299, 0.587, 0.114)  # ITU-R BT.601 luma, as in the released code
SOBEL_X = ((-1.0, 0.0, 1.0), (-2.0, 0.0, 2.0), (-1.0, 0.0, 1.0))
CONTINUITY_TOL = 1e-6


@dataclass(frozen=True)
class RGPAConfig(DictConfig):
    """Constants of the piecewise map W(p) and the pooling patch in image px ([CODE] values, kept configurable)."""

    floor: float = 0.3
    ceiling: float = 1.0
    low: float = 0.15
    high: float = 0.25
    slope: float = 7.0
    patch: int = 16

    def __post_init__(self) -> None:
        for name in ("floor", "ceiling", "low", "high", "slope"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
                raise ValueError(f"`{name}` must be a finite number; got {value!r}.")
            object.__setattr__(self, name, float(value))
        if not isinstance(self.patch, int) or isinstance(self.patch, bool) or self.patch < LATENT_FACTOR \
                or self.patch % LATENT_FACTOR:
            raise ValueError(
                f"`patch` must be a positive multiple of {LATENT_FACTOR} image px (a whole number of latent px); "
                f"got {self.patch!r}. CODSR uses 16."
            )
        if self.low >= self.high:
            raise ValueError(f"`low` must be below `high`; got low={self.low} and high={self.high}.")
        if not 0.0 <= self.floor <= self.ceiling:
            raise ValueError(
                f"the noise weights must satisfy 0 <= floor <= ceiling; got floor={self.floor}, ceiling={self.ceiling}."
            )
        reached = self.floor + self.slope * (self.high - self.low)
        if abs(reached - self.ceiling) > CONTINUITY_TOL:
            raise ValueError(
                f"the RGPA map must be continuous: floor + slope * (high - low) must equal ceiling; got "
                f"{self.floor} + {self.slope} * ({self.high} - {self.low}) = {reached}, ceiling {self.ceiling}. "
                f"Use slope = {(self.ceiling - self.floor) / (self.high - self.low):.6g}."
            )


def _check_image(x_lq: torch.Tensor, *, multiple: int = 1) -> None:
    if not isinstance(x_lq, torch.Tensor) or x_lq.ndim != 4 or x_lq.shape[1] != 3 or x_lq.shape[0] == 0:
        shape = tuple(x_lq.shape) if isinstance(x_lq, torch.Tensor) else type(x_lq).__name__
        raise ValueError(f"`x_lq` must be an RGB batch (B, 3, H, W) in [-1, 1]; got {shape}.")
    h, w = x_lq.shape[-2:]
    if h % multiple or w % multiple:
        raise ValueError(
            f"`x_lq` height and width must be multiples of {multiple} (the padded image the VAE encodes); got "
            f"{h}x{w}. Pad or resize the upsampled LQ to {math.ceil(h / multiple) * multiple}x"
            f"{math.ceil(w / multiple) * multiple} first."
        )


def grayscale(x_lq: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) in [-1, 1] -> (B, 1, H, W) grey in [0, 1], g = 0.299 R + 0.587 G + 0.114 B."""
    _check_image(x_lq)
    coeffs = torch.tensor(GRAY_COEFFS, device=x_lq.device, dtype=x_lq.dtype).view(1, 3, 1, 1)
    x01 = (x_lq + 1.0) / 2.0  # (B, 3, H, W)
    return (x01 * coeffs).sum(dim=1, keepdim=True)  # (B, 1, H, W)


def gradient_magnitude(x_lq: torch.Tensor) -> torch.Tensor:
    """Sobel "fast" magnitude |G_x| + |G_y| of the grey image: (B, 3, H, W) in [-1, 1] -> (B, 1, H, W) >= 0."""
    gray = grayscale(x_lq)  # (B, 1, H, W)
    gx = torch.tensor(SOBEL_X, device=x_lq.device, dtype=x_lq.dtype)  # (3, 3)
    kernels = torch.stack((gx, gx.T)).unsqueeze(1)  # (2, 1, 3, 3): G_x and G_y = G_x transposed
    padded = F.pad(gray, (1, 1, 1, 1), mode="replicate")  # (B, 1, H + 2, W + 2)
    grads = F.conv2d(padded, kernels)  # (B, 2, H, W); conv2d is cross-correlation, as specified
    return grads.abs().sum(dim=1, keepdim=True)  # (B, 1, H, W)


def weight_map(p: torch.Tensor, config: RGPAConfig = RGPAConfig()) -> torch.Tensor:
    """The piecewise map W(p), elementwise; any shape, dtype and device of ``p``."""
    # The map is continuous and increasing (checked in RGPAConfig), so its three pieces are exactly the linear
    # piece clamped to [floor, ceiling].
    linear = config.floor + config.slope * (p - config.low)
    return linear.clamp(min=config.floor, max=config.ceiling)


def region_weights(x_lq: torch.Tensor, config: RGPAConfig = RGPAConfig()) -> torch.Tensor:
    """Per-latent-pixel noise weights W: (B, 3, H, W) in [-1, 1], H and W multiples of 8 -> (B, 1, H/8, W/8)."""
    _check_image(x_lq, multiple=LATENT_FACTOR)
    h, w = x_lq.shape[-2:]
    patch = config.patch
    g_mag = gradient_magnitude(x_lq)  # (B, 1, H, W)
    pad_h, pad_w = -h % patch, -w % patch
    g_mag = F.pad(g_mag, (0, pad_w, 0, pad_h), mode="replicate")  # (B, 1, H', W'), multiples of patch
    p = F.avg_pool2d(g_mag, kernel_size=patch, stride=patch)  # (B, 1, H'/patch, W'/patch)
    weights = weight_map(p, config)  # (B, 1, H'/patch, W'/patch)
    repeat = patch // LATENT_FACTOR
    weights = weights.repeat_interleave(repeat, dim=2).repeat_interleave(repeat, dim=3)  # (B, 1, H'/8, W'/8)
    return weights[..., : h // LATENT_FACTOR, : w // LATENT_FACTOR].contiguous()  # (B, 1, H/8, W/8)


def region_adaptive_noise(
    x_lq: torch.Tensor, seed: int, *, latent_shape: tuple[int, ...], config: RGPAConfig = RGPAConfig()
) -> tuple[torch.Tensor, torch.Tensor]:
    """ε_a = W ⊙ ε and W, for the latent of ``x_lq``.

    x_lq (B, 3, H, W) in [-1, 1], H and W multiples of 8; latent_shape (B, C, H/8, W/8), the shape of z_L.
    ε ~ N(0, I) is drawn on the CPU from ``seed``, the same draw for every batch item (see ``osd_core.noise``).
    Returns ε_a (B, C, H/8, W/8) and W (B, 1, H/8, W/8), both on x_lq's device in its dtype; W can be shown as a mask.
    """
    weights = region_weights(x_lq, config)  # (B, 1, h, w)
    expected = (x_lq.shape[0], weights.shape[2], weights.shape[3])
    shape = tuple(latent_shape)
    if len(shape) != 4 or (shape[0], shape[2], shape[3]) != expected or shape[1] < 1:
        raise ValueError(
            f"`latent_shape` must be (B, C, H/8, W/8) = ({expected[0]}, C, {expected[1]}, {expected[2]}) for an "
            f"x_lq of shape {tuple(x_lq.shape)}; got {shape}. Pass z_lq.shape of the latent of this image."
        )
    eps = gaussian_noise(shape[1:], seed, batch=shape[0], device=x_lq.device, dtype=x_lq.dtype)  # (B, C, h, w)
    return weights * eps, weights  # (B, C, h, w), (B, 1, h, w)

"""Full-reference fidelity metrics: PSNR and SSIM (Wang, Bovik, Sheikh, Simoncelli, "Image Quality Assessment: From
Error Visibility to Structural Similarity", IEEE TIP 2004).

Conventions, chosen to match how the SR papers report them ("PSNR and SSIM computed on the Y channel in YCbCr
space", CODSR §4.1; BasicSR/pyiqa ``test_y_channel``):

* Inputs are (B, 3, H, W) float in [0, 1]. ``channel="y"`` (default) compares the BT.601 studio-range luma
  Y = (16 + 65.481 R + 128.553 G + 24.966 B) / 255 (MATLAB ``rgb2ycbcr``), in float, without rounding to 8 bits;
  ``channel="rgb"`` compares the three channels. A (B, 1, H, W) input is compared as is (any luma of your choice).
* PSNR = 10 log10(1 / MSE), MSE over (C, H, W) per image; identical images give +inf.
* SSIM: 11 × 11 Gaussian window with σ = 1.5, K1 = 0.01, K2 = 0.03, data range 1, "valid" filtering (no padding),
  the mean of the SSIM map over positions and channels; no automatic 2× downsampling (MATLAB ``ssim.m`` does that,
  BasicSR and pyiqa's default do not). Per position, with μ, σ² and σ_xy the window-weighted moments:

      l  = (2 μ_x μ_y + C1) / (μ_x² + μ_y² + C1)          C1 = (0.01)²
      cs = (2 σ_xy + C2) / (σ_x² + σ_y² + C2)            C2 = (0.03)²
      SSIM = l · cs

``ssim_terms`` returns the two maps; MS-SSIM (``training.perceptual.fallback``) multiplies them across scales.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

CHANNELS = ("y", "rgb")
SSIM_WINDOW = 11
SSIM_SIGMA = 1.5
SSIM_K1, SSIM_K2 = 0.01, 0.03
# BT.601 studio-range luma of [0, 1] RGB, as MATLAB's rgb2ycbcr and BasicSR compute it.
YCBCR_Y_WEIGHTS = (65.481 / 255.0, 128.553 / 255.0, 24.966 / 255.0)
YCBCR_Y_OFFSET = 16.0 / 255.0


def _prepare(x: torch.Tensor, y: torch.Tensor, channel: str, min_side: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    if channel not in CHANNELS:
        raise ValueError(f"`channel` must be one of {CHANNELS}; got {channel!r}. Use \"y\" as the SR papers do.")
    if x.shape != y.shape or x.ndim != 4 or x.shape[1] not in (1, 3):
        raise ValueError(f"`x` and `y` must both have shape (B, 3, H, W) (or (B, 1, H, W)); got {tuple(x.shape)} "
                         f"and {tuple(y.shape)}.")
    if min(x.shape[-2:]) < min_side:
        raise ValueError(f"images must be at least {min_side} px on each side; got {tuple(x.shape[-2:])}.")
    if channel == "y" and x.shape[1] == 3:
        return rgb_to_y(x), rgb_to_y(y)
    return x, y


def rgb_to_y(x: torch.Tensor) -> torch.Tensor:
    """BT.601 studio-range luma: (B, 3, H, W) in [0, 1] -> (B, 1, H, W) in [16/255, 235/255]."""
    weights = torch.tensor(YCBCR_Y_WEIGHTS, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    return (x * weights).sum(dim=1, keepdim=True) + YCBCR_Y_OFFSET  # (B, 1, H, W)


def psnr(x: torch.Tensor, y: torch.Tensor, *, channel: str = "y") -> torch.Tensor:
    """PSNR in dB per image: x, y (B, 3, H, W) in [0, 1] -> (B,) float32 (+inf where x == y)."""
    x, y = _prepare(x, y, channel)
    mse = (x.double() - y.double()).square().mean(dim=(1, 2, 3))  # (B,)
    return (10.0 * torch.log10(1.0 / mse)).float()  # (B,); log10(1/0) = +inf


def gaussian_window(size: int = SSIM_WINDOW, sigma: float = SSIM_SIGMA, *, dtype: torch.dtype = torch.float32,
                    device: torch.device | None = None) -> torch.Tensor:
    """The normalised 1-D Gaussian g (size,); the 2-D SSIM window is the outer product g gᵀ."""
    offsets = torch.arange(size, dtype=torch.float64) - (size - 1) / 2  # (size,)
    g = torch.exp(-offsets.square() / (2 * sigma * sigma))  # (size,)
    return (g / g.sum()).to(device=device, dtype=dtype)


def _blur_valid(x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """Depthwise separable Gaussian filtering without padding: (B, C, H, W) -> (B, C, H − k + 1, W − k + 1)."""
    c, k = x.shape[1], g.numel()
    x = F.conv2d(x, g.view(1, 1, k, 1).expand(c, 1, k, 1), groups=c)  # (B, C, H − k + 1, W)
    return F.conv2d(x, g.view(1, 1, 1, k).expand(c, 1, 1, k), groups=c)  # (B, C, H − k + 1, W − k + 1)


def ssim_terms(x: torch.Tensor, y: torch.Tensor, *, data_range: float = 1.0, window: int = SSIM_WINDOW,
               sigma: float = SSIM_SIGMA) -> tuple[torch.Tensor, torch.Tensor]:
    """Luminance map l and contrast-structure map cs, each (B, C, H − window + 1, W − window + 1), in x's dtype."""
    g = gaussian_window(window, sigma, dtype=x.dtype, device=x.device)  # (window,)
    c1, c2 = (SSIM_K1 * data_range) ** 2, (SSIM_K2 * data_range) ** 2
    mu_x, mu_y = _blur_valid(x, g), _blur_valid(y, g)  # (B, C, h, w) each
    var_x = _blur_valid(x * x, g) - mu_x.square()  # (B, C, h, w)
    var_y = _blur_valid(y * y, g) - mu_y.square()  # (B, C, h, w)
    cov = _blur_valid(x * y, g) - mu_x * mu_y  # (B, C, h, w)
    luminance = (2 * mu_x * mu_y + c1) / (mu_x.square() + mu_y.square() + c1)  # (B, C, h, w)
    contrast_structure = (2 * cov + c2) / (var_x + var_y + c2)  # (B, C, h, w)
    return luminance, contrast_structure


def ssim(x: torch.Tensor, y: torch.Tensor, *, channel: str = "y") -> torch.Tensor:
    """SSIM per image: x, y (B, 3, H, W) in [0, 1], at least 11 px a side -> (B,) float32 (1 where x == y)."""
    x, y = _prepare(x, y, channel, min_side=SSIM_WINDOW)
    # float64: the moments are differences of window means (E[x²] − E[x]²), which cancel badly in float32.
    luminance, contrast_structure = ssim_terms(x.double(), y.double())  # (B, C, h, w) each
    return (luminance * contrast_structure).mean(dim=(1, 2, 3)).float()  # (B,)

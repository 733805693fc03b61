"""The weight-free perceptual loss used when no LPIPS weights are available (SPEC §10 option 2, [RECON]):

    D(x, y) = λ · (1 − MS-SSIM(x, y)) + λ′ · MS-GMSD(x, y)

MS-SSIM (Wang, Simoncelli, Bovik, "Multiscale structural similarity for image quality assessment", Asilomar 2003):
per RGB channel, SSIM terms (``training.metrics.ssim_terms``, 11 × 11 Gaussian, σ 1.5) at scales j = 1..M with 2 × 2
average pooling between scales, MS-SSIM = Π_{j<M} cs_j^{β_j} · ssim_M^{β_M}, β = (0.0448, 0.2856, 0.3001, 0.2363,
0.1333), averaged over the channels.

MS-GMSD (Xue et al., "Gradient Magnitude Similarity Deviation", IEEE TIP 2014; Zhang et al., "Gradient magnitude
similarity deviation on multiple scales for color image quality assessment", ICASSP 2017): on the luma
Y = 0.299 R + 0.587 G + 0.114 B, Prewitt gradient magnitudes m (kernels /3, replicate padding), the similarity map
GMS = (2 m_x m_y + c) / (m_x² + m_y² + c) with c = 170 / 255², GMSD_j = std(GMS) at scale j (2 × 2 average pooling
between the 4 scales), MS-GMSD = √(Σ_j w_j GMSD_j²), w = (0.096, 0.596, 0.289, 0.019).

Reconstruction choices ([RECON]): λ = λ′ = 1 by default; MS-GMSD on luma only (the ICASSP paper adds a chroma term);
scales whose side would fall below the SSIM window (11 px) are dropped and the remaining β renormalised (64 px crops
keep 3 scales, 512 px crops all 5); cs and the last SSIM are clamped at 1e-6 so that the fractional powers stay
differentiable (the clamp only acts on anti-correlated patches); √ and ‖∇‖ get tiny floors so that identical images
have finite gradients (D(x, x) ≈ 1e-6, not 0).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from training.metrics import SSIM_WINDOW, ssim_terms

MS_SSIM_WEIGHTS = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)
MS_GMSD_WEIGHTS = (0.096, 0.596, 0.289, 0.019)
GMS_C = 170.0 / 255.0 ** 2
LUMA = (0.299, 0.587, 0.114)
_CLAMP = 1e-6
_SQRT_FLOOR = 1e-12


def ms_ssim(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """MS-SSIM per image: x, y (B, C, H, W) in [0, 1], sides >= 11 px -> (B,)."""
    side = min(x.shape[-2:])
    if side < SSIM_WINDOW:
        raise ValueError(f"MS-SSIM needs images of at least {SSIM_WINDOW} px a side; got {tuple(x.shape[-2:])}. "
                         "Use larger crops.")
    scales = min(len(MS_SSIM_WEIGHTS), 1 + int(math.floor(math.log2(side / SSIM_WINDOW))))
    weights = torch.tensor(MS_SSIM_WEIGHTS[:scales], dtype=torch.float32)
    weights = weights / weights.sum()  # (M,)
    result = torch.ones(x.shape[:2], device=x.device)  # (B, C)
    for j in range(scales):
        luminance, contrast_structure = ssim_terms(x.float(), y.float())  # (B, C, h, w) each
        last = j == scales - 1
        term = (luminance * contrast_structure if last else contrast_structure).mean(dim=(2, 3))  # (B, C)
        result = result * term.clamp_min(_CLAMP) ** float(weights[j])  # (B, C)
        if not last:
            x, y = F.avg_pool2d(x, 2), F.avg_pool2d(y, 2)  # (B, C, H/2, W/2)
    return result.mean(dim=1)  # (B,)


def _gradient_magnitude(luma: torch.Tensor) -> torch.Tensor:
    """Prewitt gradient magnitude of (B, 1, H, W) -> (B, 1, H, W), replicate padding."""
    kx = torch.tensor([[1.0, 0.0, -1.0]] * 3, dtype=luma.dtype, device=luma.device) / 3.0  # (3, 3)
    kernels = torch.stack([kx, kx.t()]).unsqueeze(1)  # (2, 1, 3, 3)
    grad = F.conv2d(F.pad(luma, (1, 1, 1, 1), mode="replicate"), kernels)  # (B, 2, H, W)
    return (grad.square().sum(dim=1, keepdim=True) + _SQRT_FLOOR).sqrt()  # (B, 1, H, W)


def ms_gmsd(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """MS-GMSD per image: x, y (B, 3, H, W) in [0, 1] -> (B,) (0 for identical images, up to the floors)."""
    luma = torch.tensor(LUMA, device=x.device).view(1, 3, 1, 1)
    lx, ly = (x.float() * luma).sum(1, keepdim=True), (y.float() * luma).sum(1, keepdim=True)  # (B, 1, H, W) each
    total = torch.zeros(x.shape[0], device=x.device)  # (B,)
    for j, weight in enumerate(MS_GMSD_WEIGHTS):
        if j > 0:
            if min(lx.shape[-2:]) < 2:
                break
            lx, ly = F.avg_pool2d(lx, 2), F.avg_pool2d(ly, 2)  # (B, 1, H/2, W/2)
        mx, my = _gradient_magnitude(lx), _gradient_magnitude(ly)  # (B, 1, h, w) each
        gms = (2 * mx * my + GMS_C) / (mx.square() + my.square() + GMS_C)  # (B, 1, h, w)
        total = total + weight * gms.var(dim=(1, 2, 3), unbiased=False)  # (B,)
    return (total + _SQRT_FLOOR).sqrt()  # (B,)


class FallbackPerceptual(nn.Module):
    """λ (1 − MS-SSIM) + λ′ MS-GMSD; forward(x, y) with x, y (B, 3, H, W) in [-1, 1] -> (B,) float32."""

    def __init__(self, ssim_weight: float = 1.0, gmsd_weight: float = 1.0) -> None:
        super().__init__()
        self.ssim_weight, self.gmsd_weight = ssim_weight, gmsd_weight
        self.variant = f"fallback msssim-gmsd ({ssim_weight}·(1 − MS-SSIM) + {gmsd_weight}·MS-GMSD)"

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if x.shape != y.shape or x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"the perceptual loss needs x and y of one shape (B, 3, H, W) in [-1, 1]; got "
                             f"{tuple(x.shape)} and {tuple(y.shape)}.")
        # float32 even under autocast: SSIM's variances are differences of window means, which half precision
        # cannot resolve at the scale of C2 = 9e-4.
        with torch.autocast(device_type=x.device.type, enabled=False):
            x01, y01 = (x.float() + 1) / 2, (y.float() + 1) / 2  # (B, 3, H, W) in [0, 1]
            return self.ssim_weight * (1 - ms_ssim(x01, y01)) + self.gmsd_weight * ms_gmsd(x01, y01)  # (B,)

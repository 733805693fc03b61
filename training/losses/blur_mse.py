"""TADSR's timestep-dependent blurred MSE (SPEC §3.5; "Time-Aware One Step Diffusion Network for Real-World Image
Super-Resolution", arXiv:2508.16557, supp. Eq. 13–14).

Per sample, with its student timestep t_s, both the output x̂ and the target x_H (B, 3, H, W) in [-1, 1] are blurred
by the same Gaussian G_{t_s} before the MSE, so a large t_s (more generation) is only held to the coarse structure:

    k(t_s) = 5 + 4 ⌊t_s / 200⌋          5, 9, 13, 17, 21 for t_s in [0, 200), [200, 400), ..., [800, 1000)  [PAPER+CODE]
    σ(t_s) = 1 + t_s / 200                                                                                 [CODE]
    L      = MSE(G_{t_s} * x̂, G_{t_s} * x_H)

G is torchvision's ``GaussianBlur``: the normalised 1-D Gaussian exp(−x² / 2σ²) on the k integer offsets centred at
0, applied separably after reflect padding by k // 2 (needs images larger than k // 2 on each side).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def blur_kernel_size(t_s: torch.Tensor) -> torch.Tensor:
    """k(t_s) = 5 + 4 ⌊t_s / 200⌋ per sample: (B,) -> (B,) int64."""
    return 5 + 4 * torch.div(t_s.long(), 200, rounding_mode="floor")


def blur_sigma(t_s: torch.Tensor) -> torch.Tensor:
    """σ(t_s) = 1 + t_s / 200 per sample: (B,) -> (B,) float64."""
    return 1.0 + t_s.double() / 200.0


def gaussian_kernel_1d(size: int, sigma: float, *, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """torchvision's Gaussian: exp(−x² / 2σ²) at x = −(k−1)/2 .. (k−1)/2, normalised to sum 1: (k,)."""
    x = torch.linspace(-(size - 1) / 2, (size - 1) / 2, size, dtype=torch.float64)  # (k,)
    kernel = torch.exp(-0.5 * (x / sigma) ** 2)  # (k,)
    return (kernel / kernel.sum()).to(device=device, dtype=dtype)


def gaussian_blur(x: torch.Tensor, size: int, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur with reflect padding: (N, C, H, W) -> (N, C, H, W)."""
    c, pad = x.shape[1], size // 2
    if min(x.shape[-2:]) <= pad:
        raise ValueError(f"a {size}×{size} blur with reflect padding needs images larger than {pad} px a side; got "
                         f"{tuple(x.shape[-2:])}. Train on larger crops (TADSR uses 512).")
    g = gaussian_kernel_1d(size, sigma, dtype=x.dtype, device=x.device)  # (k,)
    x = F.pad(x, (pad, pad, pad, pad), mode="reflect")  # (N, C, H + 2p, W + 2p)
    x = F.conv2d(x, g.view(1, 1, size, 1).expand(c, 1, size, 1), groups=c)  # (N, C, H, W + 2p)
    return F.conv2d(x, g.view(1, 1, 1, size).expand(c, 1, 1, size), groups=c)  # (N, C, H, W)


def blur_per_sample(x: torch.Tensor, t_s: torch.Tensor) -> torch.Tensor:
    """G_{t_s[i]} * x[i] for every sample: x (B, C, H, W), t_s (B,) -> (B, C, H, W)."""
    if t_s.shape != (x.shape[0],):
        raise ValueError(f"`t_s` must hold one timestep per sample, shape ({x.shape[0]},); got {tuple(t_s.shape)}.")
    kernels = list(zip(blur_kernel_size(t_s).tolist(), blur_sigma(t_s).tolist(), strict=True))  # (k, σ) per sample
    out = torch.empty_like(x)  # (B, C, H, W)
    for key in set(kernels):  # one call per distinct kernel
        index = torch.tensor([i for i, item in enumerate(kernels) if item == key], device=x.device)  # (n,)
        out[index] = gaussian_blur(x[index], *key)  # (n, C, H, W)
    return out


def blurred_mse(x_hat: torch.Tensor, x_hq: torch.Tensor, t_s: torch.Tensor) -> torch.Tensor:
    """MSE(G_{t_s} * x̂, G_{t_s} * x_H) over the batch: x_hat, x_hq (B, 3, H, W), t_s (B,) -> scalar."""
    if x_hat.shape != x_hq.shape:
        raise ValueError(f"`x_hat` and `x_hq` must have one shape; got {tuple(x_hat.shape)} and {tuple(x_hq.shape)}.")
    # float32 even under autocast: the loss is a small difference of blurred images
    with torch.autocast(device_type=x_hat.device.type, enabled=False):
        both = torch.cat([x_hat, x_hq]).float()  # (2B, 3, H, W)
        both = blur_per_sample(both, torch.cat([t_s, t_s]).to(x_hat.device))  # (2B, 3, H, W)
        blurred_hat, blurred_hq = both.chunk(2)  # (B, 3, H, W) each
        return F.mse_loss(blurred_hat, blurred_hq)

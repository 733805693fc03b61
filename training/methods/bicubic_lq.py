"""Clean-LQ mixing: some samples' LQ is the bicubic down-and-up of the GT instead of a Real-ESRGAN degradation.

TADSR (zty557/TADSR@b0eaa30 training data, SPEC.md §3.6) degrades an image with probability ``deg_prob`` = 0.99;
otherwise its LQ is the GT bicubically downscaled ×s and upscaled back to GT size, so the student also sees mildly
degraded inputs. The data pipeline always degrades, so the method mixes per sample at train time:

    keep_b ~ Bernoulli(deg_prob)
    x_L,b  = x_L,b                                         if keep_b
           = clamp(up_s(down_s(x_H,b)), −1, 1)             otherwise   (bicubic; the downscale antialiased like PIL)

The draws come from the step generator, one per sample whatever ``deg_prob`` is, so changing it does not shift the
other random streams.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def bicubic_lq(hq: torch.Tensor, scale: int) -> torch.Tensor:
    """hq (B, 3, H, W) in [-1, 1], H and W multiples of ``scale`` -> bicubic ×scale down and up, (B, 3, H, W)."""
    if scale < 1 or hq.shape[-2] % scale or hq.shape[-1] % scale:
        raise ValueError(f"`scale` must be a positive integer dividing the GT size {tuple(hq.shape[-2:])}; got "
                         f"{scale}. Use the degradation scale (data.degradation.scale).")
    small = F.interpolate(hq.float(), scale_factor=1.0 / scale, mode="bicubic", antialias=True,
                          align_corners=False)  # (B, 3, H/s, W/s)
    up = F.interpolate(small, size=tuple(hq.shape[-2:]), mode="bicubic", align_corners=False)  # (B, 3, H, W)
    return up.clamp(-1.0, 1.0).to(hq.dtype)


def mix_bicubic_lq(lq: torch.Tensor, hq: torch.Tensor, *, deg_prob: float, scale: int,
                   generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(x_L with the clean LQ where a sample is not degraded (B, 3, H, W), the kept-degradation mask (B,) bool)."""
    if not 0.0 <= deg_prob <= 1.0:
        raise ValueError(f"`deg_prob` must be a probability in [0, 1]; got {deg_prob}. TADSR uses 0.99.")
    keep = torch.rand(lq.shape[0], generator=generator) < deg_prob  # (B,) drawn on the CPU
    if bool(keep.all()):
        return lq, keep
    clean = bicubic_lq(hq, scale)  # (B, 3, H, W)
    return torch.where(keep.to(lq.device)[:, None, None, None], lq, clean.to(lq.dtype)), keep

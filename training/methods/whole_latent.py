"""The nodes' one-step denoise (``osd_core.onestep.one_step_denoise``, SPEC §0.6) on one tile covering the whole
latent, for the generators being trained: training never tiles, and calling the very function the nodes run keeps
the U-Net step, the x̂₀ formula and CODSR's conv_in hook identical between training and the exported bundle.
A lone tile is returned as predicted (no blending weights), and gradients flow through it as through a plain call.
"""

from __future__ import annotations

import math

import torch

from osd_core.onestep import ConvInHook, one_step_denoise
from osd_core.parameterisation import Parameterisation
from osd_core.schedule import NoiseSchedule


def denoise_whole_latent(unet, schedule: NoiseSchedule, parameterisation: Parameterisation, z_lq: torch.Tensor,
                         cond: torch.Tensor, t: torch.Tensor, *, noise: torch.Tensor | None = None,
                         conv_in_hook: ConvInHook | None = None) -> torch.Tensor:
    """ẑ₀ (B, 4, h, w) float32 from z_lq (B, 4, h, w), cond (B, L, D), t (B,) and optional noise (B, 4, h, w)."""
    tile = 8 * math.ceil(max(z_lq.shape[-2:]) / 8)  # one window: h·w <= tile²
    return one_step_denoise(unet, schedule, parameterisation, z_lq, cond, t, noise=noise, tile_latent=tile,
                            overlap_latent=0, conv_in_hook=conv_in_hook)

"""IDaS-SR's MINE estimate on whole images of any size (SPEC.md §5.2, §5.7 [RECON]).

τ and the degradation embedding d come from one global estimate on the latent area-resized to at most 64 latent px
a side, so every tile shares one τ; the inversion noise ε_inv is estimated per latent tile and the tiles are blended
with the same gaussian weights as the U-Net's (``tiling.blend_tiles``), so large images cost O(tiles), not
O(tokens²). Latents up to one tile are estimated in a single pass.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from .mine import MINE
from .tiling import TileWindow, blend_tiles


@dataclass
class MINEEstimate:
    """τ (B,) float32, ε_inv (B, 4, h, w) float32, d (B, cond_dim) float32, all on the CPU."""

    tau: torch.Tensor
    eps_inv: torch.Tensor
    d: torch.Tensor


def mine_estimate(
    mine: MINE,
    z_lq: torch.Tensor,
    *,
    tile_latent: int = 64,
    overlap_latent: int = 16,
    callback: Callable[[int, int], None] | None = None,
) -> MINEEstimate:
    """Run MINE on a scaled latent z_lq (B, 4, h, w) on MINE's device and dtype."""
    param = next(mine.parameters())
    z = z_lq.to(device=param.device, dtype=param.dtype)  # (B, 4, h, w)
    tau, d = mine.estimate_global(z)  # (B,), (B, cond_dim)

    def predict(window: TileWindow) -> torch.Tensor:
        return mine.inversion_noise(z, window=window).float()  # (B, 4, th, tw)

    eps_inv = blend_tiles(predict, tuple(z.shape), tile_latent=tile_latent, overlap_latent=overlap_latent,
                          device=param.device, dtype=torch.float32, callback=callback)  # (B, 4, h, w)
    return MINEEstimate(tau=tau.float().cpu(), eps_inv=eps_inv.cpu(), d=d.float().cpu())

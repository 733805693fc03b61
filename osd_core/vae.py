"""VAE encode and decode of SD's AutoencoderKL, tiled for large images (SPEC.md §0.2, §1.3).

Encode:  z = (mean + std * n) * 0.18215 with n ~ N(0, I) (``sampling="sample"``, what every reference implementation
         uses), or z = mean * 0.18215 (``sampling="mode"``, deterministic; a deviation from the references).
Decode:  x = clamp(Dec(z / 0.18215), -1, 1).

Tiling: large inputs are cut into overlapping tiles on the latent grid, each tile is encoded (its moments) or decoded
on its own and the tiles are blended with the gaussian weights of the latent tiler (``tiling.blend_tiles``), so peak
memory is set by the tile size, not the image. Each tile normalises with its own GroupNorm statistics, so a tiled
result differs slightly from an untiled one (the exact alternative, accumulating GroupNorm statistics over all tiles as
OSEDiff's VAE hook does, is not implemented). The sampling noise is drawn once for the whole latent from a seeded CPU
generator, so tiling does not change which noise a pixel gets.
"""

from __future__ import annotations

from typing import Callable

import torch

from .noise import gaussian_noise
from .tiling import TileWindow, blend_tiles

SAMPLING_MODES = ("sample", "mode")
LATENT_DOWNSCALE = 8

Callback = Callable[[int, int], None]
# An encoder maps pixels (B, 3, H, W) in [-1, 1] to moments (B, 8, H/8, W/8): the plain SD encoder, or TADSR's
# time-aware encoder with its timestep bound.
EncoderFn = Callable[[torch.Tensor], torch.Tensor]


def sd_encoder_fn(vae) -> EncoderFn:
    """The plain SD VAE encoder (encoder + quant_conv) as an ``EncoderFn``."""

    def encode(x: torch.Tensor) -> torch.Tensor:
        h = vae.encoder(x)  # (B, 8, H/8, W/8)
        return vae.quant_conv(h) if vae.quant_conv is not None else h

    return encode


def time_aware_encoder_fn(tae, t: torch.Tensor) -> EncoderFn:
    """TADSR's time-aware encoder with its timesteps t (B,) bound, as an ``EncoderFn`` (called per tile)."""

    def encode(x: torch.Tensor) -> torch.Tensor:
        return tae(x, t.to(x.device))  # (B, 8, H/8, W/8)

    return encode


def encode_latent(
    vae,
    x: torch.Tensor,
    *,
    sampling: str = "sample",
    seed: int = 0,
    tile_latent: int = 128,
    overlap_latent: int = 16,
    encoder: EncoderFn | None = None,
    callback: Callback | None = None,
) -> torch.Tensor:
    """Encode x (B, 3, H, W) in [-1, 1], H and W multiples of 8, to a scaled latent (B, 4, H/8, W/8) float32.

    Runs in the VAE's dtype on the VAE's device; ``tile_latent``/``overlap_latent`` are in latent pixels.
    """
    if sampling not in SAMPLING_MODES:
        raise ValueError(f"`sampling` must be one of {SAMPLING_MODES}; got {sampling!r}.")
    encoder = encoder or sd_encoder_fn(vae)
    param = next(vae.parameters())
    x = x.to(device=param.device, dtype=param.dtype)
    b, _, height, width = x.shape
    moments_shape = (b, 2 * vae.config.latent_channels, height // LATENT_DOWNSCALE, width // LATENT_DOWNSCALE)

    def encode_tile(win: TileWindow) -> torch.Tensor:
        pixels = x[..., win.y0 * 8 : win.y1 * 8, win.x0 * 8 : win.x1 * 8]  # (B, 3, 8th, 8tw)
        return encoder(pixels).float()  # (B, 8, th, tw)

    moments = blend_tiles(
        encode_tile, moments_shape, tile_latent=tile_latent, overlap_latent=overlap_latent,
        device=param.device, dtype=torch.float32, callback=callback,
    )  # (B, 8, h, w)
    mean, logvar = moments.chunk(2, dim=1)  # (B, 4, h, w) each
    if sampling == "sample":
        # Same clamp as diffusers' DiagonalGaussianDistribution, so the std never under- or overflows.
        std = torch.exp(0.5 * logvar.clamp(-30.0, 20.0))  # (B, 4, h, w)
        noise = gaussian_noise(tuple(mean.shape[1:]), seed, batch=b, device=mean.device, dtype=mean.dtype)
        mean = mean + std * noise  # (B, 4, h, w)
    return (mean * vae.config.scaling_factor).cpu()


def decode_latent(
    vae,
    z: torch.Tensor,
    *,
    tile_latent: int = 128,
    overlap_latent: int = 16,
    callback: Callback | None = None,
) -> torch.Tensor:
    """Decode a scaled latent z (B, 4, h, w) to pixels (B, 3, 8h, 8w) float32 in [-1, 1] (on the CPU)."""
    param = next(vae.parameters())
    z = (z / vae.config.scaling_factor).to(device=param.device, dtype=param.dtype)
    b, _, h, w = z.shape
    out_shape = (b, vae.config.out_channels, h * LATENT_DOWNSCALE, w * LATENT_DOWNSCALE)

    def decode_tile(win: TileWindow) -> torch.Tensor:
        tile = z[..., win.y0 // 8 : win.y1 // 8, win.x0 // 8 : win.x1 // 8]  # (B, 4, th, tw)
        return vae.decode(tile).sample.float()  # (B, 3, 8th, 8tw)

    x = blend_tiles(
        decode_tile, out_shape, tile_latent=tile_latent * LATENT_DOWNSCALE,
        overlap_latent=overlap_latent * LATENT_DOWNSCALE, device=param.device, dtype=torch.float32,
        callback=callback,
    )  # (B, 3, 8h, 8w)
    return x.clamp(-1.0, 1.0).cpu()

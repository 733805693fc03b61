"""Decode: OSD_LATENT -> VAE decoder -> IMAGE at exactly input size x factor (+ the upscaled alpha as MASK)."""

from __future__ import annotations

import torch

from ..osd_core.imageprep import crop_to_frame, to_unit_range
from ..osd_core.tiling import retry_smaller_tiles, validate_tiling
from ..osd_core.vae import decode_latent
from . import comfy_glue as glue


class OneStepSRDecode:
    DESCRIPTION = (
        "Decodes the latent with the VAE decoder (tiled for large images) and crops the padding away, giving exactly "
        "input size x factor. The MASK output is the upscaled alpha in LoadImage's convention (1 - alpha), all zero "
        "for opaque images."
    )
    CATEGORY = glue.CATEGORY
    RETURN_TYPES = ("IMAGE", "MASK")
    RETURN_NAMES = ("image", "mask")
    FUNCTION = "decode"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": ("OSD_MODEL", {"tooltip": "From Load model."}),
                "latent": ("OSD_LATENT", {"tooltip": "From One-step denoise."}),
                "vae_tile_size": ("INT", {"default": 224, "min": 8, "max": 1024, "step": 8,
                                          "tooltip": "Decoder tile in latent px (x8 = image px)."}),
                "vae_tile_overlap": ("INT", {"default": 16, "min": 0, "max": 512, "step": 8,
                                             "tooltip": "Overlap of decoder tiles in latent px."}),
            }
        }

    def decode(self, model, latent, vae_tile_size, vae_tile_overlap):
        validate_tiling(vae_tile_size, vae_tile_overlap)
        vae = model.components.vae
        def run(tile, overlap):
            return decode_latent(vae, latent.z, tile_latent=tile, overlap_latent=overlap,
                                 callback=glue.progress_callback())  # (B, 3, Hp, Wp) in [-1, 1]

        with glue.on_device(vae):
            x = retry_smaller_tiles(run, vae_tile_size, vae_tile_overlap, on_retry=glue.free_cache)
        image = to_unit_range(crop_to_frame(x, latent.image.frame))  # (B, 3, H, W) in [0, 1]
        alpha = latent.image.alpha
        mask = 1.0 - alpha[:, 0] if alpha is not None else torch.zeros(image.shape[0], *image.shape[-2:])
        return (glue.bchw_to_image(image), mask)

"""Encode: upsample the LQ image by a float factor, pad to a multiple of 8, VAE-encode -> OSD_LATENT."""

from __future__ import annotations

import torch

from ..osd_core.datatypes import OSDLatent
from ..osd_core.imageprep import prepare_image
from ..osd_core.tiling import retry_smaller_tiles, validate_tiling
from ..osd_core.vae import SAMPLING_MODES, encode_latent, time_aware_encoder_fn
from . import comfy_glue as glue


def _with_alpha(image: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Attach ComfyUI's MASK (1 - alpha, as LoadImage gives it) to a (B, 3, H, W) image as a 4th channel."""
    if mask is None or image.shape[1] != 3 or not bool(mask.any()):
        return image  # LoadImage's mask of an opaque image is all zeros: nothing to carry
    mask = mask.float().cpu()
    if mask.ndim == 2:
        mask = mask[None]
    if tuple(mask.shape[-2:]) != tuple(image.shape[-2:]):
        raise ValueError(
            f"`mask` is {tuple(mask.shape[-2:])} px but the image is {tuple(image.shape[-2:])} px; "
            "connect the mask that came with this image (LoadImage's MASK output)."
        )
    alpha = 1.0 - mask[:, None].expand(image.shape[0], 1, *image.shape[-2:])  # (B, 1, H, W)
    return torch.cat([image, alpha], dim=1)  # (B, 4, H, W)


class OneStepSREncode:
    DESCRIPTION = (
        "Upscales the low-quality image by a float factor (bicubic), reflect-pads it to a multiple of 8 and encodes "
        "it with the model's VAE encoder (with the bundle's LoRA; TADSR's time-aware encoder when a timestep is "
        "connected). Output size is exactly input x factor; an alpha channel is upscaled separately and re-attached "
        "by Decode."
    )
    CATEGORY = glue.CATEGORY
    RETURN_TYPES = ("OSD_LATENT",)
    RETURN_NAMES = ("latent",)
    FUNCTION = "encode"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": ("OSD_MODEL", {"tooltip": "From Load model."}),
                "image": ("IMAGE", {"tooltip": "The low-quality image (batch allowed; RGB, grayscale or RGBA)."}),
                "upscale_factor": ("FLOAT", {"default": 4.0, "min": 0.0, "max": 16.0, "step": 0.05,
                                             "tooltip": "Output size = input size x factor (1.0 restores without "
                                                        "resizing). The papers train at x4."}),
                "sampling": (list(SAMPLING_MODES), {"default": "sample",
                             "tooltip": "sample: draw from the VAE posterior as the papers do (seeded). "
                                        "mode: use its mean (deterministic, a slight deviation)."}),
                "seed": ("INT", {"default": 0, "min": 0, "max": 0xFFFFFFFFFFFFFFFF,
                                 "tooltip": "Seed of the posterior sample; every batch item uses the same seed."}),
                "vae_tile_size": ("INT", {"default": 128, "min": 8, "max": 1024, "step": 8,
                                          "tooltip": "Encoder tile in latent px (x8 = image px). Larger is "
                                                     "faster, smaller needs less memory."}),
                "vae_tile_overlap": ("INT", {"default": 16, "min": 0, "max": 512, "step": 8,
                                             "tooltip": "Overlap of encoder tiles in latent px."}),
                "max_output_megapixels": ("FLOAT", {"default": 67.1, "min": 0.01, "max": 1024.0, "step": 0.1,
                                                    "tooltip": "Refuse outputs larger than this, before any work."}),
            },
            "optional": {
                "mask": ("MASK", {"tooltip": "LoadImage's MASK (1 - alpha): the alpha channel to upscale and "
                                             "re-attach. An all-zero mask (opaque image) is ignored."}),
                "timestep": ("OSD_TIMESTEP", {"tooltip": "TADSR: encode with the bundle's time-aware encoder at this "
                                                         "timestep (ignored when the bundle has none)."}),
            },
        }

    def encode(self, model, image, upscale_factor, sampling, seed, vae_tile_size, vae_tile_overlap,
               max_output_megapixels, mask=None, timestep=None):
        validate_tiling(vae_tile_size, vae_tile_overlap)
        pixels = _with_alpha(glue.image_to_bchw(image), mask)
        prepared = prepare_image(pixels, upscale_factor, max_output_pixels=int(max_output_megapixels * 1e6))
        vae = model.components.vae
        tae = model.extra_modules.get("tae") if timestep is not None else None
        encoder = time_aware_encoder_fn(tae, timestep.for_batch(pixels.shape[0])) if tae is not None else None

        def run(tile, overlap):
            return encode_latent(vae, prepared.x, sampling=sampling, seed=seed, tile_latent=tile,
                                 overlap_latent=overlap, encoder=encoder, callback=glue.progress_callback())

        with glue.on_device(*[m for m in (vae, tae) if m is not None]):
            z = retry_smaller_tiles(run, vae_tile_size, vae_tile_overlap, on_retry=glue.free_cache)
        return (OSDLatent(z=z, image=prepared),)

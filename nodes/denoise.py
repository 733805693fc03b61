"""One-step denoise: latent + conditioning + timestep (+ noise) -> the U-Net -> x̂₀ as OSD_LATENT."""

from __future__ import annotations

from ..osd_core.onestep import one_step_denoise
from ..osd_core.sft import conv_in_hook
from ..osd_core.tiling import retry_smaller_tiles
from . import comfy_glue as glue


class OneStepSRDenoise:
    DESCRIPTION = (
        "The one U-Net step: z_t = z (or alpha_t z + sigma_t noise when noise is connected), eps = UNet(z_t, t, c) on "
        "gaussian-blended latent tiles, then x0 by the bundle's parameterisation. Progress is reported per tile and "
        "the run can be cancelled between tiles. Out of memory, it retries with smaller tiles."
    )
    CATEGORY = glue.CATEGORY
    RETURN_TYPES = ("OSD_LATENT",)
    RETURN_NAMES = ("latent",)
    FUNCTION = "denoise"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": ("OSD_MODEL", {"tooltip": "From Load model."}),
                "latent": ("OSD_LATENT", {"tooltip": "From Encode."}),
                "conditioning": ("OSD_COND", {"tooltip": "From Text conditioning (or Visual prompt)."}),
                "timestep": ("OSD_TIMESTEP", {"tooltip": "From Timestep (or another timestep source)."}),
                "tile_size": ("INT", {"default": 96, "min": 8, "max": 1024, "step": 8,
                                      "tooltip": "Latent tile in latent px (96 = 768 image px). Tiling only "
                                                 "happens when the latent is larger."}),
                "tile_overlap": ("INT", {"default": 32, "min": 0, "max": 1016, "step": 8,
                                         "tooltip": "Overlap of latent tiles; must be smaller than tile_size."}),
            },
            "optional": {
                "noise": ("OSD_NOISE", {"tooltip": "Noise to start from (Gaussian, Sobel-weighted, CHARIOT mix). "
                                                   "Without it the latent itself is the U-Net input."}),
                "sft": ("OSD_SFT", {"tooltip": "CODSR's LQFM modulation of the U-Net's first conv, sliced per tile."}),
            },
        }

    def denoise(self, model, latent, conditioning, timestep, tile_size, tile_overlap, noise=None, sft=None):
        batch = latent.batch
        unet = model.components.unet
        eps = noise.for_latent(latent) if noise is not None else None
        sft = sft.for_latent(latent) if sft is not None else None
        hook = conv_in_hook(sft.gamma, sft.beta, sft.lam) if sft is not None else None

        def run(tile, overlap):
            return one_step_denoise(
                unet, model.components.schedule, model.parameterisation, latent.z,
                conditioning.for_batch(batch), timestep.for_batch(batch), noise=eps,
                tile_latent=tile, overlap_latent=overlap, conv_in_hook=hook, callback=glue.progress_callback(),
            )

        with glue.on_device(unet):
            z0 = retry_smaller_tiles(run, tile_size, tile_overlap, on_retry=glue.free_cache)
        return (latent.with_z(z0),)

"""One-step denoise: latent + conditioning + timestep (+ noise) -> the U-Net -> x̂₀ as OSD_LATENT."""

from __future__ import annotations

from ..osd_core.onestep import one_step_denoise
from ..osd_core.pisa import semantic_guidance
from ..osd_core.sft import conv_in_hook
from ..osd_core.tiling import retry_smaller_tiles
from . import comfy_glue as glue


class OneStepSRDenoise:
    DESCRIPTION = (
        "The one U-Net step: z_t = z (or alpha_t z + sigma_t noise when noise is connected), eps = UNet(z_t, t, c) on "
        "gaussian-blended latent tiles, then x0 by the bundle's parameterisation. Progress is reported per tile and "
        "the run can be cancelled between tiles. Out of memory, it retries with smaller tiles. With a PiSA-SR bundle, "
        "lambda_pix and lambda_sem weigh its pixel and semantic LoRA (two U-Net passes unless both are 1)."
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
                "lambda_pix": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 5.0, "step": 0.05,
                                         "tooltip": "PiSA-SR pixel guidance: weight of the pixel-LoRA prediction. "
                                                    "Higher removes more degradation; too high over-smooths. 1.0 "
                                                    "with lambda_sem 1.0 is the official default (one U-Net pass)."}),
                "lambda_sem": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 5.0, "step": 0.05,
                                         "tooltip": "PiSA-SR semantic guidance: weight of what the semantic LoRA "
                                                    "adds. Lower (e.g. 0.6) favours fidelity, higher adds detail. "
                                                    "Values other than 1 need a PiSA-SR bundle."}),
            },
        }

    def denoise(self, model, latent, conditioning, timestep, tile_size, tile_overlap, noise=None, sft=None,
                lambda_pix=1.0, lambda_sem=1.0):
        batch = latent.batch
        unet = model.components.unet
        eps = noise.for_latent(latent) if noise is not None else None
        sft = sft.for_latent(latent) if sft is not None else None
        hook = conv_in_hook(sft.gamma, sft.beta, sft.lam) if sft is not None else None
        unet_call = semantic_guidance(unet, lambda_pix, lambda_sem, model_name=f"model {model.name!r}")

        def run(tile, overlap):
            return one_step_denoise(
                unet, model.components.schedule, model.parameterisation, latent.z,
                conditioning.for_batch(batch), timestep.for_batch(batch), noise=eps,
                tile_latent=tile, overlap_latent=overlap, conv_in_hook=hook, unet_call=unet_call,
                callback=glue.progress_callback(),
            )

        with glue.on_device(unet):
            z0 = retry_smaller_tiles(run, tile_size, tile_overlap, on_retry=glue.free_cache)
        return (latent.with_z(z0),)

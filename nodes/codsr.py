"""CODSR nodes: Sobel region-adaptive noise (RGPA) and LQ-guided SFT modulation (LQFM) (SPEC §4)."""

from __future__ import annotations

import torch.nn.functional as F

from ..osd_core.datatypes import OSDNoise, OSDSFT
from ..osd_core.imageprep import crop_to_frame
from ..osd_core.sft import lambda_t
from ..osd_core.sobel import region_adaptive_noise
from . import comfy_glue as glue


class OneStepSRSobelNoise:
    DESCRIPTION = (
        "CODSR's region-adaptive noise: Gaussian noise weighted per 16x16 patch by the Sobel edge strength of the "
        "upsampled LQ image (0.3 in flat regions, up to 1.0 on edges and texture). The weight map is also output "
        "as a MASK at image size for previewing."
    )
    CATEGORY = glue.CATEGORY + "/CODSR"
    RETURN_TYPES = ("OSD_NOISE", "MASK")
    RETURN_NAMES = ("noise", "weight_map")
    FUNCTION = "make"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "latent": ("OSD_LATENT", {"tooltip": "From Encode (its upsampled LQ image is analysed)."}),
                "seed": ("INT", {"default": 0, "min": 0, "max": 0xFFFFFFFFFFFFFFFF,
                                 "tooltip": "Seed of the Gaussian noise; every batch item uses it."}),
            }
        }

    def make(self, latent, seed):
        eps_a, weights = region_adaptive_noise(latent.image.x, seed, latent_shape=tuple(latent.z.shape))
        mask = F.interpolate(weights, scale_factor=8, mode="nearest")  # (B, 1, Hp, Wp)
        return (OSDNoise(eps=eps_a, kind="sobel"), crop_to_frame(mask, latent.image.frame)[:, 0])


class OneStepSRSFTModulation:
    DESCRIPTION = (
        "CODSR's LQFM: scale and shift maps computed from the pixel-unshuffled LQ image that modulate the output of "
        "the U-Net's first conv, scaled by lambda_t = 1/w_t of the timestep. Connect to One-step denoise's sft input. "
        "Needs a CODSR bundle."
    )
    CATEGORY = glue.CATEGORY + "/CODSR"
    RETURN_TYPES = ("OSD_SFT",)
    RETURN_NAMES = ("sft",)
    FUNCTION = "make"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": ("OSD_MODEL", {"tooltip": "From Load model, with a CODSR bundle (it holds the LQFM)."}),
                "latent": ("OSD_LATENT", {"tooltip": "From Encode."}),
                "timestep": ("OSD_TIMESTEP", {"tooltip": "The denoise timestep (CODSR: 100); sets lambda_t."}),
            }
        }

    def make(self, model, latent, timestep):
        lqfm = model.require_module("lqfm", needed_by="SFT modulation")
        param = next(lqfm.parameters())
        with glue.on_device(lqfm):
            gamma, beta = lqfm(latent.image.x.to(device=param.device, dtype=param.dtype))  # (B, C, h, w) each
        lam = lambda_t(timestep.for_batch(latent.batch), model.components.schedule)  # (B,)
        return (OSDSFT(gamma=gamma.float().cpu(), beta=beta.float().cpu(), lam=lam.float().cpu()),)

"""Gaussian noise: seeded N(0, I) shaped like a latent -> OSD_NOISE."""

from __future__ import annotations

from ..osd_core.datatypes import OSDNoise
from ..osd_core.noise import gaussian_noise
from . import comfy_glue as glue


class OneStepSRGaussianNoise:
    DESCRIPTION = (
        "Standard Gaussian noise shaped like the latent, drawn on the CPU from the seed so a seed gives the same "
        "image on any device. Connect it to One-step denoise to start from alpha_t z + sigma_t noise."
    )
    CATEGORY = glue.CATEGORY
    RETURN_TYPES = ("OSD_NOISE",)
    RETURN_NAMES = ("noise",)
    FUNCTION = "make"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "latent": ("OSD_LATENT", {"tooltip": "The latent the noise is for (its shape and batch)."}),
                "seed": ("INT", {"default": 0, "min": 0, "max": 0xFFFFFFFFFFFFFFFF,
                                 "tooltip": "Every batch item gets the noise of this seed."}),
            }
        }

    def make(self, latent, seed):
        z = latent.z
        eps = gaussian_noise(tuple(z.shape[1:]), seed, batch=z.shape[0], device=z.device, dtype=z.dtype)
        return (OSDNoise(eps=eps, kind="gaussian"),)

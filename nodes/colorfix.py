"""Color fix: match the SR output's colours to the (upsampled) LQ reference, AdaIN or wavelet (SPEC §9)."""

from __future__ import annotations

import torch

from ..osd_core.colorfix import color_fix
from ..osd_core.imageprep import resize_image
from . import comfy_glue as glue

METHODS = ["adain", "wavelet", "none"]


class OneStepSRColorFix:
    DESCRIPTION = (
        "Corrects colour shifts of the SR output against the low-quality input: adain matches per-channel mean and "
        "std (the papers' default), wavelet keeps the output's detail and takes the reference's low frequencies. "
        "The reference is resized (bicubic) to the output size."
    )
    CATEGORY = glue.CATEGORY
    RETURN_TYPES = ("IMAGE",)
    RETURN_NAMES = ("image",)
    FUNCTION = "fix"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "image": ("IMAGE", {"tooltip": "The SR output to correct."}),
                "reference": ("IMAGE", {"tooltip": "The low-quality input image (any size; it is upsampled)."}),
                "method": (METHODS, {"default": "adain", "tooltip": "adain (default of OSEDiff/TADSR/CODSR), "
                                                                      "wavelet, or none."}),
            }
        }

    def fix(self, image, reference, method):
        target = glue.image_to_bchw(image)
        source = glue.image_to_bchw(reference)[:, :3]
        if source.shape[1] == 1:
            source = source.expand(-1, 3, -1, -1)
        if source.shape[0] not in (1, target.shape[0]):
            raise ValueError(f"`reference` has {source.shape[0]} images but `image` has {target.shape[0]}; "
                             "connect the same batch (or a single reference).")
        source = resize_image(source, *target.shape[-2:]).expand(target.shape[0], -1, -1, -1)
        fixed = color_fix(target[:, :3], source, method)
        return (glue.bchw_to_image(torch.cat([fixed, target[:, 3:]], dim=1)),)

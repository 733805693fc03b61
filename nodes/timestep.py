"""Timestep: a constant (float) timestep -> OSD_TIMESTEP."""

from __future__ import annotations

import torch

from ..osd_core.datatypes import OSDTimestep
from . import comfy_glue as glue


class OneStepSRTimestep:
    DESCRIPTION = (
        "A constant diffusion timestep for the one-step denoise. Method defaults: OSEDiff 999, TADSR 500 "
        "(its fidelity<->realism knob, 100-600), CODSR 100, RCOD 250/500/750. Fractional values are allowed."
    )
    CATEGORY = glue.CATEGORY
    RETURN_TYPES = ("OSD_TIMESTEP",)
    RETURN_NAMES = ("timestep",)
    FUNCTION = "make"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "timestep": ("FLOAT", {"default": 999.0, "min": 0.0, "max": 999.0, "step": 1.0,
                                       "tooltip": "t in [0, 999]. Higher t trusts the input less and generates "
                                                  "more texture."}),
            }
        }

    def make(self, timestep):
        return (OSDTimestep(t=torch.tensor([float(timestep)], dtype=torch.float32)),)

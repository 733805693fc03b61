"""RCOD nodes: Visual prompt (VPIM on ComfyUI's native CLIP_VISION) and Realism level (LDG levels, MEM) (SPEC §6)."""

from __future__ import annotations

import torch

from ..osd_core.datatypes import OSDCond, OSDTimestep
from ..osd_core.ldg import LDGConfig, level_timesteps, named_timestep
from ..osd_core.vpim import resize_for_clip, validate_tokens
from . import comfy_glue as glue

ADAPTIVE = "adaptive"


def _vision_tokens(clip_vision, latent, vpim_config) -> torch.Tensor:
    """The CLIP tower's last_hidden_state (B, N, D) for the latent's upsampled LQ image, squashed to the tower size."""
    pixels = resize_for_clip(latent.image.x, vpim_config).movedim(1, -1)  # (B, 224, 224, 3) in [0, 1]
    tokens = clip_vision.encode_image(pixels)["last_hidden_state"].float().cpu()  # (B, N, D)
    validate_tokens(tokens, vpim_config)
    return tokens


def _ldg_config(model) -> LDGConfig:
    meta = model.bundle.meta if model.bundle is not None else None
    return LDGConfig.from_dict(meta.hyperparameters.get("ldg", {})) if meta is not None else LDGConfig()


class OneStepSRVisualPrompt:
    DESCRIPTION = (
        "RCOD's visual prompt: CLIP vision tokens of the upsampled LQ image, mapped by the bundle's VPIM into the "
        "U-Net's cross-attention space, in place of a text prompt (no tagger needed). Use ComfyUI's Load CLIP Vision "
        "with the tower the bundle was trained with (ViT-L/14). Needs an RCOD bundle."
    )
    CATEGORY = glue.CATEGORY + "/RCOD"
    RETURN_TYPES = ("OSD_COND",)
    RETURN_NAMES = ("conditioning",)
    FUNCTION = "encode"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": ("OSD_MODEL", {"tooltip": "From Load model, with an RCOD bundle (it holds the VPIM)."}),
                "latent": ("OSD_LATENT", {"tooltip": "From Encode (its upsampled LQ image is shown to CLIP)."}),
                "clip_vision": ("CLIP_VISION", {"tooltip": "From ComfyUI's Load CLIP Vision (ViT-L/14)."}),
            }
        }

    def encode(self, model, latent, clip_vision):
        vpim = model.require_module("vpim", needed_by="Visual prompt")
        tokens = _vision_tokens(clip_vision, latent, vpim.config)  # (B, N, D)
        param = next(vpim.parameters())
        with torch.no_grad():
            cond = vpim(tokens.to(dtype=param.dtype, device=param.device))  # (B, N, cond_dim)
        return (OSDCond(hidden=cond.float().cpu(), source="vpim"),)


class OneStepSRRealismLevel:
    DESCRIPTION = (
        "RCOD's realism level: the timestep of a latent domain group, fidelity (t = 250), neutral (500) or realism "
        "(750), or adaptive: the bundle's MEM estimates the input's latent similarity and picks the group per image."
    )
    CATEGORY = glue.CATEGORY + "/RCOD"
    RETURN_TYPES = ("OSD_TIMESTEP",)
    RETURN_NAMES = ("timestep",)
    FUNCTION = "level"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": ("OSD_MODEL", {"tooltip": "From Load model (an RCOD bundle; MEM for adaptive)."}),
                "latent": ("OSD_LATENT", {"tooltip": "From Encode (used by adaptive)."}),
                "level": ([*level_timesteps(LDGConfig()), ADAPTIVE], {
                    "default": "neutral",
                    "tooltip": "fidelity keeps the input closest, realism generates the most; adaptive lets MEM "
                               "choose per image."}),
            },
            "optional": {
                "clip_vision": ("CLIP_VISION", {"tooltip": "Needed by adaptive when the MEM reads CLIP tokens."}),
            },
        }

    def level(self, model, latent, level, clip_vision=None):
        config = _ldg_config(model)
        if level != ADAPTIVE:
            return (OSDTimestep(t=torch.tensor([float(named_timestep(level, config))])),)
        mem = model.require_module("mem", needed_by="Realism level (adaptive)")
        tokens = None
        if mem.config.token_dim > 0:
            if clip_vision is None:
                raise ValueError("Realism level `adaptive` needs `clip_vision`: this bundle's MEM reads CLIP vision "
                                 "tokens. Connect Load CLIP Vision (ViT-L/14), or pick a fixed level.")
            tokens = _vision_tokens(clip_vision, latent, model.require_module("vpim", needed_by="Realism level").config)
        param = next(mem.parameters())
        tokens = tokens.to(device=param.device, dtype=param.dtype) if tokens is not None else None
        t = mem.estimate_timestep(latent.z.to(device=param.device, dtype=param.dtype), tokens, config)  # (B,)
        return (OSDTimestep(t=t.float().cpu()),)

"""Text conditioning: prompt (+ optional embedding) -> OSD_COND."""

from __future__ import annotations

from ..osd_core.datatypes import OSDCond
from ..osd_core.text import add_embedding, encode_prompt
from . import comfy_glue as glue


class OneStepSRTextConditioning:
    DESCRIPTION = (
        "Encodes a text prompt with the model's CLIP text encoder for the U-Net's cross-attention. An empty prompt "
        "is valid (no tagger needed); the papers use RAM/DAPE tags of the image. An optional embedding (IDaS-SR's "
        "degradation embedding from MINE) is added to every token."
    )
    CATEGORY = glue.CATEGORY
    RETURN_TYPES = ("OSD_COND",)
    RETURN_NAMES = ("conditioning",)
    FUNCTION = "encode"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": ("OSD_MODEL", {"tooltip": "From Load model (its text encoder is used)."}),
                "prompt": ("STRING", {"default": "", "multiline": True,
                                      "tooltip": "Tags or a caption of the image content; may be empty."}),
            },
            "optional": {
                "embedding": ("OSD_EMBED", {"tooltip": "Added to every token (IDaS-SR MINE's degradation "
                                                       "embedding)."}),
            },
        }

    def encode(self, model, prompt, embedding=None):
        text_encoder = model.components.text_encoder
        with glue.on_device(text_encoder):
            hidden = encode_prompt(text_encoder, model.components.tokenizer, prompt)  # (1, L, D)
        if embedding is not None:
            return (OSDCond(hidden=add_embedding(hidden, embedding.d), source="text+embedding"),)
        return (OSDCond(hidden=hidden, source="text"),)

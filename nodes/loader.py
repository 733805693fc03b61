"""Load model: base SD (checkpoint file or diffusers folder) + adapter bundle -> OSD_MODEL."""

from __future__ import annotations

import comfy.model_management as mm

from ..osd_core.models import resolve_dtype
from ..osd_core.official_import import cached_bundle
from ..osd_core.osd_model import load_osd_model
from . import comfy_glue as glue


class OneStepSRLoadModel:
    DESCRIPTION = (
        "Loads a Stable Diffusion 2.1-base class model and a OneStep SR adapter bundle (models/onestep_sr). "
        "The bundle's method (OSEDiff, TADSR, CODSR, IDaS-SR, RCOD, PiSA-SR) decides the parameterisation and defaults; "
        "with bundle 'none' the base model runs as plain SD, which is useful to check a graph's wiring. An official "
        ".pkl release (OSEDiff, TADSR, CODSR, PiSA-SR) is converted once into a bundle next to it; the summary output says "
        "what was loaded and converted."
    )
    CATEGORY = glue.CATEGORY
    RETURN_TYPES = ("OSD_MODEL", "STRING")
    RETURN_NAMES = ("model", "summary")
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "base_model": (glue.base_model_names(), {
                    "tooltip": "SD 2.1-base (or SD-Turbo) as a single-file checkpoint from models/checkpoints or a "
                               "diffusers folder from models/diffusers."}),
                "bundle": (glue.bundle_names(), {
                    "tooltip": "Adapter bundle from models/onestep_sr (LoRA + method modules), or an official .pkl "
                               "release. 'none' runs plain SD."}),
                "dtype": (["auto", "fp32", "fp16", "bf16"], {
                    "default": "auto",
                    "tooltip": "Weights' precision. auto: fp32 on CPU, bf16 on GPUs that support it, else fp16."}),
            }
        }

    def load(self, base_model, bundle, dtype):
        device = glue.torch_device()
        bundle_path, notes = glue.resolve_bundle(bundle), []
        if bundle_path is not None and bundle_path.lower().endswith(".pkl"):
            bundle_path, note = cached_bundle(bundle_path)
            notes.append(note)
        model = load_osd_model(glue.resolve_base_model(base_model), bundle_path, dtype=resolve_dtype(dtype, device))
        if dtype == "auto" and device.type != "cpu":
            # ComfyUI's own choice for VAEs honours --fp32-vae/--bf16-vae and avoids fp16 VAE overflow.
            for module in (model.components.vae, model.extra_modules.get("tae")):
                if module is not None:
                    module.to(dtype=mm.vae_dtype())
        summary = model.bundle.summary() if model.bundle is not None else f"{model.name}: plain SD, no bundle"
        return (model, "\n".join([*notes, summary]))

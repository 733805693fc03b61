"""comfyui-onestep-sr: one-step diffusion real-world super-resolution nodes for ComfyUI.

ComfyUI imports this file as the pack's entry point (under a module name derived from the folder), so everything
below is imported relatively. Importing registers the ``models/onestep_sr`` folder for adapter bundles.
"""

from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS
from .nodes.comfy_glue import register_model_folders

register_model_folders()

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]

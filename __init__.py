"""comfyui-onestep-sr: one-step diffusion real-world super-resolution nodes for ComfyUI.

ComfyUI imports this file as the pack's entry point (under a module name derived from the folder), so everything
below is imported relatively. Importing it inside ComfyUI registers the ``models/onestep_sr`` folder for adapter
bundles. Outside ComfyUI (pytest collects this folder as a package, packaging tools inspect it) there is no ComfyUI
to register with, and the mappings are empty.
"""

import importlib.util

if importlib.util.find_spec("folder_paths") is not None:
    from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS
    from .nodes.comfy_glue import register_model_folders

    register_model_folders()
else:
    NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS = {}, {}

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]

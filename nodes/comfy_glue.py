"""The pack's only contact surface with ComfyUI: layouts, devices, memory, progress and model folders.

Nodes stay declarations plus a few lines; everything ComfyUI-specific they share lives here, once.
"""

from __future__ import annotations

import logging
import os
from contextlib import contextmanager
from typing import Callable, Iterator

import torch

import comfy.model_management as mm
import comfy.utils
import folder_paths

logger = logging.getLogger(__name__)

BUNDLE_FOLDER = "onestep_sr"
BUNDLE_EXTENSIONS = {".safetensors", ".pkl"}
NO_BUNDLE = "none"
DIFFUSERS_PREFIX = "diffusers/"
CATEGORY = "OneStep SR"


def register_model_folders() -> None:
    """Register ``models/onestep_sr`` without clobbering paths that extra_model_paths.yaml already added."""
    default = os.path.join(folder_paths.models_dir, BUNDLE_FOLDER)
    if BUNDLE_FOLDER in folder_paths.folder_names_and_paths:
        paths, extensions = folder_paths.folder_names_and_paths[BUNDLE_FOLDER]
        if default not in paths:
            paths.append(default)
        folder_paths.folder_names_and_paths[BUNDLE_FOLDER] = (paths, set(extensions) | BUNDLE_EXTENSIONS)
    else:
        folder_paths.folder_names_and_paths[BUNDLE_FOLDER] = ([default], set(BUNDLE_EXTENSIONS))


# ---- image layout ---------------------------------------------------------------------------------------------------

def image_to_bchw(image: torch.Tensor) -> torch.Tensor:
    """ComfyUI IMAGE (B, H, W, C) float in [0, 1] -> (B, C, H, W) float32 on the CPU."""
    return image.detach().float().cpu().permute(0, 3, 1, 2).contiguous()


def bchw_to_image(x: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) float in [0, 1] -> ComfyUI IMAGE (B, H, W, C) float32 on the CPU."""
    return x.detach().float().cpu().permute(0, 2, 3, 1).contiguous()


# ---- devices, memory and progress --------------------------------------------------------------------------------

def torch_device() -> torch.device:
    return mm.get_torch_device()


@contextmanager
def on_device(*modules: torch.nn.Module) -> Iterator[torch.device]:
    """Make room through ComfyUI's memory manager, move ``modules`` to the compute device, and offload them after."""
    device = torch_device()
    needed = sum(p.numel() * p.element_size() for m in modules for p in m.parameters())
    mm.free_memory(needed, device)
    for module in modules:
        module.to(device)
    try:
        yield device
    finally:
        offload = mm.unet_offload_device()
        for module in modules:
            module.to(offload)
        if offload != device:
            mm.soft_empty_cache()


def free_cache() -> None:
    """Release cached device memory (between out-of-memory retries)."""
    mm.soft_empty_cache()


def progress_callback() -> Callable[[int, int], None]:
    """A ``callback(done, total)`` that drives a ComfyUI progress bar and is the cancel point between tiles."""
    bar = None
    mm.throw_exception_if_processing_interrupted()

    def callback(done: int, total: int) -> None:
        nonlocal bar
        if bar is None:
            bar = comfy.utils.ProgressBar(total)
        bar.update_absolute(done, total)
        mm.throw_exception_if_processing_interrupted()

    return callback


# ---- model files ------------------------------------------------------------------------------------------------

def _diffusers_folders() -> list[str]:
    names = []
    for root in folder_paths.get_folder_paths("diffusers"):
        if not os.path.isdir(root):
            continue
        for entry in sorted(os.listdir(root)):
            if os.path.isfile(os.path.join(root, entry, "unet", "config.json")):
                names.append(DIFFUSERS_PREFIX + entry)
    return names


def base_model_names() -> list[str]:
    return list(folder_paths.get_filename_list("checkpoints")) + _diffusers_folders()


def bundle_names() -> list[str]:
    return [NO_BUNDLE] + list(folder_paths.get_filename_list(BUNDLE_FOLDER))


def resolve_base_model(name: str) -> str:
    """Full path of a base model named in the Load model node's list."""
    if name.startswith(DIFFUSERS_PREFIX):
        folder = name[len(DIFFUSERS_PREFIX):]
        for root in folder_paths.get_folder_paths("diffusers"):
            if os.path.isdir(os.path.join(root, folder)):
                return os.path.join(root, folder)
    else:
        path = folder_paths.get_full_path("checkpoints", name)
        if path is not None:
            return path
    raise FileNotFoundError(
        f"`base_model` {name!r} was not found in ComfyUI's models/checkpoints or models/diffusers folders "
        f"(or extra_model_paths.yaml). Put an SD 2.1-base checkpoint there and refresh the node list."
    )


def resolve_bundle(name: str) -> str | None:
    if name == NO_BUNDLE:
        return None
    path = folder_paths.get_full_path(BUNDLE_FOLDER, name)
    if path is None:
        raise FileNotFoundError(
            f"`bundle` {name!r} was not found in ComfyUI's models/{BUNDLE_FOLDER} folder "
            "(or extra_model_paths.yaml). Put the bundle file there and refresh the node list."
        )
    return path

"""The frozen CLIP vision tower Y of RCOD's VPIM (SPEC §6.3) for training: read from a local file or folder, or
built tiny in code for tests. Never downloads.

* A folder: a transformers ``CLIPVisionModel`` (or ``...WithProjection``) written by ``save_pretrained``.
* A ``.safetensors`` file in the transformers layout, as ComfyUI's ``models/clip_vision`` holds OpenAI's ViT-L/14
  (``vision_model.*``, optionally ``visual_projection.weight``). Its config is read from the tensor shapes (width,
  depth, MLP width, patch and image size) with OpenAI CLIP's 64-wide heads and quick-GELU; the file must be complete.
* ``tiny_vision_tower``: random weights drawn from a generator, one layer, 32 px patches, at ViT-L/14's token width
  1024, so a bundle trained on it also runs with ComfyUI's CLIP_VISION ViT-L/14 (the nodes check the width).

The tokens VPIM reads are ``last_hidden_state`` (``osd_core.vpim.encode_with_tower``).
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import torch
from transformers import CLIPVisionConfig, CLIPVisionModel

PREFIX = "vision_model."  # transformers < 5 nests the tower under it; 5.x does not, except "WithProjection"
IGNORED = ("visual_projection.weight", "embeddings.position_ids")
HEAD_WIDTH = 64  # OpenAI CLIP's vision heads; not readable from the weights
TINY_TOWER = dict(hidden_size=1024, intermediate_size=64, num_hidden_layers=1, num_attention_heads=16,
                  patch_size=32, image_size=224, hidden_act="quick_gelu")


def _strip(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Keys without the ``vision_model.`` prefix, the projection and the position ids left out."""
    state = {k.removeprefix(PREFIX): v for k, v in state.items()}
    return {k: v for k, v in state.items() if k not in IGNORED}


def config_from_state(state: dict[str, torch.Tensor], where: str) -> CLIPVisionConfig:
    """The tower's config read from its tensor shapes (transformers key layout, with or without ``vision_model.``)."""
    state = _strip(state)
    patch_key, position_key = "embeddings.patch_embedding.weight", "embeddings.position_embedding.weight"
    if patch_key not in state or position_key not in state:
        raise ValueError(f"CLIP vision file {where!r} has no {PREFIX + patch_key!r} / {PREFIX + position_key!r}; it "
                         "is not a transformers-layout CLIP vision model.")
    hidden, _, patch, _ = state[patch_key].shape
    grid = math.isqrt(state[position_key].shape[0] - 1)
    layers = 1 + max(int(m.group(1)) for k in state if (m := re.match(r"encoder\.layers\.(\d+)\.", k)))
    intermediate = state["encoder.layers.0.mlp.fc1.weight"].shape[0]
    return CLIPVisionConfig(hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                            num_attention_heads=max(1, hidden // HEAD_WIDTH), patch_size=patch,
                            image_size=grid * patch, hidden_act="quick_gelu")


def tower_from_state(state: dict[str, torch.Tensor], config: CLIPVisionConfig, where: str) -> CLIPVisionModel:
    """A ``CLIPVisionModel`` holding exactly ``state`` (strict, apart from the projection and position ids)."""
    state = _strip(state)
    with torch.device("meta"):
        tower = CLIPVisionModel(config)
    own = {k.removeprefix(PREFIX): k for k in tower.state_dict() if k.removeprefix(PREFIX) not in IGNORED}
    missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    if missing or unexpected:
        raise ValueError(f"CLIP vision file {where!r} does not fit a {config.num_hidden_layers}-layer, "
                         f"{config.hidden_size}-wide CLIP vision tower: {len(missing)} missing (first: {missing[:3]}), "
                         f"{len(unexpected)} unexpected (first: {unexpected[:3]}).")
    tower.load_state_dict({own[k]: v for k, v in state.items()}, strict=False, assign=True)
    for name, buffer in tower.named_buffers():  # non-persistent buffers (position ids) are still on meta
        if buffer.is_meta:
            module_name, _, buffer_name = name.rpartition(".")
            tower.get_submodule(module_name).register_buffer(
                buffer_name, torch.arange(buffer.numel()).reshape(buffer.shape), persistent=False)
    return tower


def load_vision_tower(path: str) -> CLIPVisionModel:
    """The frozen tower at ``path`` (folder or .safetensors file), float32 on the CPU, in eval mode."""
    source = Path(path)
    if source.is_dir():
        tower = CLIPVisionModel.from_pretrained(str(source), local_files_only=True)
    elif source.is_file() and source.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(source))
        tower = tower_from_state(state, config_from_state(state, path), path)
    else:
        raise FileNotFoundError(f"CLIP vision tower {path!r} is neither a transformers folder nor a .safetensors "
                                "file; point it at ComfyUI's models/clip_vision/<ViT-L-14>.safetensors or a folder.")
    return tower.float().eval().requires_grad_(False)


def tiny_vision_tower(generator: torch.Generator) -> CLIPVisionModel:
    """A random tiny tower (``TINY_TOWER``) for tests: N(0, 0.02) weights, unit norms, zero biases, from
    ``generator``."""
    config = CLIPVisionConfig(**TINY_TOWER)
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in _strip(CLIPVisionModel(config).state_dict()).items()}
    state = {}
    for key, shape in shapes.items():
        if "norm" in key and key.endswith(".weight"):
            state[key] = torch.ones(shape)
        elif key.endswith(".bias"):
            state[key] = torch.zeros(shape)
        else:
            state[key] = torch.randn(shape, generator=generator) * 0.02
    return tower_from_state(state, config, "tiny").eval().requires_grad_(False)


def vision_tower(path: str, model, key: str) -> CLIPVisionModel:
    """The tower at ``path``; with none and tiny test models (``model.tiny``), the tiny tower seeded by
    ``model.tiny_seed`` (so every method of a test run sees the same one). ``key`` names the setting in errors."""
    if path:
        return load_vision_tower(path)
    if model.tiny:
        return tiny_vision_tower(torch.Generator().manual_seed(model.tiny_seed))
    raise ValueError(f"`{key}` is empty; set it to the CLIP vision tower VPIM reads (ViT-L/14): ComfyUI's "
                     "models/clip_vision/<file>.safetensors or a transformers CLIPVisionModel folder.")

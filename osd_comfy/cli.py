"""``onestep-sr``: upscale an image headlessly through a shipped workflow, or write tiny demo models.

    onestep-sr upscale IN --out OUT [--scale 4] [--models-dir DIR] [--workflow FILE] [--base NAME] [--bundle NAME]
                       [--clip-vision NAME] [--seed N] [--comfyui DIR]
    onestep-sr import FILE [--method {osediff,tadsr,codsr,pisa-sr}] [--time-vae DIR [--base MODEL]] --out BUNDLE
    onestep-sr make-demo-models DIR

``upscale`` runs the workflow through a real ComfyUI executor in-process (see osd_comfy.runtime), so the command line
and the editor run the same nodes and the same graph semantics. The workflow may be in API format (the shipped
``workflows/*_api.json``) or in the editor's UI format. The one-line result goes to stdout; ComfyUI's own start-up
chatter goes to stderr.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
import tempfile
import time
from contextlib import redirect_stdout
from pathlib import Path

import numpy as np
from PIL import Image

from .locate import pack_root

logger = logging.getLogger("onestep-sr")

LOADER = "OneStepSRLoadModel"
DECODER = "OneStepSRDecode"
OUTPUT_NODES = ("SaveImage", "PreviewImage")
FORMATS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP"}
DEMO_KEY = "onestep_sr.demo"
# (flag, node class, input) for each model choice; the names offered are that input's list in this ComfyUI.
MODEL_INPUTS = {"base": (LOADER, "base_model"), "bundle": (LOADER, "bundle"),
                "clip_vision": ("CLIPVisionLoader", "clip_name")}


class UsageError(Exception):
    """A problem with what the user asked for; printed without a traceback."""


def default_workflow() -> Path:
    return pack_root() / "workflows" / "osediff_api.json"


def _available(runtime, kind: str) -> list[str]:
    """The names the node's list offers (exactly what ComfyUI's validation accepts)."""
    class_type, input_name = MODEL_INPUTS[kind]
    node_class = runtime.node_classes().get(class_type)
    if node_class is None:
        return []
    return list(node_class.INPUT_TYPES()["required"][input_name][0])


def _choose(runtime, kind: str, requested: str | None, in_workflow: str) -> str:
    """The model name to use: --base/--bundle, else the workflow's, else the one available whose name contains the
    workflow's (``osediff.safetensors`` -> ``onestep-demo-osediff.safetensors``), else the only one available."""
    available = _available(runtime, kind)
    flag = "--" + kind.replace("_", "-")
    if requested is not None:
        if requested not in available:
            raise UsageError(f"{flag} {requested!r} was not found; available: {available or 'nothing'}")
        return requested
    if in_workflow in available:
        return in_workflow
    candidates = [name for name in available if name != "none"]
    stem = Path(in_workflow).stem.lower().replace("_", "-")  # pisa_sr.pkl -> onestep-demo-pisa-sr.safetensors
    similar = [name for name in candidates if stem and stem in name.lower().replace("_", "-")]
    if len(similar) == 1 or len(candidates) == 1:
        choice = similar[0] if len(similar) == 1 else candidates[0]
        logger.info("the workflow's %s %r is not installed; using %r", kind, in_workflow, choice)
        return choice
    where = "pass --models-dir with a folder holding them, or `onestep-sr make-demo-models DIR` for demo ones"
    raise UsageError(f"the workflow's {kind} {in_workflow!r} was not found and there is no unique substitute; "
                     + (f"pass {flag} with one of {available}" if candidates else f"none is installed: {where}"))


def load_workflow(path: Path, runtime) -> dict:
    """An API-format prompt from an API- or UI-format workflow file."""
    try:
        workflow = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise UsageError(f"workflow {str(path)!r} is not valid JSON: {err}") from err
    if isinstance(workflow, dict) and isinstance(workflow.get("nodes"), list):
        from .workflow_format import ui_to_api

        return ui_to_api(workflow, runtime.node_classes())
    return workflow


def _output_source(prompt: dict) -> list:
    """``[node_id, slot]`` of the IMAGE that the workflow's SaveImage (or PreviewImage) node receives."""
    for class_type in OUTPUT_NODES:
        for node in prompt.values():
            if node["class_type"] == class_type and isinstance(node["inputs"].get("images"), list):
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


def _alpha_mask(runtime, prompt: dict, result, had_alpha: bool):
    """The decoder's MASK output (1 - alpha, ComfyUI's LoadImage convention) when the input had alpha."""
    if not had_alpha:
        return None
    decoder = runtime.node_classes().get(DECODER)
    if decoder is None or tuple(decoder.RETURN_TYPES[1:2]) != ("MASK",):
        return None
    for node_id, node in prompt.items():
        if node["class_type"] == DECODER and node_id in result.outputs:
            return result.outputs[node_id][1]
    return None


def write_image(image, out: Path, alpha_mask=None) -> tuple[int, int]:
    """Write the first image of a ComfyUI IMAGE batch (B, H, W, 3) as 8 bits; alpha = 1 - ``alpha_mask`` if given."""
    pixels = (image[0].float().clamp(0, 1).cpu().numpy() * 255).round().astype(np.uint8)  # (H, W, 3)
    if alpha_mask is not None and FORMATS[out.suffix.lower()] == "JPEG":
        logger.warning("JPEG has no alpha channel; %s is written without the input's transparency", out)
        alpha_mask = None
    if alpha_mask is not None:
        alpha = ((1.0 - alpha_mask[0].float().clamp(0, 1)).cpu().numpy() * 255).round().astype(np.uint8)  # (H, W)
        pixels = np.concatenate([pixels, alpha[..., None]], axis=-1)  # (H, W, 4)
    out.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(out, format=FORMATS[out.suffix.lower()])
    return pixels.shape[1], pixels.shape[0]


def _check_paths(args) -> tuple[Path, Path, Path]:
    source, out = Path(args.input), Path(args.out)
    if not source.is_file():
        raise UsageError(f"input image {str(source)!r} does not exist")
    if out.suffix.lower() not in FORMATS:
        raise UsageError(f"--out {str(out)!r}: the extension must be one of {sorted(FORMATS)}")
    workflow = Path(args.workflow) if args.workflow else default_workflow()
    if not workflow.is_file():
        raise UsageError(f"workflow {str(workflow)!r} does not exist; pass --workflow with a workflow JSON file")
    if args.scale <= 0:
        raise UsageError(f"--scale must be positive; got {args.scale}")
    return source, out, workflow


def upscale(args) -> int:
    from .runtime import ComfyRuntime

    source, out, workflow_path = _check_paths(args)
    try:
        with Image.open(source) as probe:
            had_alpha = "A" in probe.getbands()  # what ComfyUI's LoadImage turns into a mask
    except OSError as err:
        raise UsageError(f"input image {str(source)!r} cannot be read: {err}") from err
    with tempfile.TemporaryDirectory(prefix="onestep-sr-") as tmp, redirect_stdout(sys.stderr):
        shutil.copy(source, Path(tmp) / source.name)
        runtime = ComfyRuntime.boot(args.comfyui, models_dir=args.models_dir)
        prompt = load_workflow(workflow_path, runtime)
        _configure(prompt, runtime, args, source.name)
        start = time.perf_counter()
        with runtime.using_folders(input_dir=tmp, output_dir=tmp):
            result = runtime.run(prompt)
        seconds = time.perf_counter() - start
    node_id, slot = _output_source(prompt)
    width, height = write_image(result.outputs[node_id][slot], out, _alpha_mask(runtime, prompt, result, had_alpha))
    print(f"wrote {out} ({width}x{height}) in {seconds:.1f} s")
    if _uses_demo_models(runtime, prompt):
        print("note: these are the random-weight demo models; they do not upscale anything, they only show the "
              "whole path running. Use SD 2.1-base and a trained bundle for real results.")
    return 0


def _uses_demo_models(runtime, prompt: dict) -> bool:
    """Whether the loader's base model or bundle is marked as a demo model in its safetensors metadata."""
    from safetensors import safe_open

    fp = runtime.folder_paths
    for node in prompt.values():
        if node["class_type"] != LOADER:
            continue
        paths = [fp.get_full_path("checkpoints", node["inputs"]["base_model"]),
                 fp.get_full_path("onestep_sr", node["inputs"]["bundle"])]
        for path in paths:
            if path and path.endswith(".safetensors"):
                with safe_open(path, framework="pt") as handle:
                    if DEMO_KEY in (handle.metadata() or {}):
                        return True
    return False


def _base_vae(base: str | None):
    """The VAE of ``--base`` (to compare TADSR's time_vae/ encoder with), or None."""
    if base is None:
        return None
    from osd_core.models import load_sd_components

    return load_sd_components(base).vae


def import_weights(args) -> int:
    """Convert an official .pkl release into an adapter bundle."""
    from osd_core.bundle import save_bundle
    from osd_core.official_import import import_official

    out = Path(args.out)
    if out.resolve() == Path(args.file).resolve():
        raise UsageError("--out must not overwrite the official file")
    if args.base is not None and args.time_vae is None:
        raise UsageError("--base is only used with --time-vae (to keep the time_vae/ encoder weights that differ "
                         "from it); leave it out")
    meta, tensors = import_official(args.file, method=args.method, time_vae=args.time_vae,
                                    base_vae=_base_vae(args.base))
    save_bundle(out, meta, tensors)
    lora = ", ".join(f"{component} LoRA rank {spec['rank']} (scale {meta.lora_scale(component):g})"
                     for component, spec in meta.lora.items())
    print(f"wrote {out}: {meta.method} bundle, {lora}; modules {', '.join(meta.modules)}; defaults {meta.defaults}")
    if "time_vae" in meta.extra:
        print(meta.extra["time_vae"])
    return 0


def make_demo_models(args) -> int:
    from .demo import write_demo_models

    paths = write_demo_models(args.folder)
    for kind, path in paths.items():
        print(f"{kind:11s} {path}")
    print("these models have random weights: they do not upscale anything, they only exercise the pipeline.\n"
          f"try: onestep-sr upscale {paths['input']} --out upscaled.png --models-dir {args.folder}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="onestep-sr", description="One-step diffusion super-resolution.")
    parser.add_argument("-v", "--verbose", action="store_true", help="show a failing node's traceback")
    sub = parser.add_subparsers(dest="command", required=True)
    up = sub.add_parser("upscale", help="upscale an image through a shipped workflow")
    up.add_argument("input", help="input image file")
    up.add_argument("--out", required=True, help="output image file (.png, .jpg, .jpeg, .webp)")
    up.add_argument("--scale", type=float, default=4.0, help="upscale factor (default 4)")
    up.add_argument("--models-dir", help="a ComfyUI-style models folder (checkpoints/, diffusers/, onestep_sr/), "
                                         "searched before ComfyUI's own")
    up.add_argument("--workflow", help="workflow JSON, API or UI format (default: workflows/osediff_api.json)")
    up.add_argument("--base", help="base model name as listed in the models folder")
    up.add_argument("--bundle", help="adapter bundle name in onestep_sr/ (or 'none')")
    up.add_argument("--clip-vision", help="CLIP vision model name in clip_vision/ (workflows that use one: RCOD)")
    up.add_argument("--seed", type=int, help="seed for every seeded node")
    up.add_argument("--comfyui", help="ComfyUI folder to run in (default: $COMFYUI_DIR, the ComfyUI the pack is "
                                      "installed in, or the vendored one)")
    up.set_defaults(func=upscale)
    imp = sub.add_parser("import", help="convert an official OSEDiff/TADSR/CODSR/PiSA-SR .pkl into an adapter bundle")
    imp.add_argument("file", help="the released .pkl file")
    imp.add_argument("--method", choices=["osediff", "tadsr", "codsr", "pisa-sr"],
                     help="expected layout (checked; detected from the file when left out)")
    imp.add_argument("--time-vae", help="TADSR only: its released time_vae/ folder (config.json + "
                                        "diffusion_pytorch_model.safetensors/.bin); the encoder weights that differ "
                                        "from --base are stored in the bundle")
    imp.add_argument("--base", help="with --time-vae: the base model (SD 2.1-base file or diffusers folder) to "
                                    "compare with; without it every time_vae encoder weight is stored")
    imp.add_argument("--out", required=True, help="bundle to write, e.g. ComfyUI/models/onestep_sr/osediff.safetensors")
    imp.set_defaults(func=import_weights)
    demo = sub.add_parser("make-demo-models", help="write tiny random-weight demo models")
    demo.add_argument("folder", help="where to write checkpoints/, onestep_sr/, clip_vision/ and demo_input.png")
    demo.set_defaults(func=make_demo_models)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the exit status (0 done, 1 error, 2 bad arguments)."""
    logging.basicConfig(level=logging.WARNING, format="%(name)s: %(levelname)s: %(message)s")
    logger.setLevel(logging.INFO)
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exit_:  # argparse has printed the usage and the problem
        return int(exit_.code or 0)
    try:
        return args.func(args)
    except (UsageError, OSError, ValueError, RuntimeError) as err:  # RuntimeError: WorkflowError, ComfyBootError
        # A node's traceback is for bug reports, not for the user: shown only with --verbose.
        message = str(err) if args.verbose else getattr(err, "summary", str(err))
        print(f"onestep-sr: error: {message}", file=sys.stderr)
        if not args.verbose and getattr(err, "node_traceback", ""):
            print("(run again with --verbose to see the node's traceback)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())

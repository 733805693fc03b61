"""Training cost of each method's shipped config with full-size random-weight models: seconds per optimiser step and
peak memory at batch 1 (issue #4's "per-method step time and peak memory").

Writes once into ``--work`` (default ``.benchmark/``): a random SD 2.1-base diffusers folder built from the bundled
configs, a random CLIP ViT-L/14 vision tower (RCOD's VPIM reads it) and a few HQ images; then runs each method in its
own subprocess, so the peak resident memory (ru_maxrss) is that method's alone. Each run is the shipped
``training/configs/<method>.toml`` through the real ``Trainer`` (loader, data pipeline with the Real-ESRGAN
degradation, every phase and optimiser), with only these overrides: the random model, ``--crop``, batch 1, no
workers, no validation or checkpoints, and the precision flags below. ``--warmup`` steps are run untimed, then
``--steps`` timed. The stage-2 configs (codsr_stage2, rcod_mem) take the bundle the stage-1 run wrote (in this
invocation or an earlier one).

    .venv/bin/python scripts/benchmark_training.py [--methods osediff tadsr ...] [--crop 512] [--steps 1]
        [--warmup 1] [--mixed-precision no] [--teacher-dtype auto] [--gradient-checkpointing]

A run that is killed (out of memory) is reported as such; rerun it with ``--gradient-checkpointing``, a
half-precision ``--teacher-dtype`` or a smaller ``--crop``. Results are printed as a table and written to
``<work>/results-<settings>.json``.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

METHODS = ("osediff", "tadsr", "idas", "codsr_stage1", "codsr_stage2", "rcod", "rcod_mem")
NEEDS_BUNDLE = {"codsr_stage2": ("codsr_stage1", "codsr_stage2.stage1_bundle"),
                "rcod_mem": ("rcod", "rcod_mem.rcod_bundle")}
CLIP_VISION_KEY = {"rcod": "rcod.clip_vision", "rcod_mem": "rcod_mem.clip_vision"}
VIT_L14 = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
               patch_size=14, image_size=224, hidden_act="quick_gelu")


# ---------------------------------------------------------------------------------------------- the random models


def write_random_sd21(folder: Path) -> None:
    """A complete SD 2.1-base diffusers folder with random weights, from the configs bundled in osd_core."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from osd_core.models import CONFIG_DIR, load_tokenizer

    source = CONFIG_DIR / "sd21-base"
    torch.manual_seed(0)
    UNet2DConditionModel.from_config(json.loads((source / "unet" / "config.json").read_text())).save_pretrained(
        folder / "unet")
    AutoencoderKL.from_config(json.loads((source / "vae" / "config.json").read_text())).save_pretrained(folder / "vae")
    text = json.loads((source / "text_encoder" / "config.json").read_text())
    CLIPTextModel(CLIPTextConfig(**text)).save_pretrained(folder / "text_encoder")
    load_tokenizer().save_pretrained(str(folder / "tokenizer"))
    for name in ("scheduler/scheduler_config.json", "model_index.json"):
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes((source / name).read_bytes())


def write_random_vit_l14(folder: Path) -> None:
    """OpenAI CLIP ViT-L/14's vision tower (304 M parameters) with random weights, as a transformers folder."""
    from transformers import CLIPVisionConfig, CLIPVisionModel

    torch.manual_seed(0)
    CLIPVisionModel(CLIPVisionConfig(**VIT_L14)).save_pretrained(folder)


def write_images(folder: Path, count: int, size: int) -> None:
    """``count`` smooth random RGB images a little larger than the crop (random crops and flips still apply)."""
    import numpy as np
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:size, 0:size].astype(np.float32) / size
    for i in range(count):
        image = np.stack([0.5 + 0.4 * np.sin(2 * np.pi * (rng.uniform(1, 4) * x + rng.uniform(1, 4) * y)
                                             + rng.uniform(0, 6)) for _ in range(3)], -1)
        Image.fromarray((image * 255).round().astype(np.uint8)).save(folder / f"{i:03d}.png")


def prepare(work: Path, crop: int) -> dict[str, Path]:
    """The random models and images in ``work`` (written on the first call, reused after)."""
    paths = {"base": work / "sd21-base-random", "clip_vision": work / "clip-vit-l14-random",
             "images": work / f"hq-{crop}"}
    for key, write in (("base", write_random_sd21), ("clip_vision", write_random_vit_l14)):
        if not (paths[key] / ".complete").is_file():
            print(f"writing {paths[key]} ...", flush=True)
            paths[key].mkdir(parents=True, exist_ok=True)
            write(paths[key])
            (paths[key] / ".complete").touch()
    if not paths["images"].is_dir():
        write_images(paths["images"], 4, crop + crop // 8)
    return paths


# ---------------------------------------------------------------------------------------------- one method


def overrides(method: str, args, paths: dict[str, Path], bundles: dict[str, str]) -> list[str]:
    out = [f"model.base={paths['base'].as_posix()}", f"data.hq_dir={paths['images'].as_posix()}",
           f"data.crop_size={args.crop}", "data.num_workers=0", "train.batch_size=1", "train.grad_accumulation=1",
           f"train.max_steps={args.warmup + args.steps}", "train.save_every=0", "train.val_every=0",
           "train.log_every=1", "train.progress_bar=false", f"train.mixed_precision={args.mixed_precision}",
           f"train.output_dir={(args.work / 'runs' / method).as_posix()}", f"model.dtype={args.teacher_dtype}",
           f"model.gradient_checkpointing={str(args.gradient_checkpointing).lower()}"]
    if method in CLIP_VISION_KEY:
        out.append(f"{CLIP_VISION_KEY[method]}={paths['clip_vision'].as_posix()}")
    if method in NEEDS_BUNDLE:
        stage1, key = NEEDS_BUNDLE[method]
        out.append(f"{key}={bundles[stage1]}")
    return out


def run_one(method: str, settings: list[str]) -> dict:
    """In this (child) process: build the trainer from the shipped config, time its steps, write the bundle."""
    from training.config import load_config
    from training.trainer import Trainer

    args = json.loads(settings[0])
    config = load_config(REPO / "training" / "configs" / f"{method}.toml", settings[1:])
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    start = time.perf_counter()
    trainer = Trainer(config)
    build_s = time.perf_counter() - start
    trainable = sum(p.numel() for p in trainer.state.parameters)
    for module in trainer.modules.values():
        module.train()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times, terms = [], {}
    for _ in range(args["warmup"] + args["steps"]):
        start = time.perf_counter()
        terms = trainer.train_step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    bundle = trainer.export()
    timed = times[args["warmup"]:]
    return {"method": method, "step_s": sum(timed) / len(timed), "steps_s": times, "build_s": build_s,
            "trainable_params": trainable, "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
            "peak_cuda_gib": torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None,
            "device": str(device), "threads": torch.get_num_threads(), "bundle": str(bundle),
            "loss_terms": {k: v for k, v in terms.items() if not k.endswith("grad_norm")}}


def launch(method: str, args, settings: list[str]) -> dict:
    """Run ``method`` in a fresh Python; its result, or why it failed."""
    payload = json.dumps({"warmup": args.warmup, "steps": args.steps})
    command = [sys.executable, __file__, "--child", method, payload, *settings]
    done = subprocess.run(command, capture_output=True, text=True)
    for line in reversed(done.stdout.splitlines()):
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    killed = done.returncode < 0
    reason = f"killed by signal {-done.returncode} (out of memory?)" if killed else f"exit {done.returncode}"
    return {"method": method, "error": reason, "stderr_tail": done.stderr[-2000:]}


def table(results: list[dict]) -> str:
    rows = ["| method | s / step | peak RSS GiB | peak CUDA GiB | trainable params | build s |",
            "|---|---|---|---|---|---|"]
    for r in results:
        if "error" in r:
            rows.append(f"| {r['method']} | failed: {r['error']} | | | | |")
            continue
        cuda = f"{r['peak_cuda_gib']:.1f}" if r["peak_cuda_gib"] is not None else "-"
        rows.append(f"| {r['method']} | {r['step_s']:.1f} | {r['peak_rss_gib']:.1f} | {cuda} | "
                    f"{r['trainable_params'] / 1e6:.1f} M | {r['build_s']:.0f} |")
    return "\n".join(rows)


def main() -> None:
    if len(sys.argv) > 2 and sys.argv[1] == "--child":
        print("RESULT " + json.dumps(run_one(sys.argv[2], sys.argv[3:])), flush=True)
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--crop", type=int, default=512, help="training crop (output size); 512 as in the papers")
    parser.add_argument("--steps", type=int, default=1, help="timed optimiser steps per method")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps before them")
    parser.add_argument("--mixed-precision", default="no", choices=["no", "fp16", "bf16"])
    parser.add_argument("--teacher-dtype", default="auto", choices=["auto", "fp32", "fp16", "bf16"],
                        help="model.dtype: the frozen teacher and text encoder")
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--work", type=Path, default=REPO / ".benchmark")
    args = parser.parse_args()
    paths = prepare(args.work, args.crop)
    results, bundles = [], {}
    for method in args.methods:
        if method in NEEDS_BUNDLE and NEEDS_BUNDLE[method][0] not in bundles:
            stage1 = NEEDS_BUNDLE[method][0]
            earlier = args.work / "runs" / stage1 / f"{stage1}.safetensors"  # from an earlier invocation
            if not earlier.is_file():
                results.append({"method": method, "error": f"needs the {stage1} bundle: list {stage1} before it"})
                continue
            bundles[stage1] = str(earlier)
        print(f"{method} ...", flush=True)
        result = launch(method, args, overrides(method, args, paths, bundles))
        if "bundle" in result:
            bundles[method] = result["bundle"]
        else:
            print(result.get("stderr_tail", ""), file=sys.stderr)
        results.append(result)
        print(json.dumps(result), flush=True)
    tag = f"crop{args.crop}-{args.mixed_precision}-teacher_{args.teacher_dtype}" + (
        "-checkpointing" if args.gradient_checkpointing else "")
    (args.work / f"results-{tag}.json").write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()},
                                                        "results": results}, indent=2))
    print(table(results))


if __name__ == "__main__":
    main()

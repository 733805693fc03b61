"""Helpers for the training tests: tiny image folders made in code, a tiny-model config, and accelerate reset."""

from __future__ import annotations

import contextlib
import csv
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from training.config import TrainingConfig, load_config

REPO = Path(__file__).resolve().parents[1]
OSEDIFF_TOML = REPO / "training" / "configs" / "osediff.toml"


def smooth_image(width: int, height: int, seed: int) -> np.ndarray:
    """A smooth random RGB image (H, W, 3) uint8: low-frequency gradients plus a soft checkerboard."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    channels = []
    for _ in range(3):
        fx, fy, phase = rng.uniform(0.5, 2.0), rng.uniform(0.5, 2.0), rng.uniform(0, 2 * np.pi)
        wave = np.sin(2 * np.pi * (fx * x / width + fy * y / height) + phase)
        checker = np.sign(np.sin(np.pi * x / 16) * np.sin(np.pi * y / 16)) * 0.25
        channels.append(0.5 + 0.3 * wave + checker * rng.uniform(0.2, 1.0))
    return (np.clip(np.stack(channels, -1), 0, 1) * 255).round().astype(np.uint8)


def image_folder(folder: Path, count: int, *, width: int = 80, height: int = 72, seed: int = 0) -> Path:
    """``count`` smooth PNGs named 000.png, 001.png, ... in ``folder`` (created)."""
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        Image.fromarray(smooth_image(width, height, seed + i)).save(folder / f"{i:03d}.png")
    return folder


# the methods whose config has a `[<method>.perceptual]` section (the OSEDiff-form generators)
PERCEPTUAL_METHODS = ("osediff", "tadsr", "idas", "codsr_stage1", "codsr_stage2", "rcod")


def random_images(seed: int, batch: int = 2, size: int = 64) -> torch.Tensor:
    """Seeded uniform noise images (batch, 3, size, size) in [-1, 1], the models' pixel range."""
    return torch.rand(batch, 3, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def tiny_overrides(tmp: Path, hq_dir: Path, *extra: str, method: str = "osediff") -> list[str]:
    """Overrides of a shipped config for tiny models and 64 px crops, CPU, fp32, no workers, quiet. The perceptual
    networks get random AlexNet weights, so a test computes the same with or without the LPIPS weights in the cache
    (the reference test in test_training_losses_perceptual covers the real ones)."""
    perceptual = [f'{method}.perceptual.kind="random-trunk"'] if method in PERCEPTUAL_METHODS else []
    return ["model.tiny=true", f"data.hq_dir={hq_dir.as_posix()}", "data.crop_size=64", "data.num_workers=0",
            f"train.output_dir={(tmp / 'run').as_posix()}", "train.mixed_precision=no", "train.batch_size=2",
            "train.max_steps=4", "train.save_every=0", "train.log_every=1", "train.progress_bar=false",
            'val.perceptual={kind="random-trunk"}', *perceptual, *extra]


def tiny_config(tmp: Path, hq_dir: Path, *extra: str) -> TrainingConfig:
    """The shipped OSEDiff config with ``tiny_overrides``."""
    return load_config(OSEDIFF_TOML, tiny_overrides(tmp, hq_dir, *extra))


@contextlib.contextmanager
def one_thread():
    """One torch thread: tiny models gain nothing from more, and on a shared machine thread barriers get slow."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def validated(val_dir: Path, steps: int) -> tuple[str, ...]:
    """Overrides: train ``steps`` steps and validate on ``val_dir`` (64 px crops) after the last."""
    return (f"train.max_steps={steps}", f"train.val_every={steps}", f"val.hq_dir={val_dir.as_posix()}",
            "val.crop_size=64")


def run_trainer(config: TrainingConfig):
    """Train ``config`` to the end on one thread: (the trainer, its trainable state before training, the bundle)."""
    from training.trainer import Trainer

    with one_thread():
        trainer = Trainer(config)
        before = {k: v.clone() for k, v in trainer.state.capture().items()}
        bundle = trainer.run()
    reset_accelerate()
    return trainer, before, bundle


def logged_rows(run_dir: str | Path, terms: tuple[str, ...], steps: int, val_images: int = 2) -> list[dict[str, str]]:
    """The rows of ``train_log.csv``, after checking one per step 1..``steps`` and every term present, not NaN;
    and that the validation after the last step scored ``val_images`` images (000, 001, ...) and their mean."""
    run_dir = Path(run_dir)
    with open(run_dir / "train_log.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [int(r["step"]) for r in rows] == list(range(1, steps + 1))
    for term in terms:
        assert all(float(r[term]) == float(r[term]) for r in rows), term  # present and not NaN
    with open(run_dir / "val_metrics.csv", newline="") as handle:
        assert [r["image"] for r in csv.DictReader(handle)] == [f"{i:03d}" for i in range(val_images)] + ["mean"]
    return rows


def changed_keys(trainer, before: dict[str, torch.Tensor]) -> set[str]:
    """The checkpointed tensors of ``trainer`` that differ from ``before``, after checking all are finite."""
    after = trainer.state.capture()
    assert all(torch.isfinite(v).all() for v in after.values())
    return {k for k in before if not torch.equal(before[k], after[k])}


def run_bundle_workflow(comfy, models_dir: Path, input_dir: Path, bundle: Path, workflow: str,
                        size: tuple[int, int] = (24, 16)):
    """Run the shipped ``workflow`` on ``bundle`` (copied into the suite's models/onestep_sr) and a ``size`` (w, h)
    input image inside ComfyUI: (the API prompt, which later runs may edit; the output (1, 4h, 4w, 3) in [0, 1])."""
    from conftest import demo_workflow, node_of, run_image, write_image

    name = f"trained-{workflow}-{bundle.stem}.safetensors"
    shutil.copyfile(bundle, models_dir / "onestep_sr" / name)
    prompt = demo_workflow(workflow, write_image(input_dir, f"{name}.png", *size))
    prompt[node_of(prompt, "OneStepSRLoadModel")]["inputs"]["bundle"] = name
    out = run_image(comfy, prompt)
    assert out.shape == (1, 4 * size[1], 4 * size[0], 3)
    assert 0.0 <= float(out.min()) and float(out.max()) <= 1.0
    return prompt, out


def reset_accelerate() -> None:
    """Forget accelerate's process-wide singletons, so the next Accelerator starts from scratch."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


@pytest.fixture(autouse=True)
def isolated_training():
    """Each test on one thread and with a fresh accelerate state."""
    with one_thread():
        yield
    reset_accelerate()

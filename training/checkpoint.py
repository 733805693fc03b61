"""Training checkpoints: atomic folders that resume a run exactly, and their rotation.

``<output_dir>/checkpoints/step-00000500/`` holds

* ``modules.safetensors``: every trainable module's phase parameters and buffers, as ``<module>.<parameter>``;
* ``optimisers.pt``: each phase's AdamW and LR-schedule state, the fp16 grad-scaler state (weights-only pickle);
* ``extra.pt``: the method's ``extra_state``;
* ``rng-<process>.pt``: each process's python, numpy, torch (CPU and CUDA) RNG states and the trainer's generators;
* ``trainer_state.json``: the step, the data position (epoch, batch), the method and the process count;
* ``config.toml``: the resolved config (a valid ``--config`` file).

A checkpoint is written into ``.tmp-step-...`` and renamed into place only when complete, so a run killed while
saving leaves the previous checkpoints intact and never a half-written one under a real name. Only the last
``keep_last`` are kept. Restoring everything listed makes N straight steps and N/2 + resume + N/2 steps identical
bit for bit (on the CPU; GPU kernels may themselves be non-deterministic).
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
PREFIX, TMP = "step-", ".tmp-"
STATE_FILE = "trainer_state.json"


@dataclass
class Checkpoint:
    """What a checkpoint folder holds, loaded (RNG of one process)."""

    path: Path
    step: int
    epoch: int
    position: int
    modules: dict[str, torch.Tensor]
    optim: dict[str, Any]
    extra: dict[str, Any]
    rng: dict[str, Any] | None
    meta: dict[str, Any]


def checkpoints_dir(output_dir: str | Path) -> Path:
    return Path(output_dir) / "checkpoints"


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """Complete checkpoint folders, oldest first."""
    root = checkpoints_dir(output_dir)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and p.name.startswith(PREFIX) and (p / STATE_FILE).is_file()]
    return sorted(found, key=lambda p: int(p.name[len(PREFIX):]))


def resolve_resume(resume: str, output_dir: str | Path) -> Path | None:
    """``train.resume``: "" (start fresh), "latest" (the newest checkpoint, if any) or a checkpoint folder."""
    if not resume:
        return None
    if resume == "latest":
        found = list_checkpoints(output_dir)
        if not found:
            logger.info("train.resume = latest but %s has no checkpoint; starting from step 0",
                        checkpoints_dir(output_dir))
        return found[-1] if found else None
    path = Path(resume)
    if not (path / STATE_FILE).is_file():
        raise FileNotFoundError(f"train.resume {resume!r} is not a checkpoint folder (no {STATE_FILE}); use "
                                f"\"latest\" or a folder under {checkpoints_dir(output_dir)}.")
    return path


def capture_rng(generators: dict[str, torch.Generator]) -> dict[str, Any]:
    """Every RNG state of this process: python, numpy, torch CPU/CUDA, and the named generators."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"python": random.getstate(), "numpy": (kind, keys.tolist(), pos, has_gauss, cached),
             "torch": torch.get_rng_state(), "generators": {k: g.get_state() for k, g in generators.items()}}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any], generators: dict[str, torch.Generator]) -> None:
    """Undo ``capture_rng``; the named generators must be the ones captured."""
    random.setstate((state["python"][0], tuple(state["python"][1]), state["python"][2]))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    missing = sorted(set(generators) - set(state["generators"]))
    if missing:
        raise ValueError(f"the checkpoint has no state for the generators {missing}; it was made by another version.")
    for name, generator in generators.items():
        generator.set_state(state["generators"][name])


def save_checkpoint(accelerator, output_dir: str | Path, *, step: int, epoch: int, position: int,
                    modules: dict[str, torch.Tensor], optim: dict[str, Any], extra: dict[str, Any],
                    rng: dict[str, Any], meta: dict[str, Any], config_toml: str, keep_last: int) -> Path:
    """Write a checkpoint atomically (every process saves its RNG; the main process the rest) and rotate."""
    root = checkpoints_dir(output_dir)
    final = root / f"{PREFIX}{step:08d}"
    tmp = root / f"{TMP}{final.name}"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    torch.save(rng, tmp / f"rng-{accelerator.process_index}.pt")
    if accelerator.is_main_process:
        save_file({k: v.detach().contiguous().cpu() for k, v in modules.items()}, str(tmp / "modules.safetensors"))
        torch.save(optim, tmp / "optimisers.pt")
        torch.save(extra, tmp / "extra.pt")
        (tmp / "config.toml").write_text(config_toml, encoding="utf-8")
        state = {"format_version": FORMAT_VERSION, "step": step, "epoch": epoch, "position": position,
                 "num_processes": accelerator.num_processes, **meta}
        (tmp / STATE_FILE).write_text(json.dumps(state, indent=2), encoding="utf-8")
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        _rotate(root, output_dir, keep_last)
    accelerator.wait_for_everyone()
    return final


def _rotate(root: Path, output_dir: str | Path, keep_last: int) -> None:
    for old in list_checkpoints(output_dir)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    for stale in root.glob(f"{TMP}*"):
        shutil.rmtree(stale, ignore_errors=True)


def load_checkpoint(path: str | Path, process_index: int, num_processes: int) -> Checkpoint:
    """Read a checkpoint folder on the CPU (tensors via safetensors and weights-only pickles)."""
    path = Path(path)
    meta = json.loads((path / STATE_FILE).read_text(encoding="utf-8"))
    if meta.get("format_version", 0) > FORMAT_VERSION:
        raise ValueError(f"checkpoint {str(path)!r} has format {meta['format_version']}, newer than this trainer "
                         f"({FORMAT_VERSION}); update the training package.")
    rng_file = path / f"rng-{process_index}.pt"
    if meta.get("num_processes") != num_processes or not rng_file.is_file():
        logger.warning("checkpoint %s was saved by %s processes, this run has %d: model and optimiser states are "
                       "restored, the random streams are not, so the run will not repeat the original exactly",
                       path, meta.get("num_processes"), num_processes)
        rng = None
    else:
        rng = torch.load(rng_file, map_location="cpu", weights_only=True)
    return Checkpoint(
        path=path, step=int(meta["step"]), epoch=int(meta["epoch"]), position=int(meta["position"]),
        modules=load_file(str(path / "modules.safetensors")),
        optim=torch.load(path / "optimisers.pt", map_location="cpu", weights_only=True),
        extra=torch.load(path / "extra.pt", map_location="cpu", weights_only=True), rng=rng, meta=meta,
    )

"""Checkpoints: N straight steps == N/2, stop (or a killed process), resume, N/2 steps, bit for bit on the CPU;
atomic folders, rotation, and refusing a checkpoint of another method."""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from training.checkpoint import list_checkpoints
from training.trainer import Trainer
from training_support import (  # noqa: F401 (fixture)
    OSEDIFF_TOML,
    REPO,
    image_folder,
    isolated_training,
    reset_accelerate,
    tiny_config,
    tiny_overrides,
)

# every OSEDiff term and random stream: VAE posterior noise, VSD and regulariser timesteps and noise, degradations;
# three images in batches of two cross an epoch boundary every few steps
FULL = ("train.max_steps=6", "train.save_every=3")


def _assert_same_files(a, b):
    ta, tb = load_file(str(a)), load_file(str(b))
    assert ta.keys() == tb.keys()
    different = [k for k in ta if not torch.equal(ta[k], tb[k])]
    assert not different, f"{len(different)} tensors differ, first {different[:3]}"


def _losses(run):
    with open(run / "train_log.csv", newline="") as handle:
        return [{k: v for k, v in row.items() if k.startswith("loss")} for row in csv.DictReader(handle)]


def test_stop_and_resume_is_bit_identical(tmp_path):
    hq = image_folder(tmp_path / "hq", 3)
    Trainer(tiny_config(tmp_path / "straight", hq, *FULL)).run()
    reset_accelerate()
    run = tmp_path / "straight" / "run"
    first = Trainer(tiny_config(tmp_path, hq, *FULL))
    assert first.run(stop_at=3) is None
    (tmp_path / "run" / "checkpoints" / ".tmp-step-00000004").mkdir()  # a save interrupted by a kill
    (tmp_path / "run" / "checkpoints" / "step-00000005").mkdir()  # no trainer_state.json: not a checkpoint
    resumed = Trainer(tiny_config(tmp_path, hq, *FULL, "train.resume=latest"))
    assert (resumed.step, resumed.epoch, resumed.position) == (3, 2, 1)  # one batch per epoch
    bundle = resumed.run()
    _assert_same_files(run / "osediff.safetensors", bundle)
    for name in ("modules.safetensors",):
        _assert_same_files(run / "checkpoints" / "step-00000006" / name,
                           tmp_path / "run" / "checkpoints" / "step-00000006" / name)
    a = torch.load(run / "checkpoints" / "step-00000006" / "optimisers.pt", weights_only=True)
    b = torch.load(tmp_path / "run" / "checkpoints" / "step-00000006" / "optimisers.pt", weights_only=True)
    for sa, sb in zip(a["optimisers"], b["optimisers"]):
        for key, state in sa["state"].items():
            assert all(torch.equal(state[k], sb["state"][key][k]) for k in state)
    assert _losses(run) == _losses(tmp_path / "run")  # the log of the resumed run reads as one run
    assert not (tmp_path / "run" / "checkpoints" / ".tmp-step-00000004").exists()


def test_killed_process_resumes_bit_identical(tmp_path):
    hq = image_folder(tmp_path / "hq", 3)
    lean = ("osediff.lambda_vsd=0", "osediff.lambda_lpips=0", "train.save_every=1")
    Trainer(tiny_config(tmp_path / "straight", hq, *lean, "train.max_steps=5")).run()
    reset_accelerate()
    # the process would train for long; it is killed right after its first checkpoint, maybe while saving another
    overrides = tiny_overrides(tmp_path, hq, *lean, "train.max_steps=1000")
    process = subprocess.Popen([sys.executable, "-m", "training", "--config", str(OSEDIFF_TOML), *overrides],
                               cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               env={**os.environ, "OMP_NUM_THREADS": "1"})  # as this process (bit-exact)
    deadline = time.monotonic() + 300
    try:
        while not list_checkpoints(tmp_path / "run") and time.monotonic() < deadline:
            assert process.poll() is None, "the training process ended before its first checkpoint"
            time.sleep(0.01)
        os.kill(process.pid, signal.SIGKILL)
    finally:
        process.wait()
    killed_at = int(list_checkpoints(tmp_path / "run")[-1].name.split("-")[1])
    assert 1 <= killed_at < 5
    bundle = Trainer(tiny_config(tmp_path, hq, *lean, "train.max_steps=5", "train.resume=latest")).run()
    _assert_same_files(tmp_path / "straight" / "run" / "osediff.safetensors", bundle)


def test_rotation_keeps_the_last_checkpoints(tmp_path):
    hq = image_folder(tmp_path / "hq", 2)
    trainer = Trainer(tiny_config(tmp_path, hq, "train.max_steps=3", "train.save_every=1", "train.keep_last=2",
                                  "osediff.lambda_vsd=0", "osediff.lambda_lpips=0"))
    trainer.run()
    kept = list_checkpoints(tmp_path / "run")
    assert [p.name for p in kept] == ["step-00000002", "step-00000003"]
    saved = (kept[-1] / "config.toml").read_text()
    assert 'method = "osediff"' in saved and "max_steps = 3" in saved


def test_a_checkpoint_of_another_setup_is_refused(tmp_path):
    hq = image_folder(tmp_path / "hq", 2)
    lean = ("train.max_steps=1", "train.save_every=1", "osediff.lambda_vsd=0", "osediff.lambda_lpips=0")
    Trainer(tiny_config(tmp_path, hq, *lean)).run()
    missing_regulariser = r"does not fit this method's trainable modules: \d+ missing \(first: \['regulariser\."
    with pytest.raises(ValueError, match=missing_regulariser):
        Trainer(tiny_config(tmp_path, hq, *lean[:-2], "osediff.lambda_lpips=0", "train.resume=latest"))
    with pytest.raises(ValueError, match=r"has shape \(4, .*the model needs \(2, "):
        Trainer(tiny_config(tmp_path, hq, *lean, "lora.unet_rank=2", "train.resume=latest"))
    with pytest.raises(FileNotFoundError, match="not a checkpoint folder"):
        Trainer(tiny_config(tmp_path, hq, *lean, f"train.resume={(tmp_path / 'nowhere').as_posix()}"))

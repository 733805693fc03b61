"""Two processes (torch.distributed on the CPU with gloo, as ``accelerate launch`` runs them on GPUs): DDP through
the generator and regulariser phases, one checkpoint with each process's random streams, and an exact resume."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from safetensors.torch import load_file

from training_support import OSEDIFF_TOML, REPO, image_folder, isolated_training, tiny_overrides  # noqa: F401


def _launch(overrides: list[str]) -> None:
    # accelerate runs several CPU processes when told to use the CPU (``accelerate launch --cpu`` sets the same)
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                             "-m", "training", "--config", str(OSEDIFF_TOML), *overrides],
                            cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]


def test_two_processes_train_checkpoint_and_resume_exactly(tmp_path):
    hq = image_folder(tmp_path / "hq", 4)
    common = ("train.batch_size=1", "train.save_every=2", "data.crop_size=64")
    _launch(tiny_overrides(tmp_path / "straight", hq, *common, "train.max_steps=3"))
    straight = tmp_path / "straight" / "run"
    state = json.loads((straight / "checkpoints" / "step-00000002" / "trainer_state.json").read_text())
    assert state["num_processes"] == 2 and state["position"] == 2
    assert {p.name for p in (straight / "checkpoints" / "step-00000002").glob("rng-*.pt")} == {"rng-0.pt", "rng-1.pt"}
    checkpoint = (straight / "checkpoints" / "step-00000002").as_posix()
    _launch(tiny_overrides(tmp_path, hq, *common, "train.max_steps=3", f"train.resume={checkpoint}"))
    a, b = load_file(str(straight / "osediff.safetensors")), load_file(str(tmp_path / "run" / "osediff.safetensors"))
    assert a.keys() == b.keys() and all(a[k].equal(b[k]) for k in a)

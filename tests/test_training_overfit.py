"""Overfitting: the OSEDiff generator (LoRA + conv_in on tiny models) drives its reconstruction loss well below its
starting value on a handful of smooth images (MSE-only weights keep it fast)."""

from __future__ import annotations

import csv

import numpy as np

from training.trainer import Trainer
from training_support import image_folder, isolated_training, smooth_image, tiny_config  # noqa: F401 (fixture)


def test_reconstruction_loss_falls_well_below_its_start(tmp_path):
    hq = image_folder(tmp_path / "hq", 2, width=64, height=64)
    trainer = Trainer(tiny_config(
        tmp_path, hq, "osediff.lambda_lpips=0", "osediff.lambda_vsd=0", "osediff.latent_sampling=\"mode\"",
        "data.hflip=false", "optim.lr=2e-3", "train.max_steps=50"))
    trainer.run()
    with open(tmp_path / "run" / "train_log.csv", newline="") as handle:
        losses = [float(row["loss_l2"]) for row in csv.DictReader(handle)]
    start, end = losses[0], sum(losses[-5:]) / 5
    # predicting each image's mean colour: the variance of the targets; the generator must do better than that
    flat = float(np.mean([(smooth_image(64, 64, i) / 127.5 - 1).var(axis=(0, 1)).mean() for i in range(2)]))
    assert len(losses) == 50
    assert end < 0.5 * start and end < 0.85 * flat, f"MSE went from {start:.4f} to {end:.4f} (flat colour {flat:.4f})"

"""Periodic validation on held-out images: LQ | output | HQ side by side, and PSNR / SSIM / LPIPS per image.

The validation set is fixed for the whole run: HQ images from ``val.hq_dir`` (at most ``val.max_images``, in name
order) centre-cropped to ``val.crop_size``; the LQ is the paired file from ``val.lq_dir`` (resized to HQ size, then
cropped the same way) or synthesised once with ``data.degradation`` from a generator seeded by (``val.seed``, image
index), so every validation pass scores the same inputs. Generation draws from its own seeded generators, so a
validation pass leaves the training random streams untouched.

Outputs: ``<output_dir>/val/step-XXXXXXXX/<name>.png`` (LQ | output | HQ, 8-bit) and rows of ``val_metrics.csv``.
PSNR and SSIM come from ``training.metrics`` on [0, 1]; LPIPS from ``training.perceptual``
on [-1, 1], built from ``[val.perceptual]``.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from training.config import TrainingConfig
from training.data import read_prompt
from training.degradation import degrade
from training.images import UnreadableImage, centre_crop, list_images, load_rgb, resize
from training.metrics import psnr, ssim
from training.perceptual import PerceptualConfig, build_perceptual
from training.sampler import VALIDATION, item_generator
from training.schema import build

logger = logging.getLogger(__name__)
# the LPIPS the papers' tables report (pyiqa's default network), unless [val.perceptual] says otherwise
VAL_LPIPS = "lpips-alex"


def _pairs(config: TrainingConfig) -> list[tuple[str, torch.Tensor, torch.Tensor, str]]:
    """(name, lq, hq, prompt) with lq, hq (3, S, S) in [0, 1]; unreadable files are skipped with a warning."""
    v = config.val
    files = list_images(v.hq_dir, config.data.extensions, "val.hq_dir")[: v.max_images]
    lq_by_stem = {}
    if v.lq_dir:
        lq_by_stem = {p.stem: p for p in list_images(v.lq_dir, config.data.extensions, "val.lq_dir")}
    pairs = []
    for index, path in enumerate(files):
        try:
            hq_full = load_rgb(path)  # (3, H, W)
            if v.lq_dir:
                if path.stem not in lq_by_stem:
                    raise FileNotFoundError(f"val.lq_dir {v.lq_dir!r} has no LQ image named like {path.name}.")
                lq_full = resize(load_rgb(lq_by_stem[path.stem]), tuple(hq_full.shape[-2:]))  # (3, H, W)
        except UnreadableImage as err:
            logger.warning("skipping unreadable validation image %s", err)
            continue
        hq = centre_crop(hq_full, v.crop_size)  # (3, S, S)
        if v.lq_dir:
            lq = centre_crop(lq_full, v.crop_size)
        else:
            generator = item_generator(v.seed, VALIDATION, 0, index)
            lq = degrade(hq[None], generator, config.data.degradation)[0][0]  # (3, S or S/s, ...)
            lq = resize(lq, (v.crop_size, v.crop_size))  # (3, S, S)
        pairs.append((path.stem, lq, hq, read_prompt(path, "auto", v.prompt)))
    if not pairs:
        raise FileNotFoundError(f"val.hq_dir {v.hq_dir!r} holds no readable image.")
    return pairs


def _save_strip(path: Path, images: list[torch.Tensor]) -> None:
    strip = torch.cat(images, dim=-1).clamp(0, 1)  # (3, S, 3S)
    pixels = (strip.permute(1, 2, 0).cpu().numpy() * 255.0).round().astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)


class Validator:
    """Scores a method's ``generate`` on the fixed validation set; call ``run`` on the main process only."""

    def __init__(self, config: TrainingConfig, device: torch.device) -> None:
        self.config, self.device = config, device
        self.pairs = _pairs(config)
        self.lpips = None
        if config.val.lpips:
            settings = {"kind": VAL_LPIPS, **config.val.perceptual}
            perceptual = build(PerceptualConfig, settings, "val.perceptual")
            self.lpips = build_perceptual(perceptual).to(device).eval().requires_grad_(False)
        logger.info("validation set: %d images from %s", len(self.pairs), config.val.hq_dir)

    @torch.no_grad()
    def run(self, method, step: int) -> tuple[list[dict], dict[str, float]]:
        """Generate every validation image, write the strips, return per-image rows and the means."""
        folder = Path(self.config.train.output_dir) / "val" / f"step-{step:08d}"
        rows = []
        for index, (name, lq, hq, prompt) in enumerate(self.pairs):
            generator = item_generator(self.config.val.seed, VALIDATION, 1, index)
            out = method.generate((lq * 2 - 1)[None].to(self.device), [prompt], generator)  # (1, 3, S, S)
            out01 = ((out.float() + 1) / 2).clamp(0, 1).cpu()  # (1, 3, S, S)
            row = {"image": name, "psnr": float(psnr(out01, hq[None])[0]), "ssim": float(ssim(out01, hq[None])[0])}
            if self.lpips is not None:
                x = out01.to(self.device) * 2 - 1  # (1, 3, S, S)
                row["lpips"] = float(self.lpips(x, (hq[None] * 2 - 1).to(self.device))[0])
            rows.append(row)
            _save_strip(folder / f"{name}.png", [lq, out01[0], hq])
        metrics = [k for k in rows[0] if k != "image"]
        means = {k: float(np.mean([r[k] for r in rows])) for k in metrics}
        return rows, means

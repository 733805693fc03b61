"""Training data: crops and ranges, reproducibility per (seed, epoch, index), skipping unreadable files, paired
folders, prompts, TMG masks and the resumable sampler."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from PIL import Image

from training.config import DataConfig
from training.data import TrainingImages, collate, training_loader
from training.degradation import DegradationConfig
from training.sampler import ResumableSampler
from training_support import image_folder


def _config(hq_dir, **kwargs) -> DataConfig:
    return DataConfig(hq_dir=str(hq_dir), crop_size=64, **kwargs)


def test_items_have_the_crop_size_range_and_prompt(tmp_path):
    folder = image_folder(tmp_path / "hq", 2, width=90, height=70)
    (folder / "000.txt").write_text("a cat, a sofa\n")
    item = TrainingImages(_config(folder, prompt="fallback"), seed=0)[(0, 0)]
    assert item["hq"].shape == item["lq"].shape == (3, 64, 64)
    for key in ("hq", "lq"):
        assert item[key].dtype == torch.float32 and -1 <= float(item[key].min()) and float(item[key].max()) <= 1
    assert not torch.equal(item["hq"], item["lq"])
    # the LQ is an 8-bit image (SPEC §8.2 step 10)
    lq255 = (item["lq"] + 1) / 2 * 255
    torch.testing.assert_close(lq255, lq255.round(), atol=1e-3, rtol=0)
    assert item["prompt"] == "a cat, a sofa" and item["name"] == "000"
    assert TrainingImages(_config(folder, prompt="fallback"), seed=0)[(0, 1)]["prompt"] == "fallback"
    fixed = TrainingImages(_config(folder, prompt="fixed", prompt_source="fixed"), seed=0)
    assert fixed[(0, 0)]["prompt"] == "fixed"


def test_small_images_are_enlarged_to_the_crop(tmp_path):
    folder = image_folder(tmp_path / "hq", 1, width=40, height=24)
    item = TrainingImages(_config(folder), seed=0)[(0, 0)]
    assert item["hq"].shape == (3, 64, 64)


def test_items_are_reproducible_per_seed_epoch_and_index(tmp_path):
    folder = image_folder(tmp_path / "hq", 3, width=96, height=96)
    data = TrainingImages(_config(folder), seed=7)
    again = TrainingImages(_config(folder), seed=7)[(1, 2)]
    first = data[(1, 2)]
    assert torch.equal(first["hq"], again["hq"]) and torch.equal(first["lq"], again["lq"])
    for other in (data[(2, 2)], TrainingImages(_config(folder), seed=8)[(1, 2)]):
        assert not torch.equal(first["lq"], other["lq"])


def test_worker_processes_do_not_change_the_batches(tmp_path):
    folder = image_folder(tmp_path / "hq", 4, width=72, height=72)
    data = TrainingImages(_config(folder), seed=0)

    def batches(workers):
        sampler = ResumableSampler(len(data), 2, seed=0)
        return [b["lq"] for b in training_loader(data, sampler, workers)]

    for a, b in zip(batches(0), batches(2), strict=True):
        assert torch.equal(a, b)


def test_unreadable_image_is_skipped_with_a_warning(tmp_path, caplog):
    folder = image_folder(tmp_path / "hq", 2)
    (folder / "001.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not an image")
    data = TrainingImages(_config(folder), seed=0)
    with caplog.at_level(logging.WARNING, logger="training.data"):
        item = data[(0, 1)]
    assert item["name"] == "000" and item["hq"].shape == (3, 64, 64)
    assert any("001.png" in r.getMessage() for r in caplog.records)
    (folder / "000.png").write_bytes(b"")
    with pytest.raises(RuntimeError, match="no image in data.hq_dir"):
        TrainingImages(_config(folder), seed=0)[(0, 0)]


def _blocks(height: int, width: int, block: int, seed: int) -> np.ndarray:
    """Random colours in constant block x block squares, (H, W, 3) uint8."""
    cells = np.random.default_rng(seed).integers(0, 256, (height // block, width // block, 3), dtype=np.uint8)
    return cells.repeat(block, 0).repeat(block, 1)


def test_paired_folders_crop_the_same_place(tmp_path):
    hq_dir, lq_dir = tmp_path / "hq", tmp_path / "lq"
    hq_dir.mkdir(), lq_dir.mkdir()
    hq = _blocks(128, 96, 16, seed=0)
    Image.fromarray(hq).save(hq_dir / "a.png")
    Image.fromarray(hq[::4, ::4]).save(lq_dir / "a.png")  # the LQ is the HQ at 1/4 size
    data = TrainingImages(_config(hq_dir, lq_dir=str(lq_dir)), seed=0)
    for epoch in range(4):
        item = data[(epoch, 0)]
        assert item["lq"].shape == item["hq"].shape == (3, 64, 64)
        # constant 16 px blocks survive the 4x round trip except near block edges
        assert float((item["lq"] - item["hq"]).abs().mean()) < 0.1
    with pytest.raises(FileNotFoundError, match="no LQ image for 1 HQ images"):
        Image.fromarray(hq).save(hq_dir / "b.png")
        TrainingImages(_config(hq_dir, lq_dir=str(lq_dir)), seed=0)


def test_sidecar_prompts_can_be_required(tmp_path):
    folder = image_folder(tmp_path / "hq", 2)
    (folder / "000.txt").write_text("tags")
    with pytest.raises(FileNotFoundError, match=r"1 images have no prompt file.*001\.txt"):
        TrainingImages(_config(folder, prompt_source="sidecar"), seed=0)


def test_masks_follow_the_crop_and_flip(tmp_path):
    hq_dir, masks = tmp_path / "hq", tmp_path / "masks"
    hq_dir.mkdir()
    pixels = np.zeros((64, 64, 3), np.uint8)
    pixels[:, :16] = 255  # a white band on the left marks the "dog"
    Image.fromarray(pixels).save(hq_dir / "img.png")
    (masks / "img").mkdir(parents=True)
    Image.fromarray((pixels[..., 0] > 0).astype(np.uint8) * 255).save(masks / "img" / "00_dog.png")
    Image.fromarray(np.full((64, 64), 255, np.uint8)).save(masks / "img" / "01_red_car.png")
    config = _config(hq_dir, masks_dir=str(masks), max_masks=3, degradation=DegradationConfig(resize_back=True))
    data = TrainingImages(config, seed=0)
    items = [data[(epoch, 0)] for epoch in range(6)]
    for item in items:
        assert item["masks"].shape == (3, 64, 64) and item["mask_valid"].tolist() == [True, True, False]
        assert item["nouns"] == ["dog", "red car", ""]
        white = (item["hq"][0] > 0).float()
        assert torch.equal(item["masks"][0], white)  # the mask moved with the image, flipped or not
    assert {bool(item["masks"][0][:, 0].all()) for item in items} == {True, False}  # both flips occurred
    batch = collate(items[:2])
    assert batch["masks"].shape == (2, 3, 64, 64) and batch["nouns"][1] == ["dog", "red car", ""]


def test_sampler_resumes_mid_epoch_and_splits_processes():
    straight = list(ResumableSampler(10, 2, seed=3))
    assert len(straight) == 10 and sorted(i for _, i in straight) == list(range(10))
    resumed = ResumableSampler(10, 2, seed=3)
    resumed.set_position(0, 3)
    assert list(resumed) == straight[6:]
    ranks = [list(ResumableSampler(10, 2, seed=3, rank=r, world_size=2)) for r in range(2)]
    assert len(ranks[0]) == len(ranks[1]) == 4  # 10 // (2 x 2) = 2 batches each, the remainder dropped
    assert not set(ranks[0]) & set(ranks[1])
    second_epoch = ResumableSampler(10, 2, seed=3)
    second_epoch.set_position(1, 0)
    assert list(second_epoch) != straight
    with pytest.raises(ValueError, match="one global batch needs 4"):
        ResumableSampler(3, 2, seed=0, world_size=2)
    with pytest.raises(ValueError, match="outside an epoch of 5 batches"):
        resumed.set_position(0, 6)

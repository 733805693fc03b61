"""Training pairs: a random crop of an HQ image and its LQ, either synthesised on the fly or read from a paired folder.

Synthesised (``data.lq_dir`` empty; SPEC §1.2, §8), per item from its own generator (``training.sampler``):

1. read the HQ image; if a side is shorter than ``crop_size``, enlarge it (bicubic) until none is;
2. random ``crop_size``² crop, random horizontal flip (``hflip``);
3. LQ = ``training.degradation.degrade`` with ``data.degradation`` (every parameter configurable); with its
   ``resize_back`` (OSEDiff) the LQ comes back at HQ size, otherwise it is resized up here (bicubic) so that the
   models always receive the LQ at output size (SPEC §0.3).

Paired (``data.lq_dir`` set): the LQ with the same stem, at HQ size or an integer fraction s of it; the crop is taken at
the same place in both (the LQ crop is crop_size/s), the same flip, and the LQ crop is resized (bicubic) to HQ size.

A batch is a dict: ``hq``, ``lq`` (B, 3, H, W) float in [-1, 1]; ``prompt``, ``name`` lists of B strings; with
``masks_dir``: ``masks`` (B, M, H, W) float in {0, 1}, ``mask_valid`` (B, M) bool, ``nouns`` B lists of M strings
(padding: zero masks, "" nouns). An unreadable image is skipped with a warning naming the file: its slot is filled
by the next readable image, so the run goes on and stays reproducible.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset, default_collate

from training.config import DataConfig
from training.degradation import degrade
from training.images import (
    UnreadableImage,
    cover_size,
    crop,
    draw_offset,
    list_images,
    list_masks,
    load_mask,
    load_rgb,
    mask_noun,
    resize,
)
from training.sampler import TRAIN, ResumableSampler, item_generator

logger = logging.getLogger(__name__)


def read_prompt(image: Path, source: str, fixed: str) -> str:
    """The prompt of ``image``: its ``<stem>.txt`` sidecar ("sidecar"; "auto" where it exists) or ``fixed``."""
    sidecar = image.with_suffix(".txt")
    if source == "fixed" or (source == "auto" and not sidecar.is_file()):
        return fixed
    return sidecar.read_text(encoding="utf-8").strip()


class TrainingImages(Dataset):
    """Map-style dataset keyed by (epoch, index) (the ``ResumableSampler``'s keys); see the module docstring."""

    def __init__(self, config: DataConfig, seed: int) -> None:
        self.config, self.seed = config, seed
        root = Path(config.hq_dir)
        self.files = list_images(root, config.extensions, "data.hq_dir")
        self.stems = [p.relative_to(root).with_suffix("").as_posix() for p in self.files]
        self.lq_files: list[Path] | None = None
        if config.lq_dir:
            lq_root = Path(config.lq_dir)
            by_stem = {p.relative_to(lq_root).with_suffix("").as_posix(): p
                       for p in list_images(lq_root, config.extensions, "data.lq_dir")}
            missing = [s for s in self.stems if s not in by_stem]
            if missing:
                raise FileNotFoundError(f"data.lq_dir {config.lq_dir!r} has no LQ image for {len(missing)} HQ images "
                                        f"(first: {missing[:3]}); paired LQ files need the HQ file's name.")
            self.lq_files = [by_stem[s] for s in self.stems]
        if config.prompt_source == "sidecar":
            absent = [str(p.with_suffix(".txt")) for p in self.files if not p.with_suffix(".txt").is_file()]
            if absent:
                raise FileNotFoundError(f"data.prompt_source is \"sidecar\" but {len(absent)} images have no prompt "
                                        f"file (first: {absent[:3]}); add them or use prompt_source = \"auto\".")
        self._skipped: set[int] = set()

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, key: tuple[int, int]) -> dict:
        epoch, index = key
        for offset in range(len(self.files)):
            candidate = (index + offset) % len(self.files)
            if candidate in self._skipped:
                continue
            try:
                return self._item(candidate, item_generator(self.seed, TRAIN, epoch, index))
            except UnreadableImage as err:
                self._skipped.add(candidate)
                logger.warning("skipping unreadable training image %s", err)
        raise RuntimeError(f"no image in data.hq_dir {self.config.hq_dir!r} could be read; see the warnings above.")

    def _item(self, index: int, generator: torch.Generator) -> dict:
        c = self.config
        hq = load_rgb(self.files[index])  # (3, H0, W0)
        lq = None if self.lq_files is None else load_rgb(self.lq_files[index])  # (3, H0/s, W0/s)
        scale = 1 if lq is None else self._lq_scale(index, hq, lq)
        size = tuple(-(-side // scale) * scale for side in cover_size(*hq.shape[-2:], c.crop_size))
        hq = resize(hq, size)  # (3, H, W)
        top = draw_offset(generator, size[0] // scale, c.crop_size // scale) * scale
        left = draw_offset(generator, size[1] // scale, c.crop_size // scale) * scale
        flip = c.hflip and bool(torch.rand((), generator=generator) < 0.5)
        hq = crop(hq, top, left, c.crop_size)  # (3, S, S)
        hq = hq.flip(-1) if flip else hq
        if lq is None:
            lq, _ = degrade(hq[None], generator, c.degradation)  # (1, 3, S, S) or (1, 3, S/s, S/s)
            lq = lq[0]
        else:
            lq = resize(lq, (size[0] // scale, size[1] // scale))  # (3, H/s, W/s)
            lq = crop(lq, top // scale, left // scale, c.crop_size // scale)  # (3, S/s, S/s)
            lq = lq.flip(-1) if flip else lq
        lq = resize(lq, (c.crop_size, c.crop_size))  # (3, S, S)
        item = {"hq": hq * 2 - 1, "lq": lq * 2 - 1, "name": self.stems[index],
                "prompt": read_prompt(self.files[index], c.prompt_source, c.prompt)}
        if c.masks_dir:
            item.update(self._masks(index, size, top, left, flip))
        return item

    def _lq_scale(self, index: int, hq: torch.Tensor, lq: torch.Tensor) -> int:
        (h, w), (lh, lw) = hq.shape[-2:], lq.shape[-2:]
        scale = h // lh
        if lh * scale != h or lw * scale != w or self.config.crop_size % scale:
            raise ValueError(f"paired images {self.files[index]} ({w}x{h}) and {self.lq_files[index]} ({lw}x{lh}): "
                             f"the HQ must be the LQ times an integer that divides data.crop_size "
                             f"({self.config.crop_size}).")
        return scale

    def _masks(self, index: int, size: tuple[int, int], top: int, left: int, flip: bool) -> dict:
        c = self.config
        files = list_masks(Path(c.masks_dir), self.stems[index], c.max_masks)
        masks = torch.zeros(c.max_masks, c.crop_size, c.crop_size)
        valid = torch.zeros(c.max_masks, dtype=torch.bool)
        nouns = [""] * c.max_masks
        for slot, path in enumerate(files):
            mask = resize(load_mask(path)[None], size, mode="nearest")  # (1, H, W)
            mask = crop(mask, top, left, c.crop_size)[0]  # (S, S)
            masks[slot] = mask.flip(-1) if flip else mask
            valid[slot], nouns[slot] = True, mask_noun(path)
        return {"masks": masks, "mask_valid": valid, "nouns": nouns}


def collate(items: list[dict]) -> dict:
    """Stack tensors; keep ``prompt``/``name`` as lists of strings and ``nouns`` as a list of lists."""
    nouns = [item.pop("nouns") for item in items if "nouns" in item]
    batch = default_collate(items)
    if nouns:
        batch["nouns"] = nouns
    return batch


def training_loader(dataset: TrainingImages, sampler: ResumableSampler, num_workers: int) -> DataLoader:
    """A DataLoader over ``sampler``'s keys; its own generator keeps the global torch RNG untouched."""
    return DataLoader(dataset, batch_size=sampler.batch_size, sampler=sampler, num_workers=num_workers,
                      collate_fn=collate, drop_last=True, persistent_workers=num_workers > 0,
                      pin_memory=torch.cuda.is_available(),
                      generator=torch.Generator().manual_seed(sampler.seed))

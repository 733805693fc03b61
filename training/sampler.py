"""Reproducible data order: per-epoch permutations, per-item generators, and a sampler that resumes mid-epoch.

Every random draw of the data pipeline is a pure function of seeds, never of worker count or scheduling:

* epoch e visits the items in ``permutation(seed, e)`` order (``numpy.random.SeedSequence([seed, ORDER, e])``);
* item i of epoch e draws its crop, flip and degradation from a CPU ``torch.Generator`` seeded by
  ``SeedSequence([seed, stream, e, i])`` (``item_generator``), stream TRAIN for training, VALIDATION for the fixed
  validation degradations.

The sampler yields (epoch, index) keys; with P processes, process r takes global batches r, r + P, r + 2P, ... of the
epoch's permutation (the remainder that fills no global batch is dropped), so each process sees its own images and a
position "b batches into epoch e" means the same images on every process. ``set_position`` restarts there.
"""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import Sampler

from training.schema import ConfigError

ORDER, TRAIN, VALIDATION = 0, 1, 2


def seed_of(*words: int) -> int:
    """A 63-bit seed mixed from non-negative integers (numpy's SeedSequence)."""
    return int(np.random.SeedSequence([int(w) for w in words]).generate_state(2, np.uint64)[0] >> np.uint64(1))


def item_generator(seed: int, stream: int, epoch: int, index: int) -> torch.Generator:
    """The CPU generator of item ``index`` in ``epoch`` (``stream`` TRAIN or VALIDATION)."""
    return torch.Generator().manual_seed(seed_of(seed, stream, epoch, index))


def permutation(size: int, seed: int, epoch: int) -> torch.Tensor:
    """The visiting order of epoch ``epoch``: a permutation of range(size), (size,) int64."""
    return torch.randperm(size, generator=torch.Generator().manual_seed(seed_of(seed, ORDER, epoch)))


class ResumableSampler(Sampler):
    """Yields (epoch, index) keys of one epoch for this process, from batch ``position`` on."""

    def __init__(self, size: int, batch_size: int, *, seed: int, rank: int = 0, world_size: int = 1,
                 shuffle: bool = True) -> None:
        if size < batch_size * world_size:
            raise ConfigError(f"the dataset has {size} images but one global batch needs {batch_size * world_size} "
                             f"(batch_size {batch_size} x {world_size} processes); add images or lower "
                             "train.batch_size.")
        self.size, self.batch_size, self.seed = size, batch_size, seed
        self.rank, self.world_size, self.shuffle = rank, world_size, shuffle
        self.epoch, self.position = 0, 0

    @property
    def batches_per_epoch(self) -> int:
        """Batches each process takes per epoch."""
        return self.size // (self.batch_size * self.world_size)

    def set_position(self, epoch: int, position: int) -> None:
        """Start the next iteration in ``epoch`` after its first ``position`` batches (of this process)."""
        if epoch < 0 or not 0 <= position <= self.batches_per_epoch:
            raise ValueError(f"sampler position (epoch {epoch}, batch {position}) is outside an epoch of "
                             f"{self.batches_per_epoch} batches; the checkpoint was made with other data or "
                             "batch settings.")
        self.epoch, self.position = epoch, position

    def __iter__(self):
        order = permutation(self.size, self.seed, self.epoch) if self.shuffle else torch.arange(self.size)
        for batch in range(self.position, self.batches_per_epoch):
            start = (batch * self.world_size + self.rank) * self.batch_size
            for index in order[start:start + self.batch_size].tolist():
                yield self.epoch, index

    def __len__(self) -> int:
        return (self.batches_per_epoch - self.position) * self.batch_size

"""Seeded construction of modules whose constructors draw from torch's global RNG (nn.Linear, nn.init, DiT inits).

A method's new modules (IDaS-SR's MINE, a discriminator) must start from weights set by the run's init generator,
not by whatever the global RNG holds, and must leave the global RNG as it was. ``seeded_global_rng`` draws one seed
from the generator, runs the block on a forked CPU RNG seeded with it, and restores the caller's state afterwards.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch

from training.losses.gan import DiscriminatorConfig, PatchDiscriminator


@contextlib.contextmanager
def seeded_global_rng(generator: torch.Generator) -> Iterator[None]:
    """Inside the block the global CPU RNG is seeded from ``generator``; outside, nothing changed."""
    seed = int(torch.randint(0, 2**62, (), generator=generator))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)  # scoped by fork_rng: the caller's global state is restored on exit
        yield


def seeded_discriminator(config: DiscriminatorConfig, generator: torch.Generator,
                         device: torch.device) -> PatchDiscriminator:
    """A PatchGAN whose weights come from ``generator`` alone, on ``device``; the global RNG its conv constructors
    draw from before the seeded init is left as it was."""
    with seeded_global_rng(generator):
        discriminator = PatchDiscriminator(config, generator)
    return discriminator.to(device)

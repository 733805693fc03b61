"""``python -m training.ldg_scan --config training/configs/rcod.toml [section.key=value ...] [--batches N]``:
measure RCOD's LDG bounds as the paper defines them, the extremes of M_L over the training data (SPEC §6.2), and
print the overrides that use them.

    M_L = cos(vec z_L, vec z_H)        z = E(x)·0.18215 of the LQ and the HQ of one training pair (Eq. 6)

The pairs are the run's own: the config's data section (crops, flips, degradation, seed) in the order of epoch 0,
and the VAE encoder the run starts from (the base model's, or ``model.init_bundle``'s) with the run's
``rcod.latent_sampling``. The shipped bounds (0.25, 1.0) are inferred from the paper's worked example; the scan
replaces them with ``rcod.ldg.m_min`` / ``rcod.ldg.m_max`` measured on your data (``osd_core.ldg.scan_bounds``).
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys

import torch

from osd_core.adapters import apply_bundle
from osd_core.ldg import latent_similarity, level_timestep, level_timesteps, scan_bounds
from training.config import TrainingConfig, load_config
from training.data import TrainingImages, training_loader
from training.methods.sd_ops import posterior_noise, sample_latent
from training.sampler import ResumableSampler, seed_of
from training.schema import ConfigError
from training.trainer import load_components
from training.warm_start import load_init_bundle

SCAN = 5  # the scan's own noise stream (0-2: data, 3-4: the trainer's)


@torch.no_grad()
def scan_similarities(config: TrainingConfig, max_batches: int = 0) -> torch.Tensor:
    """M_L (N,) float32 of the first ``max_batches`` training batches of epoch 0 (0 = the whole epoch)."""
    if config.method != "rcod":
        raise ConfigError(f"the LDG scan measures RCOD's M_L bounds; the config's method is {config.method!r}. "
                          "Pass training/configs/rcod.toml.")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    components = load_components(config.model)
    init_bundle = load_init_bundle(config)
    if init_bundle is not None:
        apply_bundle(components, init_bundle)
    vae = components.vae.to(device)
    dataset = TrainingImages(config.data, config.train.seed)
    sampler = ResumableSampler(len(dataset), config.train.batch_size, seed=config.train.seed)
    generator = torch.Generator().manual_seed(seed_of(config.train.seed, SCAN))
    sampling = config.method_config.latent_sampling
    values = []
    for i, batch in enumerate(training_loader(dataset, sampler, config.data.num_workers)):
        if max_batches and i >= max_batches:
            break
        lq, hq = batch["lq"].to(device), batch["hq"].to(device)  # (B, 3, H, W) each
        z = [sample_latent(vae, x, posterior_noise(x, vae, sampling, generator)) for x in (lq, hq)]
        values.append(latent_similarity(*z).float().cpu())  # (B,)
    if not values:
        raise ConfigError(f"`data.hq_dir` {config.data.hq_dir!r} gave no batch of {config.train.batch_size}; add "
                          "images or lower train.batch_size.")
    return torch.cat(values)


def level_shares(m: torch.Tensor, ldg) -> str:
    """How the pairs fall into the LDG levels with ``ldg``'s bounds, e.g. "fidelity 30 %, neutral 50 %, ..."."""
    t = level_timestep(m, ldg)  # (N,)
    return ", ".join(f"{name} {100 * float((t == step).float().mean()):.0f} %"
                     for name, step in level_timesteps(ldg).items())


def report(m: torch.Tensor, config: TrainingConfig) -> str:
    """The scan's summary and the overrides to train with."""
    m_min, m_max = scan_bounds(m)
    shipped = config.method_config.ldg
    scanned = dataclasses.replace(shipped, m_min=m_min, m_max=m_max)
    return (f"M_L over {m.numel()} training pairs: min {m_min:.4f}, max {m_max:.4f}, mean {float(m.mean()):.4f}\n"
            f"levels with the configured bounds ({shipped.m_min:g}, {shipped.m_max:g}): {level_shares(m, shipped)}\n"
            f"levels with the scanned bounds: {level_shares(m, scanned)}\n"
            f"train with: rcod.ldg.m_min={m_min:.4f} rcod.ldg.m_max={m_max:.4f}\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m training.ldg_scan", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True, help="the RCOD config of the run, e.g. training/configs/rcod.toml")
    parser.add_argument("overrides", nargs="*", metavar="section.key=value", help="as for python -m training")
    parser.add_argument("--batches", type=int, default=0, help="batches of train.batch_size to scan (0 = one epoch)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if args.batches < 0:
        parser.error(f"--batches must be >= 0 (0 = one epoch); got {args.batches}")
    try:
        config = load_config(args.config, args.overrides)
        sys.stdout.write(report(scan_similarities(config, args.batches), config))
    except (ConfigError, FileNotFoundError) as err:
        logging.getLogger("training").error("%s", err)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

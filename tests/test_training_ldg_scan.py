"""RCOD's LDG data scan (``python -m training.ldg_scan``): M_L = cos(vec z_L, vec z_H) (Eq. 6) over the run's own
training pairs, its extremes as M_min / M_max, and the overrides it prints."""

from __future__ import annotations

import re

import pytest
import torch
import torch.nn.functional as F

from osd_core.tiny import tiny_components
from training.config import load_config
from training.data import TrainingImages
from training.ldg_scan import main, scan_similarities
from training.schema import ConfigError
from training_support import REPO, image_folder, isolated_training, tiny_overrides  # noqa: F401 (fixture)

RCOD_TOML = REPO / "training" / "configs" / "rcod.toml"


def scan_overrides(tmp, hq, *extra):
    return tiny_overrides(tmp, hq, "train.batch_size=1", 'rcod.latent_sampling="mode"', *extra, method="rcod")


def by_hand(config) -> list[float]:
    """Eq. 6 on every pair of epoch 0 with the frozen tiny VAE's posterior mode, written out."""
    vae = tiny_components(config.model.tiny_seed).vae
    dataset = TrainingImages(config.data, config.train.seed)
    values = []
    with torch.no_grad():
        for index in range(len(dataset)):
            item = dataset[(0, index)]
            z_l, z_h = (vae.encode(item[k][None]).latent_dist.mode() * vae.config.scaling_factor for k in ("lq", "hq"))
            values.append(float(F.cosine_similarity(z_l.flatten(), z_h.flatten(), dim=0)))
    return sorted(values)


def test_scan_is_equation_6_on_every_training_pair(tmp_path):
    config = load_config(RCOD_TOML, scan_overrides(tmp_path, image_folder(tmp_path / "hq", 3)))
    m = scan_similarities(config)
    assert m.shape == (3,)
    assert sorted(m.tolist()) == pytest.approx(by_hand(config), abs=1e-5)
    assert scan_similarities(config, max_batches=2).shape == (2,)


def test_command_prints_the_extremes_as_overrides(tmp_path, capsys):
    overrides = scan_overrides(tmp_path, image_folder(tmp_path / "hq", 3))
    assert main(["--config", str(RCOD_TOML), *overrides]) == 0
    out = capsys.readouterr().out
    expected = by_hand(load_config(RCOD_TOML, overrides))
    found = re.search(r"train with: rcod.ldg.m_min=(\S+) rcod.ldg.m_max=(\S+)", out)
    assert found, out
    assert (float(found[1]), float(found[2])) == pytest.approx((expected[0], expected[-1]), abs=1e-4)
    assert "M_L over 3 training pairs" in out and "levels with the scanned bounds" in out


def test_other_methods_and_empty_folders_are_refused(tmp_path, capsys):
    hq = image_folder(tmp_path / "hq", 1)
    osediff = load_config(REPO / "training" / "configs" / "osediff.toml", tiny_overrides(tmp_path, hq))
    with pytest.raises(ConfigError, match="RCOD's M_L bounds"):
        scan_similarities(osediff)
    assert main(["--config", str(RCOD_TOML), *scan_overrides(tmp_path, hq, "train.batch_size=2")]) == 2

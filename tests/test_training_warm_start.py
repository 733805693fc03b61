"""Warm start (``model.init_bundle``, ``training.warm_start``): a run starts from a bundle's LoRA (rescaled to the
run's alpha), conv_in, method modules and VAE-encoder base weights; what does not fit is an error naming the setting,
what the run does not use is a warning."""

from __future__ import annotations

import dataclasses
import logging

import pytest
import torch

from osd_core.bundle import load_bundle, save_bundle
from osd_core.tiny import TINY_VAE
from training.config import load_config
from training.schema import ConfigError
from training.trainer import Trainer
from training.warm_start import load_init_bundle
from training_support import (  # noqa: F401 (fixture)
    REPO,
    image_folder,
    isolated_training,
    run_trainer,
    tiny_overrides,
)

CONFIGS = REPO / "training" / "configs"
# per method: extra overrides for tiny models (IDaS-SR: a small MINE and a PatchGAN that fits 8x8 latents)
TINY = {"osediff": (), "tadsr": (), "codsr_stage1": (), "rcod": (),
        "idas": ("idas.mine.hidden_size=32", "idas.mine.depth=2", "idas.mine.num_heads=4", "idas.mine.num_queries=4",
                 "idas.discriminator.channels=[8, 16, 32]", "idas.discriminator.strides=[2, 1, 1]",
                 "idas.discriminator.head_levels=[3]")}


def config(tmp, hq, method, *extra):
    return load_config(CONFIGS / f"{method}.toml", tiny_overrides(tmp, hq, *TINY[method], *extra, method=method))


def trained_bundle(tmp, hq, method="osediff", *extra):
    """The bundle of one training step (so LoRA B, conv_in and the modules differ from a fresh start)."""
    return run_trainer(config(tmp / "first", hq, method, "train.max_steps=1", *extra))[2]


@pytest.mark.parametrize("method", sorted(TINY))
def test_a_run_starts_exactly_from_the_bundle(tmp_path, method):
    """Another seed initialises differently; with the bundle as init_bundle, the run's weights are the bundle's."""
    hq = image_folder(tmp_path / "hq", 2)
    bundle = trained_bundle(tmp_path, hq, method)
    trainer = Trainer(config(tmp_path, hq, method, "train.seed=7", f"model.init_bundle={bundle.as_posix()}"))
    _, tensors = trainer.method.export_bundle()
    saved = load_bundle(bundle).tensors
    assert set(tensors) == set(saved)
    for key, value in saved.items():
        torch.testing.assert_close(tensors[key], value, rtol=0, atol=0, msg=key)


def test_lora_b_is_rescaled_to_the_runs_alpha(tmp_path):
    """Bundle alpha 4 at rank 4 (scale 1), run alpha 8 (scale 2): B is halved, so scale·B·A is the bundle's."""
    hq = image_folder(tmp_path / "hq", 2)
    bundle = trained_bundle(tmp_path, hq, "osediff", "lora.alpha=4.0")
    trainer = Trainer(config(tmp_path, hq, "osediff", f"model.init_bundle={bundle.as_posix()}"))
    _, tensors = trainer.method.export_bundle()
    saved = load_bundle(bundle).tensors
    lora_keys = [k for k in saved if ".lora_" in k]
    assert lora_keys
    for key in lora_keys:
        expected = saved[key] * 0.5 if ".lora_B." in key else saved[key]
        torch.testing.assert_close(tensors[key], expected, rtol=0, atol=0, msg=key)


def test_a_rank_mismatch_names_the_setting(tmp_path):
    hq = image_folder(tmp_path / "hq", 2)
    bundle = trained_bundle(tmp_path, hq)
    with pytest.raises(ConfigError, match=r"unet LoRA rank 4, this run 2; set lora.unet_rank=4"):
        Trainer(config(tmp_path, hq, "osediff", "lora.unet_rank=2", f"model.init_bundle={bundle.as_posix()}"))


def test_encoder_base_weights_replace_the_base_vae(tmp_path):
    """A bundle's `vae_encoder_base` (TADSR's time_vae/ encoder) replaces those VAE weights before the LoRA."""
    hq = image_folder(tmp_path / "hq", 2)
    source = load_bundle(trained_bundle(tmp_path, hq))
    key = "encoder.conv_norm_out.weight"  # a GroupNorm: no LoRA wraps it
    replacement = torch.linspace(0.5, 1.5, TINY_VAE["block_out_channels"][-1])  # (C,)
    meta = dataclasses.replace(source.meta, modules=(*source.meta.modules, "vae_encoder_base"))
    path = tmp_path / "with_base.safetensors"
    save_bundle(path, meta, {**source.tensors, f"vae_encoder_base.{key}": replacement})
    trainer = Trainer(config(tmp_path, hq, "osediff", f"model.init_bundle={path.as_posix()}"))
    torch.testing.assert_close(trainer.method.components.vae.state_dict()[key], replacement, rtol=0, atol=0)


def test_parts_the_run_does_not_train_are_named(tmp_path, caplog):
    """A TADSR bundle into an OSEDiff run: LoRA and conv_in load, the time-aware encoder is reported unused."""
    hq = image_folder(tmp_path / "hq", 2)
    bundle = trained_bundle(tmp_path, hq, "tadsr")
    with caplog.at_level(logging.INFO, logger="training.warm_start"):
        Trainer(config(tmp_path, hq, "osediff", f"model.init_bundle={bundle.as_posix()}"))
    assert "tae not used by this osediff run" in caplog.text
    assert "unet_lora, vae_encoder_lora, unet_conv_in" in caplog.text


@pytest.mark.parametrize("method, own", [("codsr_stage2", "codsr_stage2.stage1_bundle"),
                                         ("rcod_mem", "rcod_mem.rcod_bundle")])
def test_second_stages_take_their_own_bundle_setting(tmp_path, method, own):
    overrides = tiny_overrides(tmp_path, tmp_path / "hq", f"{own}=stage1.safetensors",
                               "model.init_bundle=other.safetensors", method=method)
    with pytest.raises(ConfigError, match=f"starts from `{own}`"):
        load_init_bundle(load_config(CONFIGS / f"{method}.toml", overrides))


def test_a_missing_bundle_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="model.init_bundle.*does not exist"):
        load_init_bundle(config(tmp_path, tmp_path / "hq", "osediff", "model.init_bundle=nowhere.safetensors"))

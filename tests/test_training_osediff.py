"""OSEDiff training end to end on tiny models: the trainable set (SPEC §1.2), a few steps with every loss term and
validation, the exported bundle (it reproduces the trained generator and runs the shipped workflow in ComfyUI)."""

from __future__ import annotations

import csv

import pytest
import torch

from conftest import node_of, run_image
from osd_core.adapters import apply_bundle
from osd_core.bundle import load_bundle
from osd_core.tiny import tiny_components
from training.methods.osediff import NEGATIVE_PROMPT
from training.methods.sd_lora import conv_in_base
from training.trainer import Trainer
from training_support import (  # noqa: F401 (fixture)
    changed_keys,
    image_folder,
    isolated_training,
    logged_rows,
    one_thread,
    reset_accelerate,
    run_bundle_workflow,
    run_trainer,
    tiny_config,
    validated,
)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Three OSEDiff steps (MSE + LPIPS + VSD, regulariser) with validation; (method, bundle path, output dir)."""
    tmp = tmp_path_factory.mktemp("osediff")
    hq = image_folder(tmp / "hq", 3)
    trainer, before, bundle = run_trainer(tiny_config(tmp, hq, *validated(image_folder(tmp / "val", 2, seed=10), 3)))
    return trainer.method, before, bundle, tmp / "run"


def test_trainable_set_is_lora_and_conv_in(tmp_path):
    trainer = Trainer(tiny_config(tmp_path, image_folder(tmp_path / "hq", 2)))
    method = trainer.method
    assert [p.name for p in trainer.phases] == ["generator", "regulariser"]
    names = {n for n, p in method.generator.named_parameters() if p.requires_grad}
    assert names and all(".lora_" in n or "conv_in.base_layer" in n for n in names)
    assert {"unet.conv_in.base_layer.weight", "unet.conv_in.base_layer.bias"} <= names
    assert any(n.startswith("vae.encoder.") for n in names) and not any(n.startswith("vae.decoder") for n in names)
    assert any(".lora_A.default_others." in n for n in names) and any("quant_conv.lora_A" in n for n in names)
    assert not any(p.requires_grad for p in method.components.text_encoder.parameters())
    generator_ids = {id(p) for p in trainer.phases[0].parameters()}
    assert not generator_ids & {id(p) for p in trainer.phases[1].parameters()}
    assert method.cfg.negative_prompt == NEGATIVE_PROMPT and method.negative.shape == (1, 77, 32)
    lean = Trainer(tiny_config(tmp_path, tmp_path / "hq", "osediff.lambda_vsd=0", "osediff.lambda_lpips=0"))
    assert [p.name for p in lean.phases] == ["generator"] and lean.method.perceptual is None


def test_a_few_steps_train_every_term_and_validate(trained):
    method, before, bundle, out = trained
    after = method.generator.state_dict()
    changed = [k for k, v in before.items() if k.startswith("generator.")
               and not torch.equal(v, after[k[len("generator."):]])]
    assert any(".lora_B." in k for k in changed) and any("conv_in.base_layer" in k for k in changed)
    logged_rows(out, ("loss_l2", "loss_lpips", "loss_vsd", "loss_reg", "loss_g"), 3)
    strips = sorted((out / "val" / "step-00000003").glob("*.png"))
    assert [p.name for p in strips] == ["000.png", "001.png"]
    with open(out / "val_metrics.csv", newline="") as handle:
        val = list(csv.DictReader(handle))
    assert [r["image"] for r in val] == ["000", "001", "mean"]
    assert all(float(r["psnr"]) > 0 and 0 <= float(r["lpips"]) for r in val)


def test_bundle_loads_and_reproduces_the_trained_generator(trained):
    method, _, bundle_path, _ = trained
    components = tiny_components(0)
    bundle = load_bundle(bundle_path, expected_family=components.family)
    meta = bundle.meta
    assert (meta.method, meta.parameterisation, meta.defaults["timestep"]) == ("osediff", "S", 999)
    assert meta.modules == ("unet_lora", "vae_encoder_lora", "unet_conv_in")
    assert meta.lora["unet"]["rank"] == meta.lora["vae_encoder"]["rank"] == 4 and meta.lora_scale("unet") == 2.0
    assert set(meta.lora["unet"]["adapters"]) == {"default_encoder", "default_decoder", "default_others"}
    assert meta.extra["training"]["steps"] == 3 and meta.extra["training"]["config"]["method"] == "osediff"
    apply_bundle(components, bundle)
    z = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    cond = torch.randn(1, 77, 32, generator=torch.Generator().manual_seed(1))
    t = torch.tensor([999.0])
    gen = method.generator.eval()
    with torch.no_grad():
        trained_eps = gen.unet(z, t, encoder_hidden_states=cond).sample
        merged_eps = components.unet(z, t, encoder_hidden_states=cond).sample
        x = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(2)) * 2 - 1
        trained_moments = gen.vae.quant_conv(gen.vae.encoder(x))
        merged_moments = components.vae.quant_conv(components.vae.encoder(x))
    torch.testing.assert_close(merged_eps, trained_eps, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(merged_moments, trained_moments, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(components.unet.conv_in.bias, conv_in_base(gen.unet).bias)


def test_bundle_runs_the_shipped_workflow_in_comfyui(trained, comfy, models_dir, input_dir):
    prompt, out = run_bundle_workflow(comfy, models_dir, input_dir, trained[2], "osediff")
    prompt[node_of(prompt, "OneStepSRLoadModel")]["inputs"]["bundle"] = "none"
    assert not torch.equal(run_image(comfy, prompt), out)


def test_gradient_checkpointing_changes_memory_not_results(tmp_path):
    hq = image_folder(tmp_path / "hq", 2)
    states = []
    for extra in ([], ["model.gradient_checkpointing=true"]):
        trainer = Trainer(tiny_config(tmp_path / str(len(extra)), hq, "train.max_steps=2", *extra))
        trainer.run()
        states.append(trainer.state.capture())
        assert trainer.method.generator.unet.is_gradient_checkpointing == bool(extra)
        reset_accelerate()
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])


def test_bf16_autocast_keeps_fp32_master_weights(tmp_path):
    trainer = Trainer(tiny_config(tmp_path, image_folder(tmp_path / "hq", 2), "train.max_steps=1",
                                  "train.mixed_precision=bf16"))
    assert trainer.method.components.text_encoder.dtype == torch.bfloat16
    assert {p.dtype for p in trainer.state.parameters} == {torch.float32}
    before = {k: v.clone() for k, v in trainer.state.capture().items()}
    trainer.run()
    assert changed_keys(trainer, before)

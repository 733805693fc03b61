"""TADSR training on tiny models: the student forward (SPEC §3.2–3.3), t_s sampling, TAVSD's timesteps and CFG
(§3.4), the loss composition (§3.5–3.6), what trains, the shared-U-Net scores, the clean-LQ mixing, a few real steps,
and the exported bundle (it reproduces the trained student and runs the shipped workflow in ComfyUI)."""

from __future__ import annotations


import pytest
import torch
import torch.nn.functional as F

from conftest import node_of, run_image
from osd_core.adapters import apply_bundle
from osd_core.bundle import load_bundle
from osd_core.method_modules import load_method_modules
from osd_core.tae import TimeAwareEncoder
from osd_core.tiny import tiny_components
from training.config import config_from_dict, load_config
from training.methods import method_class
from training.methods.base import RunContext
from training.methods.bicubic_lq import bicubic_lq, mix_bicubic_lq
from training.methods.tadsr import TADSRGenerator, student_timesteps
from training.schema import ConfigError
from training.trainer import Trainer
from training_support import (  # noqa: F401 (fixture)
    REPO,
    changed_keys,
    image_folder,
    isolated_training,
    logged_rows,
    one_thread,
    reset_accelerate,
    run_bundle_workflow,
    run_trainer,
    tiny_overrides,
    validated,
)

TADSR_TOML = REPO / "training" / "configs" / "tadsr.toml"


def tadsr_config(tmp, hq, *extra):
    return load_config(TADSR_TOML, tiny_overrides(tmp, hq, *extra, method="tadsr"))


def build_method(tmp, *extra):
    """The TADSR method on tiny components, bound to its own (unprepared) modules."""
    context = RunContext(torch.device("cpu"), torch.float32, torch.Generator().manual_seed(0))
    method = method_class("tadsr")(tadsr_config(tmp, tmp / "hq", *extra), tiny_components(0), context)
    method.bind(method.trainable_modules())
    return method


def perturb_time_layers(tae: TimeAwareEncoder, seed: int = 5) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in tae.time_parameters():
            param.copy_(torch.randn(param.shape, generator=generator) * 0.1)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Three TADSR steps (blurred MSE + LPIPS + TAVSD, regulariser) with validation."""
    tmp = tmp_path_factory.mktemp("tadsr")
    hq = image_folder(tmp / "hq", 3)
    return run_trainer(tadsr_config(tmp, hq, *validated(image_folder(tmp / "val", 2, seed=10), 3)))


def test_shipped_config_holds_the_spec_defaults_and_round_trips(tmp_path):
    config = tadsr_config(tmp_path, tmp_path / "hq")
    c = config.method_config
    assert (c.timestep, c.timestep_sampling, c.grid_size, c.deg_prob) == (500, "grid", 50, 0.99)
    assert (c.lambda_l2, c.lambda_lpips, c.lambda_vsd, c.lambda_reg, c.blur) == (1.0, 2.0, 1.0, 1.0, True)
    assert (c.cfg_scale, c.cfg_slope, c.tavsd_lambda, c.tavsd_gamma) == (7.5, 1 / 200, 0.5, 0.0)
    assert c.tae.zero_init and (c.tae.time_proj_channels, c.tae.temb_channels) == (128, 256)
    assert (config.optim.lr, config.lora.unet_rank, config.lora.vae_encoder_rank) == (5e-5, 4, 4)
    assert config_from_dict(config.to_dict()) == config
    with pytest.raises(ConfigError, match="deg_prob"):
        tadsr_config(tmp_path, tmp_path / "hq", "tadsr.deg_prob=1.5")
    with pytest.raises(ConfigError, match="timestep_sampling"):
        tadsr_config(tmp_path, tmp_path / "hq", 'tadsr.timestep_sampling="paper"')


def test_student_timesteps_are_the_released_grid_of_fifty(tmp_path):
    config = build_method(tmp_path).cfg
    draws = student_timesteps(4000, config, torch.Generator().manual_seed(0))
    values = sorted(set(draws.tolist()))
    assert len(values) == 50 and values[:6] == [1, 21, 41, 62, 82, 102] and values[-2:] == [978, 999]
    counts = torch.bincount(draws, minlength=1000)[values].float()
    assert counts.min() > 40 and counts.max() < 125  # uniform: 80 each on average
    uniform = student_timesteps(4000, build_method(tmp_path, 'tadsr.timestep_sampling="uniform"').cfg,
                                torch.Generator().manual_seed(0))
    assert int(uniform.min()) == 0 and int(uniform.max()) == 999 and len(set(uniform.tolist())) > 900


def test_student_forward_is_time_aware_encoder_unet_and_scaled_residual():
    components = tiny_components(0)
    tae = TimeAwareEncoder.from_vae(components.vae)
    perturb_time_layers(tae)
    generator = TADSRGenerator(components.unet, components.vae, tae, components.schedule)
    x = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(1)) * 2 - 1
    cond = torch.randn(2, 77, 32, generator=torch.Generator().manual_seed(2))
    t_s = torch.tensor([500, 102])
    with torch.no_grad():
        z_hat, x_hat = generator(x, cond, t_s, None)
        z_lq = tae(x, t_s.float()).chunk(2, dim=1)[0] * 0.18215  # the posterior mean of the TAE at t_s
        f = components.unet(z_lq, t_s.float(), encoder_hidden_states=cond).sample
        abar = components.schedule.alphas_cumprod
        expected = z_lq / abar[t_s].sqrt().float().view(2, 1, 1, 1) - f  # (R): z_L / sqrt(abar_t) - F
        plain = components.vae.quant_conv(components.vae.encoder(x)).chunk(2, dim=1)[0] * 0.18215
        decoded = components.vae.decode(z_hat / 0.18215).sample.clamp(-1, 1)
    assert abs(float(abar[500].sqrt()) - 0.52567) < 1e-5  # SPEC §0.1 table
    torch.testing.assert_close(z_hat, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(x_hat, decoded, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(z_lq, plain, atol=1e-4)  # the encoder does see t_s
    with torch.no_grad():  # per-sample t_s: each item equals its single-item run
        single, _ = generator(x[1:], cond[1:], t_s[1:], None)
    torch.testing.assert_close(z_hat[1:], single, atol=1e-5, rtol=1e-5)


def test_tavsd_timesteps_and_cfg_follow_t_s(tmp_path):
    method = build_method(tmp_path)
    t_s = torch.tensor([1, 21, 500, 999])
    t_v, cfg = method.vsd_timesteps(4, {"t_s": t_s}, torch.Generator().manual_seed(0))
    assert torch.equal(torch.as_tensor(t_v).long(), torch.tensor([0, 10, 250, 499]))  # floor(0.5 t_s)
    torch.testing.assert_close(torch.as_tensor(cfg, dtype=torch.float64),
                               torch.tensor([7.5, 7.55, 8.75, 9.995], dtype=torch.float64))  # 7.5 + t_v / 200
    shifted = build_method(tmp_path, "tadsr.tavsd_lambda=0.25", "tadsr.tavsd_gamma=7.0", "tadsr.cfg_slope=0.0")
    t_v, cfg = shifted.vsd_timesteps(4, {"t_s": t_s}, torch.Generator().manual_seed(0))
    assert torch.equal(torch.as_tensor(t_v).long(), torch.tensor([7, 12, 132, 256]))  # floor(0.25 t_s + 7)
    assert torch.allclose(torch.as_tensor(cfg, dtype=torch.float64), torch.tensor(7.5, dtype=torch.float64))


def test_pixel_loss_blurs_per_sample_and_can_be_plain(tmp_path):
    method = build_method(tmp_path)
    x = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(3)) * 2 - 1
    hq = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(4)) * 2 - 1
    plain = F.mse_loss(x, hq)
    low, high = (method.pixel_loss(x, hq, {"t_s": torch.tensor([t, t])}) for t in (1, 999))
    assert float(high) < float(low) < float(plain)  # noise images: more blur (larger t_s), smaller MSE
    plain_method = build_method(tmp_path, "tadsr.blur=false")
    torch.testing.assert_close(plain_method.pixel_loss(x, hq, {"t_s": torch.tensor([999, 999])}), plain)


def test_trainable_set_and_one_shared_unet_for_both_scores(tmp_path):
    trainer = Trainer(tadsr_config(tmp_path, image_folder(tmp_path / "hq", 2)))
    method = trainer.method
    assert [p.name for p in trainer.phases] == ["generator", "regulariser"]
    trainable = {n for n, p in method.generator.named_parameters() if p.requires_grad}
    time_names = {n for n in trainable if n.startswith("tae.time_")}
    assert len(time_names) == 4 + 2 * len(method.tae.resnet_paths)  # embedding MLP + every time_emb_proj
    assert all(".lora_" in n or "conv_in.base_layer" in n or n in time_names for n in trainable)
    assert any(n.startswith("vae.encoder.") and ".lora_" in n for n in trainable)
    assert not any("time" in n for n in method.lora["vae_encoder"]["adapters"]["default_encoder"])
    assert not any(n.startswith("vae.decoder") for n in trainable)
    assert not any(p.requires_grad for p in method.components.text_encoder.parameters())
    assert method.teacher is None and method.scores.is_shared  # no third U-Net
    assert method.scores.regulariser is method.models["regulariser"]
    phase_ids = [{id(p) for p in phase.parameters()} for phase in trainer.phases]
    assert not phase_ids[0] & phase_ids[1]
    x = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(5)) * 2 - 1
    with torch.no_grad():  # zero-initialised time projections: at step 0 the TAE is the (LoRA-identity) SD encoder
        vae = method.components.vae
        torch.testing.assert_close(method.tae(x, torch.tensor([700.0])), vae.quant_conv(vae.encoder(x)))


def test_clean_lq_mixing_follows_deg_prob():
    hq = torch.rand(64, 3, 16, 16, generator=torch.Generator().manual_seed(6)) * 2 - 1
    lq = torch.rand(64, 3, 16, 16, generator=torch.Generator().manual_seed(7)) * 2 - 1
    kept, mask = mix_bicubic_lq(lq, hq, deg_prob=1.0, scale=4, generator=torch.Generator().manual_seed(0))
    assert kept is lq and bool(mask.all())
    clean, mask = mix_bicubic_lq(lq, hq, deg_prob=0.0, scale=4, generator=torch.Generator().manual_seed(0))
    assert not bool(mask.any()) and torch.equal(clean, bicubic_lq(hq, 4))
    half, mask = mix_bicubic_lq(lq, hq, deg_prob=0.5, scale=4, generator=torch.Generator().manual_seed(0))
    assert 16 < int(mask.sum()) < 48
    assert torch.equal(half[mask], lq[mask]) and torch.equal(half[~mask], clean[~mask])
    flat = torch.full((1, 3, 16, 16), 0.25)
    torch.testing.assert_close(bicubic_lq(flat, 4), flat)  # a constant image survives down-and-up
    with pytest.raises(ValueError, match="deg_prob"):
        mix_bicubic_lq(lq, hq, deg_prob=1.5, scale=4, generator=torch.Generator())


def test_loss_is_the_weighted_sum_of_its_terms(tmp_path):
    trainer = Trainer(tadsr_config(tmp_path, image_folder(tmp_path / "hq", 2), "tadsr.lambda_l2=0.5",
                                   "tadsr.lambda_lpips=3.0", "tadsr.lambda_vsd=0.25"))
    batch = trainer._next_batch()
    carry: dict = {}
    out = trainer.method.phase_loss("generator", batch, carry, torch.Generator().manual_seed(0))
    t = out.terms
    expected = 0.5 * t["loss_l2"] + 3.0 * t["loss_lpips"] + 0.25 * t["loss_vsd"]
    assert abs(float(out.loss.detach()) - expected) < 1e-5 * max(1.0, abs(expected))
    assert carry["t_s"].shape == (2,) and carry["z_hat"].shape == (2, 4, 8, 8)


def test_a_few_steps_train_every_term_and_validate(trained):
    trainer, before, _ = trained
    changed = changed_keys(trainer, before)
    assert any(k.startswith("generator.tae.time_emb_proj.") for k in changed)
    assert any(".lora_B." in k and k.startswith("generator.vae.encoder") for k in changed)
    assert any(".lora_B." in k and k.startswith("regulariser.") for k in changed)
    logged_rows(trainer.config.train.output_dir, ("loss_l2", "loss_lpips", "loss_vsd", "loss_reg", "loss_g"), 3)


def test_bundle_reproduces_the_trained_student(trained):
    trainer, _, bundle_path = trained
    method = trainer.method
    components = tiny_components(0)
    bundle = load_bundle(bundle_path, expected_family=components.family)
    meta = bundle.meta
    assert (meta.method, meta.parameterisation, meta.defaults["timestep"]) == ("tadsr", "R", 500)
    assert meta.modules == ("unet_lora", "vae_encoder_lora", "unet_conv_in", "tae")
    apply_bundle(components, bundle)
    tae = load_method_modules(components, bundle)["tae"]
    x = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(8)) * 2 - 1
    cond = torch.randn(1, 77, 32, generator=torch.Generator().manual_seed(9))
    t = torch.tensor([500.0])
    gen = method.generator.eval()
    with torch.no_grad():
        torch.testing.assert_close(tae(x, t), gen.tae(x, t), atol=1e-5, rtol=1e-4)
        z = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(10))
        torch.testing.assert_close(components.unet(z, t, encoder_hidden_states=cond).sample,
                                   gen.unet(z, t, encoder_hidden_states=cond).sample, atol=1e-5, rtol=1e-4)


def test_bundle_runs_the_shipped_workflow_in_comfyui(trained, comfy, models_dir, input_dir):
    prompt, out = run_bundle_workflow(comfy, models_dir, input_dir, trained[2], "tadsr")
    prompt[node_of(prompt, "OneStepSRTimestep")]["inputs"]["timestep"] = 100.0
    assert not torch.equal(run_image(comfy, prompt), out)  # t_s reaches the encoder and the U-Net


def test_bf16_autocast_step_is_finite_and_trains(tmp_path):
    trainer, before, _ = run_trainer(tadsr_config(tmp_path, image_folder(tmp_path / "hq", 2), "train.max_steps=1",
                                                  "train.mixed_precision=bf16"))
    assert "generator.tae.time_emb_proj.mid_block_resnets_0.weight" in changed_keys(trainer, before)

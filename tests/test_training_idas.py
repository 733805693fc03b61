"""IDaS-SR training on tiny models: the generator forward written from SPEC §5.1/§5.3/§5.4's equations, gradients to
τ, the sampling of s, the ablation switches of §5.6, the parameter groups and optimisers, the loss composition and
the phases (generator → regulariser → discriminator), a few real steps, and the exported bundle (MINE rebuilt by
``osd_core.method_modules``, ablated parts exported as trained, the shipped workflow run in ComfyUI)."""

from __future__ import annotations


import pytest
import torch
import torch.nn.functional as F

import training.methods.osediff as osediff_module
from conftest import node_of, run_image
from osd_core.adapters import apply_bundle
from osd_core.bundle import Bundle, load_bundle
from osd_core.method_modules import load_method_modules
from osd_core.tiny import tiny_components
from training.config import config_from_dict, load_config
from training.losses.gan import DiscriminatorConfig
from training.methods import method_class
from training.methods.base import RunContext
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

IDAS_TOML = REPO / "training" / "configs" / "idas.toml"
# a small MINE, and a latent PatchGAN whose strides fit the 8x8 latents of 64 px crops
TINY = ("idas.mine.hidden_size=32", "idas.mine.depth=2", "idas.mine.num_heads=4", "idas.mine.num_queries=4",
        "idas.discriminator.channels=[8, 16, 32]", "idas.discriminator.strides=[2, 1, 1]",
        "idas.discriminator.head_levels=[3]")


def idas_config(tmp, hq, *extra):
    return load_config(IDAS_TOML, tiny_overrides(tmp, hq, *TINY, *extra, method="idas"))


def build_method(tmp, *extra, perturb: bool = True):
    """The IDaS-SR method on tiny components, bound to its own (unprepared) modules; MINE's zero-initialised heads
    (and the LoRA B matrices) get small random values so every path carries a signal."""
    context = RunContext(torch.device("cpu"), torch.float32, torch.Generator().manual_seed(0))
    method = method_class("idas")(idas_config(tmp, tmp / "hq", *extra), tiny_components(0), context)
    method.bind(method.trainable_modules())
    if perturb:
        generator = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for name, param in method.generator.named_parameters():
                if name.startswith("mine.") and not bool(param.any()) or ".lora_B." in name:
                    param.copy_(torch.randn(param.shape, generator=generator) * 0.05)
    return method


def inputs(batch: int = 2, seed: int = 2):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(batch, 3, 64, 64, generator=g) * 2 - 1
    return x, torch.randn(batch, 77, 32, generator=g), torch.randn(batch, 4, 8, 8, generator=g)


def interp(table: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Eq. 16: piecewise-linear interpolation of a per-integer-timestep table at float t."""
    k0 = t.detach().floor().clamp(0, 998).long()
    w = t - k0
    return (1 - w) * table[k0].float() + w * table[k0 + 1].float()


def std_b(x: torch.Tensor) -> torch.Tensor:
    """Per-sample std over (C, H, W) with SPEC's guard sqrt(mean((x - mean)^2) + 1e-8)."""
    flat = x.flatten(1)
    return ((flat - flat.mean(1, keepdim=True)).square().mean(1) + 1e-8).sqrt()


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Three IDaS-SR steps (MSE + LPIPS + VSD + latent GAN, regulariser, discriminator) with validation."""
    tmp = tmp_path_factory.mktemp("idas")
    hq = image_folder(tmp / "hq", 3)
    return run_trainer(idas_config(tmp, hq, *validated(image_folder(tmp / "val", 2, seed=10), 3)))


def test_shipped_config_holds_the_spec_defaults_and_round_trips(tmp_path):
    config = load_config(IDAS_TOML, tiny_overrides(tmp_path, tmp_path / "hq", method="idas"))
    c = config.method_config
    assert (c.lambda_l2, c.lambda_lpips, c.lambda_vsd, c.lambda_gan, c.cfg_scale) == (1.0, 2.0, 1.0, 0.1, 7.5)
    assert (c.s_range, c.validation_s, c.timestep) == ((0.0, 1.0), 0.6, 999)
    assert all((c.use_tp, c.use_ine, c.use_deg_embed, c.use_chariot, c.use_lgan, c.train_conv_in))
    mine = c.mine  # DiT-S/2 with SPEC's reconstructed heads and bounds
    assert (mine.patch_size, mine.hidden_size, mine.depth, mine.num_heads, mine.mlp_ratio) == (2, 384, 12, 6, 4.0)
    assert (mine.num_queries, mine.tau_min, mine.tau_max, mine.tau_init) == (8, 20.0, 250.0, 120.0)
    assert (c.chariot.t_max, c.chariot.delta, c.chariot.energy_mode) == (999.0, 1e-6, "std")
    assert c.discriminator == DiscriminatorConfig.latent_patchgan()
    groups = config.optim.groups
    assert config.optim.lr == 5e-5 and groups["mine"].lr == 1e-4
    assert (groups["discriminator"].lr, groups["discriminator"].betas) == (1e-4, (0.5, 0.999))
    assert config_from_dict(config.to_dict()) == config
    with pytest.raises(ConfigError, match="s_range"):
        idas_config(tmp_path, tmp_path / "hq", "idas.s_range=[0.5, 0.2]")


def test_generator_forward_follows_the_equations(tmp_path):
    method = build_method(tmp_path)
    components, mine = method.components, method.mine
    x, cond, eps = inputs()
    s = torch.tensor([0.3, 0.8])
    with torch.no_grad():
        z_hat, x_hat, trace = method.generator(x, cond, s, eps, None)
        z_lq = components.vae.quant_conv(components.vae.encoder(x)).chunk(2, dim=1)[0] * 0.18215
        est = mine(z_lq)
        tau = est.tau
        t = tau + s * (999 - tau)  # Eq. 8 / 18
        s4 = s.view(2, 1, 1, 1)
        eps_raw = (1 - s4) * est.eps_inv + s4 * eps  # Eq. 19
        sigma_tgt = (1 - s) * std_b(est.eps_inv) + s  # Eq. 20
        eps_mix = (sigma_tgt / (std_b(eps_raw) + 1e-6)).view(2, 1, 1, 1) * eps_raw  # Eq. 21
        abar = components.schedule.alphas_cumprod
        alpha, sigma = interp(abar.sqrt(), t).view(2, 1, 1, 1), interp((1 - abar).sqrt(), t).view(2, 1, 1, 1)
        z_t = alpha * z_lq + sigma * eps_mix  # Eq. 22
        cond_d = cond + est.d[:, None, :]  # Eq. 17: d added to every token
        eps_hat = components.unet(z_t, t, encoder_hidden_states=cond_d).sample
        expected = (z_t - sigma * eps_hat) / alpha  # Eq. 10, x0 form (S)
    assert bool((est.tau > 20).all() and (est.tau < 250).all()) and not torch.allclose(est.tau, est.tau.flip(0))
    torch.testing.assert_close(trace["t"], t)
    torch.testing.assert_close(trace["eps_mix"], eps_mix, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(z_hat, expected, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(x_hat, components.vae.decode(z_hat / 0.18215).sample.clamp(-1, 1))
    with torch.no_grad():  # each item equals its single-item run (per-sample τ, s, std)
        single, _, _ = method.generator(x[1:], cond[1:], s[1:], eps[1:], None)
    torch.testing.assert_close(z_hat[1:], single, atol=1e-5, rtol=1e-5)


def test_gradients_reach_tau_through_the_interpolation_and_the_unet(tmp_path):
    method = build_method(tmp_path)
    x, cond, eps = inputs()
    s = torch.tensor([0.25, 0.5])
    z_hat, _, trace = method.generator(x, cond, s, eps, None)
    tau_grad, = torch.autograd.grad(trace["t"].sum(), [trace["tau"]], retain_graph=True)
    torch.testing.assert_close(tau_grad, 1 - s)  # d t' / d tau = 1 - s
    z_hat.square().mean().backward()
    for head in (method.mine.tau_head, method.mine.d_head, method.mine.spatial_head):
        assert all(p.grad is not None and bool(p.grad.abs().sum() > 0) for p in head.parameters())


def test_s_is_uniform_per_sample_in_training_and_fixed_for_validation(tmp_path):
    method = build_method(tmp_path, perturb=False)
    s = method._steering(4000, torch.Generator().manual_seed(0))
    assert s.shape == (4000,) and 0 <= float(s.min()) < 0.01 and 0.99 < float(s.max()) < 1
    assert abs(float(s.mean()) - 0.5) < 0.02 and abs(float(s.var()) - 1 / 12) < 0.005  # U(0, 1)
    narrow = build_method(tmp_path, "idas.s_range=[0.2, 0.4]", perturb=False)._steering(1000, torch.Generator())
    assert 0.2 <= float(narrow.min()) and float(narrow.max()) <= 0.4
    off = build_method(tmp_path, "idas.use_chariot=false", perturb=False)._steering(8, torch.Generator())
    assert torch.equal(off, torch.zeros(8))  # use_chariot off: s = 0, t' = tau
    assert method.cfg.validation_s == 0.6


def test_use_tp_off_fixes_tau(tmp_path):
    method = build_method(tmp_path, "idas.use_tp=false")
    x, cond, eps = inputs()
    z_hat, _, trace = method.generator(x, cond, torch.zeros(2), eps, None)
    assert torch.equal(trace["tau"], torch.full((2,), 999.0)) and torch.equal(trace["t"], torch.full((2,), 999.0))
    z_hat.square().mean().backward()
    assert all(p.grad is None for p in method.mine.tau_head.parameters())
    assert all(p.grad is not None for p in method.mine.d_head.parameters())


def test_use_ine_off_zeroes_the_inversion_noise(tmp_path):
    method = build_method(tmp_path, "idas.use_ine=false")
    x, cond, eps = inputs()
    with torch.no_grad():
        _, _, trace = method.generator(x, cond, torch.zeros(2), eps, None)
        _, _, full = method.generator(x, cond, torch.ones(2), eps, None)
    assert not bool(trace["eps_inv"].any()) and not bool(trace["eps_mix"].any())  # s = 0: no noise at all
    torch.testing.assert_close(std_b(full["eps_mix"]), torch.ones(2), atol=1e-4, rtol=0)  # s = 1: unit-energy ε


def test_use_deg_embed_off_keeps_the_plain_prompt(tmp_path):
    x, cond, eps = inputs()
    with torch.no_grad():
        _, _, on = build_method(tmp_path).generator(x, cond, torch.zeros(2), eps, None)
        _, _, off = build_method(tmp_path, "idas.use_deg_embed=false").generator(x, cond, torch.zeros(2), eps, None)
    assert torch.equal(off["cond"], cond) and not torch.allclose(on["cond"], cond)


def test_use_lgan_off_drops_the_discriminator(tmp_path):
    method = build_method(tmp_path, "idas.use_lgan=false", perturb=False)
    assert method.discriminator is None and [p.name for p in method.phases()] == ["generator", "regulariser"]
    assert "discriminator" not in method.trainable_modules()
    assert method.extra_generator_terms(torch.zeros(1, 4, 8, 8), {}, {}) == {}


def test_crops_too_small_for_the_latent_patchgan_fail_before_training(tmp_path):
    """The shipped PatchGAN needs 24² latents; 64 px crops give 8² on the tiny VAE (x8), so the method refuses."""
    context = RunContext(torch.device("cpu"), torch.float32, torch.Generator().manual_seed(0))
    config = load_config(IDAS_TOML, tiny_overrides(tmp_path, tmp_path / "hq", *TINY[:4], method="idas"))
    with pytest.raises(ConfigError, match=r"data.crop_size >= 192"):
        method_class("idas")(config, tiny_components(0), context)


def test_conv_in_can_stay_frozen(tmp_path):
    method = build_method(tmp_path, "idas.train_conv_in=false", perturb=False)
    trained = {id(p) for p in method.phases()[0].groups["generator"]}
    conv_in = method.components.unet.conv_in
    assert id(conv_in.base_layer.weight) not in trained and id(conv_in.lora_B["default_encoder"].weight) in trained
    meta, tensors = method.export_bundle()
    assert "unet_conv_in" not in meta.modules and not any(k.startswith("unet_conv_in.") for k in tensors)


def test_phases_groups_and_optimisers(tmp_path):
    trainer = Trainer(idas_config(tmp_path, image_folder(tmp_path / "hq", 2)))
    method = trainer.method
    assert [p.name for p in trainer.phases] == ["generator", "regulariser", "discriminator"]
    generator_phase = trainer.phases[0]
    assert set(generator_phase.groups) == {"generator", "mine"}
    assert {id(p) for p in generator_phase.groups["mine"]} == {id(p) for p in method.mine.parameters()}
    names = {id(p): n for n, p in method.generator.named_parameters()}
    assert all(".lora_" in names[id(p)] or "conv_in.base_layer" in names[id(p)]
               for p in generator_phase.groups["generator"])
    settings = {g["name"]: (g["lr"], tuple(g["betas"])) for o in trainer.optimisers for g in o.param_groups}
    assert settings == {"generator": (5e-5, (0.9, 0.999)), "mine": (1e-4, (0.9, 0.999)),
                        "regulariser": (5e-5, (0.9, 0.999)), "discriminator": (1e-4, (0.5, 0.999))}
    assert all(isinstance(o.optimizer if hasattr(o, "optimizer") else o, torch.optim.AdamW)
               for o in trainer.optimisers)
    ids = [{id(p) for p in phase.parameters()} for phase in trainer.phases]
    assert not ids[0] & ids[1] and not ids[0] & ids[2] and not ids[1] & ids[2]
    assert method.mine.config.cond_dim == 32 and method.teacher is not None  # OSEDiff's separate teacher


def test_generator_loss_composition_and_vsd_on_the_plain_prompt(tmp_path, monkeypatch):
    trainer = Trainer(idas_config(tmp_path, image_folder(tmp_path / "hq", 2), "idas.lambda_l2=0.5",
                                  "idas.lambda_lpips=3.0", "idas.lambda_vsd=0.25", "idas.lambda_gan=0.7"))
    method = trainer.method
    seen = {}
    real_vsd_loss = osediff_module.vsd_loss

    def spy(z_hat, t, cfg_scale, c_pos, c_neg, scores, generator):
        seen["c_pos"] = c_pos
        return real_vsd_loss(z_hat, t, cfg_scale, c_pos, c_neg, scores, generator)

    monkeypatch.setattr(osediff_module, "vsd_loss", spy)
    method.discriminator.eval()  # no spectral-norm power iteration, so D is the same function at every call
    with torch.no_grad():  # a non-zero degradation embedding, so c' = c + d differs from c
        method.mine.d_head[-1].bias.normal_(0, 0.1, generator=torch.Generator().manual_seed(3))
    batch = trainer._next_batch()
    carry: dict = {}
    out = method.phase_loss("generator", batch, carry, torch.Generator().manual_seed(0))
    t = out.terms
    expected = 0.5 * t["loss_l2"] + 3.0 * t["loss_lpips"] + 0.25 * t["loss_vsd"] + 0.7 * t["loss_gan"]
    assert abs(float(out.loss.detach()) - expected) < 1e-5 * max(1.0, abs(expected))
    torch.testing.assert_close(seen["c_pos"], method.prompts(batch["prompt"]))  # c_pos, not c + d
    assert not torch.allclose(carry["trace"]["cond"], seen["c_pos"])  # while the generator's U-Net saw c + d
    with torch.no_grad():
        gan = -method.discriminator(carry["z_fake"])[0].mean()  # hinge generator loss: -mean D(z_hat)
    assert abs(t["loss_gan"] - float(gan)) < 1e-5


def test_discriminator_phase_is_hinge_on_frozen_encoder_latents(tmp_path):
    trainer = Trainer(idas_config(tmp_path, image_folder(tmp_path / "hq", 2), 'idas.latent_sampling="mode"'))
    method = trainer.method
    with torch.no_grad():
        for name, param in method.components.vae.named_parameters():
            if ".lora_B." in name:
                param.normal_(0, 0.05, generator=torch.Generator().manual_seed(3))
    method.discriminator.eval()  # no spectral-norm power iteration, so D is the same function at every call
    batch = trainer._next_batch()
    carry: dict = {}
    method.phase_loss("generator", batch, carry, torch.Generator().manual_seed(0))
    real = method.real_latent(batch["hq"], torch.Generator())
    frozen = tiny_components(0).vae
    with torch.no_grad():
        expected_real = frozen.quant_conv(frozen.encoder(batch["hq"])).chunk(2, dim=1)[0] * 0.18215
    torch.testing.assert_close(real, expected_real, atol=1e-5, rtol=1e-5)  # the LoRA is switched off
    out = method.phase_loss("discriminator", batch, carry, torch.Generator())
    d = method.discriminator
    with torch.no_grad():
        hinge = F.relu(1 - d(expected_real)[0]).mean() + F.relu(1 + d(carry["z_fake"])[0]).mean()
    assert abs(float(out.loss.detach()) - float(hinge)) < 1e-5 and out.terms["loss_d"] == float(out.loss.detach())
    assert any(p.requires_grad for p in method.components.vae.parameters())  # LoRA flags restored


def test_a_few_steps_train_every_phase_and_validate(trained):
    trainer, before, _ = trained
    changed = changed_keys(trainer, before)
    for prefix in ("generator.mine.tau_head.", "generator.mine.d_head.", "generator.mine.spatial_head.",
                   "generator.mine.blocks.", "generator.vae.encoder.", "generator.unet.", "regulariser.",
                   "discriminator."):
        assert any(k.startswith(prefix) for k in changed), prefix
    terms = ("loss_l2", "loss_lpips", "loss_vsd", "loss_gan", "loss_reg", "loss_d", "loss_g", "tau")
    rows = logged_rows(trainer.config.train.output_dir, terms, 3)
    assert all(20 <= float(r["tau"]) <= 250 for r in rows)


def test_bundle_rebuilds_mine_and_reproduces_the_generator(trained):
    trainer, _, bundle_path = trained
    method = trainer.method
    components = tiny_components(0)
    bundle = load_bundle(bundle_path, expected_family=components.family)
    meta = bundle.meta
    assert (meta.method, meta.parameterisation, meta.defaults["s"]) == ("idas", "S", 0.6)
    assert meta.modules == ("unet_lora", "vae_encoder_lora", "unet_conv_in", "mine")
    assert meta.hyperparameters["mine"] == method.mine.config.to_dict()
    apply_bundle(components, bundle)
    mine = load_method_modules(components, bundle)["mine"]
    z = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        ours, theirs = method.mine.eval()(z), mine(z)
    for field in ("tau", "eps_inv", "d"):
        torch.testing.assert_close(getattr(theirs, field), getattr(ours, field))


@pytest.mark.parametrize("switch", ["use_tp", "use_ine", "use_deg_embed"])
def test_an_ablated_bundle_computes_what_was_trained(tmp_path, switch):
    method = build_method(tmp_path, f"idas.{switch}=false")
    meta, tensors = method.export_bundle()
    mine = load_method_modules(tiny_components(0), Bundle(meta, tensors, "ablated"))["mine"]
    z = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        trained_tau, trained_eps_inv, trained_cond = method.generator.estimate(z, torch.zeros(2, 77, 32))
        exported = mine(z)
    torch.testing.assert_close(exported.tau, trained_tau)  # 999 with use_tp off
    torch.testing.assert_close(exported.eps_inv, trained_eps_inv)  # 0 with use_ine off
    torch.testing.assert_close(exported.d[:, None, :].expand_as(trained_cond), trained_cond)  # 0 with it off
    assert {"use_tp": not exported.tau.ne(999).any(), "use_ine": not exported.eps_inv.any(),
            "use_deg_embed": not exported.d.any()}[switch]


def test_bundle_runs_the_shipped_workflow_in_comfyui(trained, comfy, models_dir, input_dir):
    prompt, out = run_bundle_workflow(comfy, models_dir, input_dir, trained[2], "idas")
    prompt[node_of(prompt, "OneStepSRChariotMix")]["inputs"]["s"] = 0.0
    assert not torch.equal(run_image(comfy, prompt), out)  # s reaches the timestep and the noise


def test_bf16_autocast_step_is_finite_and_trains(tmp_path):
    trainer, before, _ = run_trainer(idas_config(tmp_path, image_folder(tmp_path / "hq", 2), "train.max_steps=1",
                                                 "train.mixed_precision=bf16"))
    changed = changed_keys(trainer, before)
    assert {"generator.mine.tau_head.2.weight", "generator.mine.d_head.2.weight",
            "discriminator.blocks.0.bias"} <= changed


def test_stop_and_resume_is_bit_identical(tmp_path):
    """Three optimisers, MINE and the discriminator's spectral-norm buffers all come back from a checkpoint."""
    hq = image_folder(tmp_path / "hq", 3)
    steps = ("train.max_steps=2", "train.save_every=1")
    straight = Trainer(idas_config(tmp_path / "straight", hq, *steps)).run()
    reset_accelerate()
    assert Trainer(idas_config(tmp_path, hq, *steps)).run(stop_at=1) is None
    reset_accelerate()
    resumed = Trainer(idas_config(tmp_path, hq, *steps, "train.resume=latest"))
    assert resumed.step == 1
    bundle = resumed.run()
    a, b = load_bundle(straight).tensors, load_bundle(bundle).tensors
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

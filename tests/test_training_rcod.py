"""RCOD_O training (SPEC §6) and its MEM stage (§6.4) on tiny models: the LDG timestep rule (Eq. 5–6), the generator
at that t with VPIM conditioning and no noise, DAS (Eq. 7), the teacher's text negative against a visual c_pos, the
trainable sets, a few real steps of both configs, and the bundles in the nodes and ComfyUI's shipped workflow."""

from __future__ import annotations

import shutil

import pytest
import torch
from safetensors.torch import save_file

from conftest import demo_workflow, node_of, run_image, write_image
from osd_core.adapters import apply_bundle
from osd_core.bundle import load_bundle, save_bundle
from osd_core.ldg import LDGConfig, latent_similarity
from osd_core.method_modules import load_method_modules
from osd_core.tiny import tiny_bundle, tiny_components
from osd_core.vpim import VPIMConfig, preprocess
from training.config import ModelConfig, config_from_dict, load_config
from training.losses.vsd import ScoreModels
from training.methods.clip_vision import load_vision_tower, tiny_vision_tower, vision_tower
from training.methods.rcod import constant_timestep
from training.methods.sd_lora import conv_in_base
from training.methods.sd_ops import latent_noise, sample_latent
from training.schema import ConfigError
from training.trainer import Trainer
from training_support import (  # noqa: F401 (fixture)
    REPO,
    changed_keys,
    image_folder,
    isolated_training,
    logged_rows,
    one_thread,
    random_images,
    reset_accelerate,
    run_trainer,
    tiny_overrides,
    validated,
)

RCOD_TOML = REPO / "training" / "configs" / "rcod.toml"
MEM_TOML = REPO / "training" / "configs" / "rcod_mem.toml"
ALPHA_500, SIGMA_500 = 0.52567, 0.85069  # SPEC §0.1 table


def rcod_config(tmp, hq, *extra):
    return load_config(RCOD_TOML, tiny_overrides(tmp, hq, *extra, method="rcod"))


def mem_config(tmp, hq, bundle, *extra):
    return load_config(MEM_TOML, tiny_overrides(tmp, hq, f"rcod_mem.rcod_bundle={bundle.as_posix()}",
                                                "rcod_mem.hidden=[32, 16]", *extra, method="rcod_mem"))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Three RCOD steps with validation, then two MEM steps on its bundle: (rcod trainer, its state before training,
    rcod bundle, mem trainer, its state before training, mem bundle, folder)."""
    tmp = tmp_path_factory.mktemp("rcod")
    hq = image_folder(tmp / "hq", 3)
    val = image_folder(tmp / "val", 1, seed=10)
    trainer, rcod_before, rcod_bundle = run_trainer(rcod_config(tmp, hq, *validated(val, 3)))
    mem_trainer, mem_before, mem_bundle = run_trainer(mem_config(tmp / "mem", hq, rcod_bundle, *validated(val, 2)))
    return trainer, rcod_before, rcod_bundle, mem_trainer, mem_before, mem_bundle, tmp


@pytest.fixture
def method(tmp_path):
    return Trainer(rcod_config(tmp_path, image_folder(tmp_path / "hq", 2))).method


def _with_cosine(z_hq: torch.Tensor, cosines: list[float]) -> torch.Tensor:
    """Latents whose flattened cosine to z_hq (B, ...) is ``cosines[i]`` (B values): a·ẑ_H + b·u with u ⟂ ẑ_H."""
    flat = z_hq.flatten(1)
    unit = flat / flat.norm(dim=1, keepdim=True)
    other = torch.randn(flat.shape, generator=torch.Generator().manual_seed(7))
    other = other - (other * unit).sum(1, keepdim=True) * unit
    other = other / other.norm(dim=1, keepdim=True)
    c = torch.tensor(cosines)[:, None]
    return (c * unit + (1 - c**2).sqrt() * other).reshape(z_hq.shape) * 3.0


def test_configs_carry_the_spec_defaults_round_trip_and_refuse_bad_values():
    base = ["model.tiny=true", "data.hq_dir=/data/hq"]
    rcod = load_config(RCOD_TOML, base)
    c = rcod.method_config
    assert (c.timestep, c.lambda_l2, c.lambda_lpips, c.lambda_vsd, c.lambda_reg, c.cfg_scale) == (500, 1, 2, 1, 1, 7.5)
    assert c.ldg == LDGConfig(k=250, n=3, m_min=0.25, m_max=1.0) and c.vpim_init_std == 0.02
    assert (rcod.lora.unet_rank, rcod.lora.vae_encoder_rank, rcod.optim.lr) == (4, 4, 2e-5)
    mem = load_config(MEM_TOML, [*base, "rcod_mem.rcod_bundle=/runs/rcod.safetensors"])
    assert (mem.optim.lr, mem.method_config.hidden, mem.method_config.use_tokens) == (1e-4, (512, 256), True)
    for config in (rcod, mem):
        assert config_from_dict(config.to_dict()) == config
    with pytest.raises(ConfigError, match="one of the LDG levels"):
        load_config(RCOD_TOML, [*base, "rcod.timestep=400"])
    with pytest.raises(ConfigError, match="m_min"):
        load_config(RCOD_TOML, [*base, "rcod.ldg.m_min=1.5"])
    with pytest.raises(ConfigError, match="`rcod_bundle` is empty"):
        load_config(MEM_TOML, base)


def test_ldg_rule_groups_each_sample_by_its_latent_cosine(method):
    """Eq. 5–6 with k = 250, n = 3, M_min = 0.25, M_max = 1: [0.75, 1] -> 250, [0.5, 0.75) -> 500, else 750."""
    hq = random_images(1, batch=4)
    noise = latent_noise(hq, 4, torch.Generator().manual_seed(2))
    with torch.no_grad():
        z_hq = sample_latent(method.generator.vae, hq, noise)
    z_lq = _with_cosine(z_hq, [0.99, 0.621, 0.3, -0.5])
    torch.testing.assert_close(latent_similarity(z_lq, z_hq), torch.tensor([0.99, 0.621, 0.3, -0.5]))
    t = method.ldg_timestep(hq, noise)(z_lq)
    assert t.tolist() == [250.0, 500.0, 750.0, 750.0]


def test_generator_is_the_standard_x0_at_t_with_vpim_tokens_and_no_noise(method):
    lq = random_images(3)
    noise = latent_noise(lq, 4, torch.Generator().manual_seed(4))
    tokens = method.tokens(lq)
    expected_tokens = method.tower(pixel_values=preprocess(lq, method.vpim.config)).last_hidden_state
    torch.testing.assert_close(tokens, expected_tokens)  # the frozen ViT's last_hidden_state, CLS included
    cond = method.vpim(tokens)
    torch.testing.assert_close(cond, tokens @ method.vpim.proj.weight.T + method.vpim.proj.bias)  # c_y = W Y + b
    with torch.no_grad():
        z_hat, x_hat, t = method.generator(lq, cond, noise, constant_timestep(500))
        z_lq = sample_latent(method.generator.vae, lq, noise)  # (B, 4, 8, 8)
        eps = method.generator.unet(z_lq, t, encoder_hidden_states=cond).sample
    assert t.tolist() == [500.0, 500.0]
    torch.testing.assert_close(z_hat, (z_lq - SIGMA_500 * eps) / ALPHA_500, rtol=1e-4, atol=1e-4)
    decoded = method.generator.vae.decode(z_hat / 0.18215).sample.clamp(-1, 1)
    torch.testing.assert_close(x_hat, decoded)


def test_das_draws_the_vsd_timestep_around_each_samples_level(method):
    generator = torch.Generator().manual_seed(0)
    t = torch.tensor([250.0, 500.0, 750.0] * 4000)
    t_r, cfg = method.vsd_timesteps(t.shape[0], {"t": t}, generator)
    assert cfg == 7.5
    for level, (low, high) in {250: (20, 500), 500: (250, 750), 750: (500, 980)}.items():
        drawn = t_r[t == level]
        assert int(drawn.min()) == low and int(drawn.max()) == high  # inclusive bounds, reached in 4000 draws


def test_teacher_guidance_with_a_text_negative_against_visual_tokens(method):
    """SPEC §6.3 [RECON]: c_neg is the text embedding of the negative prompt (77 tokens), c_pos the VPIM tokens
    (50 here); ε_real = ε(c_neg) + s (ε(c_pos) − ε(c_neg)) with the frozen teacher."""
    cond = method.vpim(method.tokens(random_images(5)))  # (2, 50, 32)
    negative = method.negative_condition(cond)
    assert negative.shape == (2, 77, 32) and torch.equal(negative[1], method.prompts([method.cfg.negative_prompt])[0])
    scores = ScoreModels(teacher=method.teacher, regulariser=method.regulariser, schedule=method.components.schedule)
    z_t = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(6))
    t = torch.tensor([300, 600])
    with torch.no_grad():
        guided = scores.real_eps(z_t, t, cond, negative, torch.tensor([7.5, 2.0]))
        e_u = method.teacher(z_t, t, encoder_hidden_states=negative).sample
        e_c = method.teacher(z_t, t, encoder_hidden_states=cond).sample
    scale = torch.tensor([7.5, 2.0]).view(2, 1, 1, 1)
    torch.testing.assert_close(guided, e_u + scale * (e_c - e_u))


def test_trainable_set_is_osediffs_plus_the_vpim_linear(tmp_path):
    trainer = Trainer(rcod_config(tmp_path, image_folder(tmp_path / "hq", 2)))
    method = trainer.method
    assert [p.name for p in trainer.phases] == ["generator", "regulariser"]
    assert set(trainer.phases[0].groups) == {"generator", "vpim"}
    assert trainer.phases[0].groups["vpim"] == list(method.vpim.parameters())
    names = {n for n, p in method.generator.named_parameters() if p.requires_grad}
    assert names and all(".lora_" in n or "conv_in.base_layer" in n for n in names)
    assert conv_in_base(method.generator.unet).weight.requires_grad
    assert not any(p.requires_grad for p in method.tower.parameters())
    assert not any(p.requires_grad for p in method.teacher.parameters())
    assert not any(p.requires_grad for p in method.components.text_encoder.parameters())
    assert method.tower.config.hidden_size == method.vpim.config.vision_dim == 1024  # ComfyUI's ViT-L/14 width
    assert sorted(trainer.modules) == ["generator", "regulariser", "vpim"]


def test_a_few_steps_train_every_term_and_validate(trained):
    trainer, before, _, _, _, _, tmp = trained
    changed = changed_keys(trainer, before)
    assert {"vpim.proj.weight", "vpim.proj.bias"} <= changed
    assert any(".lora_B." in k and k.startswith("generator.") for k in changed)
    assert any("conv_in.base_layer" in k for k in changed) and any(k.startswith("regulariser.") for k in changed)
    names = ("loss_l2", "loss_lpips", "loss_vsd", "loss_reg", "loss_g")
    for row in logged_rows(tmp / "run", names, 3, val_images=1):
        terms = {k: float(row[k]) for k in names}
        # L_G = MSE + λ1 LPIPS + λ2 VSD with the [RECON] (1, 2, 1)
        assert terms["loss_g"] == pytest.approx(terms["loss_l2"] + 2 * terms["loss_lpips"] + terms["loss_vsd"],
                                                rel=1e-4)
    assert (tmp / "run" / "val" / "step-00000003" / "000.png").is_file()


def test_rcod_bundle_reproduces_the_trained_generator(trained):
    trainer, _, bundle_path, _, _, _, _ = trained
    method = trainer.method
    components = tiny_components(0)
    bundle = load_bundle(bundle_path, expected_family=components.family)
    meta = bundle.meta
    assert (meta.method, meta.parameterisation, meta.defaults["level"]) == ("rcod", "S", "neutral")
    assert meta.modules == ("unet_lora", "vae_encoder_lora", "unet_conv_in", "vpim")
    assert meta.hyperparameters["ldg"] == LDGConfig().to_dict()
    assert meta.hyperparameters["vpim"]["vision_dim"] == 1024 and meta.hyperparameters["vpim"]["cond_dim"] == 32
    apply_bundle(components, bundle)
    vpim = load_method_modules(components, bundle)["vpim"]
    lq = random_images(8)
    tokens = method.tokens(lq)
    z = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(9))
    t = torch.tensor([250.0, 750.0])
    with torch.no_grad():
        cond = method.vpim(tokens)
        torch.testing.assert_close(vpim(tokens), cond)
        trained_eps = method.generator.unet(z, t, encoder_hidden_states=cond).sample
        merged_eps = components.unet(z, t, encoder_hidden_states=cond).sample
    torch.testing.assert_close(merged_eps, trained_eps, atol=1e-5, rtol=1e-4)


def test_mem_stage_trains_only_mem_on_the_true_metric(trained):
    trainer, _, _, mem_trainer, before, _, tmp = trained
    method = trainer.method
    mem = mem_trainer.method
    assert [p.name for p in mem_trainer.phases] == ["mem"] and list(mem_trainer.modules) == ["mem"]
    assert {id(p) for p in mem_trainer.state.parameters} == {id(p) for p in mem.mem.parameters()}
    assert changed_keys(mem_trainer, before)
    # the frozen encoder is the trained RCOD encoder (its LoRA merged)
    x = random_images(11)
    with torch.no_grad():
        trained_moments = method.generator.vae.quant_conv(method.generator.vae.encoder(x))
        frozen_moments = mem.components.vae.quant_conv(mem.components.vae.encoder(x))
    torch.testing.assert_close(frozen_moments, trained_moments, atol=1e-5, rtol=1e-4)
    assert not any(p.requires_grad for p in mem.components.vae.parameters())
    assert (tmp / "mem" / "run" / "val" / "step-00000002" / "000.png").is_file()  # the adaptive output
    # L_MEM = |MEM(z_L, tokens) - cos(z_L, z_H)| with z_L, z_H drawn as the phase draws them
    batch = {"lq": random_images(12), "hq": random_images(13)}
    out = mem.phase_loss("mem", batch, {}, torch.Generator().manual_seed(3))
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        z_lq = sample_latent(mem.components.vae, batch["lq"], latent_noise(batch["lq"], 4, generator))
        z_hq = sample_latent(mem.components.vae, batch["hq"], latent_noise(batch["hq"], 4, generator))
        m_hat = mem.mem(z_lq, method.tokens(batch["lq"]))
    expected = (m_hat - latent_similarity(z_lq, z_hq)).abs().mean()
    torch.testing.assert_close(out.loss.detach(), expected)


def test_mem_bundle_adds_mem_to_the_rcod_bundle(trained):
    _, _, rcod_path, mem_trainer, _, mem_path, _ = trained
    rcod, extended = load_bundle(rcod_path), load_bundle(mem_path)
    assert extended.meta.modules == (*rcod.meta.modules, "mem")
    assert extended.meta.hyperparameters["mem"] == {"latent_channels": 4, "token_dim": 1024, "hidden": [32, 16]}
    assert all(torch.equal(v, extended.tensors[k]) for k, v in rcod.tensors.items())
    assert extended.meta.extra["training"]["config"]["method"] == "rcod_mem"
    assert extended.meta.extra["rcod_bundle"]["training"]["config"]["method"] == "rcod"
    components = tiny_components(0)
    apply_bundle(components, extended)
    modules = load_method_modules(components, extended)
    torch.testing.assert_close(modules["mem"].mlp[0].weight, mem_trainer.method.mem.mlp[0].weight)


def test_mem_stage_refuses_a_bundle_that_is_not_rcod(tmp_path):
    bundle = tmp_path / "osediff.safetensors"
    save_bundle(bundle, *tiny_bundle(method="osediff"))
    with pytest.raises(ValueError, match="MEM extends an RCOD bundle"):
        Trainer(mem_config(tmp_path, image_folder(tmp_path / "hq", 2), bundle))


def test_clip_vision_tower_from_a_comfyui_file_and_the_missing_path_error(tmp_path):
    tower = tiny_vision_tower(torch.Generator().manual_seed(0))
    state = {f"vision_model.{k}": v for k, v in tower.state_dict().items()}
    state["visual_projection.weight"] = torch.zeros(8, 1024)  # CLIPVisionModelWithProjection files carry it
    save_file(state, str(tmp_path / "vit.safetensors"))
    loaded = load_vision_tower(str(tmp_path / "vit.safetensors"))
    assert (loaded.config.num_hidden_layers, loaded.config.patch_size, loaded.config.image_size) == (1, 32, 224)
    pixels = preprocess(random_images(14), VPIMConfig(cond_dim=32))
    torch.testing.assert_close(loaded(pixel_values=pixels).last_hidden_state,
                               tower(pixel_values=pixels).last_hidden_state)
    with pytest.raises(ValueError, match="`rcod.clip_vision` is empty"):
        vision_tower("", ModelConfig(base="/models/sd21"), "rcod.clip_vision")


def test_bundles_run_the_shipped_workflow_in_comfyui(trained, comfy, models_dir, input_dir):
    _, _, rcod_path, _, _, mem_path, _ = trained
    shutil.copyfile(rcod_path, models_dir / "onestep_sr" / "trained-rcod.safetensors")
    shutil.copyfile(mem_path, models_dir / "onestep_sr" / "trained-rcod-mem.safetensors")
    image = write_image(input_dir, "trained_rcod.png", 16, 16)
    prompt = demo_workflow("rcod", image)
    loader, level = node_of(prompt, "OneStepSRLoadModel"), node_of(prompt, "OneStepSRRealismLevel")
    prompt[loader]["inputs"]["bundle"] = "trained-rcod.safetensors"
    out = run_image(comfy, prompt)
    assert out.shape == (1, 64, 64, 3) and 0.0 <= float(out.min()) and float(out.max()) <= 1.0
    prompt[loader]["inputs"]["bundle"] = "trained-rcod-mem.safetensors"
    prompt[level]["inputs"]["level"] = "adaptive"
    prompt[level]["inputs"]["clip_vision"] = [node_of(prompt, "CLIPVisionLoader"), 0]
    result = comfy.run(prompt)
    assert result.outputs[level][0].t.tolist()[0] in (250.0, 500.0, 750.0)

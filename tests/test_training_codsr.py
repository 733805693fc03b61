"""CODSR training (SPEC §4) on tiny models: the generator (RGPA noise, LQFM on conv_in, x̂₀ N) against the SPEC
formulas, the t_s draws, stage 1's trainable set, loss weights and pixel D, stage 2's merge + alignment LoRA, its
loss composition and TMG token loss, a few real steps of both configs, and both bundles in ComfyUI's workflow."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from conftest import demo_workflow, node_of, run_image, write_image
from osd_core.adapters import apply_bundle
from osd_core.bundle import load_bundle, save_bundle
from osd_core.method_modules import load_method_modules
from osd_core.tiny import tiny_bundle, tiny_components
from training.config import config_from_dict, load_config
from training.schema import ConfigError
from training.losses.comat import capture_cross_attention
from training.methods.codsr_generator import CODSRDraws, draw
from training.methods.codsr_stage2 import ALIGNMENT_LAYERS
from training.methods.sd_lora import conv_in_base
from training.methods.sd_ops import latent_noise, sample_latent
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

STAGE1_TOML = REPO / "training" / "configs" / "codsr_stage1.toml"
STAGE2_TOML = REPO / "training" / "configs" / "codsr_stage2.toml"
# SPEC §0.1 at t = 100: α, σ, w = σ/α, λ = 1/w
ALPHA_100, SIGMA_100, W_100, LAMBDA_100 = 0.94563, 0.32523, 0.34393, 2.9076
PROMPT = "a dog on the grass, tree"


def stage1_config(tmp, hq, *extra):
    return load_config(STAGE1_TOML, tiny_overrides(tmp, hq, *extra, method="codsr_stage1"))


def stage2_config(tmp, hq, bundle, *extra):
    return load_config(STAGE2_TOML, tiny_overrides(tmp, hq, f"codsr_stage2.stage1_bundle={bundle.as_posix()}",
                                                   *extra, method="codsr_stage2"))


def tmg_data(folder):
    """Three HQ images with the prompt PROMPT, and TMG masks for two of them: "dog" (left half) on 000 and "dog"
    plus "tree" (top rows) on 001."""
    hq = image_folder(folder / "hq", 3)
    for i in range(3):
        (hq / f"{i:03d}.txt").write_text(PROMPT)
    masks = folder / "masks"
    left, top = np.zeros((72, 80), np.uint8), np.zeros((72, 80), np.uint8)
    left[:, :40], top[:24] = 255, 255
    for stem, files in {"000": {"00_dog": left}, "001": {"00_dog": left, "01_tree": top}}.items():
        (masks / stem).mkdir(parents=True)
        for name, pixels in files.items():
            Image.fromarray(pixels).save(masks / stem / f"{name}.png")
    return hq, masks


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Stage 1 (3 steps, validation), then stage 2 on its bundle with TMG masks (2 steps, validation):
    (stage-1 trainer, its initial state, its bundle, stage-2 trainer, its initial state, its bundle, folder)."""
    tmp = tmp_path_factory.mktemp("codsr")
    hq, masks = tmg_data(tmp)
    val = image_folder(tmp / "val", 1, seed=10)
    first, first_before, first_bundle = run_trainer(stage1_config(tmp / "s1", hq, *validated(val, 2)))
    second, second_before, second_bundle = run_trainer(stage2_config(
        tmp / "s2", hq, first_bundle, f"data.masks_dir={masks.as_posix()}", *validated(val, 2)))
    return first, first_before, first_bundle, second, second_before, second_bundle, tmp


@pytest.fixture
def stage1(tmp_path):
    return Trainer(stage1_config(tmp_path, image_folder(tmp_path / "hq", 2)))


def _perturb_lqfm(lqfm) -> None:
    """Give the zero-initialised last convs values, so γ and β are not 0."""
    generator = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for conv in (lqfm.SFT_scale_conv1, lqfm.SFT_shift_conv1):
            conv.weight.copy_(torch.randn(conv.weight.shape, generator=generator) * 0.01)
            conv.bias.copy_(torch.randn(conv.bias.shape, generator=generator) * 0.1)


def test_configs_carry_the_spec_defaults_round_trip_and_refuse_bad_values():
    base = ["model.tiny=true", "data.hq_dir=/data/hq"]
    first = load_config(STAGE1_TOML, base)
    c = first.method_config
    assert (c.timestep, c.t_min, c.t_max, c.lambda_l2, c.lambda_lpips, c.lambda_gan, c.lambda_vsd) == \
        (100, 20, 400, 2, 5, 0.5, 0)
    assert (first.lora.unet_rank, first.lora.vae_encoder_rank, c.train_conv_in) == (16, 4, False)
    assert (c.discriminator.in_channels, c.discriminator.loss, c.discriminator.real_target) == (3, "bce", 0.8)
    second = load_config(STAGE2_TOML, [*base, "codsr_stage2.stage1_bundle=/runs/s1.safetensors"])
    c = second.method_config
    assert (c.lambda_l2, c.lambda_lpips, c.lambda_vsd, c.lambda_reg, c.cfg_scale, c.eta_pos) == (1, 2, 2, 1, 7.5, 1)
    for config in (first, second):
        assert config_from_dict(config.to_dict()) == config
    for path, extra, message in (
            (STAGE1_TOML, "codsr_stage1.t_min=500", "t_min <= t_max"),
            (STAGE1_TOML, "codsr_stage1.discriminator.in_channels=4", "in_channels` must be 3"),
            (STAGE2_TOML, "codsr_stage2.eta_pos=-1", "eta_pos"),
            (STAGE2_TOML, "codsr_stage2.timestep=1000", "timestep")):
        bundle = ["codsr_stage2.stage1_bundle=/b.safetensors"] if path == STAGE2_TOML else []
        with pytest.raises(ConfigError, match=message):
            load_config(path, [*base, *bundle, extra])
    with pytest.raises(ConfigError, match="`stage1_bundle` is empty"):
        load_config(STAGE2_TOML, base)


def test_generator_follows_rgpa_lqfm_and_the_noise_residual_x0(stage1):
    """SPEC §4.1–4.3 at t_s = 100 on a flat image, whose RGPA weight is the floor 0.3 everywhere."""
    method = stage1.method
    generator_module = method.generator
    _perturb_lqfm(generator_module.lqfm)
    lq = torch.full((2, 3, 64, 64), 0.2)
    lq[1] = -0.4
    cond = torch.randn(2, 77, 32, generator=torch.Generator().manual_seed(1))
    noise = latent_noise(lq, 4, torch.Generator().manual_seed(2))
    eps = latent_noise(lq, 4, torch.Generator().manual_seed(3))
    t = torch.tensor([100.0, 100.0])
    with torch.no_grad():
        z_hat, x_hat = generator_module(lq, cond, CODSRDraws(noise, eps, t))
        z_lq = sample_latent(generator_module.vae, lq, noise)  # (2, 4, 8, 8)
        eps_a = 0.3 * eps
        z_t = ALPHA_100 * z_lq + SIGMA_100 * eps_a
        gamma, beta = generator_module.lqfm(lq)
        assert gamma.abs().max() > 0 and beta.abs().max() > 0
        hook = generator_module.unet.conv_in.register_forward_hook(
            lambda _m, _i, f: f * (1 + LAMBDA_100 * gamma) + LAMBDA_100 * beta)
        try:
            eps_hat = generator_module.unet(z_t, t, encoder_hidden_states=cond).sample
        finally:
            hook.remove()
    torch.testing.assert_close(z_hat, z_lq + W_100 * (eps_a - eps_hat), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(z_hat, (z_t - SIGMA_100 * eps_hat) / ALPHA_100, rtol=1e-4, atol=1e-4)  # = (S)
    torch.testing.assert_close(x_hat, generator_module.vae.decode(z_hat / 0.18215).sample.clamp(-1, 1))


def test_training_draws_t_s_in_range_and_validation_uses_100(stage1):
    method = stage1.method
    lq = torch.zeros(3000, 3, 8, 8)
    draws = method._noise(lq, torch.Generator().manual_seed(0))
    assert draws.t.dtype == torch.float32 and torch.equal(draws.t, draws.t.round())
    assert (int(draws.t.min()), int(draws.t.max())) == (20, 400)  # [RECON] U_int[20, 400], both ends drawn
    assert draws.latent.shape == draws.eps.shape == (3000, 4, 1, 1)
    fixed = draw(lq[:2], torch.Generator().manual_seed(0), t_range=(100, 100), sample_latent_noise=False)
    assert fixed.t.tolist() == [100.0, 100.0] and fixed.latent is None


def test_stage1_trains_lora_r16_r4_and_lqfm_and_a_separate_discriminator(stage1, tmp_path):
    method, phases = stage1.method, stage1.phases
    assert [p.name for p in phases] == ["generator", "discriminator"]
    names = {n for n, p in method.generator.named_parameters() if p.requires_grad}
    assert names == {n for n in names if ".lora_" in n or n.startswith("lqfm.")}
    assert {n for n in names if n.startswith("lqfm.")} == {f"lqfm.{k}" for k, _ in method.lqfm.named_parameters()}
    ranks = {n.split(".")[0]: p.shape[0] for n, p in method.generator.named_parameters() if ".lora_A." in n}
    assert ranks == {"unet": 16, "vae": 4}
    assert not conv_in_base(method.generator.unet).weight.requires_grad  # [RECON] default: LoRA only
    assert not any(p.requires_grad for p in method.components.text_encoder.parameters())
    generator_ids = {id(p) for p in phases[0].parameters()}
    assert not generator_ids & {id(p) for p in phases[1].parameters()}
    assert {id(p) for p in phases[1].parameters()} == {id(p) for p in method.discriminator.parameters()}
    assert method.teacher is None and method.regulariser is None  # no VSD in stage 1
    whole = Trainer(stage1_config(tmp_path / "conv", tmp_path / "hq", "codsr_stage1.train_conv_in=true"))
    assert conv_in_base(whole.method.generator.unet).weight.requires_grad
    assert "unet_conv_in" in whole.method.export_bundle()[0].modules


def test_stage1_discriminator_phase_is_smoothed_bce_on_real_and_detached_fake(stage1):
    method = stage1.method
    method.discriminator.eval()  # spectral norm's power iteration would move the weights between the calls
    hq, fake = random_images(6), random_images(7).requires_grad_(True)
    out = method.phase_loss("discriminator", {"hq": hq}, {"x_hat": fake}, torch.Generator().manual_seed(0))
    with torch.no_grad():
        real_logits, fake_logits = method.discriminator(hq), method.discriminator(fake)
    assert len(real_logits) == 3  # three levels, as S3Diff's three heads

    def bce(logits, target):  # −[y log σ(x) + (1 − y) log(1 − σ(x))], averaged
        return -(target * F.logsigmoid(logits) + (1 - target) * F.logsigmoid(-logits)).mean()

    expected = sum(bce(r, 0.8) + bce(f, 0.0) for r, f in zip(real_logits, fake_logits))
    torch.testing.assert_close(out.loss.detach(), expected)
    out.loss.backward()
    assert fake.grad is None  # the fake is detached: D's step never reaches the generator


def test_stage1_steps_weigh_l2_lpips_gan_as_2_5_half(trained):
    first, before, _, _, _, _, tmp = trained
    names = ("loss_l2", "loss_lpips", "loss_gan", "loss_g", "loss_d")
    for row in logged_rows(tmp / "s1" / "run", names, 2, val_images=1):
        term = {k: float(row[k]) for k in names}
        assert term["loss_g"] == pytest.approx(2 * term["loss_l2"] + 5 * term["loss_lpips"] + 0.5 * term["loss_gan"],
                                               rel=1e-4)
    changed = changed_keys(first, before)
    assert any(".lora_B." in k for k in changed) and any("lqfm.SFT_scale_conv1" in k for k in changed)
    assert any(k.startswith("discriminator.") for k in changed)
    assert (tmp / "s1" / "run" / "val" / "step-00000002" / "000.png").is_file()


def test_stage1_resumes_exactly_with_the_discriminator_state(trained, tmp_path):
    hq = trained[-1] / "hq"
    straight = Trainer(stage1_config(tmp_path / "a", hq, "train.max_steps=3"))
    straight.run()
    reset_accelerate()
    Trainer(stage1_config(tmp_path / "b", hq, "train.max_steps=3", "train.save_every=1")).run(stop_at=2)
    reset_accelerate()
    resumed = Trainer(stage1_config(tmp_path / "b", hq, "train.max_steps=3", "train.save_every=1",
                                    "train.resume=latest"))
    resumed.run()
    expected, got = straight.state.capture(), resumed.state.capture()
    assert any(k.endswith("._u") for k in got)  # the spectral norms' power-iteration state is checkpointed
    assert all(torch.equal(expected[k], got[k]) for k in expected)


def test_stage1_bundle_reproduces_the_trained_generator(trained):
    first, _, bundle_path, _, _, _, _ = trained
    method = first.method
    components = tiny_components(0)
    bundle = load_bundle(bundle_path, expected_family=components.family)
    meta = bundle.meta
    assert (meta.method, meta.parameterisation, meta.defaults["timestep"]) == ("codsr", "N", 100)
    assert meta.modules == ("unet_lora", "vae_encoder_lora", "lqfm")
    assert (meta.lora["unet"]["rank"], meta.lora["vae_encoder"]["rank"]) == (16, 4) and meta.lora_scale("unet") == 0.5
    apply_bundle(components, bundle)
    lqfm = load_method_modules(components, bundle)["lqfm"]
    lq = random_images(8)
    cond = torch.randn(2, 77, 32, generator=torch.Generator().manual_seed(9))
    z = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(10))
    t = torch.tensor([100.0, 100.0])
    with torch.no_grad():
        for module in (lqfm, method.lqfm):
            assert module(lq)[0].abs().max() > 0  # trained away from the zero init
        torch.testing.assert_close(lqfm(lq), method.lqfm(lq))
        trained_eps = method.generator.unet(z, t, encoder_hidden_states=cond).sample
        merged_eps = components.unet(z, t, encoder_hidden_states=cond).sample
    torch.testing.assert_close(merged_eps, trained_eps, atol=1e-5, rtol=1e-4)


def test_stage2_merges_stage1_and_trains_only_the_cross_attention_alignment_lora(trained):
    _, _, first_bundle, second, _, _, _ = trained
    method = second.method
    unet = method.generator.unet
    assert [p.name for p in second.phases] == ["generator", "regulariser"]
    lora = {n: p for n, p in unet.named_parameters() if ".lora_" in n}
    adapters = {n.split(".lora_")[1].split(".")[1] for n in lora}
    assert adapters == {"default_encoder_alignment", "default_decoder_alignment", "default_others_alignment"}
    modules = {n.split(".lora_")[0] for n in lora}
    assert modules and all(".attn2." in m and m.rsplit(".attn2.", 1)[1] in ALIGNMENT_LAYERS for m in modules)
    assert {p.shape[0] for n, p in lora.items() if ".lora_A." in n} == {16}  # the stage-1 U-Net rank
    trained_ids = {id(p) for p in second.phases[0].parameters()}
    assert trained_ids == {id(p) for p in lora.values()}
    assert not any(p.requires_grad for p in method.generator.vae.parameters())
    assert not any(p.requires_grad for p in method.lqfm.parameters())
    assert not any(".lora_" in n for n, _ in method.generator.vae.named_parameters())  # merged
    # the frozen parts are stage 1's: LQFM as exported, the U-Net's base weights stage 1 merged at 1.0
    reference = tiny_components(0)
    stage1 = load_bundle(first_bundle)
    apply_bundle(reference, stage1)
    base = {n.replace(".base_layer", ""): p for n, p in unet.named_parameters() if ".lora_" not in n}
    assert all(torch.allclose(base[n], p, atol=1e-6) for n, p in reference.unet.named_parameters())
    torch.testing.assert_close(method.lqfm.SFT_shift_conv1.weight,
                               load_method_modules(reference, stage1)["lqfm"].SFT_shift_conv1.weight)
    # the VSD teacher is the pristine base U-Net, not the stage-1 one
    pristine = tiny_components(0).unet
    assert all(torch.equal(p, dict(pristine.named_parameters())[n]) for n, p in method.teacher.named_parameters())


def test_stage2_loss_is_mse_2lpips_2vsd_plus_pos_and_trains(trained):
    _, _, _, second, before, _, tmp = trained
    names = ("loss_l2", "loss_lpips", "loss_vsd", "loss_pos", "loss_g", "loss_reg")
    for row in logged_rows(tmp / "s2" / "run", names, 2, val_images=1):
        term = {k: float(row[k]) for k in names}
        assert 0 < term["loss_pos"] <= 1
        assert term["loss_g"] == pytest.approx(
            term["loss_l2"] + 2 * term["loss_lpips"] + 2 * term["loss_vsd"] + term["loss_pos"], rel=1e-4)
    changed = changed_keys(second, before)
    assert any("_alignment" in k and ".lora_B." in k for k in changed)
    assert any(k.startswith("regulariser.") for k in changed)
    assert (tmp / "s2" / "run" / "val" / "step-00000002" / "000.png").is_file()


def test_tmg_token_loss_follows_comat_on_the_masked_samples(trained):
    """ℓ_k = (1 − Σ_{u∈M} A_k(u) / Σ_u A_k(u))², mean over the noun's sub-tokens, the nouns, then the samples with
    masks (SPEC §4.5); A_k = the head- and layer-averaged cross-attention of the generator at t_s."""
    _, _, _, second, _, _, _ = trained
    method = second.method
    tokenizer = method.components.tokenizer
    lq = random_images(11)
    masks = torch.zeros(2, 2, 64, 64)
    masks[0, 0, :, :32] = 1  # sample 0: "dog", the left half; sample 1 has no valid mask (its loss is not counted)
    batch = {"lq": lq, "hq": random_images(12), "prompt": [PROMPT, PROMPT], "masks": masks,
             "mask_valid": torch.tensor([[True, False], [False, False]]), "nouns": [["dog", ""], ["", ""]]}
    cond = method.prompts(batch["prompt"])
    carry = {}
    z_hat, _ = method.student(batch, cond, carry, torch.Generator().manual_seed(0))
    maps = carry["attention"].averaged((8, 8))  # (2, 77, 8, 8)
    terms = method.extra_generator_terms(z_hat, batch, carry)
    weight, loss = terms["loss_pos"]
    ids = tokenizer(PROMPT, padding="max_length", max_length=77, truncation=True).input_ids
    dog = tokenizer("dog", add_special_tokens=False).input_ids
    start = next(i for i in range(77) if ids[i:i + len(dog)] == dog)
    inside = F.interpolate(masks[0:1, 0:1], size=(8, 8), mode="area")[0, 0]
    expected = torch.stack([(1 - (maps[0, k] * inside).sum() / maps[0, k].sum()) ** 2
                            for k in range(start, start + len(dog))]).mean()
    assert weight == 1.0
    torch.testing.assert_close(loss, expected)
    loss.backward()
    unet = method.generator.unet
    grads = [p.grad for n, p in unet.named_parameters() if "_alignment" in n and ".lora_B." in n]
    assert any(g is not None and g.abs().max() > 0 for g in grads)  # L_pos reaches the alignment LoRA
    unet.zero_grad(set_to_none=True)


def test_tmg_under_gradient_checkpointing_trains_as_without(trained, tmp_path):
    """The capturing forward runs unchecked (its maps need their graph); the result is the same."""
    _, _, first_path, _, _, _, tmp = trained
    states = []
    for extra in ([], ["model.gradient_checkpointing=true"]):
        trainer = Trainer(stage2_config(tmp_path / str(len(extra)), tmp / "hq", first_path, "train.max_steps=1",
                                        f"data.masks_dir={(tmp / 'masks').as_posix()}", *extra))
        trainer.run()
        states.append(trainer.state.capture())
        assert trainer.method.generator.unet.is_gradient_checkpointing == bool(extra)  # restored after the capture
        reset_accelerate()
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])


def test_tmg_capture_sees_every_cross_attention_layer_of_the_generator(trained):
    _, _, _, second, _, _, _ = trained
    unet = second.method.generator.unet
    with torch.no_grad(), capture_cross_attention(unet) as maps:
        unet(torch.zeros(1, 4, 8, 8), torch.tensor([100.0]), encoder_hidden_states=torch.zeros(1, 77, 32))
    layers = [n for n, _ in unet.named_modules() if n.endswith(".attn2")]
    assert len(maps.maps) == len(layers) and all(m.shape[-1] == 77 for m in maps.maps)


def test_stage2_bundle_holds_both_lora_sets_in_the_codsr_layout(trained):
    _, _, first_path, second, _, second_path, _ = trained
    method = second.method
    stage1, bundle = load_bundle(first_path), load_bundle(second_path)
    meta = bundle.meta
    assert (meta.method, meta.parameterisation, meta.modules) == ("codsr", "N", stage1.meta.modules)
    adapters = meta.lora["unet"]["adapters"]
    assert sorted(adapters) == sorted([f"default_{g}{s}" for g in ("encoder", "decoder", "others")
                                       for s in ("", "_alignment")])
    assert meta.lora["unet"]["rank"] == 16 and meta.lora["vae_encoder"] == stage1.meta.lora["vae_encoder"]
    assert all(torch.equal(v, bundle.tensors[k]) for k, v in stage1.tensors.items())
    assert meta.extra["stage1_bundle"]["training"]["config"]["method"] == "codsr_stage1"
    components = tiny_components(0)
    apply_bundle(components, bundle)  # default_* and *_alignment merged at 1.0, as the release's loader does
    cond = torch.randn(2, 77, 32, generator=torch.Generator().manual_seed(13))
    z = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(14))
    t = torch.tensor([100.0, 250.0])
    with torch.no_grad():
        trained_eps = method.generator.unet(z, t, encoder_hidden_states=cond).sample
        merged_eps = components.unet(z, t, encoder_hidden_states=cond).sample
    torch.testing.assert_close(merged_eps, trained_eps, atol=1e-5, rtol=1e-4)


def test_stage2_refuses_mismatched_rank_and_non_stage1_bundles(trained, tmp_path):
    _, _, first_path, _, _, second_path, tmp = trained
    hq = tmp / "hq"
    with pytest.raises(ValueError, match=r"lora.unet_rank=16 lora.alpha=8.0"):
        Trainer(stage2_config(tmp_path / "a", hq, first_path, "lora.unet_rank=4"))
    with pytest.raises(ValueError, match="already has alignment adapters"):
        Trainer(stage2_config(tmp_path / "b", hq, second_path))
    other = tmp_path / "osediff.safetensors"
    save_bundle(other, *tiny_bundle(method="osediff"))
    with pytest.raises(ValueError, match="starts from a CODSR stage-1 bundle"):
        Trainer(stage2_config(tmp_path / "c", hq, other))


def test_bundles_run_the_shipped_workflow_in_comfyui(trained, comfy, models_dir, input_dir):
    _, _, first_path, _, _, second_path, _ = trained
    image = write_image(input_dir, "trained_codsr.png", 24, 16)
    prompt = demo_workflow("codsr", image)
    loader = node_of(prompt, "OneStepSRLoadModel")
    outputs = []
    for name, path in (("trained-codsr-stage1", first_path), ("trained-codsr", second_path)):
        shutil.copyfile(path, models_dir / "onestep_sr" / f"{name}.safetensors")
        prompt[loader]["inputs"]["bundle"] = f"{name}.safetensors"
        out = run_image(comfy, prompt)
        assert out.shape == (1, 64, 96, 3) and 0.0 <= float(out.min()) and float(out.max()) <= 1.0
        outputs.append(out)
    assert not torch.equal(outputs[0], outputs[1])

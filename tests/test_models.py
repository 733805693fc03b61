"""Offline model loading: diffusers folder, single file (LDM layout), bundled configs, tokenizer, errors."""

import json
import shutil

import pytest
import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from diffusers.loaders import single_file_utils
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import CLIPTextConfig, CLIPTextModel

from osd_core import models
from osd_core.ldm_keys import text_to_ldm, unet_to_ldm, vae_to_ldm
from osd_core.models import (
    CONFIG_DIR,
    SDComponents,
    base_family,
    load_sd_components,
    load_tokenizer,
    resolve_dtype,
    save_single_file,
)
from osd_core.schedule import NoiseSchedule, ScheduleConfig
from osd_core.tiny import (
    TINY_TEXT,
    TINY_UNET,
    TINY_VAE,
    save_tiny_diffusers,
    tiny_components,
)

SD21 = CONFIG_DIR / "sd21-base"


@pytest.fixture(scope="module")
def reference():
    return tiny_components(seed=3)


def _outputs(components):
    g = torch.Generator().manual_seed(0)
    z, x = torch.randn(1, 4, 8, 8, generator=g), torch.rand(1, 3, 32, 32, generator=g) * 2 - 1
    ids = components.tokenizer("a photo of a cat", padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        text = components.text_encoder(ids)[0]  # (1, 77, 32)
        eps = components.unet(z, torch.tensor([500.0]), encoder_hidden_states=text).sample  # (1, 4, 8, 8)
        return eps, components.vae.encode(x).latent_dist.mean, components.vae.decode(z).sample, text


def _assert_identical(a, b):
    for left, right in zip(_outputs(a), _outputs(b), strict=True):
        assert torch.equal(left, right)


def _json(path):
    return json.loads(path.read_text())


def _meta_models(root):
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(_json(root / "unet/config.json"))
        vae = AutoencoderKL.from_config(_json(root / "vae/config.json"))
        text = CLIPTextModel(CLIPTextConfig.from_dict(_json(root / "text_encoder/config.json")))
    return unet, vae, text


# ---- round trips -----------------------------------------------------------------------------------------------

def test_diffusers_folder_round_trip_is_bit_identical(tmp_path):
    saved = save_tiny_diffusers(tmp_path / "tiny", seed=3)
    loaded = load_sd_components(tmp_path / "tiny")
    _assert_identical(saved, loaded)
    assert loaded.family == saved.family and loaded.family.startswith("custom-")
    assert loaded.source == str(tmp_path / "tiny") and loaded.dtype == torch.float32
    assert not any(p.requires_grad for m in loaded.modules() for p in m.parameters())
    assert not loaded.unet.training


def test_single_file_round_trip_in_ldm_layout(tmp_path, reference):
    path = tmp_path / "tiny.safetensors"
    save_single_file(reference, path)
    with safe_open(str(path), framework="pt") as handle:
        keys, metadata = set(handle.keys()), handle.metadata()
    # names of the original LDM layout (layers_per_block = 1: the downsamplers sit at input_blocks 2, 4, 6)
    assert {"model.diffusion_model.input_blocks.0.0.weight", "model.diffusion_model.input_blocks.2.0.op.weight",
            "model.diffusion_model.input_blocks.1.1.proj_in.weight",
            "model.diffusion_model.middle_block.1.proj_out.weight",
            "model.diffusion_model.output_blocks.1.1.conv.weight", "model.diffusion_model.out.2.weight",
            "first_stage_model.encoder.down.0.block.0.conv1.weight",
            "first_stage_model.decoder.up.3.block.0.conv1.weight",
            "first_stage_model.encoder.mid.attn_1.q.weight", "first_stage_model.quant_conv.weight",
            "cond_stage_model.model.transformer.resblocks.1.attn.in_proj_weight",
            "cond_stage_model.model.ln_final.weight"} <= keys
    assert {"onestep_sr.config.unet", "onestep_sr.config.vae", "onestep_sr.config.text_encoder"} <= set(metadata)
    loaded = load_sd_components(path)
    _assert_identical(reference, loaded)
    assert loaded.family == reference.family


def test_single_file_keeps_the_schedule(tmp_path, reference):
    other = SDComponents(**{**vars(reference), "schedule": NoiseSchedule(ScheduleConfig(beta_end=0.02))})
    save_single_file(other, tmp_path / "s.safetensors")
    assert load_sd_components(tmp_path / "s.safetensors").schedule.config == ScheduleConfig(beta_end=0.02)


@pytest.mark.parametrize("wrapped", [True, False])
def test_ckpt_without_metadata_takes_the_bundled_config_route(tmp_path, reference, monkeypatch, wrapped):
    """A .ckpt carries no configs: the loader picks bundled ones from the tensor shapes (here: the tiny ones)."""
    st = tmp_path / "tiny.safetensors"
    save_single_file(reference, st)
    state = load_file(str(st))
    torch.save({"state_dict": state, "global_step": 10} if wrapped else state, tmp_path / "tiny.ckpt")
    seen = []

    def tiny_configs(found, path):
        seen.append(found[models._CONTEXT_KEY].shape)
        return {"unet": dict(TINY_UNET), "vae": dict(TINY_VAE), "text_encoder": dict(TINY_TEXT), "scheduler": {}}

    monkeypatch.setattr(models, "_bundled_configs", tiny_configs)
    _assert_identical(reference, load_sd_components(tmp_path / "tiny.ckpt"))
    assert seen == [(32, 32)]


def _resave(source, target, rename):
    with safe_open(str(source), framework="pt") as handle:
        metadata = handle.metadata()
    state = {rename(k): v for k, v in load_file(str(source)).items()}
    save_file({k: v for k, v in state.items() if k is not None}, str(target), metadata=metadata)


def test_text_encoder_in_the_sgm_layout_loads(tmp_path, reference):
    """Stability's sgm code (SD-Turbo's single file) keeps the OpenCLIP tower under conditioner.embedders.0.model."""
    save_single_file(reference, tmp_path / "ldm.safetensors")
    _resave(tmp_path / "ldm.safetensors", tmp_path / "sgm.safetensors",
            lambda k: k.replace("cond_stage_model.model.", "conditioner.embedders.0.model."))
    _assert_identical(reference, load_sd_components(tmp_path / "sgm.safetensors"))


def test_file_without_text_encoder_is_named(tmp_path, reference):
    save_single_file(reference, tmp_path / "ldm.safetensors")
    _resave(tmp_path / "ldm.safetensors", tmp_path / "unet_only.safetensors",
            lambda k: None if k.startswith("cond_stage_model.") else k)
    with pytest.raises(ValueError, match="unet_only.safetensors.*holds no text encoder"):
        load_sd_components(tmp_path / "unet_only.safetensors")


def test_dtype_is_applied(tmp_path):
    save_tiny_diffusers(tmp_path / "tiny")
    loaded = load_sd_components(tmp_path / "tiny", dtype=torch.bfloat16)
    assert {p.dtype for m in loaded.modules() for p in m.parameters()} == {torch.bfloat16}
    assert loaded.dtype == torch.bfloat16


def test_folder_without_tokenizer_and_scheduler_uses_fallbacks(tmp_path):
    save_tiny_diffusers(tmp_path / "tiny")
    shutil.rmtree(tmp_path / "tiny" / "tokenizer")
    shutil.rmtree(tmp_path / "tiny" / "scheduler")
    loaded = load_sd_components(tmp_path / "tiny")
    assert loaded.tokenizer("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert loaded.schedule.config == ScheduleConfig()
    given = load_sd_components(tmp_path / "tiny", tokenizer_dir=CONFIG_DIR / "clip_tokenizer")
    assert given.tokenizer.pad_token_id == 0


def test_v_prediction_scheduler_is_refused(tmp_path):
    save_tiny_diffusers(tmp_path / "tiny")
    config_path = tmp_path / "tiny" / "scheduler" / "scheduler_config.json"
    config_path.write_text(json.dumps({**_json(config_path), "prediction_type": "v_prediction"}))
    with pytest.raises(ValueError, match="epsilon"):
        load_sd_components(tmp_path / "tiny")


# ---- errors ----------------------------------------------------------------------------------------------------

def test_missing_path_says_where_models_go(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.safetensors.*models/checkpoints"):
        load_sd_components(tmp_path / "nope.safetensors")


def test_corrupt_safetensors_is_named(tmp_path):
    bad = tmp_path / "broken.safetensors"
    bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    with pytest.raises(ValueError, match="broken.safetensors.*not a valid safetensors file.*Re-download"):
        load_sd_components(bad)


def test_truncated_safetensors_is_named(tmp_path, reference):
    path = tmp_path / "cut.safetensors"
    save_single_file(reference, path)
    path.write_bytes(path.read_bytes()[:5000])
    with pytest.raises(ValueError, match="cut.safetensors.*not a valid safetensors file"):
        load_sd_components(path)


def test_unknown_layout_lists_keys_and_layouts_tried(tmp_path):
    path = tmp_path / "other.safetensors"
    save_file({"some.weight": torch.zeros(2), "other.bias": torch.zeros(1)}, str(path))
    with pytest.raises(ValueError, match=r"first keys: \['other\.bias', 'some\.weight'\].*Layouts tried"):
        load_sd_components(path)


def test_diffusers_keys_in_a_single_file_get_a_hint(tmp_path):
    path = tmp_path / "unet.safetensors"
    save_file({"down_blocks.0.resnets.0.conv1.weight": torch.zeros(1)}, str(path))
    with pytest.raises(ValueError, match="diffusers folder instead"):
        load_sd_components(path)


def test_sd1_checkpoint_is_refused(tmp_path):
    path = tmp_path / "sd15.safetensors"
    save_file({models._CONTEXT_KEY: torch.zeros(320, 768)}, str(path))
    with pytest.raises(ValueError, match="768-wide.*SD 2.x"):
        load_sd_components(path)


def test_incomplete_single_file_lists_missing_weights(tmp_path, reference):
    path = tmp_path / "part.safetensors"
    save_single_file(reference, path)
    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata()
    state = load_file(str(path))
    del state["model.diffusion_model.out.2.weight"]
    save_file(state, str(path), metadata=metadata)
    with pytest.raises(ValueError, match=r"U-Net weights are incomplete; missing \['conv_out.weight'\]"):
        load_sd_components(path)


class _Payload:
    """Stands for arbitrary code in a pickle."""


def test_ckpt_with_code_is_refused(tmp_path):
    torch.save({"state_dict": {"x": torch.zeros(1)}, "obj": _Payload()}, tmp_path / "evil.ckpt")
    with pytest.raises(ValueError, match="evil.ckpt.*weights-only"):
        load_sd_components(tmp_path / "evil.ckpt")


def test_not_a_model_folder(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="unet/config.json"):
        load_sd_components(tmp_path / "empty")


def test_other_file_types_are_refused(tmp_path):
    (tmp_path / "model.gguf").write_bytes(b"x")
    with pytest.raises(ValueError, match="neither a diffusers folder nor a checkpoint"):
        load_sd_components(tmp_path / "model.gguf")


# ---- tokenizer and bundled configs -----------------------------------------------------------------------------

def test_tokenizer_ids_and_padding():
    tokenizer = load_tokenizer()
    ids = tokenizer("a photo of a cat", padding="max_length", max_length=77).input_ids
    assert ids[:7] == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert ids[7:] == [0] * 70
    assert tokenizer.model_max_length == 77 and tokenizer.pad_token == "!"
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id) == (49406, 49407)
    assert len(tokenizer("word " * 100, truncation=True, max_length=77).input_ids) == 77


def test_tokenizer_notice_names_the_licence():
    assert "MIT" in (CONFIG_DIR / "clip_tokenizer" / "NOTICE").read_text()


def _count(module):
    return sum(p.numel() for p in module.parameters())


def test_bundled_sd21_configs_have_the_published_sizes():
    unet, vae, text = _meta_models(SD21)
    assert round(_count(unet) / 1e6, 1) == 865.9
    assert round(_count(vae) / 1e6, 1) == 83.7
    assert round(_count(text) / 1e6, 1) == 340.4
    assert base_family(unet.config) == "sd2"
    assert vae.config.scaling_factor == 0.18215 and text.config.num_hidden_layers == 23


def test_sd_turbo_shares_the_networks_and_the_betas():
    turbo = CONFIG_DIR / "sd-turbo"
    for part in ("unet/config.json", "vae/config.json", "text_encoder/config.json"):
        assert _json(turbo / part) == _json(SD21 / part)
    for root in (SD21, turbo):
        assert set(_json(root / "model_index.json")) >= {"unet", "vae", "text_encoder", "tokenizer", "scheduler"}
    schedules = [ScheduleConfig.from_diffusers(_json(root / "scheduler/scheduler_config.json"))
                 for root in (SD21, turbo)]
    assert schedules[0] == schedules[1] == ScheduleConfig(1000, 0.00085, 0.012, "scaled_linear")


def test_ldm_names_match_the_diffusers_converters_at_full_size():
    """On the real SD 2.1-base topology (meta tensors), our diffusers -> LDM names are exactly what diffusers'
    single-file converters turn back into the diffusers state dict, and include the published LDM names."""
    unet, vae, text = _meta_models(SD21)
    ldm_unet = unet_to_ldm(unet.state_dict(), dict(unet.config))
    ldm_vae = vae_to_ldm(vae.state_dict(), dict(vae.config))
    ldm_text = text_to_ldm(text.state_dict())
    assert {"model.diffusion_model.input_blocks.3.0.op.weight", "model.diffusion_model.input_blocks.9.0.op.weight",
            "model.diffusion_model.output_blocks.2.1.conv.weight",
            "model.diffusion_model.output_blocks.8.2.conv.weight",
            "model.diffusion_model.input_blocks.4.0.skip_connection.weight",
            "model.diffusion_model.time_embed.0.weight"} <= set(ldm_unet)
    assert {"first_stage_model.decoder.up.0.block.0.nin_shortcut.weight",
            "first_stage_model.encoder.down.1.block.0.nin_shortcut.weight",
            "first_stage_model.encoder.down.0.downsample.conv.weight"} <= set(ldm_vae)
    assert ldm_vae["first_stage_model.encoder.mid.attn_1.q.weight"].shape == (512, 512, 1, 1)
    assert "cond_stage_model.model.transformer.resblocks.22.attn.in_proj_weight" in ldm_text
    back_unet = single_file_utils.convert_ldm_unet_checkpoint(ldm_unet, dict(unet.config))
    back_vae = single_file_utils.convert_ldm_vae_checkpoint(ldm_vae, dict(vae.config))
    for original, back in ((unet.state_dict(), back_unet), (vae.state_dict(), back_vae)):
        assert set(back) == set(original)
        assert all(back[k].shape == v.shape for k, v in original.items())
    back_text = single_file_utils.convert_open_clip_checkpoint(text, ldm_text, prefix=models.TEXT_PREFIX)
    assert {models.strip_text_prefix(k) for k in back_text} == {models.strip_text_prefix(k) for k in text.state_dict()}


# ---- small API -------------------------------------------------------------------------------------------------

def test_families():
    sd = {"block_out_channels": [320, 640, 1280, 1280], "in_channels": 4}
    assert base_family({**sd, "cross_attention_dim": 1024}) == "sd2"
    assert base_family({**sd, "cross_attention_dim": 768}) == "sd1"
    assert base_family({"block_out_channels": [320, 640, 1280], "in_channels": 4, "cross_attention_dim": 2048}) \
        == "sdxl"
    inpaint = base_family({**sd, "cross_attention_dim": 1024, "in_channels": 9})
    assert inpaint.startswith("custom-") and len(inpaint) == len("custom-") + 8
    tiny = tiny_components()
    assert base_family(tiny.unet.config) == base_family(tiny_components(seed=9).unet.config)
    assert base_family({**dict(tiny.unet.config), "layers_per_block": 2}) != base_family(tiny.unet.config)


def test_resolve_dtype(monkeypatch):
    cpu = torch.device("cpu")
    assert [resolve_dtype(n, cpu) for n in ("fp32", "fp16", "bf16", "auto")] == \
        [torch.float32, torch.float16, torch.bfloat16, torch.float32]
    assert resolve_dtype("auto", torch.device("mps")) == torch.float16
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert resolve_dtype("auto", torch.device("cuda")) == torch.bfloat16
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert resolve_dtype("auto", torch.device("cuda")) == torch.float16
    with pytest.raises(ValueError, match="`dtype` must be one of auto, fp32, fp16, bf16; got 'fp8'"):
        resolve_dtype("fp8", cpu)


def test_components_modules_and_to(reference):
    assert reference.modules() == [reference.unet, reference.vae, reference.text_encoder]
    assert reference.to(torch.device("cpu")) is reference


def test_tiny_components_are_seeded_and_leave_the_global_rng_alone():
    state = torch.random.get_rng_state()
    a, b, c = tiny_components(seed=5), tiny_components(seed=5), tiny_components(seed=6)
    assert torch.equal(torch.random.get_rng_state(), state)
    for left, right in zip(a.modules(), b.modules(), strict=True):
        assert all(torch.equal(x, y) for x, y in zip(left.state_dict().values(), right.state_dict().values(),
                                                      strict=True))
    assert not torch.equal(a.unet.conv_in.weight, c.unet.conv_in.weight)
    assert tiny_components(dtype=torch.bfloat16).unet.conv_in.weight.dtype == torch.bfloat16


def test_tiny_components_keep_the_sd_interfaces(reference):
    eps, mean, image, text = _outputs(reference)
    assert eps.shape == (1, 4, 8, 8) and mean.shape == (1, 4, 4, 4) and image.shape == (1, 3, 64, 64)
    assert text.shape == (1, 77, 32)
    assert reference.vae.config.scaling_factor == 0.18215
    assert [type(b).__name__ for b in reference.unet.down_blocks] == ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"]

"""Offline model loading: diffusers folder, single file (LDM layout), bundled configs, tokenizer, errors."""

import json

import pytest
import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from safetensors.torch import save_file
from transformers import CLIPTextConfig, CLIPTextModel

from osd_core.models import CONFIG_DIR, base_family, load_sd_components, load_tokenizer, resolve_dtype, save_single_file
from osd_core.tiny import save_tiny_diffusers, tiny_components


@pytest.fixture(scope="module")
def reference():
    return tiny_components(seed=3)


def _outputs(components):
    g = torch.Generator().manual_seed(0)
    z, x = torch.randn(1, 4, 8, 8, generator=g), torch.rand(1, 3, 32, 32, generator=g) * 2 - 1
    ids = components.tokenizer("a photo of a cat", padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        text = components.text_encoder(ids)[0]
        eps = components.unet(z, torch.tensor([500.0]), encoder_hidden_states=text).sample
        return eps, components.vae.encode(x).latent_dist.mean, components.vae.decode(z).sample, text


def _assert_same(a, b):
    for left, right in zip(_outputs(a), _outputs(b)):
        torch.testing.assert_close(left, right, atol=1e-5, rtol=1e-5)


def test_diffusers_folder_round_trip(tmp_path):
    saved = save_tiny_diffusers(tmp_path / "tiny", seed=3)
    loaded = load_sd_components(tmp_path / "tiny")
    _assert_same(saved, loaded)
    assert loaded.family == saved.family and loaded.family.startswith("custom-")


def test_single_file_round_trip_in_ldm_layout(tmp_path, reference):
    path = tmp_path / "tiny.safetensors"
    save_single_file(reference, path)
    from safetensors import safe_open
    with safe_open(str(path), framework="pt") as handle:
        keys = list(handle.keys())
    assert any(k.startswith("model.diffusion_model.input_blocks.1.1.") for k in keys)
    assert any(k.startswith("first_stage_model.encoder.down.0.block.0.") for k in keys)
    assert any(k.endswith("attn.in_proj_weight") for k in keys)
    _assert_same(reference, load_sd_components(path))


def test_ckpt_is_read_weights_only_and_unwrapped(tmp_path, reference):
    from safetensors.torch import load_file

    st = tmp_path / "tiny.safetensors"
    save_single_file(reference, st)
    torch.save({"state_dict": load_file(str(st)), "global_step": 10}, tmp_path / "tiny.ckpt")
    # a .ckpt carries no config metadata, so it takes the bundled-config route, which checks the context width
    with pytest.raises(ValueError, match="32-wide text context"):
        load_sd_components(tmp_path / "tiny.ckpt")


class _Payload:
    """Stands for arbitrary code in a pickle."""


def test_ckpt_with_code_is_refused(tmp_path):
    torch.save({"state_dict": {"x": torch.zeros(1)}, "obj": _Payload()}, tmp_path / "evil.ckpt")
    with pytest.raises(ValueError, match="weights-only"):
        load_sd_components(tmp_path / "evil.ckpt")


def test_dtype_is_applied(tmp_path):
    save_tiny_diffusers(tmp_path / "tiny")
    loaded = load_sd_components(tmp_path / "tiny", dtype=torch.bfloat16)
    assert {p.dtype for m in loaded.modules() for p in m.parameters()} == {torch.bfloat16}


def test_missing_path_says_where_models_go(tmp_path):
    with pytest.raises(FileNotFoundError, match="models/checkpoints"):
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
    with pytest.raises(ValueError, match="not a valid safetensors file"):
        load_sd_components(path)


def test_unknown_layout_lists_keys(tmp_path):
    path = tmp_path / "other.safetensors"
    save_file({"some.weight": torch.zeros(2)}, str(path))
    with pytest.raises(ValueError, match=r"some\.weight.*Tried"):
        load_sd_components(path)


def test_sd1_checkpoint_is_refused(tmp_path):
    path = tmp_path / "sd15.safetensors"
    save_file({"model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": torch.zeros(320, 768)},
              str(path))
    with pytest.raises(ValueError, match="768-wide.*SD 2.x"):
        load_sd_components(path)


def test_not_a_model_folder(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="unet/config.json"):
        load_sd_components(tmp_path / "empty")


def test_tokenizer_ids_and_padding():
    ids = load_tokenizer()("a photo of a cat", padding="max_length", max_length=77).input_ids
    assert ids[:7] == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert ids[7:] == [0] * 70


def test_bundled_sd21_configs_have_the_published_sizes():
    root = CONFIG_DIR / "sd21-base"
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(json.loads((root / "unet/config.json").read_text()))
        vae = AutoencoderKL.from_config(json.loads((root / "vae/config.json").read_text()))
        text = CLIPTextModel(CLIPTextConfig.from_dict(json.loads((root / "text_encoder/config.json").read_text())))
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert round(count(unet) / 1e6, 1) == 865.9
    assert round(count(vae) / 1e6, 1) == 83.7
    assert 339 < count(text) / 1e6 < 341
    assert base_family(unet.config) == "sd2"


def test_families():
    assert base_family({"cross_attention_dim": 768, "block_out_channels": [320, 640, 1280, 1280], "in_channels": 4}) \
        == "sd1"
    tiny = tiny_components()
    assert base_family(tiny.unet.config) == base_family(tiny_components(seed=9).unet.config)


def test_resolve_dtype():
    cpu = torch.device("cpu")
    assert resolve_dtype("auto", cpu) == torch.float32 and resolve_dtype("bf16", cpu) == torch.bfloat16
    with pytest.raises(ValueError, match="dtype"):
        resolve_dtype("fp8", cpu)

"""LoRA targets, injection, strict loading and merging (SPEC.md §0.5, CHECKPOINTS.md §1)."""

import json

import pytest
import torch
from diffusers import AutoencoderKL, UNet2DConditionModel

from osd_core.lora import (
    inject_lora,
    load_lora_state_dict,
    lora_scale,
    lora_state_dict,
    merge_lora,
    unet_lora_targets,
    vae_encoder_lora_targets,
)
from osd_core.models import CONFIG_DIR
from osd_core.tiny import tiny_components


@pytest.fixture()
def comps():
    return tiny_components(seed=0)


def _unet_out(unet):
    g = torch.Generator().manual_seed(0)
    z, c = torch.randn(1, 4, 8, 8, generator=g), torch.randn(1, 77, 32, generator=g)
    with torch.no_grad():
        return unet(z, torch.tensor([999.0]), encoder_hidden_states=c).sample  # (1, 4, 8, 8)


def _vae_out(vae):
    x = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.no_grad():
        return vae.encode(x).latent_dist.mean  # (1, 4, 4, 4)


def _inject_unet(unet, rank=4):
    for adapter, names in unet_lora_targets(unet).items():
        inject_lora(unet, names, rank=rank, adapter_name=adapter)


def _random_b(state, seed=1):
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(v.shape, generator=g) * 0.05 if ".lora_B." in k else v for k, v in state.items()}


# ---- targets -----------------------------------------------------------------------------------------------------

def test_unet_targets_follow_the_osediff_patterns(comps):
    targets = unet_lora_targets(comps.unet)
    everything = [name for names in targets.values() for name in names]
    assert "conv_in" in targets["default_encoder"] and "conv_out" in targets["default_decoder"]
    assert {"down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k",
            "down_blocks.0.attentions.0.proj_in", "down_blocks.0.downsamplers.0.conv",
            "down_blocks.2.resnets.0.conv_shortcut"} <= set(targets["default_encoder"])
    assert {"up_blocks.0.upsamplers.0.conv", "up_blocks.1.attentions.1.transformer_blocks.0.attn1.to_out.0",
            "up_blocks.3.resnets.1.conv2"} <= set(targets["default_decoder"])
    assert {"mid_block.attentions.0.transformer_blocks.0.attn1.to_q", "mid_block.resnets.0.conv1",
            "mid_block.attentions.0.transformer_blocks.0.ff.net.2",
            "mid_block.attentions.0.transformer_blocks.0.ff.net.0.proj"} <= set(targets["default_others"])
    assert all(name.startswith("mid_block.") for name in targets["default_others"])
    assert not any("time_emb" in n or "time_embedding" in n or "norm" in n for n in everything)
    assert len(everything) == len(set(everything))


def test_tiny_unet_target_counts_follow_from_its_architecture(comps):
    """layers_per_block 1, widths (32, 32, 64, 64), attention in down 0-2 and up 1-3; 12 Linears per transformer
    (proj_in/out, 2 x q/k/v/out, 2 ff). Encoder: conv_in + 4x2 resnet convs + 1 shortcut + 3x12 + 3 downsamplers;
    decoder: 8x2 resnet convs + 8 shortcuts (skip concatenation) + 6x12 + 3 upsamplers + conv_out; others: mid."""
    counts = {name: len(names) for name, names in unet_lora_targets(comps.unet).items()}
    assert counts == {"default_encoder": 1 + 8 + 1 + 36 + 3, "default_decoder": 16 + 8 + 72 + 3 + 1,
                      "default_others": 4 + 12}


def test_vae_targets_are_encoder_plus_quant_conv(comps):
    targets = vae_encoder_lora_targets(comps.vae)
    assert "quant_conv" in targets and "post_quant_conv" not in targets
    assert all(t.startswith("encoder.") for t in targets if t != "quant_conv")
    assert {"encoder.conv_in", "encoder.conv_out", "encoder.mid_block.attentions.0.to_q",
            "encoder.mid_block.attentions.0.to_out.0", "encoder.down_blocks.0.downsamplers.0.conv",
            "encoder.down_blocks.2.resnets.0.conv_shortcut"} <= set(targets)
    assert not any("norm" in t for t in targets)
    # conv_in, 4 x 2 resnet convs, 1 shortcut, 3 downsamplers, 2 x 2 mid convs, 4 attention Linears, conv_out, quant
    assert len(targets) == len(set(targets)) == 1 + 8 + 1 + 3 + 4 + 4 + 1 + 1


def test_full_size_sd21_target_counts_match_the_official_lists():
    """CHECKPOINTS.md §1: SD 2.1-base gives 94 encoder, 148 decoder and 16 others U-Net modules, 32 VAE modules."""
    root = CONFIG_DIR / "sd21-base"
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(json.loads((root / "unet/config.json").read_text()))
        vae = AutoencoderKL.from_config(json.loads((root / "vae/config.json").read_text()))
    counts = {name: len(targets) for name, targets in unet_lora_targets(unet).items()}
    assert counts == {"default_encoder": 94, "default_decoder": 148, "default_others": 16}
    assert len(vae_encoder_lora_targets(vae)) == len(set(vae_encoder_lora_targets(vae))) == 32


# ---- injection -------------------------------------------------------------------------------------------------

def test_injection_is_identity_and_keys_follow_the_official_grammar(comps):
    before = _unet_out(comps.unet)
    _inject_unet(comps.unet)
    assert torch.equal(_unet_out(comps.unet), before)
    keys = lora_state_dict(comps.unet)
    assert "conv_in.lora_A.default_encoder.weight" in keys
    assert "mid_block.resnets.0.conv1.lora_B.default_others.weight" in keys
    assert "up_blocks.1.attentions.0.proj_in.lora_A.default_decoder.weight" in keys
    assert not any("base_model" in k or k.startswith("unet.") for k in keys)
    # peft shapes: conv A (r, in, k, k), B (out, r, 1, 1); Linear A (r, in), B (out, r); gaussian A, zero B
    assert keys["conv_in.lora_A.default_encoder.weight"].shape == (4, 4, 3, 3)
    assert keys["conv_in.lora_B.default_encoder.weight"].shape == (32, 4, 1, 1)
    assert keys["mid_block.attentions.0.transformer_blocks.0.attn2.to_k.lora_A.default_others.weight"].shape == (4, 32)
    assert all(not v.any() for k, v in keys.items() if ".lora_B." in k)
    assert all(v.std() > 0 for k, v in keys.items() if ".lora_A." in k)


def test_lora_state_dict_selects_one_adapter_exactly(comps):
    targets = unet_lora_targets(comps.unet)
    _inject_unet(comps.unet)
    assert unet_lora_targets(comps.unet) == targets  # an injected model still reports its base modules
    for adapter, names in targets.items():
        keys = lora_state_dict(comps.unet, adapter)
        assert len(keys) == 2 * len(names)
        assert all(f".{adapter}.weight" in k for k in keys)
    assert lora_state_dict(comps.unet, "default") == {}


def test_vae_encoder_lora_is_identity_then_merges_exactly(comps):
    before = _vae_out(comps.vae)
    decoder = {k: v.clone() for k, v in comps.vae.decoder.state_dict().items()}
    # the official VAE lists repeat names (CHECKPOINTS.md §1): duplicates are harmless
    targets = vae_encoder_lora_targets(comps.vae)
    inject_lora(comps.vae, targets + targets[:5], rank=2, adapter_name="default_encoder")
    assert torch.equal(_vae_out(comps.vae), before)
    assert len(lora_state_dict(comps.vae)) == 2 * len(targets)
    load_lora_state_dict(comps.vae, _random_b(lora_state_dict(comps.vae)))
    unmerged = _vae_out(comps.vae)
    assert not torch.allclose(unmerged, before)
    merge_lora(comps.vae)
    torch.testing.assert_close(_vae_out(comps.vae), unmerged, atol=1e-5, rtol=1e-5)
    assert all(torch.equal(v, decoder[k]) for k, v in comps.vae.decoder.state_dict().items())


def test_every_adapter_is_active_and_merge_matches(comps):
    before = _unet_out(comps.unet)
    _inject_unet(comps.unet)
    state = _random_b(lora_state_dict(comps.unet))
    # only the encoder adapter's B is non-zero: the output must still change (it is active)
    encoder_only = {k: (v if "default_encoder" in k or ".lora_A." in k else torch.zeros_like(v))
                    for k, v in state.items()}
    load_lora_state_dict(comps.unet, encoder_only)
    assert not torch.allclose(_unet_out(comps.unet), before)
    load_lora_state_dict(comps.unet, state)
    unmerged = _unet_out(comps.unet)
    merge_lora(comps.unet)
    assert isinstance(comps.unet.conv_in, torch.nn.Conv2d) and not hasattr(comps.unet, "peft_config")
    assert not any(".lora_" in k or "base_layer" in k for k in comps.unet.state_dict())
    torch.testing.assert_close(_unet_out(comps.unet), unmerged, atol=1e-5, rtol=1e-5)


def test_merge_uses_scale_alpha_over_rank(comps):
    weight = comps.unet.conv_in.weight.detach().clone()
    inject_lora(comps.unet, ["conv_in"], rank=2, adapter_name="a")
    a, b = torch.randn(2, 4, 3, 3), torch.randn(32, 2, 1, 1)
    load_lora_state_dict(comps.unet, {"conv_in.lora_A.a.weight": a, "conv_in.lora_B.a.weight": b})
    merge_lora(comps.unet)
    delta = (b.flatten(1) @ a.flatten(1)).reshape(weight.shape) * (8 / 2)  # peft default alpha 8: W + (8/r) B A
    torch.testing.assert_close(comps.unet.conv_in.weight.detach(), weight + delta, atol=1e-5, rtol=1e-5)
    assert lora_scale(4) == 2.0 and lora_scale(16) == 0.5 and lora_scale(8, alpha=8) == 1.0


def test_linear_merge_with_explicit_alpha(comps):
    name = "mid_block.attentions.0.transformer_blocks.0.attn2.to_k"
    weight = comps.unet.get_submodule(name).weight.detach().clone()  # (64, 32): mid width 64, context 32
    inject_lora(comps.unet, [name], rank=4, alpha=4.0, adapter_name="hypir")  # HYPIR-style alpha = r: scale 1
    a, b = torch.randn(4, 32), torch.randn(64, 4)
    load_lora_state_dict(comps.unet, {f"{name}.lora_A.hypir.weight": a, f"{name}.lora_B.hypir.weight": b})
    merge_lora(comps.unet)
    torch.testing.assert_close(comps.unet.get_submodule(name).weight.detach(), weight + b @ a, atol=1e-5, rtol=1e-5)


# ---- refusals ----------------------------------------------------------------------------------------------------

def test_strict_loading_lists_missing_and_unexpected(comps):
    inject_lora(comps.unet, ["conv_in"], rank=2, adapter_name="a")
    with pytest.raises(ValueError, match=r"1 missing.*lora_B.*1 unexpected.*bogus"):
        load_lora_state_dict(comps.unet, {"conv_in.lora_A.a.weight": torch.zeros(2, 4, 3, 3), "bogus": torch.zeros(1)})


def test_strict_loading_checks_shapes(comps):
    inject_lora(comps.unet, ["conv_in"], rank=2, adapter_name="a")
    with pytest.raises(ValueError, match=r"wrong shape.*lora_A.a.weight: \(3, 4, 3, 3\), expected \(2, 4, 3, 3\)"):
        load_lora_state_dict(comps.unet, {"conv_in.lora_A.a.weight": torch.zeros(3, 4, 3, 3),
                                          "conv_in.lora_B.a.weight": torch.zeros(32, 2, 1, 1)})


def test_bad_arguments(comps):
    with pytest.raises(ValueError, match="rank"):
        inject_lora(comps.unet, ["conv_in"], rank=0, adapter_name="a")
    with pytest.raises(ValueError, match="alpha"):
        inject_lora(comps.unet, ["conv_in"], rank=4, alpha=0.0, adapter_name="a")
    with pytest.raises(ValueError, match="no target"):
        inject_lora(comps.unet, [], rank=4, adapter_name="a")
    with pytest.raises(ValueError, match=r"1 modules the model does not have.*down_blocks.9.conv"):
        inject_lora(comps.unet, ["conv_in", "down_blocks.9.conv"], rank=4, adapter_name="a")
    assert lora_state_dict(comps.unet) == {}  # nothing was injected by the refused calls

"""LoRA targets, injection, strict loading and merging (SPEC.md §0.5, CHECKPOINTS.md §1)."""

import pytest
import torch

from osd_core.lora import (inject_lora, load_lora_state_dict, lora_state_dict, merge_lora, unet_lora_targets,
                           vae_encoder_lora_targets)
from osd_core.tiny import tiny_components


@pytest.fixture()
def comps():
    return tiny_components(seed=0)


def _unet_out(unet):
    g = torch.Generator().manual_seed(0)
    z, c = torch.randn(1, 4, 16, 16, generator=g), torch.randn(1, 77, 32, generator=g)
    with torch.no_grad():
        return unet(z, torch.tensor([999.0]), encoder_hidden_states=c).sample


def test_unet_targets_follow_the_osediff_patterns(comps):
    targets = unet_lora_targets(comps.unet)
    everything = [name for names in targets.values() for name in names]
    assert "conv_in" in targets["default_encoder"] and "conv_out" in targets["default_decoder"]
    assert "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k" in targets["default_encoder"]
    assert "down_blocks.0.downsamplers.0.conv" in targets["default_encoder"]
    assert "up_blocks.0.upsamplers.0.conv" in targets["default_decoder"]
    assert all(name.startswith("mid_block.") for name in targets["default_others"]) and targets["default_others"]
    assert {"mid_block.attentions.0.transformer_blocks.0.ff.net.2",
            "mid_block.attentions.0.transformer_blocks.0.ff.net.0.proj"} <= set(targets["default_others"])
    assert not any("time_emb" in n or "time_embedding" in n or "norm" in n for n in everything)
    assert len(everything) == len(set(everything))


def test_vae_targets_are_encoder_plus_quant_conv(comps):
    targets = vae_encoder_lora_targets(comps.vae)
    assert "quant_conv" in targets and "post_quant_conv" not in targets
    assert all(t.startswith("encoder.") for t in targets if t != "quant_conv")
    assert "encoder.mid_block.attentions.0.to_q" in targets and "encoder.down_blocks.0.downsamplers.0.conv" in targets
    assert not any("norm" in t for t in targets)


def test_injection_is_identity_and_keys_follow_the_official_grammar(comps):
    before = _unet_out(comps.unet)
    for adapter, names in unet_lora_targets(comps.unet).items():
        inject_lora(comps.unet, names, rank=4, adapter_name=adapter)
    assert torch.equal(_unet_out(comps.unet), before)
    keys = lora_state_dict(comps.unet)
    assert "conv_in.lora_A.default_encoder.weight" in keys
    assert "mid_block.resnets.0.conv1.lora_B.default_others.weight" in keys
    assert keys["conv_in.lora_A.default_encoder.weight"].shape == (4, 4, 3, 3)
    assert keys["conv_in.lora_B.default_encoder.weight"].shape == (32, 4, 1, 1)


def test_every_adapter_is_active_and_merge_matches(comps):
    before = _unet_out(comps.unet)
    for adapter, names in unet_lora_targets(comps.unet).items():
        inject_lora(comps.unet, names, rank=4, adapter_name=adapter)
    g = torch.Generator().manual_seed(1)
    state = {k: torch.randn(v.shape, generator=g) * 0.05 if ".lora_B." in k else v
             for k, v in lora_state_dict(comps.unet).items()}
    # only the encoder adapter's B is non-zero: the output must still change (it is active)
    encoder_only = {k: (v if "default_encoder" in k or ".lora_A." in k else torch.zeros_like(v))
                    for k, v in state.items()}
    load_lora_state_dict(comps.unet, encoder_only)
    assert not torch.allclose(_unet_out(comps.unet), before)
    load_lora_state_dict(comps.unet, state)
    unmerged = _unet_out(comps.unet)
    merge_lora(comps.unet)
    assert isinstance(comps.unet.conv_in, torch.nn.Conv2d) and not hasattr(comps.unet, "peft_config")
    torch.testing.assert_close(_unet_out(comps.unet), unmerged, atol=1e-5, rtol=1e-5)


def test_merge_uses_scale_alpha_over_rank(comps):
    conv = comps.unet.conv_in
    weight = conv.weight.detach().clone()
    inject_lora(comps.unet, ["conv_in"], rank=2, adapter_name="a")
    a = torch.randn(2, 4, 3, 3)
    b = torch.randn(32, 2, 1, 1)
    load_lora_state_dict(comps.unet, {"conv_in.lora_A.a.weight": a, "conv_in.lora_B.a.weight": b})
    merge_lora(comps.unet)
    delta = (b.flatten(1) @ a.flatten(1)).reshape(weight.shape) * (8 / 2)  # peft default alpha 8
    torch.testing.assert_close(comps.unet.conv_in.weight.detach(), weight + delta, atol=1e-5, rtol=1e-5)


def test_strict_loading_lists_missing_and_unexpected(comps):
    inject_lora(comps.unet, ["conv_in"], rank=2, adapter_name="a")
    with pytest.raises(ValueError, match=r"1 missing.*lora_B.*1 unexpected.*bogus"):
        load_lora_state_dict(comps.unet, {"conv_in.lora_A.a.weight": torch.zeros(2, 4, 3, 3), "bogus": torch.zeros(1)})


def test_bad_rank_and_empty_targets(comps):
    with pytest.raises(ValueError, match="rank"):
        inject_lora(comps.unet, ["conv_in"], rank=0, adapter_name="a")
    with pytest.raises(ValueError, match="no target"):
        inject_lora(comps.unet, [], rank=4, adapter_name="a")


def test_full_size_sd21_target_counts_match_the_official_lists():
    """CHECKPOINTS.md §1: SD 2.1-base gives 94 encoder, 148 decoder and 16 others U-Net modules, 32 VAE modules."""
    import json

    from diffusers import AutoencoderKL, UNet2DConditionModel

    from osd_core.models import CONFIG_DIR

    root = CONFIG_DIR / "sd21-base"
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(json.loads((root / "unet/config.json").read_text()))
        vae = AutoencoderKL.from_config(json.loads((root / "vae/config.json").read_text()))
    counts = {name: len(targets) for name, targets in unet_lora_targets(unet).items()}
    assert counts == {"default_encoder": 94, "default_decoder": 148, "default_others": 16}
    assert len(vae_encoder_lora_targets(vae)) == len(set(vae_encoder_lora_targets(vae))) == 32

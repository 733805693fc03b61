"""VPIM, RCOD's visual prompt injection (SPEC.md §6.3): CLIP preprocessing, the Linear and token-width checks."""

from __future__ import annotations

import json

import pytest
import torch

from osd_core.vpim import (
    CLIP_MEAN,
    CLIP_STD,
    VPIM,
    VPIMConfig,
    encode_with_tower,
    preprocess,
    resize_for_clip,
    validate_tokens,
)


def test_preprocess_shape_and_mid_grey_normalisation():
    x = torch.zeros(2, 3, 37, 53)  # mid-grey in [-1, 1], odd non-square size
    pixels = preprocess(x, VPIMConfig())
    assert pixels.shape == (2, 3, 224, 224) and pixels.dtype == torch.float32
    for c in range(3):
        expected = (0.5 - CLIP_MEAN[c]) / CLIP_STD[c]
        assert torch.allclose(pixels[:, c], torch.full((2, 224, 224), expected), atol=1e-5)


def test_preprocess_black_white_and_clamp():
    x = torch.cat([-torch.ones(1, 3, 64, 64), torch.ones(1, 3, 64, 64)])
    x01 = resize_for_clip(x, VPIMConfig())
    assert torch.allclose(x01[0], torch.zeros(3, 224, 224), atol=1e-6)
    assert torch.allclose(x01[1], torch.ones(3, 224, 224), atol=1e-6)
    # a hard edge overshoots under bicubic; the clamp keeps the result displayable
    edge = torch.ones(1, 3, 16, 16)
    edge[..., :8] = -1.0
    edge01 = resize_for_clip(edge, VPIMConfig())
    assert edge01.min().item() == 0.0 and edge01.max().item() == 1.0


def test_preprocess_antialiases_downscale():
    # A 1-px checkerboard downscaled 7x averages to grey with antialiasing; plain bicubic samples single pixels
    # (the output centres fall on input pixel centres) and returns pure black/white.
    board = (torch.arange(392)[:, None] + torch.arange(392)[None, :]) % 2 * 2.0 - 1.0  # (392, 392) in {-1, 1}
    x01 = resize_for_clip(board.expand(1, 3, 392, 392).clone(), VPIMConfig(image_size=56))
    assert x01.shape == (1, 3, 56, 56)
    assert torch.allclose(x01[..., 4:-4, 4:-4], torch.full_like(x01[..., 4:-4, 4:-4], 0.5), atol=0.02)


def test_preprocess_rejects_non_rgb():
    with pytest.raises(ValueError, match="x_lq"):
        preprocess(torch.zeros(1, 4, 32, 32), VPIMConfig())


def test_default_parameter_count():
    assert sum(p.numel() for p in VPIM(VPIMConfig()).parameters()) == 1024 * 1024 + 1024


def test_init_statistics():
    vpim = VPIM(VPIMConfig())
    vpim.initialize_weights(torch.Generator().manual_seed(0))
    w = vpim.proj.weight
    assert torch.equal(vpim.proj.bias, torch.zeros(1024))
    # 1M draws of N(0, 0.02): the sample mean and std are tight
    assert abs(w.mean().item()) < 1e-4
    assert w.std().item() == pytest.approx(0.02, rel=0.01)


def test_seeded_init_is_deterministic():
    a, b, c = (VPIM(VPIMConfig(vision_dim=8, cond_dim=4)) for _ in range(3))
    a.initialize_weights(torch.Generator().manual_seed(3))
    b.initialize_weights(torch.Generator().manual_seed(3))
    c.initialize_weights(torch.Generator().manual_seed(4))
    assert torch.equal(a.proj.weight, b.proj.weight) and not torch.equal(a.proj.weight, c.proj.weight)


def test_forward_shape_and_linear():
    vpim = VPIM(VPIMConfig(vision_dim=16, cond_dim=8))
    tokens = torch.randn(2, 257, 16, generator=torch.Generator().manual_seed(0))
    c_y = vpim(tokens)
    assert c_y.shape == (2, 257, 8)
    assert torch.allclose(c_y, tokens @ vpim.proj.weight.T + vpim.proj.bias, atol=1e-6)


def test_width_mismatch_error_names_towers():
    with pytest.raises(ValueError, match=r"gives 1280-wide tokens but this bundle's VPIM expects 1024 \(ViT-L/14\)"):
        VPIM(VPIMConfig())(torch.zeros(1, 257, 1280))
    with pytest.raises(ValueError, match="last_hidden_state"):
        validate_tokens(torch.zeros(1, 1024), VPIMConfig())


def test_config_round_trip_and_unknown_key():
    config = VPIMConfig(vision_dim=1280, cond_dim=1024, image_size=336, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    assert VPIMConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    with pytest.raises(ValueError, match="init_sdt"):
        VPIMConfig.from_dict({"init_sdt": 0.02})


@pytest.mark.parametrize(
    "kwargs", [{"vision_dim": 0}, {"image_size": 2.5}, {"mean": (0.5, 0.5)}, {"std": (0.5, 0.0, 0.5)},
               {"init_std": 0.0}]
)
def test_config_validation(kwargs):
    with pytest.raises(ValueError):
        VPIMConfig(**kwargs)


def _tiny_tower(hidden: int = 32):
    from transformers import CLIPVisionConfig, CLIPVisionModel

    config = CLIPVisionConfig(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                              num_attention_heads=4, image_size=224, patch_size=32)
    with torch.random.fork_rng(devices=[]):  # transformers initialises from the global RNG; keep it untouched
        torch.manual_seed(0)
        return CLIPVisionModel(config).eval()


def test_encode_with_tower_tiny_clip():
    tower = _tiny_tower()
    config = VPIMConfig(vision_dim=32, cond_dim=16)
    x = torch.rand(2, 3, 40, 60, generator=torch.Generator().manual_seed(0)) * 2 - 1
    tokens = encode_with_tower(tower, x, config)
    assert tokens.shape == (2, 1 + (224 // 32) ** 2, 32)  # CLS + 7x7 patches
    expected = tower(pixel_values=preprocess(x, config)).last_hidden_state
    assert torch.allclose(tokens, expected, atol=1e-6)
    assert VPIM(config)(tokens).shape == (2, 50, 16)


def test_encode_with_tower_width_mismatch():
    with pytest.raises(ValueError, match="32-wide tokens but this bundle's VPIM expects 1024"):
        encode_with_tower(_tiny_tower(), torch.zeros(1, 3, 32, 32), VPIMConfig())

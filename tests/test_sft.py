"""CODSR LQFM (SPEC.md §4.2): layer shapes, zero-init identity, λ_t golden values and the per-tile conv_in hook."""

from __future__ import annotations

import pytest
import torch

from osd_core.schedule import NoiseSchedule
from osd_core.sft import LQFM, LQFMConfig, conv_in_hook, lambda_t, modulate
from osd_core.tiling import TileWindow

SMALL = LQFMConfig(hidden=16, out_channels=8)


def _randomised(config: LQFMConfig = SMALL, seed: int = 0) -> LQFM:
    """An LQFM whose zero-initialised last convs are given random weights, so γ and β are not zero."""
    lqfm = LQFM(config)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in lqfm.parameters():
            param.copy_(torch.randn(param.shape, generator=gen) * 0.1)
    return lqfm


def test_parameter_count_at_the_default_config():
    # Per branch: Conv3x3(192 -> 320) = 192*320*9 + 320 = 553,280 and Conv3x3(320 -> 320) = 320*320*9 + 320
    # = 921,920, so 1,475,200; two branches (scale, shift) = 2,950,400 (SPEC: "about 2.95M").
    lqfm = LQFM(LQFMConfig())
    assert sum(p.numel() for p in lqfm.parameters()) == 2_950_400


def test_state_dict_keys_are_the_released_sft_names():
    keys = set(LQFM(SMALL).state_dict())
    expected = {f"SFT_{b}_conv{i}.{p}" for b in ("scale", "shift") for i in (0, 1) for p in ("weight", "bias")}
    assert keys == expected


def test_lambda_t_golden_values():
    lam = lambda_t(torch.tensor([100.0, 999.0, 1.0]), NoiseSchedule())
    torch.testing.assert_close(lam, torch.tensor([2.9076, 0.0684, 24.205]), atol=1e-3, rtol=0)


def test_fresh_lqfm_is_the_identity():
    lqfm = LQFM(SMALL)
    x = torch.rand(2, 3, 16, 24) * 2 - 1
    gamma, beta = lqfm(x)
    assert gamma.shape == beta.shape == (2, 8, 2, 3)
    assert torch.equal(gamma, torch.zeros_like(gamma)) and torch.equal(beta, torch.zeros_like(beta))
    f = torch.randn(2, 8, 2, 3)
    assert torch.equal(modulate(f, gamma, beta, torch.tensor([2.9, 0.07])), f)
    assert torch.count_nonzero(lqfm.SFT_scale_conv0.weight) > 0 and torch.count_nonzero(lqfm.SFT_shift_conv0.bias) > 0


def test_first_convs_follow_the_conv2d_default_bound_and_the_generator():
    lqfm = LQFM(LQFMConfig())
    bound = 1 / (192 * 9) ** 0.5
    weight = lqfm.SFT_scale_conv0.weight
    assert weight.abs().max() <= bound and weight.abs().max() > 0.9 * bound
    a, b = LQFM(SMALL), LQFM(SMALL)
    a.initialize_weights(torch.Generator().manual_seed(4))
    b.initialize_weights(torch.Generator().manual_seed(4))
    assert torch.equal(a.SFT_shift_conv0.weight, b.SFT_shift_conv0.weight)
    assert not torch.equal(a.SFT_shift_conv0.weight, a.SFT_scale_conv0.weight)


def test_modulate_formula_by_hand():
    f = torch.tensor([2.0, 2.0]).view(2, 1, 1, 1)
    gamma = torch.tensor([0.5, 0.5]).view(2, 1, 1, 1)
    beta = torch.tensor([0.25, 0.25]).view(2, 1, 1, 1)
    lam = torch.tensor([2.0, 0.0])
    # item 0: 2 * (1 + 2 * 0.5) + 2 * 0.25 = 4.5; item 1: λ = 0 leaves f unchanged.
    out = modulate(f, gamma, beta, lam)
    torch.testing.assert_close(out.flatten(), torch.tensor([4.5, 2.0]))


def test_modulate_follows_the_features_dtype():
    f = torch.ones(1, 2, 2, 2, dtype=torch.float64)
    out = modulate(f, torch.ones(1, 2, 2, 2), torch.ones(1, 2, 2, 2), torch.tensor([1.0]))
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, torch.full_like(f, 3.0))


def test_modulate_refuses_mismatched_maps():
    with pytest.raises(ValueError, match="out_channels"):
        modulate(torch.zeros(1, 320, 4, 4), torch.zeros(1, 32, 4, 4), torch.zeros(1, 32, 4, 4), torch.ones(1))


def test_hook_slices_the_window():
    h, w = 6, 9
    pos = torch.arange(h * w, dtype=torch.float32).view(1, 1, h, w)
    gamma = pos.expand(1, 2, h, w)
    beta = -pos.expand(1, 2, h, w) * 10
    lam = torch.tensor([3.0])
    window = TileWindow(1, 4, 2, 7)
    f = torch.ones(1, 2, 3, 5)
    out = conv_in_hook(gamma, beta, lam)(window)(f)
    tile = pos[..., 1:4, 2:7]
    # f = 1: f' = 1 + 3 γ + 3 β = 1 + 3 pos - 30 pos
    torch.testing.assert_close(out, (1 - 27 * tile).expand(1, 2, 3, 5))
    with pytest.raises(ValueError, match="conv_in features"):
        conv_in_hook(gamma, beta, lam)(TileWindow(0, 4, 0, 4))(f)


def test_pixel_unshuffle_channel_order():
    # Each pixel encodes (channel, row, column); unshuffled channel c = ch*64 + dy*8 + dx at latent (i, j) must
    # hold input pixel (ch, 8i + dy, 8j + dx).
    h, w = 16, 24
    ch = torch.arange(3).view(3, 1, 1)
    ys = torch.arange(h).view(1, h, 1)
    xs = torch.arange(w).view(1, 1, w)
    x = (ch * 10_000 + ys * 100 + xs).float().unsqueeze(0)  # (1, 3, 16, 24)
    u = LQFM(SMALL).unshuffle(x)
    assert u.shape == (1, 192, 2, 3)
    for c, dy, dx, i, j in [(0, 0, 0, 0, 0), (1, 3, 5, 1, 2), (2, 7, 7, 1, 1), (0, 7, 0, 0, 2), (2, 0, 6, 1, 0)]:
        assert u[0, c * 64 + dy * 8 + dx, i, j] == c * 10_000 + (8 * i + dy) * 100 + (8 * j + dx)


def test_config_round_trip_and_validation():
    config = LQFMConfig(in_channels=3, downscale=8, hidden=64, out_channels=32, kernel=5)
    assert LQFMConfig.from_dict(config.to_dict()) == config
    assert LQFM(config).SFT_scale_conv0.weight.shape == (64, 192, 5, 5)
    with pytest.raises(ValueError, match="unknown keys.*'hiden'"):
        LQFMConfig.from_dict({"hiden": 64})
    with pytest.raises(ValueError, match="kernel"):
        LQFMConfig(kernel=4)
    with pytest.raises(ValueError, match="hidden"):
        LQFMConfig(hidden=0)


def test_batch_item_equals_single_run():
    lqfm = _randomised()
    x = torch.rand(3, 3, 16, 16, generator=torch.Generator().manual_seed(1)) * 2 - 1
    gamma, beta = lqfm(x)
    assert gamma.abs().max() > 0 and not torch.allclose(gamma, beta)
    for i in range(3):
        g1, b1 = lqfm(x[i:i + 1])
        torch.testing.assert_close(gamma[i:i + 1], g1)
        torch.testing.assert_close(beta[i:i + 1], b1)


def test_sizes_not_multiple_of_8_are_refused():
    with pytest.raises(ValueError, match="multiples of 8.*24x16"):
        LQFM(SMALL)(torch.zeros(1, 3, 20, 16))
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        LQFM(SMALL)(torch.zeros(1, 4, 16, 16))


def test_hook_in_the_one_step_denoise_of_a_tiny_unet():
    from osd_core.onestep import one_step_denoise
    from osd_core.parameterisation import Parameterisation
    from osd_core.tiny import tiny_components

    comps = tiny_components(seed=0)
    gen = torch.Generator().manual_seed(3)
    x_lq = torch.rand(1, 3, 64, 128, generator=gen) * 2 - 1
    z = torch.randn(1, 4, 8, 16, generator=gen)  # three overlapping 8x8 tiles
    cond = torch.randn(1, 77, 32, generator=gen)
    t = torch.full((1,), 100.0)
    lam = lambda_t(t, comps.schedule)
    config = LQFMConfig(hidden=16, out_channels=comps.unet.conv_in.out_channels)

    def run(lqfm: LQFM | None) -> torch.Tensor:
        hook = conv_in_hook(*lqfm(x_lq), lam) if lqfm is not None else None
        return one_step_denoise(comps.unet, comps.schedule, Parameterisation.NOISE_RESIDUAL, z, cond, t,
                                noise=torch.zeros_like(z), tile_latent=8, overlap_latent=4, conv_in_hook=hook)

    plain = run(None)
    assert torch.equal(run(LQFM(config)), plain)
    assert not torch.allclose(run(_randomised(config)), plain, atol=1e-4)

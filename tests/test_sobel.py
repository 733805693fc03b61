"""CODSR RGPA (SPEC.md §4.1): golden Sobel values and weight maps computed by hand from the spec."""

from __future__ import annotations

import pytest
import torch

from osd_core.noise import gaussian_noise
from osd_core.sobel import (
    RGPAConfig,
    gradient_magnitude,
    grayscale,
    region_adaptive_noise,
    region_weights,
    weight_map,
)


def _from01(g: torch.Tensor) -> torch.Tensor:
    """A grey (H, W) image in [0, 1] -> (1, 3, H, W) RGB in [-1, 1] (equal channels, so grey == g)."""
    return (g * 2.0 - 1.0).expand(1, 3, *g.shape).clone()


def _step(h: int, w: int, edge_col: int) -> torch.Tensor:
    """Black left of ``edge_col``, white from it on."""
    g = torch.zeros(h, w, dtype=torch.float64)
    g[:, edge_col:] = 1.0
    return _from01(g)


def test_map_golden_values():
    p = torch.tensor([0.0, 0.15, 0.2, 0.25, 0.3, 4.0], dtype=torch.float64)
    expected = torch.tensor([0.3, 0.3, 0.65, 1.0, 1.0, 1.0], dtype=torch.float64)
    torch.testing.assert_close(weight_map(p), expected, atol=1e-9, rtol=0)


def test_map_follows_a_custom_config():
    config = RGPAConfig(floor=0.5, ceiling=1.0, low=0.1, high=0.2, slope=5.0)
    p = torch.tensor([0.05, 0.15, 0.3])
    torch.testing.assert_close(weight_map(p, config), torch.tensor([0.5, 0.75, 1.0]))


def test_discontinuous_map_is_refused():
    with pytest.raises(ValueError, match="continuous.*slope = 7"):
        RGPAConfig(slope=6.0)
    with pytest.raises(ValueError, match="low"):
        RGPAConfig(low=0.3, high=0.2)
    with pytest.raises(ValueError, match="patch"):
        RGPAConfig(patch=12)


def test_config_round_trip_and_unknown_key():
    config = RGPAConfig(floor=0.2, ceiling=0.9, low=0.1, high=0.2, slope=7.0, patch=32)
    assert RGPAConfig.from_dict(config.to_dict()) == config
    with pytest.raises(ValueError, match="unknown keys.*'slop'"):
        RGPAConfig.from_dict({"slop": 7.0})


def test_grayscale_coefficients():
    x = -torch.ones(3, 3, 2, 2)
    for i in range(3):
        x[i, i] = 1.0  # pure red, green, blue of value 1
    gray = grayscale(x)[:, 0, 0, 0]
    torch.testing.assert_close(gray, torch.tensor([0.299, 0.587, 0.114]))


def test_constant_image_gives_floor_everywhere():
    for value in (-1.0, 0.2, 1.0):
        x = torch.full((2, 3, 32, 48), value)
        assert torch.equal(gradient_magnitude(x), torch.zeros(2, 1, 32, 48))
        assert torch.equal(region_weights(x), torch.full((2, 1, 4, 6), 0.3))
    coloured = torch.tensor([0.5, -0.3, 0.9]).view(1, 3, 1, 1).expand(1, 3, 24, 40)
    assert torch.equal(region_weights(coloured), torch.full((1, 1, 3, 5), 0.3))


def test_vertical_step_edge_gives_magnitude_four():
    # Black | white between columns 19 and 20: |G_x| sums the column coefficients 1 + 2 + 1 = 4 at both columns
    # next to the edge; G_y is zero everywhere (rows are identical, replicate padding).
    mag = gradient_magnitude(_step(32, 48, 20))[0, 0]
    expected = torch.zeros(32, 48, dtype=torch.float64)
    expected[:, 19:21] = 4.0
    torch.testing.assert_close(mag, expected, atol=1e-12, rtol=0)


def test_horizontal_step_edge_uses_the_transposed_kernel():
    mag = gradient_magnitude(_step(48, 32, 20).transpose(-1, -2))[0, 0]
    expected = torch.zeros(32, 48, dtype=torch.float64)
    expected[19:21, :] = 4.0
    torch.testing.assert_close(mag, expected, atol=1e-12, rtol=0)


def test_red_edge_is_weighted_by_its_luma():
    x = -torch.ones(1, 3, 8, 16)
    x[:, 0, :, 8:] = 1.0  # black | pure red
    mag = gradient_magnitude(x)[0, 0]
    torch.testing.assert_close(mag[:, 7:9], torch.full((8, 2), 4 * 0.299))
    torch.testing.assert_close(mag[:, :7], torch.zeros(8, 7), atol=1e-6, rtol=0)
    torch.testing.assert_close(mag[:, 9:], torch.zeros(8, 7), atol=1e-6, rtol=0)


def test_patches_containing_the_edge_hit_the_ceiling():
    # Edge inside patch column 1 (image columns 16..31): mean 2 * 4 / 16 = 0.5 > 0.25 -> 1.0, elsewhere 0 -> 0.3.
    weights = region_weights(_step(32, 64, 20))[0, 0]  # (4, 8) latent, 2 latent px per patch
    expected = torch.full((4, 8), 0.3, dtype=torch.float64)
    expected[:, 2:4] = 1.0
    torch.testing.assert_close(weights, expected, atol=1e-9, rtol=0)


def test_edge_on_a_patch_border_reaches_the_ceiling_from_both_sides():
    # Edge between columns 15 and 16: each neighbouring patch holds one column of 4 -> p = 4/16 = 0.25 -> W = 1.0.
    weights = region_weights(_step(16, 48, 16))[0, 0]  # (2, 6)
    expected = torch.tensor([1.0, 1.0, 1.0, 1.0, 0.3, 0.3], dtype=torch.float64).expand(2, 6)
    torch.testing.assert_close(weights, expected, atol=1e-9, rtol=0)


def test_ramp_pads_by_replication_at_the_border_and_before_pooling():
    # g = 0.2 + c x along x with c = 0.025, 40x24 px (not multiples of 16). Sobel with replicate padding gives
    # 4 (g[x+1] - g[x-1]) = 8c inside and 4c at the two border columns (x = 0, 23), no G_y at the top/bottom rows.
    c = 0.025
    g = (0.2 + c * torch.arange(24, dtype=torch.float64)).expand(40, 24)
    x = _from01(g)
    expected_mag = torch.full((40, 24), 8 * c, dtype=torch.float64)
    expected_mag[:, [0, 23]] = 4 * c
    torch.testing.assert_close(gradient_magnitude(x)[0, 0], expected_mag, atol=1e-12, rtol=0)
    # Pooling (padded to 48x32 by replicating the last row/column):
    #   patch column 0 (x 0..15):  (4c + 15 * 8c) / 16 = 7.75c = 0.19375 -> 0.3 + 7 * 0.04375 = 0.60625
    #   patch column 1 (x 16..31): (7 * 8c + 9 * 4c) / 16 = 5.75c = 0.14375 -> 0.3 (at or below 0.15)
    # Every patch row is the same: the replicated rows 40..47 carry the same gradient (zero padding would halve it).
    weights = region_weights(x)
    assert weights.shape == (1, 1, 5, 3)
    expected = torch.tensor([0.60625, 0.60625, 0.3], dtype=torch.float64).expand(5, 3)
    torch.testing.assert_close(weights[0, 0], expected, atol=1e-9, rtol=0)


def test_output_shapes_for_sizes_not_multiple_of_16():
    x = torch.rand(2, 3, 40, 56) * 2 - 1
    weights = region_weights(x)
    assert weights.shape == (2, 1, 5, 7)
    eps_a, w = region_adaptive_noise(x, 3, latent_shape=(2, 4, 5, 7))
    assert eps_a.shape == (2, 4, 5, 7) and torch.equal(w, weights)


def test_weights_of_random_images_stay_in_range_and_patches_repeat_2x2():
    x = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(0)) * 2 - 1
    weights = region_weights(x)[0, 0]
    assert weights.min() >= 0.3 and weights.max() <= 1.0
    blocks = weights.reshape(4, 2, 4, 2)
    assert torch.equal(blocks, blocks[:, :1, :, :1].expand_as(blocks))


def test_noise_is_weighted_gaussian_and_deterministic():
    x = torch.rand(1, 3, 48, 32, generator=torch.Generator().manual_seed(1)) * 2 - 1
    eps_a, w = region_adaptive_noise(x, 7, latent_shape=(1, 4, 6, 4))
    eps = gaussian_noise((4, 6, 4), 7, batch=1, device="cpu", dtype=torch.float32)
    torch.testing.assert_close(eps_a / w, eps)
    again, _ = region_adaptive_noise(x, 7, latent_shape=(1, 4, 6, 4))
    assert torch.equal(eps_a, again)
    other, _ = region_adaptive_noise(x, 8, latent_shape=(1, 4, 6, 4))
    assert not torch.allclose(eps_a, other)


def test_batch_items_equal_their_single_runs():
    gen = torch.Generator().manual_seed(2)
    x = torch.rand(3, 3, 32, 48, generator=gen) * 2 - 1
    x[1] = 0.0  # a flat item among textured ones
    eps_a, w = region_adaptive_noise(x, 11, latent_shape=(3, 4, 4, 6))
    for i in range(3):
        single_eps, single_w = region_adaptive_noise(x[i:i + 1], 11, latent_shape=(1, 4, 4, 6))
        assert torch.equal(eps_a[i:i + 1], single_eps) and torch.equal(w[i:i + 1], single_w)
    assert torch.equal(w[1], torch.full((1, 4, 6), 0.3))
    assert not torch.equal(w[0], w[1])


def test_dtype_follows_input():
    x = torch.zeros(1, 3, 16, 16, dtype=torch.float64)
    eps_a, w = region_adaptive_noise(x, 0, latent_shape=(1, 4, 2, 2))
    assert eps_a.dtype == w.dtype == torch.float64


def test_bad_inputs_are_refused():
    with pytest.raises(ValueError, match="multiples of 8.*48x56"):
        region_weights(torch.zeros(1, 3, 42, 56))
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        region_weights(torch.zeros(1, 4, 16, 16))
    with pytest.raises(ValueError, match="latent_shape"):
        region_adaptive_noise(torch.zeros(1, 3, 16, 16), 0, latent_shape=(1, 4, 4, 4))
    with pytest.raises(ValueError, match="latent_shape"):
        region_adaptive_noise(torch.zeros(2, 3, 16, 16), 0, latent_shape=(1, 4, 2, 2))

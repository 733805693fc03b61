"""MINE (SPEC.md §5.2, §5.7): zero-init start, any latent size, position table, bounds, batching, config, counts."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from osd_core.mine import MINE, MINEConfig, MINEOutput, global_grid_size, sincos_2d

SMALL = dict(hidden_size=32, depth=2, num_heads=4, cond_dim=16)


def small(**overrides) -> MINE:
    return MINE(MINEConfig(**{**SMALL, **overrides}))


def randomize(model: MINE, seed: int = 0, scale: float = 0.3) -> MINE:
    """Every parameter N(0, scale²), so the zero-initialised heads produce non-trivial outputs."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            param.copy_(torch.randn(param.shape, generator=generator) * scale)
    return model


def latent(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def grid_seen(model: MINE, run) -> tuple[int, ...]:
    """The (h, w) of the latent that reached the patch embedding during ``run()``."""
    seen = []
    handle = model.patch_embed.register_forward_hook(lambda mod, args, out: seen.append(tuple(args[0].shape[-2:])))
    try:
        run()
    finally:
        handle.remove()
    assert len(seen) == 1
    return seen[0]


@pytest.mark.parametrize("style", ["plain", "adaln"])
def test_fresh_model_is_identity_start(style):
    model = small(block_style=style)
    out = model(latent(3, 4, 9, 12))
    assert isinstance(out, MINEOutput)
    assert torch.equal(out.eps_inv, torch.zeros(3, 4, 9, 12))
    assert torch.equal(out.d, torch.zeros(3, 16))
    torch.testing.assert_close(out.tau, torch.full((3,), 120.0), rtol=0, atol=1e-4)
    assert out.tau.dtype == torch.float32 and out.g.shape == (3, 32)


def test_fresh_tau_follows_tau_init():
    model = small(tau_min=40.0, tau_max=200.0, tau_init=77.0)
    torch.testing.assert_close(model(latent(1, 4, 8, 8)).tau, torch.tensor([77.0]), rtol=0, atol=1e-4)


@pytest.mark.parametrize("style", ["plain", "adaln"])
@pytest.mark.parametrize("hw", [(8, 8), (9, 13), (16, 10)])
def test_any_latent_size_keeps_shape(style, hw):
    model = randomize(small(block_style=style))
    z = latent(2, 4, *hw)
    out = model(z)
    assert out.eps_inv.shape == z.shape
    assert out.tau.shape == (2,) and out.d.shape == (2, 16)
    assert out.eps_inv.abs().sum() > 0 and out.d.abs().sum() > 0
    expected_grid = (hw[0] + hw[0] % 2, hw[1] + hw[1] % 2)
    assert grid_seen(model, lambda: model(z)) == expected_grid


def test_odd_size_is_replicate_padded_then_cropped():
    model = randomize(small())
    z = latent(1, 4, 9, 13)
    padded = torch.cat([z, z[..., -1:, :]], dim=-2)  # replicate the last row -> (1, 4, 10, 13)
    padded = torch.cat([padded, padded[..., -1:]], dim=-1)  # replicate the last column -> (1, 4, 10, 14)
    full = model(padded)
    out = model(z)
    torch.testing.assert_close(out.eps_inv, full.eps_inv[..., :9, :13])
    torch.testing.assert_close(out.tau, full.tau)


def test_unpatchify_layout_golden():
    """Each token's 16 outputs fill its 2×2 patch in (row, column, channel) order: value (2i + j)·4 + c."""
    model = small()
    with torch.no_grad():
        model.spatial_head.bias.copy_(torch.arange(16.0))
    eps_inv = model(latent(1, 4, 5, 6)).eps_inv  # (1, 4, 5, 6), padded to 6×6 then cropped
    i = (torch.arange(5) % 2).view(1, 5, 1)
    j = (torch.arange(6) % 2).view(1, 1, 6)
    c = torch.arange(4).view(4, 1, 1)
    expected = ((2 * i + j) * 4 + c).float()  # (4, 5, 6)
    assert torch.equal(eps_inv[0], expected)


def test_grid_size_changes_the_output():
    model = randomize(small())
    z = latent(1, 4, 16, 16)
    assert not torch.allclose(model(z).tau, model(z[..., :8, :12]).tau)


def test_position_table_golden():
    table = sincos_2d(8, 2, 3)  # 2 rows × 3 columns, dim 8: ω = (1, 10000^(−1/2) = 0.01) per axis
    assert table.shape == (6, 8)
    torch.testing.assert_close(table[0], torch.tensor([0.0, 0, 1, 1, 0, 0, 1, 1], dtype=torch.float64))
    col1 = [math.sin(1), math.sin(0.01), math.cos(1), math.cos(0.01), 0, 0, 1, 1]  # row 0, column 1
    torch.testing.assert_close(table[1], torch.tensor(col1, dtype=torch.float64))
    row1 = [0, 0, 1, 1, math.sin(1), math.sin(0.01), math.cos(1), math.cos(0.01)]  # row 1, column 0
    torch.testing.assert_close(table[3], torch.tensor(row1, dtype=torch.float64))
    col2 = [math.sin(2), math.sin(0.02), math.cos(2), math.cos(0.02)]  # row 1, column 2 (last token)
    torch.testing.assert_close(table[5], torch.tensor(col2 + row1[4:], dtype=torch.float64))


def test_patches_carry_their_position():
    """Without a position table MINE would be blind to where a patch sits: rolling by whole patches would not move τ."""
    model = randomize(small(), seed=10)
    z = latent(1, 4, 8, 8, seed=11)
    rolled = torch.roll(z, shifts=2, dims=-1)  # one patch to the right, wrapped
    assert not torch.allclose(model(z).tau, model(rolled).tau, rtol=0, atol=1e-3)


def test_g_is_the_mean_of_the_query_tokens():
    model = randomize(small(), seed=12)
    captured = []
    handle = model.final_norm.register_forward_hook(lambda mod, args, out: captured.append(out))
    out = model(latent(2, 4, 6, 6))
    handle.remove()
    torch.testing.assert_close(out.g, captured[0][:, :8].mean(dim=1))
    torch.testing.assert_close(out.d, model.d_head(out.g))


def test_tau_stays_in_bounds():
    model = randomize(small(), scale=0.5)
    tau = model(latent(4, 4, 8, 8)).tau
    assert ((tau > 20.0) & (tau < 250.0)).all()
    assert tau.std() > 0
    with torch.no_grad():
        model.tau_head[-1].bias.fill_(1e4)
    assert (model(latent(2, 4, 8, 8)).tau == 250.0).all()
    with torch.no_grad():
        model.tau_head[-1].bias.fill_(-1e4)
    assert (model(latent(2, 4, 8, 8)).tau == 20.0).all()


@pytest.mark.parametrize("style", ["plain", "adaln"])
def test_batch_item_equals_single_run(style):
    model = randomize(small(block_style=style), seed=1)
    z = latent(3, 4, 9, 10, seed=2)
    batch = model(z)
    for i in range(3):
        single = model(z[i : i + 1])
        torch.testing.assert_close(batch.eps_inv[i : i + 1], single.eps_inv, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(batch.tau[i : i + 1], single.tau, rtol=1e-5, atol=1e-4)
        torch.testing.assert_close(batch.d[i : i + 1], single.d, rtol=1e-5, atol=1e-5)


def test_gradients_reach_the_zero_initialised_heads():
    model = small()
    out = model(latent(2, 4, 8, 8))
    (out.eps_inv.square().sum() + out.tau.sum() + out.d.sum() + (out.eps_inv * latent(2, 4, 8, 8, seed=3)).sum()
     ).backward()
    assert model.spatial_head.weight.grad.abs().sum() > 0
    assert model.tau_head[-1].weight.grad.abs().sum() > 0
    assert model.d_head[-1].weight.grad.abs().sum() > 0


def test_config_round_trip_and_unknown_key():
    config = MINEConfig(**SMALL, block_style="adaln", tau_min=40.0, tau_max=200.0)
    restored = MINEConfig.from_dict(json.loads(json.dumps(config.to_dict())))
    assert restored == config
    assert small().config == MINEConfig(**SMALL)
    with pytest.raises(ValueError, match="num_querys"):
        MINEConfig.from_dict({**config.to_dict(), "num_querys": 4})


@pytest.mark.parametrize(
    ("field", "value"),
    [("block_style", "cross"), ("hidden_size", 30), ("num_heads", 5), ("tau_init", 260.0), ("depth", 0)],
)
def test_config_validation(field, value):
    with pytest.raises(ValueError, match=field):
        MINEConfig(**{**SMALL, field: value})


def test_wrong_channels_refused():
    with pytest.raises(ValueError, match="`latent`"):
        small()(latent(1, 3, 8, 8))


def test_estimate_global_uses_a_bounded_grid():
    model = randomize(small(), seed=4)
    z = latent(2, 4, 100, 80, seed=5)
    assert global_grid_size(100, 80, 64) == (64, 51)
    grid = grid_seen(model, lambda: model.estimate_global(z))
    assert max(grid) <= 64 and grid == (64, 52)  # 51 is padded to the patch
    tau, d = model.estimate_global(z)
    reference = model(F.interpolate(z, size=(64, 51), mode="area"))
    torch.testing.assert_close(tau, reference.tau)
    torch.testing.assert_close(d, reference.d)
    assert grid_seen(model, lambda: model.estimate_global(z, max_latent=32)) == (32, 26)


def test_estimate_global_leaves_small_latents_alone():
    model = randomize(small(), seed=6)
    z = latent(1, 4, 16, 10)
    tau, d = model.estimate_global(z)
    out = model(z)
    torch.testing.assert_close(tau, out.tau)
    torch.testing.assert_close(d, out.d)


def test_inversion_noise_on_a_tile():
    model = randomize(small(), seed=7)
    z = latent(1, 4, 20, 24, seed=8)
    torch.testing.assert_close(model.inversion_noise(z), model(z).eps_inv)
    tile = model.inversion_noise(z, window=(3, 14, 5, 24))
    assert tile.shape == (1, 4, 11, 19)
    torch.testing.assert_close(tile, model(z[..., 3:14, 5:24]).eps_inv)
    with pytest.raises(ValueError, match="`window`"):
        model.inversion_noise(z, window=(0, 30, 0, 8))


def test_low_precision_weights_keep_the_latent_dtype():
    model = randomize(small(), seed=9).to(torch.bfloat16)
    out = model(latent(1, 4, 8, 8))
    assert out.eps_inv.dtype == torch.float32 and out.d.dtype == torch.float32 and out.tau.dtype == torch.float32
    assert torch.isfinite(out.eps_inv).all()


def test_default_parameter_count():
    """Hand count from the layer shapes of DiT-S/2 (D = 384, MLP 1536, 12 blocks, patch 2, 4 channels)."""
    dim, mlp, depth, cond = 384, 1536, 12, 1024
    patch = 4 * 2 * 2 * dim + dim
    queries = 8 * dim
    attention = (dim * 3 * dim + 3 * dim) + (dim * dim + dim)
    feedforward = (dim * mlp + mlp) + (mlp * dim + dim)
    plain_block = 2 * (2 * dim) + attention + feedforward  # two affine LayerNorms
    spatial = dim * 16 + 16
    tau_head = (dim * dim + dim) + (dim + 1)
    d_head = (dim * cond + cond) + (cond * cond + cond)
    heads = spatial + tau_head + d_head
    plain = patch + queries + depth * plain_block + 2 * dim + heads
    adaln_block = attention + feedforward + (dim * 6 * dim + 6 * dim)  # no affine norms, adaLN modulation
    adaln = patch + queries + dim + depth * adaln_block + (dim * 2 * dim + 2 * dim) + heads
    assert 21_000_000 < depth * plain_block < 21_500_000  # SPEC §5.2: the (a) backbone is ≈21.3M
    assert 22_000_000 < plain < 24_000_000
    assert 33_000_000 < adaln < 34_500_000  # SPEC §5.2: (b) is ≈33M
    counted = {style: sum(p.numel() for p in MINE(MINEConfig(block_style=style)).parameters())
               for style in ("plain", "adaln")}
    assert counted == {"plain": plain, "adaln": adaln}

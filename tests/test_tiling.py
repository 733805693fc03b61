"""Gaussian-blended latent tiling (SPEC.md §1.3): identity, coverage, placement, weights."""

import itertools

import pytest
import torch

try:
    from hypothesis import assume, given, settings
    from hypothesis import strategies as st
except ImportError:  # the parametrised grid below still covers the property
    given = None

from osd_core.tiling import (
    TileWindow,
    blend_tiles,
    gaussian_weights,
    retry_smaller_tiles,
    tile_starts,
    tile_windows,
    validate_tiling,
)


def _identity_blend(x, tile, overlap, calls=None):
    return blend_tiles(lambda w: w.slice(x), tuple(x.shape), tile_latent=tile, overlap_latent=overlap,
                       device="cpu", dtype=x.dtype, callback=(lambda d, t: calls.append((d, t))) if calls is not None
                       else None)


@pytest.mark.parametrize("size,tile,overlap", [
    ((37, 53), 16, 8), ((8, 200), 16, 0), ((97, 97), 32, 24), ((37, 53), 8, 0), ((150, 60), 96, 32),
    ((33, 17), 16, 15), ((200, 8), 8, 4),
])
def test_identity_predictor_returns_its_input(size, tile, overlap):
    x = torch.randn(2, 3, *size, generator=torch.Generator().manual_seed(0))
    # exact up to float32 rounding of the weighted average (a few ulp where many tiles overlap)
    torch.testing.assert_close(_identity_blend(x, tile, overlap), x, atol=1e-6, rtol=1e-6)


def test_every_pixel_covered_and_last_tile_flush():
    for (h, w), tile, overlap in itertools.product([(37, 53), (16, 100)], [8, 16], [0, 4]):
        cover = torch.zeros(h, w)
        windows = tile_windows(h, w, tile, overlap)
        for win in windows:
            cover[win.y0:win.y1, win.x0:win.x1] += 1
        assert bool((cover > 0).all())
        assert max(win.y1 for win in windows) == h and max(win.x1 for win in windows) == w
        assert all(win.y1 - win.y0 == min(tile, h) and win.x1 - win.x0 == min(tile, w) for win in windows)


def test_tile_starts_step_and_snap():
    assert tile_starts(100, 32, 8) == [0, 24, 48, 68]
    assert tile_starts(32, 32, 8) == [0]
    assert tile_starts(20, 32, 8) == [0]


def test_single_window_when_area_fits():
    assert tile_windows(24, 20, 32, 8) == [TileWindow(0, 24, 0, 20)]
    assert len(tile_windows(40, 40, 32, 8)) == 4


def test_callback_reports_each_tile():
    calls = []
    _identity_blend(torch.zeros(1, 1, 40, 40), 16, 8, calls)
    assert calls == [(i, len(calls)) for i in range(1, len(calls) + 1)] and len(calls) == 16


def test_callback_can_cancel():
    def stop(done, total):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        blend_tiles(lambda w: torch.zeros(1, 1, w.y1 - w.y0, w.x1 - w.x0), (1, 1, 40, 40), tile_latent=16,
                    overlap_latent=8, device="cpu", dtype=torch.float32, callback=stop)


def test_gaussian_weights_symmetric_peaked_and_with_var_0_01():
    w = gaussian_weights(9, 12)
    assert torch.allclose(w, w.flip(0)) and torch.allclose(w, w.flip(1))
    assert w[4].argmax() in (5, 6) and w.max() <= 1.0
    # corner of a 9-px axis: exp(-(4)^2 / (2 * 0.01 * 81))
    expected = torch.exp(torch.tensor(-16 / (2 * 0.01 * 81)))
    assert torch.isclose(gaussian_weights(9, 1)[0, 0], expected)


def test_bad_tiling_messages_name_the_input_and_a_fix():
    with pytest.raises(ValueError, match=r"`tile_size` must be a positive multiple of 8; got 100\. Use 96 or 104"):
        validate_tiling(100, 32)
    with pytest.raises(ValueError, match="tile_overlap"):
        validate_tiling(64, 64)
    with pytest.raises(ValueError, match="tile_overlap"):
        validate_tiling(64, -8)


def test_out_of_memory_retries_with_smaller_tiles():
    tried = []

    def run(tile, overlap):
        tried.append((tile, overlap))
        if tile > 32:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2 GiB")
        return torch.zeros(1)

    freed = []
    retry_smaller_tiles(run, 96, 32, on_retry=lambda: freed.append(1))
    assert tried == [(96, 32), (48, 16), (24, 8)] and len(freed) == 2


def test_out_of_memory_gives_up_at_the_minimum_and_other_errors_pass_through():
    def always(tile, overlap):
        raise torch.OutOfMemoryError("out of memory")

    with pytest.raises(torch.OutOfMemoryError):
        retry_smaller_tiles(always, 64, 16)

    def broken(tile, overlap):
        raise RuntimeError("shape mismatch")

    with pytest.raises(RuntimeError, match="shape mismatch"):
        retry_smaller_tiles(broken, 64, 16)


if given is not None:
    @settings(max_examples=60, deadline=None, database=None)
    @given(h=st.integers(1, 90), w=st.integers(1, 90), tile=st.sampled_from([8, 16, 24, 32, 64]), data=st.data())
    def test_identity_property_any_size_tile_and_overlap(h, w, tile, data):
        overlap = data.draw(st.integers(0, tile - 1))
        assume(len(tile_windows(h, w, tile, overlap)) <= 200)  # keep each example fast
        x = torch.randn(1, 2, h, w, generator=torch.Generator().manual_seed(h * 97 + w))
        torch.testing.assert_close(_identity_blend(x, tile, overlap), x, atol=1e-6, rtol=1e-6)


def test_blend_is_a_convex_combination_of_the_tiles():
    values = {}

    def constant_per_tile(win):
        values[win] = float(len(values))
        return torch.full((1, 1, win.y1 - win.y0, win.x1 - win.x0), values[win])

    out = blend_tiles(constant_per_tile, (1, 1, 50, 70), tile_latent=24, overlap_latent=8, device="cpu",
                      dtype=torch.float32)
    assert out.min() >= -1e-5 and out.max() <= max(values.values()) + 1e-5
    assert out[0, 0, 0, 0] == 0.0  # the corner is covered by the first tile only
    assert len(torch.unique(out)) > len(values)  # overlaps blend, not overwrite


def test_blend_output_dtype_and_float32_accumulation():
    x = torch.rand(1, 4, 40, 44, generator=torch.Generator().manual_seed(1))
    out = blend_tiles(lambda w: w.slice(x).half(), tuple(x.shape), tile_latent=16, overlap_latent=8, device="cpu",
                      dtype=torch.float16)
    assert out.dtype == torch.float16
    torch.testing.assert_close(out, x.half(), atol=1e-3, rtol=1e-3)
    single = blend_tiles(lambda w: w.slice(x), tuple(x.shape), tile_latent=64, overlap_latent=8, device="cpu",
                         dtype=torch.float64)
    assert single.dtype == torch.float64 and torch.equal(single, x.double())


def test_wrong_predictor_shape_is_refused():
    with pytest.raises(ValueError, match=r"predictor returned shape \(1, 1, 8, 8\).*expected \(2, 1, 16, 16\)"):
        blend_tiles(lambda w: torch.zeros(1, 1, 8, 8), (2, 1, 40, 40), tile_latent=16, overlap_latent=8,
                    device="cpu", dtype=torch.float32)


def test_non_integer_tiling_and_bad_starts_are_refused():
    with pytest.raises(ValueError, match=r"integers; got 96\.0"):
        validate_tiling(96.0, 32)
    with pytest.raises(ValueError, match=r"got 64 and True"):
        validate_tiling(64, True)
    with pytest.raises(ValueError, match="overlap 32"):
        tile_starts(100, 32, 32)
    with pytest.raises(ValueError, match=r"`tile_overlap` \(96\) must .*smaller than `tile_size` \(64\)"):
        validate_tiling(64, 96)


def test_small_tile_sizes_suggest_multiples_of_8():
    with pytest.raises(ValueError, match="got 4. Use 8 or 16"):
        validate_tiling(4, 0)
    with pytest.raises(ValueError, match="got 0. Use 8 or 16"):
        validate_tiling(0, 0)


def test_windows_are_clipped_per_axis_and_flush():
    windows = tile_windows(10, 1000, 96, 32)  # 10·1000 > 96², so it tiles, with 10 x 96 tiles
    assert {(w.y0, w.y1) for w in windows} == {(0, 10)}
    assert [w.x0 for w in windows] == [64 * i for i in range(15)] + [904] and windows[-1].x1 == 1000


def test_even_tile_weights_use_mean_t_minus_1_over_2():
    w = gaussian_weights(8, 1)[:, 0]
    expected = torch.exp(-(torch.arange(8.0) - 3.5) ** 2 / (2 * 0.01 * 64))
    torch.testing.assert_close(w, expected)
    assert w[3] == w[4]  # OSEDiff's T/2 quirk would make these differ
    assert torch.isclose(gaussian_weights(1, 5, var=0.5)[0, 0],
                         torch.exp(torch.tensor(-4 / (2 * 0.5 * 25))))


def test_tile_window_slice_takes_the_last_two_dims():
    x = torch.arange(2 * 3 * 5 * 7).reshape(2, 3, 5, 7)
    assert torch.equal(TileWindow(1, 4, 2, 6).slice(x), x[:, :, 1:4, 2:6])

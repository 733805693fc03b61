"""The one-step denoise (osd_core.onestep) on a tiny U-Net: formulas, tiling, batching, hooks."""

import pytest
import torch

from osd_core.onestep import one_step_denoise
from osd_core.parameterisation import Parameterisation
from osd_core.schedule import NoiseSchedule
from osd_core.tiny import tiny_components


@pytest.fixture(scope="module")
def parts():
    comps = tiny_components(seed=0)
    g = torch.Generator().manual_seed(1)
    z = torch.randn(2, 4, 24, 20, generator=g)
    cond = torch.randn(1, 77, comps.unet.config.cross_attention_dim, generator=g).expand(2, -1, -1)
    return comps, z, cond


def _run(comps, z, cond, t, **kw):
    with torch.no_grad():
        return one_step_denoise(comps.unet, comps.schedule, kw.pop("kind", Parameterisation.STANDARD), z, cond, t, **kw)


def test_standard_parameterisation_matches_closed_form_at_999(parts):
    comps, z, cond = parts
    t = torch.full((2,), 999.0)
    with torch.no_grad():
        eps = comps.unet(z, t, encoder_hidden_states=cond).sample
    abar = NoiseSchedule().alphas_cumprod[999].item()
    expected = (z - (1 - abar) ** 0.5 * eps) / abar ** 0.5  # SPEC §1.1
    torch.testing.assert_close(_run(comps, z, cond, t, tile_latent=96), expected, atol=1e-4, rtol=1e-4)


def test_noise_enters_as_alpha_z_plus_sigma_eps(parts):
    comps, z, cond = parts
    t = torch.full((2,), 100.0)
    noise = torch.randn(z.shape, generator=torch.Generator().manual_seed(3))
    sched = NoiseSchedule()
    a, s = sched.alpha(t)[:, None, None, None], sched.sigma(t)[:, None, None, None]
    z_in = a * z + s * noise
    with torch.no_grad():
        eps = comps.unet(z_in, t, encoder_hidden_states=cond).sample
    expected = z + (s / a) * (noise - eps)  # (N) of SPEC §0.6
    got = _run(comps, z, cond, t, noise=noise, kind=Parameterisation.NOISE_RESIDUAL)
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


def test_latent_within_one_tile_is_not_tiled(parts):
    # 24 x 20 = 480 latent px <= 32 x 32: a single window, so the tile size cannot change the result.
    comps, z, cond = parts
    t = torch.full((2,), 500.0)
    torch.testing.assert_close(_run(comps, z, cond, t, tile_latent=96),
                               _run(comps, z, cond, t, tile_latent=32, overlap_latent=8), atol=0, rtol=0)


def test_tiled_run_is_finite_and_close_to_untiled(parts):
    comps, z, cond = parts
    t = torch.full((2,), 999.0)
    whole = _run(comps, z, cond, t, tile_latent=96)
    tiled = _run(comps, z, cond, t, tile_latent=16, overlap_latent=8)
    assert torch.isfinite(tiled).all()
    assert tiled.shape == whole.shape
    # Tiles see less context, so results differ, but only by a bounded amount on a smooth random U-Net.
    assert (tiled - whole).abs().mean() < (whole.abs().mean())


def test_batch_item_equals_single_run(parts):
    comps, z, cond = parts
    t = torch.tensor([999.0, 250.5])
    both = _run(comps, z, cond, t, tile_latent=16, overlap_latent=8)
    for i in range(2):
        single = _run(comps, z[i:i + 1], cond[i:i + 1], t[i:i + 1], tile_latent=16, overlap_latent=8)
        torch.testing.assert_close(both[i:i + 1], single, atol=1e-5, rtol=1e-5)


def test_conv_in_hook_is_applied_per_tile_and_removed(parts):
    comps, z, cond = parts
    t = torch.full((2,), 100.0)
    windows = []

    def hook(window):
        windows.append(window)
        return lambda feat: feat * 0.0

    hooked = _run(comps, z, cond, t, tile_latent=16, overlap_latent=8, conv_in_hook=hook)
    assert len(windows) > 1
    assert not comps.unet.conv_in._forward_hooks
    plain = _run(comps, z, cond, t, tile_latent=16, overlap_latent=8)
    assert not torch.allclose(hooked, plain)


def test_callback_counts_tiles(parts):
    comps, z, cond = parts
    calls = []
    _run(comps, z, cond, torch.full((2,), 999.0), tile_latent=16, overlap_latent=8,
         callback=lambda done, total: calls.append((done, total)))
    assert calls[-1][0] == calls[-1][1] == len(calls) > 1


def test_bad_tiling_is_refused(parts):
    comps, z, cond = parts
    with pytest.raises(ValueError, match="multiple of 8"):
        _run(comps, z, cond, torch.full((2,), 999.0), tile_latent=100)
    with pytest.raises(ValueError, match="tile_overlap"):
        _run(comps, z, cond, torch.full((2,), 999.0), tile_latent=16, overlap_latent=16)

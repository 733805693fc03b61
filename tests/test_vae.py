"""VAE encode/decode (osd_core.vae) on a tiny AutoencoderKL: scaling, seeding, tiling."""

import pytest
import torch

from osd_core.tiny import tiny_components
from osd_core.vae import decode_latent, encode_latent


@pytest.fixture(scope="module")
def vae():
    return tiny_components(seed=0).vae


@pytest.fixture(scope="module")
def image():
    return torch.rand(2, 3, 48, 40, generator=torch.Generator().manual_seed(0)) * 2 - 1


def test_mode_is_scaled_posterior_mean(vae, image):
    with torch.no_grad():
        mean = vae.encode(image).latent_dist.mean
        z = encode_latent(vae, image, sampling="mode")
    torch.testing.assert_close(z, mean * vae.config.scaling_factor, atol=1e-5, rtol=1e-5)
    assert z.shape == (2, 4, 6, 5)


def test_sample_is_seeded_and_differs_from_mode(vae, image):
    with torch.no_grad():
        a = encode_latent(vae, image, sampling="sample", seed=7)
        b = encode_latent(vae, image, sampling="sample", seed=7)
        c = encode_latent(vae, image, sampling="sample", seed=8)
        m = encode_latent(vae, image, sampling="mode")
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert not torch.equal(a, m)


def test_batch_item_equals_single_encode(vae, image):
    with torch.no_grad():
        both = encode_latent(vae, image, sampling="sample", seed=3)
        single = encode_latent(vae, image[1:], sampling="sample", seed=3)
    torch.testing.assert_close(both[1:], single, atol=1e-5, rtol=1e-5)


def test_unknown_sampling_is_refused(vae, image):
    with pytest.raises(ValueError, match="sampling"):
        encode_latent(vae, image, sampling="median")


def test_decode_shape_range_and_tiling(vae):
    z = torch.randn(1, 4, 20, 18, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        whole = decode_latent(vae, z, tile_latent=224)
        tiled = decode_latent(vae, z, tile_latent=16, overlap_latent=8)
    assert whole.shape == tiled.shape == (1, 3, 160, 144)
    assert whole.min() >= -1 and whole.max() <= 1
    assert torch.isfinite(tiled).all()


def test_tiled_encode_keeps_shape_and_noise(vae):
    x = torch.rand(1, 3, 96, 80, generator=torch.Generator().manual_seed(2)) * 2 - 1
    calls = []
    with torch.no_grad():
        tiled = encode_latent(vae, x, sampling="mode", tile_latent=8, overlap_latent=4,
                              callback=lambda d, t: calls.append(d))
        whole = encode_latent(vae, x, sampling="mode")
    assert tiled.shape == whole.shape == (1, 4, 12, 10)
    assert len(calls) > 1

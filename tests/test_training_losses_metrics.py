"""PSNR and SSIM (training.metrics): identities, closed-form values, and the published values on pyiqa's pairs."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from test_training_losses_perceptual import reference_pairs

from training.metrics import psnr, rgb_to_y, ssim, ssim_terms

C1, C2 = 0.01 ** 2, 0.03 ** 2


def _images(seed: int, batch: int = 2, size: int = 24) -> torch.Tensor:
    return torch.rand(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


def test_identities():
    x, y = _images(0), _images(1)
    assert torch.isinf(psnr(x, x)).all() and psnr(x, y).shape == (2,)
    torch.testing.assert_close(ssim(x, x), torch.ones(2))
    torch.testing.assert_close(ssim(x, y), ssim(y, x))
    torch.testing.assert_close(psnr(x[1:], y[1:]), psnr(x, y)[1:])
    assert bool((ssim(x, y) < 0.2).all())  # independent noise


def test_psnr_of_a_constant_offset():
    x = _images(2) * 0.8
    assert psnr(x, x + 0.1, channel="rgb").tolist() == pytest.approx([20.0, 20.0], abs=1e-4)
    # on BT.601 luma the offset shrinks by 219/255
    expected = -20 * math.log10(0.1 * 219 / 255)
    assert psnr(x, x + 0.1).tolist() == pytest.approx([expected, expected], abs=1e-4)


def test_luma_of_black_and_white():
    black_white = torch.stack([torch.zeros(3, 1, 1), torch.ones(3, 1, 1)])
    assert (rgb_to_y(black_white).flatten() * 255).tolist() == pytest.approx([16.0, 235.0], abs=1e-3)


def test_ssim_of_constant_images_is_the_luminance_term():
    a, b = 0.2, 0.7
    x, y = torch.full((1, 3, 16, 16), a), torch.full((1, 3, 16, 16), b)
    expected = (2 * a * b + C1) / (a * a + b * b + C1)  # σ = 0: the contrast-structure term is C2 / C2 = 1
    assert ssim(x, y, channel="rgb").item() == pytest.approx(expected, rel=1e-6)
    luminance, contrast_structure = ssim_terms(x.double(), y.double())
    assert luminance.shape == (1, 3, 6, 6) and torch.allclose(contrast_structure, torch.ones(1, 3, 6, 6).double())


def test_ssim_of_a_negated_pattern():
    pattern = (torch.arange(16.0)[None] + torch.arange(16.0)[:, None]) % 2  # checkerboard, mean 0.5
    x = (0.25 + 0.5 * pattern).expand(1, 1, 16, 16)
    y = 1 - x  # same mean and variance, correlation −1
    luminance, contrast_structure = ssim_terms(x.double(), y.double())
    var = contrast_structure.new_tensor(0.0625)  # window-weighted variance of a ±0.25 checkerboard, up to the window
    assert torch.allclose(luminance, torch.ones_like(luminance))
    assert bool((contrast_structure < 0).all()) and ssim(x, y).item() < 0
    assert contrast_structure.min().item() == pytest.approx(((-2 * var + C2) / (2 * var + C2)).item(), rel=1e-2)


def test_checks():
    with pytest.raises(ValueError, match="channel"):
        psnr(_images(0), _images(1), channel="ycbcr")
    with pytest.raises(ValueError, match="at least 11 px"):
        ssim(_images(0, size=8), _images(1, size=8))
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        psnr(_images(0), _images(1)[:, :2])


def test_published_psnr_and_ssim_on_pyiqa_pairs():
    dist, ref = reference_pairs()
    # pyiqa's calibration_summary.csv: "psnr" (RGB) and the MATLAB "ssim" row, on the 8-bit luma 0.299/0.587/0.114
    np.testing.assert_allclose(psnr(dist, ref, channel="rgb").numpy(), [21.11, 20.99, 27.01, 23.30, 21.62],
                               atol=6e-3)
    weights = torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)
    luma = [((img.double() * weights).sum(1, keepdim=True) * 255).round() / 255 for img in (dist, ref)]
    np.testing.assert_allclose(ssim(*luma).numpy(), [0.6993, 0.9978, 0.9989, 0.9669, 0.6519], atol=6e-5)

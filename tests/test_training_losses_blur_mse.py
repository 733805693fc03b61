"""TADSR's blurred MSE (SPEC §3.5): kernel sizes, σ, torchvision-style Gaussian, reflect padding, per sample."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from training.losses.blur_mse import (
    blur_kernel_size,
    blur_per_sample,
    blur_sigma,
    blurred_mse,
    gaussian_blur,
    gaussian_kernel_1d,
)


def test_kernel_sizes_5_9_13_17_21_and_sigma():
    t_s = torch.tensor([0, 1, 199, 200, 399, 400, 599, 600, 799, 800, 999])
    assert blur_kernel_size(t_s).tolist() == [5, 5, 5, 9, 9, 13, 13, 17, 17, 21, 21]
    torch.testing.assert_close(blur_sigma(t_s), 1.0 + t_s.double() / 200)
    assert blur_sigma(torch.tensor([500])).item() == 3.5


def test_gaussian_kernel_matches_formula():
    g = gaussian_kernel_1d(5, 1.5, dtype=torch.float64, device=torch.device("cpu"))
    raw = torch.tensor([math.exp(-(x * x) / (2 * 1.5 ** 2)) for x in (-2, -1, 0, 1, 2)], dtype=torch.float64)
    torch.testing.assert_close(g, raw / raw.sum())


def test_separable_blur_equals_2d_reflect_convolution():
    x = torch.randn(2, 3, 12, 10, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    g = gaussian_kernel_1d(9, 2.0, dtype=torch.float64, device=x.device)
    kernel = torch.outer(g, g).expand(3, 1, 9, 9)
    reference = F.conv2d(F.pad(x, (4, 4, 4, 4), mode="reflect"), kernel, groups=3)
    torch.testing.assert_close(gaussian_blur(x, 9, 2.0), reference)
    constant = torch.full((1, 3, 24, 22), 0.3, dtype=torch.float64)
    torch.testing.assert_close(gaussian_blur(constant, 21, 5.0), constant)  # reflect padding keeps constants
    with pytest.raises(ValueError, match="larger than 10 px"):
        gaussian_blur(x, 21, 5.0)


def test_each_sample_gets_its_own_kernel():
    x = torch.randn(3, 3, 24, 24, generator=torch.Generator().manual_seed(1))
    t_s = torch.tensor([50, 900, 50])
    out = blur_per_sample(x, t_s)
    for i, t in enumerate(t_s.tolist()):
        single = gaussian_blur(x[i:i + 1], 5 + 4 * (t // 200), 1 + t / 200)
        torch.testing.assert_close(out[i:i + 1], single)


def test_blurred_mse_value_gradient_and_checks():
    g = torch.Generator().manual_seed(2)
    x_hat = torch.randn(2, 3, 32, 32, generator=g, requires_grad=True)
    x_hq = torch.randn(2, 3, 32, 32, generator=g)
    t_s = torch.tensor([100, 700])
    loss = blurred_mse(x_hat, x_hq, t_s)
    expected = F.mse_loss(blur_per_sample(x_hat.detach(), t_s), blur_per_sample(x_hq, t_s))
    torch.testing.assert_close(loss.detach(), expected)
    loss.backward()
    assert x_hat.grad is not None and torch.isfinite(x_hat.grad).all()
    assert blurred_mse(x_hq, x_hq, t_s).item() == 0.0
    assert loss.item() < F.mse_loss(x_hat, x_hq).item()  # blurring removes the independent high frequencies
    with pytest.raises(ValueError, match="one timestep per sample"):
        blurred_mse(x_hq, x_hq, torch.tensor([1]))


def test_blurred_mse_keeps_float32_under_autocast():
    g = torch.Generator().manual_seed(3)
    x_hat, x_hq = torch.randn(2, 3, 32, 32, generator=g), torch.randn(2, 3, 32, 32, generator=g)
    t_s = torch.tensor([300, 900])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = blurred_mse(x_hat, x_hq, t_s)
    assert low.dtype == torch.float32 and low.item() == blurred_mse(x_hat, x_hq, t_s).item()

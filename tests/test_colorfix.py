"""Colour fix (SPEC.md §9): AdaIN and wavelet identities and transfers."""

import pytest
import torch

from osd_core.colorfix import adain_color_fix, color_fix, wavelet_color_fix, wavelet_decomposition

G = torch.Generator().manual_seed(0)
TARGET = torch.rand(2, 3, 40, 36, generator=G)
SOURCE = torch.rand(2, 3, 40, 36, generator=G) * 0.5 + 0.25


def test_identities():
    torch.testing.assert_close(adain_color_fix(TARGET, TARGET), TARGET, atol=1e-5, rtol=0)
    torch.testing.assert_close(wavelet_color_fix(TARGET, TARGET), TARGET, atol=1e-5, rtol=0)
    assert color_fix(TARGET, SOURCE, "none") is TARGET


def test_adain_matches_source_statistics():
    out = adain_color_fix(TARGET, SOURCE)
    torch.testing.assert_close(out.mean(dim=(-2, -1)), SOURCE.mean(dim=(-2, -1)), atol=1e-5, rtol=0)
    torch.testing.assert_close(out.std(dim=(-2, -1)), SOURCE.std(dim=(-2, -1)), atol=1e-3, rtol=0)


def test_adain_uses_unbiased_variance_plus_1e_5():
    t = torch.tensor([0.2, 0.4, 0.6, 0.8]).reshape(1, 1, 2, 2).expand(1, 3, 2, 2)
    s = torch.tensor([0.5, 0.5, 0.5, 0.7]).reshape(1, 1, 2, 2).expand(1, 3, 2, 2)
    t_std = (t.var(dim=(-2, -1), unbiased=True, keepdim=True) + 1e-5).sqrt()
    s_std = (s.var(dim=(-2, -1), unbiased=True, keepdim=True) + 1e-5).sqrt()
    expected = (t - t.mean(dim=(-2, -1), keepdim=True)) / t_std * s_std + s.mean(dim=(-2, -1), keepdim=True)
    torch.testing.assert_close(adain_color_fix(t, s), expected.clamp(0, 1))


def test_wavelet_decomposition_sums_back_and_low_is_smooth():
    high, low = wavelet_decomposition(TARGET)
    torch.testing.assert_close(high + low, TARGET, atol=1e-5, rtol=0)
    assert low.std() < TARGET.std() / 3


def test_constant_source_colour_transfers():
    source = torch.full_like(TARGET, 0.3)
    torch.testing.assert_close(wavelet_color_fix(TARGET, source).mean(dim=(-2, -1)),
                               torch.full((2, 3), 0.3), atol=0.08, rtol=0)
    # a constant source has std sqrt(1e-5) = 0.0032 after the eps, so the output varies by a few 1e-3 at most
    torch.testing.assert_close(adain_color_fix(TARGET, source), torch.full_like(TARGET, 0.3), atol=0.01, rtol=0)


def test_batch_items_are_independent():
    both = adain_color_fix(TARGET, SOURCE)
    torch.testing.assert_close(both[1:], adain_color_fix(TARGET[1:], SOURCE[1:]))
    both = wavelet_color_fix(TARGET, SOURCE)
    torch.testing.assert_close(both[:1], wavelet_color_fix(TARGET[:1], SOURCE[:1]))


def test_errors():
    with pytest.raises(ValueError, match="method"):
        color_fix(TARGET, SOURCE, "lab")
    with pytest.raises(ValueError, match="reference"):
        adain_color_fix(TARGET, SOURCE[..., :10])


def test_keeps_dtype():
    assert adain_color_fix(TARGET.half(), SOURCE.half()).dtype == torch.float16


def test_dispatch_matches_the_functions():
    torch.testing.assert_close(color_fix(TARGET, SOURCE, "adain"), adain_color_fix(TARGET, SOURCE), atol=0, rtol=0)
    torch.testing.assert_close(color_fix(TARGET, SOURCE, "wavelet"), wavelet_color_fix(TARGET, SOURCE), atol=0, rtol=0)


def test_one_level_blur_of_a_delta_is_the_binomial_kernel():
    x = torch.zeros(1, 3, 9, 9)
    x[..., 4, 4] = 1.0
    high, low = wavelet_decomposition(x, levels=1)
    kernel = torch.tensor([[1.0, 2.0, 1.0], [2.0, 4.0, 2.0], [1.0, 2.0, 1.0]]) / 16
    torch.testing.assert_close(low[0, 1, 3:6, 3:6], kernel)
    assert low.sum().item() == pytest.approx(3.0) and low[0, 0, :3].abs().max() == 0
    torch.testing.assert_close(high, x - low)


def test_second_level_is_dilated_by_2():
    x = torch.zeros(1, 3, 17, 17)
    x[..., 8, 8] = 1.0
    _, low1 = wavelet_decomposition(x, levels=1)
    _, low2 = wavelet_decomposition(x, levels=2)
    # level 2 blurs level 1 with taps 2 px apart: low2[8, 8] = Σ k[i, j] · low1[8 + 2(i-1), 8 + 2(j-1)]
    kernel = torch.tensor([[1.0, 2.0, 1.0], [2.0, 4.0, 2.0], [1.0, 2.0, 1.0]]) / 16
    taps = low1[0, 0, 6:11:2, 6:11:2]
    assert low2[0, 0, 8, 8].item() == pytest.approx((kernel * taps).sum().item(), abs=1e-7)


def test_replicate_padding_keeps_a_constant_image_constant():
    x = torch.full((1, 3, 10, 13), 0.42)
    high, low = wavelet_decomposition(x)
    torch.testing.assert_close(low, x)
    assert high.abs().max() < 1e-6


def test_wavelet_keeps_the_targets_detail_and_the_sources_colour():
    target = TARGET[:1]
    source = torch.full_like(target, 0.5)
    out = wavelet_color_fix(target, source)
    target_high, _ = wavelet_decomposition(target)
    torch.testing.assert_close(out, (target_high + 0.5).clamp(0, 1), atol=1e-6, rtol=0)


def test_a_single_reference_serves_a_batch_and_mismatched_batches_fail():
    out = adain_color_fix(TARGET, SOURCE[:1])
    torch.testing.assert_close(out[1], adain_color_fix(TARGET[1:], SOURCE[:1])[0])
    out = wavelet_color_fix(TARGET, SOURCE[:1])
    torch.testing.assert_close(out[1], wavelet_color_fix(TARGET[1:], SOURCE[:1])[0])
    with pytest.raises(ValueError, match="reference batch has 2 images but the output has 3"):
        wavelet_color_fix(torch.rand(3, 3, 8, 8), torch.rand(2, 3, 8, 8))


def test_size_and_pixel_count_errors():
    with pytest.raises(ValueError, match=r"output \(2, 3, 40, 36\) and reference \(2, 3, 40, 10\)"):
        wavelet_color_fix(TARGET, SOURCE[..., :10])
    with pytest.raises(ValueError, match="at least 2 pixels.*1x1"):
        adain_color_fix(torch.rand(1, 3, 1, 1), torch.rand(1, 3, 1, 1))
    with pytest.raises(ValueError, match=r"\(B, C, H, W\)"):
        adain_color_fix(TARGET[0], SOURCE[0])
    with pytest.raises(ValueError, match=r"`method` must be one of .*got 'Adain'"):
        color_fix(TARGET, SOURCE, "Adain")


def test_outputs_are_clamped_and_keep_dtype():
    wild = torch.rand(1, 3, 16, 16) * 3 - 1
    for fix in (adain_color_fix, wavelet_color_fix):
        out = fix(wild, torch.rand(1, 3, 16, 16))
        assert out.min() >= 0 and out.max() <= 1
        assert fix(TARGET.to(torch.bfloat16), SOURCE.to(torch.bfloat16)).dtype == torch.bfloat16


@pytest.mark.parametrize("radius", [1, 2, 4, 8, 16])
def test_blur_equals_the_depthwise_dilated_conv_of_spec_9(radius):
    from osd_core.colorfix import _binomial_blur

    x = torch.rand(2, 3, 11, 19, generator=torch.Generator().manual_seed(radius))
    kernel = torch.tensor([[1.0, 2.0, 1.0], [2.0, 4.0, 2.0], [1.0, 2.0, 1.0]]).div(16).expand(3, 1, 3, 3)
    padded = torch.nn.functional.pad(x, (radius,) * 4, mode="replicate")
    expected = torch.nn.functional.conv2d(padded, kernel, groups=3, dilation=radius)
    torch.testing.assert_close(_binomial_blur(x, radius), expected, atol=1e-6, rtol=0)

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

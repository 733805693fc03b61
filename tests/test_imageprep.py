"""Image preparation: float factors, reflect padding to ×8, exact crop back, gray/RGBA, bad input."""

import pytest
import torch

from osd_core.imageprep import crop_to_frame, prepare_image, resize_image, to_signed_range, to_unit_range


@pytest.mark.parametrize("h,w", [(8, 8), (9, 13), (29, 37), (64, 48), (17, 100)])
@pytest.mark.parametrize("factor", [1.0, 1.5, 2.0, 2.37, 4.0])
def test_size_padding_and_round_trip(h, w, factor):
    image = torch.rand(2, 3, h, w, generator=torch.Generator().manual_seed(h * w))
    prepared = prepare_image(image, factor)
    frame = prepared.frame
    assert (frame.out_h, frame.out_w) == (round(h * factor), round(w * factor))
    assert frame.padded_h % 8 == 0 and frame.padded_w % 8 == 0
    assert prepared.x.shape == (2, 3, frame.padded_h, frame.padded_w)
    assert prepared.x.min() >= -1 and prepared.x.max() <= 1
    cropped = to_unit_range(crop_to_frame(prepared.x, frame))
    torch.testing.assert_close(cropped, prepared.x_up01, atol=1e-6, rtol=0)


def test_factor_one_is_exact():
    image = torch.rand(1, 3, 16, 24)
    prepared = prepare_image(image, 1.0)
    assert torch.equal(prepared.x_up01, image)


def test_padding_reflects():
    image = torch.rand(1, 3, 10, 9)
    x = prepare_image(image, 1.0).x  # padded to 16 x 16
    torch.testing.assert_close(x[..., 10, :9], x[..., 8, :9])
    torch.testing.assert_close(x[..., :10, 9], x[..., :10, 7])


def test_grayscale_and_rgba():
    gray = prepare_image(torch.rand(1, 1, 12, 12), 2.0)
    assert gray.x.shape[1] == 3 and torch.equal(gray.x_up01[:, 0], gray.x_up01[:, 2])
    rgba = torch.rand(1, 4, 12, 10)
    prepared = prepare_image(rgba, 2.5)
    assert prepared.alpha.shape == (1, 1, 30, 25)
    torch.testing.assert_close(prepared.alpha, resize_image(rgba[:, 3:], 30, 25))
    assert prepared.alpha.min() >= 0 and prepared.alpha.max() <= 1


@pytest.mark.parametrize("image,factor,pattern", [
    (torch.rand(0, 3, 16, 16), 4.0, "non-empty batch"),
    (torch.rand(1, 2, 16, 16), 4.0, "channels; got 2"),
    (torch.rand(1, 3, 1, 1), 4.0, "1x1 px"),
    (torch.rand(1, 3, 16, 16), 0.0, r"`upscale_factor` must be a positive number; got 0\.0"),
    (torch.rand(1, 3, 16, 16), -2.0, "got -2.0"),
    (torch.rand(1, 3, 16, 16), float("nan"), "got nan"),
    (torch.rand(1, 3, 16, 16), 0.25, "at least 8 px"),
])
def test_bad_input_messages(image, factor, pattern):
    with pytest.raises(ValueError, match=pattern):
        prepare_image(image, factor)


def test_nan_and_inf_are_counted():
    image = torch.rand(1, 3, 16, 16)
    image[0, 0, 0, :3] = float("nan")
    image[0, 1, 0, 0] = float("inf")
    with pytest.raises(ValueError, match="4 NaN or Inf"):
        prepare_image(image, 2.0)


def test_pixel_cap_names_the_largest_factor():
    with pytest.raises(ValueError, match=r"cap of 0\.0 MP|at most 2\.0") as err:
        prepare_image(torch.rand(1, 3, 100, 100), 4.0, max_output_pixels=200 * 200)
    assert "at most 2.0" in str(err.value) and "max_output_megapixels" in str(err.value)


def test_range_helpers_are_inverse():
    x = torch.rand(5)
    torch.testing.assert_close(to_unit_range(to_signed_range(x)), x)

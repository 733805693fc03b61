"""Image preparation: float factors, reflect padding to ×8, exact crop back, gray/RGBA, bad input."""

import re

import pytest
import torch

from osd_core.imageprep import PixelFrame, crop_to_frame, prepare_image, resize_image, to_signed_range, to_unit_range


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


@pytest.mark.parametrize("image,factor,patterns", [
    (torch.rand(0, 3, 16, 16), 4.0, ["`image`", "non-empty batch", r"\(0, 3, 16, 16\)"]),
    (torch.rand(3, 16, 16), 4.0, ["`image`", r"\(3, 16, 16\)"]),
    (torch.rand(1, 2, 16, 16), 4.0, ["`image`", "channels; got 2", "RGB"]),
    (torch.zeros(1, 3, 16, 16, dtype=torch.uint8), 4.0, ["`image`", "torch.uint8", "255"]),
    (torch.rand(1, 3, 1, 1), 4.0, ["`image` is 1x1 px", "at least 8 px per side", "Resize it first"]),
    (torch.rand(1, 3, 5, 30), 4.0, ["`image` is 30x5 px"]),
    (torch.rand(1, 3, 16, 16), 0.0, [r"`upscale_factor` must be a positive number; got 0\.0"]),
    (torch.rand(1, 3, 16, 16), -2.0, ["`upscale_factor`", "got -2.0"]),
    (torch.rand(1, 3, 16, 16), float("nan"), ["`upscale_factor`", "got nan"]),
    (torch.rand(1, 3, 16, 16), float("inf"), ["`upscale_factor`", "got inf"]),
    (torch.rand(1, 3, 16, 16), 0.25, ["`upscale_factor` 0.25", "4x4 px", "at least 8 px"]),
])
def test_bad_input_messages(image, factor, patterns):
    with pytest.raises(ValueError) as err:
        prepare_image(image, factor)
    for pattern in patterns:
        assert re.search(pattern, str(err.value)), (pattern, str(err.value))


def test_nan_and_inf_are_counted():
    image = torch.rand(1, 3, 16, 16)
    image[0, 0, 0, :3] = float("nan")
    image[0, 1, 0, 0] = float("inf")
    with pytest.raises(ValueError, match="4 NaN or Inf"):
        prepare_image(image, 2.0)


def test_pixel_cap_names_the_output_the_cap_and_the_largest_factor():
    with pytest.raises(ValueError) as err:
        prepare_image(torch.rand(1, 3, 100, 100), 4.0, max_output_pixels=200 * 200)
    message = str(err.value)
    for part in ("`upscale_factor` 4.0", "400x400", "40000 px", "at most 2.0", "max_output_megapixels"):
        assert part in message, (part, message)


@pytest.mark.parametrize("h,w,cap", [(37, 53, 100_000), (101, 13, 50_000), (9, 9, 6400)])
def test_the_suggested_factor_fits_the_cap(h, w, cap):
    with pytest.raises(ValueError, match="at most") as err:
        prepare_image(torch.rand(1, 3, h, w), 100.0, max_output_pixels=cap)
    largest = float(re.search(r"at most ([0-9.]+)", str(err.value)).group(1))
    frame = prepare_image(torch.rand(1, 3, h, w), largest, max_output_pixels=cap).frame
    assert frame.out_h * frame.out_w <= cap
    bigger = round(largest + 0.01, 2)
    assert round(h * bigger) * round(w * bigger) > cap  # and no larger 0.01 step fits


def test_range_helpers_are_inverse():
    x = torch.rand(5)
    torch.testing.assert_close(to_unit_range(to_signed_range(x)), x)


@pytest.mark.parametrize("multiple", [8, 16, 64])
@pytest.mark.parametrize("h,w", [(8, 8), (8, 23), (15, 9)])
def test_small_images_pad_by_more_than_their_side(h, w, multiple):
    image = torch.rand(1, 3, h, w, generator=torch.Generator().manual_seed(h + w))
    prepared = prepare_image(image, 1.0, multiple=multiple)
    frame = prepared.frame
    assert frame.padded_h % multiple == 0 and frame.padded_w % multiple == 0
    assert 0 <= frame.padded_h - h < multiple and 0 <= frame.padded_w - w < multiple
    assert torch.equal(prepared.x_up01, image)
    torch.testing.assert_close(to_unit_range(crop_to_frame(prepared.x, frame)), image, atol=1e-6, rtol=0)
    assert bool(torch.isfinite(prepared.x).all()) and prepared.x.abs().max() <= 1


def test_padding_is_minimal_and_frame_is_exact():
    prepared = prepare_image(torch.rand(1, 3, 13, 21), 3.0)  # 39 x 63 -> 40 x 64
    assert prepared.frame == PixelFrame(out_h=39, out_w=63, padded_h=40, padded_w=64)
    assert prepared.x_up01.shape == (1, 3, 39, 63)


def test_factor_one_clamps_and_does_not_alias():
    image = torch.rand(1, 3, 16, 16)
    image[0, 0, 0, 0] = 1.5
    prepared = prepare_image(image, 1.0)
    assert prepared.x_up01[0, 0, 0, 0] == 1.0 and image[0, 0, 0, 0] == 1.5
    prepared.x_up01.zero_()
    assert image.abs().sum() > 0


def test_grayscale_equals_its_rgb_repeat():
    gray = torch.rand(2, 1, 12, 17, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(prepare_image(gray, 1.7).x, prepare_image(gray.repeat(1, 3, 1, 1), 1.7).x)


def test_bad_multiple_and_crop_mismatch():
    with pytest.raises(ValueError, match=r"`multiple` must be a positive integer; got 0"):
        prepare_image(torch.rand(1, 3, 16, 16), 2.0, multiple=0)
    frame = prepare_image(torch.rand(1, 3, 16, 16), 2.0).frame
    with pytest.raises(ValueError, match=r"\(16, 16\).*\(32, 32\)"):
        crop_to_frame(torch.zeros(1, 3, 16, 16), frame)


def test_resize_image_clamps_overshoot_and_returns_float32():
    x = torch.zeros(1, 1, 8, 8)
    x[..., ::2, :] = 1.0  # stripes make bicubic overshoot
    up = resize_image(x, 13, 13)
    assert up.shape == (1, 1, 13, 13) and up.dtype == torch.float32
    assert up.min() >= 0 and up.max() <= 1
    assert resize_image(x.half(), 8, 8).dtype == torch.float32

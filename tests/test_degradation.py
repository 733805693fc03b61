"""Real-ESRGAN second-order degradation (SPEC §8): kernels, pixel stages, parameter draws and config."""

from __future__ import annotations

import dataclasses
import json
import math
from collections import Counter

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from training.degradation import (
    DegradationConfig,
    degrade,
    filter2d,
    gaussian_noise,
    jpeg_compress,
    poisson_noise,
    sample_params,
)
from training.kernels import (
    KERNEL_TYPES,
    FinalSincConfig,
    KernelConfig,
    KernelSpec,
    draw_blur_spec,
    gaussian_kernel,
    generalized_kernel,
    plateau_kernel,
    random_final_kernel,
    random_mixed_kernel,
    sinc_kernel,
)

N_DRAWS = 2000


def bessel_j1(x: float) -> float:
    """J₁(x) by Bessel's integral (1/π)∫₀^π cos(τ − x sin τ) dτ (the trapezoid rule converges spectrally)."""
    tau = np.linspace(0.0, math.pi, 4001)
    values = np.cos(tau - x * np.sin(tau))
    return float(np.sum((values[1:] + values[:-1]) / 2) * (tau[1] - tau[0]) / math.pi)


def sigma_matrix(sigma_x: float, sigma_y: float, theta: float) -> np.ndarray:
    rot = np.array([[math.cos(theta), -math.sin(theta)], [math.sin(theta), math.cos(theta)]])
    return rot @ np.diag([sigma_x**2, sigma_y**2]) @ rot.T


def quad_form(sigma: np.ndarray, dx: int, dy: int) -> float:
    v = np.array([dx, dy], dtype=np.float64)
    return float(v @ np.linalg.inv(sigma) @ v)


def assert_rate(count: int, n: int, p: float, what: str) -> None:
    """``count`` successes out of ``n`` lie within a 4-sigma binomial band around n·p."""
    band = 4 * math.sqrt(n * p * (1 - p))
    assert abs(count - n * p) <= band, f"{what}: {count}/{n}, expected {n * p:.0f} ± {band:.0f}"


def all_specs(size: int = 9) -> list[KernelSpec]:
    shapes = [KernelSpec(kind, size, sigma_x=1.4, sigma_y=0.6 if "aniso" in kind else 1.4,
                         theta=0.7 if "aniso" in kind else 0.0, beta=1.7) for kind in KERNEL_TYPES]
    return shapes + [KernelSpec("sinc", size, omega_c=2.0), KernelSpec("impulse", 21)]


# ---------------------------------------------------------------- kernels


@pytest.mark.parametrize("spec", all_specs(), ids=lambda s: s.kind)
def test_kernel_sums_to_one_padded_and_centred(spec):
    kernel = spec.build()
    assert kernel.shape == (21, 21) and kernel.dtype == torch.float32
    assert kernel.sum().item() == pytest.approx(1.0, abs=1e-6)
    margin = (21 - spec.size) // 2
    inner = torch.zeros(21, 21, dtype=torch.bool)
    inner[margin:21 - margin, margin:21 - margin] = True
    assert torch.all(kernel[~inner] == 0)
    axis = torch.arange(21, dtype=torch.float64)
    k = kernel.double()
    assert (k.sum(1) * axis).sum().item() == pytest.approx(10.0, abs=1e-6)  # every type is point-symmetric
    assert (k.sum(0) * axis).sum().item() == pytest.approx(10.0, abs=1e-6)


@pytest.mark.parametrize("omega_c", [math.pi / 5, 1.3, math.pi])
def test_sinc_centre_and_values_follow_the_bessel_formula(omega_c):
    size = 7
    raw = np.zeros((size, size))
    for row in range(size):
        for col in range(size):
            r = math.hypot(row - 3, col - 3)
            if r == 0:
                raw[row, col] = omega_c**2 / (4 * math.pi)
            else:
                raw[row, col] = omega_c * bessel_j1(omega_c * r) / (2 * math.pi * r)
    kernel = sinc_kernel(size, omega_c).double().numpy()
    np.testing.assert_allclose(kernel, raw / raw.sum(), rtol=1e-5, atol=1e-7)
    assert kernel[3, 3] * raw.sum() == pytest.approx(omega_c**2 / (4 * math.pi), rel=1e-5)


def test_gaussian_generalized_plateau_match_their_closed_forms():
    sx, sy, theta, beta, size = 1.3, 0.7, 0.4, 1.6, 9
    sigma = sigma_matrix(sx, sy, theta)
    forms = {
        "gaussian": (gaussian_kernel(size, sx, sy, theta), lambda q: math.exp(-0.5 * q)),
        "generalized": (generalized_kernel(size, sx, sy, theta, beta), lambda q: math.exp(-0.5 * q**beta)),
        "plateau": (plateau_kernel(size, sx, sy, theta, beta), lambda q: 1.0 / (q**beta + 1.0)),
    }
    for name, (kernel, form) in forms.items():
        total = sum(form(quad_form(sigma, dx, dy)) for dx in range(-4, 5) for dy in range(-4, 5))
        for dx, dy in [(0, 0), (1, 0), (0, 2), (2, -1), (-3, 1), (4, 4)]:
            expected = form(quad_form(sigma, dx, dy)) / total  # x = (column, row) offsets
            assert kernel[4 + dy, 4 + dx].item() == pytest.approx(expected, rel=1e-5, abs=1e-9), (name, dx, dy)


def test_generalized_with_beta_one_is_gaussian_and_axes_swap_with_a_quarter_turn():
    torch.testing.assert_close(generalized_kernel(11, 2.0, 0.8, 0.3, 1.0), gaussian_kernel(11, 2.0, 0.8, 0.3))
    torch.testing.assert_close(gaussian_kernel(11, 2.0, 0.8, 0.3), gaussian_kernel(11, 0.8, 2.0, 0.3 + math.pi / 2))


@pytest.mark.parametrize("spec", [s for s in all_specs() if "aniso" not in s.kind], ids=lambda s: s.kind)
def test_isotropic_kernels_are_rotation_symmetric(spec):
    kernel = spec.build()
    for image in (kernel.T, torch.rot90(kernel), torch.flip(kernel, dims=[0]), torch.flip(kernel, dims=[1])):
        torch.testing.assert_close(image, kernel, rtol=0, atol=1e-7)


def test_random_kernels_are_normalised_21x21():
    generator = torch.Generator().manual_seed(3)
    for _ in range(50):
        for kernel in (random_mixed_kernel(generator), random_mixed_kernel(generator, KernelConfig(sinc_prob=1.0)),
                       random_final_kernel(generator)):
            assert kernel.shape == (21, 21)
            assert kernel.sum().item() == pytest.approx(1.0, abs=1e-5)
    impulse = random_final_kernel(generator, FinalSincConfig(prob=0.0))
    assert impulse[10, 10] == 1 and impulse.sum() == 1


# ---------------------------------------------------------------- pixel stages


def test_filter2d_is_reflect_padded_cross_correlation():
    image = torch.rand(2, 3, 12, 10, generator=torch.Generator().manual_seed(0))
    impulse = torch.zeros(5, 5)
    impulse[2, 2] = 1
    assert torch.equal(filter2d(image, impulse), image)
    shifted = torch.zeros(5, 5)
    shifted[3, 2] = 1  # one row below the centre: cross-correlation reads the pixel below
    torch.testing.assert_close(filter2d(image, shifted)[:, :, :-1], image[:, :, 1:])
    kernel = torch.rand(7, 7, generator=torch.Generator().manual_seed(1))
    expected = F.conv2d(F.pad(image, (3, 3, 3, 3), mode="reflect"), kernel.expand(3, 1, 7, 7), groups=3)
    torch.testing.assert_close(filter2d(image, kernel), expected)


def test_filter2d_handles_images_smaller_than_the_padding():
    constant = torch.full((1, 3, 5, 4), 0.3)
    out = filter2d(constant, gaussian_kernel(21, 3.0, 3.0, 0.0))
    assert out.shape == constant.shape
    torch.testing.assert_close(out, constant)


def test_gaussian_noise_gray_shares_one_map_and_has_sigma():
    image = torch.zeros(2, 3, 64, 64)
    gray = gaussian_noise(image, 0.1, gray=True, generator=torch.Generator().manual_seed(0))
    assert torch.equal(gray[:, 0], gray[:, 1]) and torch.equal(gray[:, 0], gray[:, 2])
    colour = gaussian_noise(image, 0.1, gray=False, generator=torch.Generator().manual_seed(0))
    assert not torch.equal(colour[:, 0], colour[:, 1])
    assert colour.std().item() == pytest.approx(0.1, rel=0.03)


def test_poisson_noise_uses_the_unique_value_count():
    # a constant image has one unique value, so vals = 2^0 = 1 and noise = Poisson(c) − c: mean 0, variance c
    image = torch.full((1, 3, 64, 64), 0.5)
    noise = poisson_noise(image, 1.0, gray=False, generator=torch.Generator().manual_seed(0))
    assert noise.mean().item() == pytest.approx(0.0, abs=0.03)
    assert noise.var().item() == pytest.approx(0.5, rel=0.05)
    scaled = poisson_noise(image, 0.5, gray=False, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(scaled, noise * 0.5)
    red = torch.zeros(1, 3, 128, 128)
    red[:, 0] = 1.0  # BT.601 luminance 0.299, quantised to 76/255: the gray noise variance is 76/255
    gray = poisson_noise(red, 1.0, gray=True, generator=torch.Generator().manual_seed(0))
    assert torch.equal(gray[:, 0], gray[:, 1]) and torch.equal(gray[:, 0], gray[:, 2])
    assert gray[:, 0].var().item() == pytest.approx(76 / 255, rel=0.05)


def test_jpeg_subsamples_chroma_4_2_0():
    # alternate red and blue rows: 4:2:0 averages chroma over row pairs (4:4:4 and 4:2:2 keep it, error < 0.01)
    stripes = (torch.arange(32) % 2).float()[:, None].expand(32, 32)
    image = torch.stack([stripes, torch.zeros(32, 32), 1 - stripes])[None]  # (1, 3, 32, 32)
    assert (jpeg_compress(image, 95) - image).abs().mean().item() > 0.2


def test_jpeg_quality_controls_the_error_and_output_is_8_bit():
    ramp = torch.linspace(0, 1, 48)
    image = torch.stack([ramp[None, :].expand(48, 48), ramp[:, None].expand(48, 48),
                         torch.full((48, 48), 0.4)])[None]  # (1, 3, 48, 48) smooth
    image = image + 0.05 * torch.rand(image.shape, generator=torch.Generator().manual_seed(0))
    errors = {q: (jpeg_compress(image, q) - image.clamp(0, 1)).abs().mean().item() for q in (30, 95)}
    assert errors[95] < 3 / 255
    assert errors[30] > errors[95]
    out = jpeg_compress(image.double(), 60)
    assert out.dtype == torch.float64 and out.shape == image.shape
    assert torch.allclose(out * 255, (out * 255).round(), atol=1e-6)


# ---------------------------------------------------------------- the whole pipeline


def hq_batch(batch: int = 2, height: int = 64, width: int = 64, seed: int = 0) -> torch.Tensor:
    return torch.rand(batch, 3, height, width, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("resize_back, size", [(True, (64, 96)), (False, (16, 24))])
def test_output_size_range_and_8_bit_values(resize_back, size):
    lq, params = degrade(hq_batch(4, 64, 96), torch.Generator().manual_seed(1),
                         DegradationConfig(resize_back=resize_back))
    assert lq.shape == (4, 3, *size) and lq.dtype == torch.float32 and len(params) == 4
    assert lq.min() >= 0 and lq.max() <= 1
    assert torch.allclose(lq * 255, (lq * 255).round(), atol=1e-4)
    assert all((p.resize_back_mode is not None) == resize_back for p in params)


def test_seeded_reproducibility_and_per_item_draws():
    hq = hq_batch(3)
    lq_a, params_a = degrade(hq, torch.Generator().manual_seed(7))
    lq_b, params_b = degrade(hq, torch.Generator().manual_seed(7))
    lq_c, _ = degrade(hq, torch.Generator().manual_seed(8))
    assert torch.equal(lq_a, lq_b) and params_a == params_b
    assert not torch.equal(lq_a, lq_c)
    assert len(set(params_a)) == 3


def test_dtype_follows_input_and_second_order_can_be_skipped():
    config = DegradationConfig(second_order_prob=0.0, resize_back=False)
    lq, params = degrade(hq_batch(2).double(), torch.Generator().manual_seed(0), config)
    assert lq.dtype == torch.float64 and lq.shape == (2, 3, 16, 16)
    assert all(not p.second_order for p in params)
    assert all(p.kernel2 is None and p.resize2 is None and p.noise2 is None for p in params)


def test_degrade_rejects_bad_inputs():
    generator = torch.Generator().manual_seed(0)
    with pytest.raises(ValueError, match="divisible by the scale 4; got 62x64"):
        degrade(torch.rand(1, 3, 62, 64), generator)
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        degrade(torch.rand(3, 64, 64), generator)
    with pytest.raises(ValueError, match="too small"):
        degrade(torch.rand(1, 3, 8, 8), generator)


# ---------------------------------------------------------------- parameter draws


@pytest.fixture(scope="module")
def draws():
    generator = torch.Generator().manual_seed(2024)
    return [sample_params(generator) for _ in range(N_DRAWS)]


def test_stage_probabilities(draws):
    n = N_DRAWS
    assert_rate(sum(p.kernel1.kind == "sinc" for p in draws), n, 0.1, "kernel 1 sinc")
    assert all(p.second_order for p in draws)  # OSEDiff: second_order_prob = 1
    blurred = [p for p in draws if p.kernel2 is not None]
    assert_rate(len(blurred), n, 0.8, "second blur")
    assert_rate(sum(p.kernel2.kind == "sinc" for p in blurred), len(blurred), 0.1, "kernel 2 sinc")
    assert_rate(sum(p.final_kernel.kind == "sinc" for p in draws), n, 0.8, "final sinc")
    assert_rate(sum(p.order == "A" for p in draws), n, 0.5, "order A")
    for stage in ("noise1", "noise2"):
        noises = [getattr(p, stage) for p in draws]
        assert_rate(sum(d.kind == "gaussian" for d in noises), n, 0.5, f"{stage} gaussian")
        assert_rate(sum(d.gray for d in noises), n, 0.4, f"{stage} gray")
    for stage, probs in (("resize1", (0.2, 0.7, 0.1)), ("resize2", (0.3, 0.4, 0.3))):
        kinds = Counter(getattr(p, stage).kind for p in draws)
        for kind, prob in zip(("up", "down", "keep"), probs):
            assert_rate(kinds[kind], n, prob, f"{stage} {kind}")


def test_kernel_type_probabilities(draws):
    mixed = [p.kernel1.kind for p in draws if p.kernel1.kind != "sinc"]
    counts = Counter(mixed)
    for kind, prob in zip(KERNEL_TYPES, (0.45, 0.25, 0.12, 0.03, 0.12, 0.03)):
        assert_rate(counts[kind], len(mixed), prob, kind)


def test_drawn_values_stay_in_their_ranges(draws):
    qualities = [q for p in draws for q in (p.jpeg1, p.jpeg2)]
    assert all(isinstance(q, int) for q in qualities) and min(qualities) == 30 and max(qualities) == 95
    for p in draws:
        for kernel, sigma_hi in ((p.kernel1, 3.0), (p.kernel2, 1.5)):
            if kernel is None:
                continue
            assert kernel.size in range(7, 22, 2) and kernel.pad_to == 21
            if kernel.kind == "sinc":
                low = math.pi / 3 if kernel.size < 13 else math.pi / 5
                assert low <= kernel.omega_c <= math.pi
                continue
            assert 0.2 <= kernel.sigma_x <= sigma_hi and 0.2 <= kernel.sigma_y <= sigma_hi
            if "aniso" in kernel.kind:
                assert -math.pi <= kernel.theta <= math.pi
            else:
                assert kernel.sigma_y == kernel.sigma_x and kernel.theta == 0.0
            if kernel.kind.startswith("generalized"):
                assert 0.5 <= kernel.beta <= 4.0
            if kernel.kind.startswith("plateau"):
                assert 1.0 <= kernel.beta <= 2.0
        if p.final_kernel.kind == "sinc":
            assert math.pi / 3 <= p.final_kernel.omega_c <= math.pi
        else:
            assert p.final_kernel == KernelSpec("impulse", 21, 21)
        for resize, (lo, hi) in ((p.resize1, (0.15, 1.5)), (p.resize2, (0.3, 1.2))):
            bounds = {"up": (1.0, hi), "down": (lo, 1.0), "keep": (1.0, 1.0)}[resize.kind]
            assert bounds[0] <= resize.scale <= bounds[1] and resize.mode in ("area", "bilinear", "bicubic")
        for noise, sigma_hi, poisson_hi in ((p.noise1, 30.0, 3.0), (p.noise2, 25.0, 2.5)):
            if noise.kind == "gaussian":
                assert 1.0 <= noise.sigma_255 <= sigma_hi and noise.poisson_scale is None
            else:
                assert 0.05 <= noise.poisson_scale <= poisson_hi and noise.sigma_255 is None


def test_beta_rule_splits_at_one():
    # BasicSR's rule: U[lo, 1] with probability 1/2, else U[1, hi]; for plateau (1, 2) that is β = 1 half the time
    generator = torch.Generator().manual_seed(11)
    config = KernelConfig(kernel_types=("generalized_iso", "plateau_iso"), kernel_probs=(0.5, 0.5), sinc_prob=0.0)
    specs = [draw_blur_spec(generator, config) for _ in range(N_DRAWS)]
    generalized = [s.beta for s in specs if s.kind == "generalized_iso"]
    plateau = [s.beta for s in specs if s.kind == "plateau_iso"]
    assert_rate(sum(b < 1 for b in generalized), len(generalized), 0.5, "generalized β < 1")
    assert_rate(sum(b == 1.0 for b in plateau), len(plateau), 0.5, "plateau β = 1")
    assert all(1.0 <= b <= 2.0 for b in plateau) and all(0.5 <= b <= 4.0 for b in generalized)


def test_invsr_second_order_probability():
    generator = torch.Generator().manual_seed(5)
    config = DegradationConfig(second_order_prob=0.5)
    params = [sample_params(generator, config) for _ in range(N_DRAWS)]
    assert_rate(sum(p.second_order for p in params), N_DRAWS, 0.5, "second order")
    assert all(p.resize2 is None and p.noise2 is None and p.kernel2 is None for p in params if not p.second_order)


# ---------------------------------------------------------------- config


@pytest.mark.parametrize("changes, message", [
    ({"second_blur_prob": 1.2}, "`second_blur_prob` must be a probability in \\[0, 1\\]; got 1.2"),
    ({"noise_range": (30.0, 1.0)}, "`noise_range` must satisfy .*got \\(30.0, 1.0\\)"),
    ({"resize_range": (0.5, 0.9)}, "`resize_range` must contain 1.0"),
    ({"resize_prob2": (0.3, 0.4, 0.4)}, "`resize_prob2` must sum to 1"),
    ({"jpeg_range": (30, 120)}, "`jpeg_range` must satisfy"),
    ({"jpeg_range": (30.5, 95)}, "`jpeg_range` must be a pair \\(lo, hi\\) of integers"),
    ({"resize_back_modes": ("nearest",)}, "`resize_back_modes` must be a non-empty tuple"),
    ({"scale": 0}, "`scale` must be a positive integer; got 0"),
    ({"gray_prob": 0.1}, "`gray_prob` must be 0"),
    ({"kernel1": {"sigma_range": (3.0, 0.2)}}, "`sigma_range` must satisfy"),
])
def test_config_validation_names_the_field(changes, message):
    with pytest.raises(ValueError, match=message):
        DegradationConfig(**changes)


def test_kernel_config_validation():
    with pytest.raises(ValueError, match="`kernel_probs` must sum to 1"):
        KernelConfig(kernel_probs=(0.5, 0.25, 0.12, 0.03, 0.12, 0.03))
    with pytest.raises(ValueError, match="`sizes` must be a non-empty tuple of odd kernel sizes"):
        KernelConfig(sizes=(7, 8))
    with pytest.raises(ValueError, match="`sinc_prob` must be a probability"):
        KernelConfig(sinc_prob=-0.1)
    with pytest.raises(ValueError, match="`final_sinc.prob` must be a probability"):
        FinalSincConfig(prob=2)


def test_config_round_trip_and_unknown_keys():
    defaults = DegradationConfig()
    assert defaults.kernel2.sigma_range == (0.2, 1.5) and defaults.kernel1.sigma_range == (0.2, 3.0)
    variant = DegradationConfig(second_order_prob=0.5, resize_back=False, jpeg_range2=(40, 90),
                                kernel2=KernelConfig(sigma_range=(0.2, 1.0), sinc_prob=0.2))
    for config in (defaults, variant):
        restored = DegradationConfig.from_dict(json.loads(json.dumps(config.to_dict())))
        assert restored == config
        assert dataclasses.asdict(restored) == dataclasses.asdict(config)
    with pytest.raises(ValueError, match=r"unknown DegradationConfig keys \['jpeg_rnage'\]"):
        DegradationConfig.from_dict({"jpeg_rnage": [30, 95]})
    with pytest.raises(ValueError, match=r"unknown KernelConfig keys \['sigma'\]"):
        DegradationConfig.from_dict({"kernel1": {"sigma": [0.2, 3.0]}})

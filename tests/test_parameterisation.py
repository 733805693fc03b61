"""The x̂₀ parameterisations of SPEC.md §0.6, checked against hand-written formulas."""

import pytest
import torch

from osd_core.parameterisation import Parameterisation, noisy_latent, predict_x0
from osd_core.schedule import NoiseSchedule

SCHED = NoiseSchedule()
G = torch.Generator().manual_seed(0)
Z_LQ = torch.randn(2, 4, 5, 6, generator=G)
EPS_HAT = torch.randn(2, 4, 5, 6, generator=G)
NOISE = torch.randn(2, 4, 5, 6, generator=G)


def _coeffs(t):
    abar = SCHED.alphas_cumprod[t].item()
    return abar ** 0.5, (1 - abar) ** 0.5


@pytest.mark.parametrize("t", [999, 500, 100, 1])
def test_standard_is_eps_to_x0(t):
    a, s = _coeffs(t)
    tt = torch.full((2,), float(t))
    got = predict_x0("S", z_in=Z_LQ, z_lq=Z_LQ, eps_hat=EPS_HAT, t=tt, schedule=SCHED)
    torch.testing.assert_close(got, (Z_LQ - s * EPS_HAT) / a)


def test_osediff_at_999_uses_the_published_coefficients():
    got = predict_x0("S", z_in=Z_LQ, z_lq=Z_LQ, eps_hat=EPS_HAT, t=torch.full((2,), 999.0), schedule=SCHED)
    torch.testing.assert_close(got, (Z_LQ - 0.99767 * EPS_HAT) / 0.06826, atol=2e-3, rtol=2e-4)


@pytest.mark.parametrize("t", [999, 500, 100, 1])
def test_scaled_residual_plain_residual_and_noise_residual(t):
    a, s = _coeffs(t)
    tt = torch.full((2,), float(t))
    torch.testing.assert_close(
        predict_x0("R", z_in=Z_LQ, z_lq=Z_LQ, eps_hat=EPS_HAT, t=tt, schedule=SCHED), Z_LQ / a - EPS_HAT)
    torch.testing.assert_close(
        predict_x0("P", z_in=Z_LQ, z_lq=Z_LQ, eps_hat=EPS_HAT, t=tt, schedule=SCHED), Z_LQ - EPS_HAT)
    torch.testing.assert_close(
        predict_x0("N", z_in=Z_LQ, z_lq=Z_LQ, eps_hat=EPS_HAT, t=tt, schedule=SCHED, noise=NOISE),
        Z_LQ + (s / a) * (NOISE - EPS_HAT))


def test_tadsr_at_500_is_1_902_z_minus_f():
    got = predict_x0("R", z_in=Z_LQ, z_lq=Z_LQ, eps_hat=EPS_HAT, t=torch.full((2,), 500.0), schedule=SCHED)
    torch.testing.assert_close(got, 1.9023 * Z_LQ - EPS_HAT, atol=2e-4 * 5, rtol=1e-4)


def test_noise_residual_equals_standard_on_the_noisy_input():
    t = torch.tensor([100.0, 730.5])
    z_in = noisy_latent(Z_LQ, t, SCHED, NOISE)
    standard = predict_x0("S", z_in=z_in, z_lq=Z_LQ, eps_hat=EPS_HAT, t=t, schedule=SCHED)
    residual = predict_x0("N", z_in=z_in, z_lq=Z_LQ, eps_hat=EPS_HAT, t=t, schedule=SCHED, noise=NOISE)
    torch.testing.assert_close(standard, residual, atol=1e-5, rtol=1e-5)


def test_standard_round_trips_with_the_true_noise():
    t = torch.tensor([250.0, 999.0])
    z_in = noisy_latent(Z_LQ, t, SCHED, NOISE)
    got = predict_x0("S", z_in=z_in, z_lq=Z_LQ, eps_hat=NOISE, t=t, schedule=SCHED)
    torch.testing.assert_close(got, Z_LQ, atol=1e-4, rtol=1e-4)


def test_noisy_latent_per_sample_and_without_noise():
    assert noisy_latent(Z_LQ, torch.tensor([1.0, 2.0]), SCHED) is Z_LQ
    t = torch.tensor([10.0, 900.0])
    z = noisy_latent(Z_LQ, t, SCHED, NOISE)
    for i in range(2):
        a, s = SCHED.alpha(t[i:i + 1]).item(), SCHED.sigma(t[i:i + 1]).item()
        torch.testing.assert_close(z[i], a * Z_LQ[i] + s * NOISE[i])


def test_parse_accepts_letters_and_names_and_refuses_others():
    assert Parameterisation.parse("R") is Parameterisation.SCALED_RESIDUAL
    assert Parameterisation.parse("noise_residual") is Parameterisation.NOISE_RESIDUAL
    with pytest.raises(ValueError, match="parameterisation"):
        Parameterisation.parse("Q")


@pytest.mark.parametrize("t", [999, 100])
def test_noise_residual_without_noise_means_zero_noise(t):
    a, s = _coeffs(t)
    got = predict_x0("N", z_in=Z_LQ, z_lq=Z_LQ, eps_hat=EPS_HAT, t=torch.full((2,), float(t)), schedule=SCHED)
    torch.testing.assert_close(got, Z_LQ - (s / a) * EPS_HAT)


def test_fractional_t_uses_the_interpolated_alpha_and_sigma():
    a0, s0 = _coeffs(500)
    a1, s1 = _coeffs(501)
    alpha, sigma = 0.75 * a0 + 0.25 * a1, 0.75 * s0 + 0.25 * s1  # t = 500.25, SPEC §5.3
    tt = torch.full((2,), 500.25)
    torch.testing.assert_close(
        predict_x0("S", z_in=Z_LQ, z_lq=Z_LQ, eps_hat=EPS_HAT, t=tt, schedule=SCHED), (Z_LQ - sigma * EPS_HAT) / alpha)
    torch.testing.assert_close(
        predict_x0("R", z_in=Z_LQ, z_lq=Z_LQ, eps_hat=EPS_HAT, t=tt, schedule=SCHED), Z_LQ / alpha - EPS_HAT)


@pytest.mark.parametrize("kind", list(Parameterisation))
def test_each_batch_item_uses_its_own_t(kind):
    t = torch.tensor([999.0, 37.5])
    z_in = noisy_latent(Z_LQ, t, SCHED, NOISE)
    both = predict_x0(kind, z_in=z_in, z_lq=Z_LQ, eps_hat=EPS_HAT, t=t, schedule=SCHED, noise=NOISE)
    for i in range(2):
        one = predict_x0(kind, z_in=z_in[i:i + 1], z_lq=Z_LQ[i:i + 1], eps_hat=EPS_HAT[i:i + 1], t=t[i:i + 1],
                         schedule=SCHED, noise=NOISE[i:i + 1])
        torch.testing.assert_close(both[i:i + 1], one)


def test_x0_and_eps_round_trip_for_standard():
    t = torch.tensor([120.0, 980.0])
    alpha, sigma = SCHED.alpha(t).reshape(2, 1, 1, 1), SCHED.sigma(t).reshape(2, 1, 1, 1)
    x0 = predict_x0("S", z_in=Z_LQ, z_lq=Z_LQ, eps_hat=EPS_HAT, t=t, schedule=SCHED)
    eps_back = (Z_LQ - alpha * x0) / sigma  # ε from x̂₀: the inverse of (S)
    torch.testing.assert_close(eps_back, EPS_HAT, atol=1e-4, rtol=1e-4)


def test_gradient_reaches_a_continuous_t():
    t = torch.tensor([400.3, 700.6], requires_grad=True)
    z_in = noisy_latent(Z_LQ, t, SCHED, NOISE)
    predict_x0("S", z_in=z_in, z_lq=Z_LQ, eps_hat=EPS_HAT, t=t, schedule=SCHED).square().sum().backward()
    assert t.grad is not None and bool(torch.isfinite(t.grad).all()) and bool((t.grad != 0).all())


def test_keeps_the_latent_dtype():
    half = Z_LQ.half()
    got = predict_x0("R", z_in=half, z_lq=half, eps_hat=EPS_HAT.half(), t=torch.full((2,), 500.0), schedule=SCHED)
    assert got.dtype == torch.float16


@pytest.mark.parametrize("text,member", [
    ("S", Parameterisation.STANDARD), ("s", Parameterisation.STANDARD), ("standard", Parameterisation.STANDARD),
    ("Scaled residual", Parameterisation.SCALED_RESIDUAL), ("plain-residual", Parameterisation.PLAIN_RESIDUAL),
    (" N ", Parameterisation.NOISE_RESIDUAL), (Parameterisation.PLAIN_RESIDUAL, Parameterisation.PLAIN_RESIDUAL),
])
def test_parse_variants(text, member):
    assert Parameterisation.parse(text) is member


def test_parse_error_names_the_value_and_the_choices():
    with pytest.raises(ValueError, match=r"'epsilon'.*S \(standard\).*N \(noise_residual\)"):
        Parameterisation.parse("epsilon")

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


@pytest.mark.parametrize("t", [500, 100])
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

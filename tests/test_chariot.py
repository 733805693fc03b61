"""CHARIOT (SPEC.md §5.4, IDaS-SR Eq. 7–8, 18–21): golden values from the equations, gradients, validation."""

from __future__ import annotations

import json
import math

import pytest
import torch

from osd_core.chariot import ChariotConfig, chariot, mix_noise, reschedule, safe_std
from osd_core.noise import gaussian_noise

DELTA = 1e-6


def randn(*shape: int, seed: int = 0, scale: float = 1.0) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * scale


def std64(x: torch.Tensor) -> torch.Tensor:
    """Reference per-sample population std in float64."""
    return x.double().flatten(1).std(dim=1, unbiased=False)


def test_safe_std_golden():
    x = torch.tensor([[1.0, -1.0, 1.0, -1.0], [3.0, 3.0, 3.0, 3.0]]).view(2, 1, 2, 2)
    expected = torch.tensor([math.sqrt(1 + 1e-8), math.sqrt(1e-8)])
    torch.testing.assert_close(safe_std(x), expected, rtol=1e-7, atol=0)


def test_s0_keeps_tau_and_inversion_noise():
    tau = torch.tensor([37.5, 120.0, 249.0])
    eps_inv = randn(3, 4, 6, 5, seed=1, scale=0.3) + 0.1
    t_prime, eps_mix = chariot(tau, eps_inv, 0.0, seed=7)
    assert torch.equal(t_prime, tau)
    sd = std64(eps_inv)
    torch.testing.assert_close(std64(eps_mix), sd * sd / (sd + DELTA), rtol=1e-5, atol=0)
    expected = eps_inv.double() * (sd / (sd + DELTA)).view(-1, 1, 1, 1)
    torch.testing.assert_close(eps_mix.double(), expected, rtol=1e-5, atol=1e-7)


def test_delta_and_guard_for_weak_inversion_noise():
    """s = 0 with std_b(ε_inv) = 1e-3: ε_mix = ε_inv · σ/(σ + δ), σ = √(1e-6 + 1e-8) (Eq. 21 and the std guard)."""
    eps_inv = randn(1, 4, 8, 8, seed=16)
    eps_inv = 1e-3 * (eps_inv - eps_inv.mean()) / std64(eps_inv).float()
    sigma = math.sqrt(1e-6 + 1e-8)
    ratio = sigma / (sigma + DELTA)  # 0.999006, a 1e-3 shrink that δ = 0 would not give
    torch.testing.assert_close(mix_noise(eps_inv, randn(1, 4, 8, 8), 0.0), eps_inv * ratio, rtol=1e-5, atol=0)


def test_s1_reaches_t_max_with_unit_energy():
    tau = torch.tensor([20.0, 250.0])
    eps_inv = randn(2, 4, 8, 8, seed=2, scale=0.2)
    eps = randn(2, 4, 8, 8, seed=3, scale=2.5)
    t_prime, eps_mix = chariot(tau, eps_inv, 1.0, eps=eps)
    torch.testing.assert_close(t_prime, torch.tensor([999.0, 999.0]))
    torch.testing.assert_close(std64(eps_mix), torch.ones(2, dtype=torch.float64), rtol=0, atol=1e-5)
    torch.testing.assert_close(eps_mix.double(), eps.double() / std64(eps).view(-1, 1, 1, 1), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(("mode", "target"), [("std", 0.4 * 0.5 + 0.6), ("var", math.sqrt(0.4 * 0.25 + 0.6))])
def test_intermediate_s_target_energy(mode, target):
    eps_inv = randn(1, 4, 16, 16, seed=4)
    eps_inv = 0.5 * eps_inv / std64(eps_inv).float().view(-1, 1, 1, 1)  # per-sample std exactly 0.5
    eps = randn(1, 4, 16, 16, seed=5)
    eps_mix = mix_noise(eps_inv, eps, 0.6, energy_mode=mode)
    torch.testing.assert_close(std64(eps_mix).item(), target, rtol=1e-5, atol=0)
    raw = 0.4 * eps_inv.double() + 0.6 * eps.double()  # direction of Eq. 19, rescaled only (no mean removal)
    torch.testing.assert_close(eps_mix.double(), raw * target / std64(raw).view(-1, 1, 1, 1), rtol=1e-4, atol=1e-6)


def test_modes_agree_at_the_ends_and_differ_in_between():
    eps_inv, eps = randn(2, 4, 8, 8, seed=6, scale=0.3), randn(2, 4, 8, 8, seed=7)
    for s in (0.0, 1.0):
        torch.testing.assert_close(mix_noise(eps_inv, eps, s, energy_mode="std"),
                                   mix_noise(eps_inv, eps, s, energy_mode="var"))
    gap = mix_noise(eps_inv, eps, 0.5, energy_mode="var").std() - mix_noise(eps_inv, eps, 0.5).std()
    assert gap > 0.01  # √((1−s)σ² + s) > (1−s)σ + s for σ < 1 (concavity of √)


@pytest.mark.parametrize("s", [0.0, 0.3, 1.0])
def test_gradients_finite_at_zero_inversion_noise(s):
    tau = torch.tensor([120.0, 80.0], requires_grad=True)
    eps_inv = torch.zeros(2, 4, 6, 6, requires_grad=True)
    t_prime, eps_mix = chariot(tau, eps_inv, s, eps=randn(2, 4, 6, 6, seed=8))
    weights = randn(2, 4, 6, 6, seed=9)
    (t_prime.sum() + (eps_mix * weights).sum()).backward()
    assert torch.isfinite(tau.grad).all()
    assert torch.isfinite(eps_inv.grad).all()
    if s == 0.0:  # ε_mix ≈ ε_inv·1e-4/(1e-4 + δ): the identity's gradient, scaled by ≈0.99
        assert eps_inv.grad.abs().sum() > 0


def test_dt_dtau_is_one_minus_s():
    s = torch.tensor([0.0, 0.25, 0.6, 1.0])
    tau = torch.tensor([20.0, 100.0, 120.0, 250.0], requires_grad=True)
    (grad,) = torch.autograd.grad(reschedule(tau, s).sum(), tau)
    torch.testing.assert_close(grad, 1 - s)


def test_per_sample_s():
    tau = torch.tensor([100.0, 200.0, 50.0])
    s = torch.tensor([0.0, 0.5, 1.0])
    torch.testing.assert_close(reschedule(tau, s), torch.tensor([100.0, 599.5, 999.0]))
    eps_inv, eps = randn(3, 4, 5, 7, seed=10, scale=0.4), randn(3, 4, 5, 7, seed=11)
    t_prime, eps_mix = chariot(tau, eps_inv, s, eps=eps)
    for i in range(3):
        t_i, mix_i = chariot(tau[i : i + 1], eps_inv[i : i + 1], float(s[i]), eps=eps[i : i + 1])
        torch.testing.assert_close(t_prime[i : i + 1], t_i)
        torch.testing.assert_close(eps_mix[i : i + 1], mix_i)


def test_reschedule_custom_t_max():
    torch.testing.assert_close(reschedule(torch.tensor([100.0]), 0.5, t_max=500.0), torch.tensor([300.0]))


@pytest.mark.parametrize("bad", [-0.1, 1.5, float("nan"), torch.tensor([0.2, 1.01])])
def test_invalid_s_raises(bad):
    tau, eps_inv = torch.tensor([120.0, 90.0]), randn(2, 4, 4, 4)
    with pytest.raises(ValueError, match="`s`"):
        chariot(tau, eps_inv, bad, seed=0)
    with pytest.raises(ValueError, match="`s`"):
        reschedule(tau, bad)


def test_s_shape_must_match_batch():
    with pytest.raises(ValueError, match="`s`"):
        reschedule(torch.tensor([120.0, 90.0]), torch.tensor([0.1, 0.2, 0.3]))


def test_seeded_noise_is_deterministic_and_drawn_like_gaussian_noise():
    tau, eps_inv = torch.tensor([120.0, 60.0]), randn(2, 4, 6, 6, seed=12, scale=0.2)
    _, a = chariot(tau, eps_inv, 0.6, seed=3)
    _, b = chariot(tau, eps_inv, 0.6, seed=3)
    _, c = chariot(tau, eps_inv, 0.6, seed=4)
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)
    eps = gaussian_noise((4, 6, 6), 3, batch=2, device=eps_inv.device, dtype=eps_inv.dtype)
    torch.testing.assert_close(a, chariot(tau, eps_inv, 0.6, eps=eps)[1])


def test_generator_noise_is_drawn_on_cpu():
    tau, eps_inv = torch.tensor([120.0]), randn(1, 4, 6, 6, seed=13, scale=0.2)
    _, a = chariot(tau, eps_inv, 0.5, generator=torch.Generator().manual_seed(5))
    eps = torch.randn(1, 4, 6, 6, generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(a, mix_noise(eps_inv, eps, 0.5))


def test_noise_source_must_be_unique():
    tau, eps_inv = torch.tensor([120.0]), randn(1, 4, 4, 4)
    with pytest.raises(ValueError, match="noise source"):
        chariot(tau, eps_inv, 0.5)
    with pytest.raises(ValueError, match="noise source"):
        chariot(tau, eps_inv, 0.5, seed=1, generator=torch.Generator())
    with pytest.raises(ValueError, match="noise source"):
        chariot(tau, eps_inv, 0.5, eps=randn(1, 4, 4, 4), seed=1)


def test_half_precision_keeps_dtype_and_stays_finite():
    tau = torch.tensor([120.0], dtype=torch.float16)
    eps_inv = torch.zeros(1, 4, 8, 8, dtype=torch.float16)
    t_prime, eps_mix = chariot(tau, eps_inv, 0.5, seed=0)
    assert t_prime.dtype == torch.float16 and eps_mix.dtype == torch.float16
    assert torch.isfinite(eps_mix).all()
    torch.testing.assert_close(eps_mix.float().std(unbiased=False).item(), 0.5, rtol=2e-3, atol=0)


def test_config_round_trip_and_validation():
    config = ChariotConfig(energy_mode="var", delta=1e-5, s_max=0.8)
    assert ChariotConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    with pytest.raises(ValueError, match="energy_mod"):
        ChariotConfig.from_dict({"energy_mod": "var"})
    with pytest.raises(ValueError, match="energy_mode"):
        ChariotConfig(energy_mode="l2")
    with pytest.raises(ValueError, match="s_max"):
        ChariotConfig(s_max=1.2)
    with pytest.raises(ValueError, match="std_eps"):
        ChariotConfig(std_eps=0.0)


def test_config_drives_chariot():
    tau, eps_inv, eps = torch.tensor([100.0]), randn(1, 4, 8, 8, seed=14, scale=0.5), randn(1, 4, 8, 8, seed=15)
    t_prime, eps_mix = chariot(tau, eps_inv, 0.5, eps=eps, config=ChariotConfig(t_max=500.0, energy_mode="var"))
    torch.testing.assert_close(t_prime, torch.tensor([300.0]))
    torch.testing.assert_close(eps_mix, mix_noise(eps_inv, eps, 0.5, energy_mode="var"))

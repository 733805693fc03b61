"""The DDPM schedule at integer and continuous t, against SPEC.md §0.1's float64 table and Eq. 16."""

import pytest
import torch

from osd_core.schedule import NoiseSchedule, ScheduleConfig, per_sample

# t: (ᾱ_t, α_t, σ_t, w_t, 1/w_t, 1/α_t) from SPEC.md §0.1
TABLE = {
    1: (0.998296, 0.99915, 0.04128, 0.04131, 24.205, 1.0009),
    20: (0.981314, 0.99061, 0.13670, 0.13799, 7.247, 1.0095),
    100: (0.894223, 0.94563, 0.32523, 0.34393, 2.9076, 1.0575),
    120: (0.868684, 0.93203, 0.36238, 0.38880, 2.5720, 1.0729),
    200: (0.753692, 0.86815, 0.49629, 0.57167, 1.7493, 1.1519),
    250: (0.673793, 0.82085, 0.57115, 0.69580, 1.4372, 1.2183),
    500: (0.276333, 0.52567, 0.85069, 1.61828, 0.6179, 1.9023),
    750: (0.056170, 0.23700, 0.97151, 4.09916, 0.2440, 4.2194),
    980: (0.005844, 0.07644, 0.99707, 13.043, 0.0767, 13.081),
    999: (0.004660, 0.06826, 0.99767, 14.615, 0.0684, 14.649),
}


def _close(value, expected):
    decimals = len(f"{expected}".split(".")[1]) if "." in f"{expected}" else 0
    assert abs(value - expected) <= 0.6 * 10 ** (-decimals) + 1e-6, (value, expected)


@pytest.mark.parametrize("t", sorted(TABLE))
def test_table_values(t):
    sched = NoiseSchedule()
    abar, alpha, sigma, w, inv_w, inv_alpha = TABLE[t]
    tt = torch.tensor([float(t)])
    _close(sched.alphas_cumprod[t].item(), abar)
    _close(sched.alpha(tt).item(), alpha)
    _close(sched.sigma(tt).item(), sigma)
    _close(sched.w(tt).item(), w)
    _close(1 / sched.w(tt).item(), inv_w)
    _close(1 / sched.alpha(tt).item(), inv_alpha)


def test_interpolates_alpha_and_sigma_separately_and_linearly():
    sched = NoiseSchedule()
    a = sched.alphas_cumprod.sqrt()
    s = (1 - sched.alphas_cumprod).sqrt()
    t = torch.tensor([100.25, 998.5], dtype=torch.float64)
    for table, fn in ((a, sched.alpha), (s, sched.sigma)):
        expected = torch.stack([0.75 * table[100] + 0.25 * table[101], 0.5 * table[998] + 0.5 * table[999]])
        torch.testing.assert_close(fn(t), expected)


def test_continuous_at_integers_and_exact_at_999():
    sched = NoiseSchedule()
    eps = 1e-4
    t = torch.tensor([500.0 - eps, 500.0, 500.0 + eps], dtype=torch.float64)
    values = sched.alpha(t)
    assert (values[0] - values[1]).abs() < 1e-6 and (values[2] - values[1]).abs() < 1e-6
    assert sched.alpha(torch.tensor([999.0], dtype=torch.float64)).item() == pytest.approx(
        sched.alphas_cumprod[999].sqrt().item(), abs=1e-12)


def test_gradient_is_the_table_slope():
    sched = NoiseSchedule()
    t = torch.tensor([120.3], dtype=torch.float64, requires_grad=True)
    sched.alpha(t).sum().backward()
    a = sched.alphas_cumprod.sqrt()
    assert t.grad.item() == pytest.approx((a[121] - a[120]).item(), rel=1e-9)


def test_out_of_range_and_nan_are_refused():
    sched = NoiseSchedule()
    for bad in (-1.0, 1000.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="timestep"):
            sched.alpha(torch.tensor([bad]))


def test_follows_device_and_dtype():
    sched = NoiseSchedule()
    assert sched.alpha(torch.tensor([10.0])).dtype == torch.float32
    assert sched.sigma(torch.tensor([10.0], dtype=torch.float64)).dtype == torch.float64


def test_config_from_diffusers_and_validation():
    cfg = ScheduleConfig.from_diffusers({"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
                                         "num_train_timesteps": 1000, "clip_sample": True, "steps_offset": 1})
    assert cfg == ScheduleConfig()
    with pytest.raises(ValueError, match="v_prediction"):
        ScheduleConfig.from_diffusers({"prediction_type": "v_prediction"})
    with pytest.raises(ValueError, match="beta_schedule"):
        ScheduleConfig(beta_schedule="cosine")
    with pytest.raises(ValueError, match="beta_start"):
        ScheduleConfig(beta_start=0.5, beta_end=0.1)


def test_per_sample_broadcast():
    x = torch.zeros(3, 4, 5, 6)
    assert per_sample(torch.tensor([1.0, 2.0, 3.0]), x).shape == (3, 1, 1, 1)


def test_message_names_timestep_value_and_range():
    with pytest.raises(ValueError, match=r"`timestep` must be finite and in \[0, 999\]; got \[1000\.5\]"):
        NoiseSchedule().sigma(torch.tensor([3.0, 1000.5]))


@pytest.mark.parametrize("k", [0, 1, 119, 500, 997, 998])
def test_continuous_on_both_sides_of_each_integer_and_monotone(k):
    sched = NoiseSchedule()
    t = torch.tensor([k - 1e-7 if k else 0.0, float(k), k + 1e-7, k + 0.5, k + 1.0], dtype=torch.float64)
    a, s = sched.alpha(t), sched.sigma(t)
    # a step of 1e-7 moves α and σ by at most slope · 1e-7 < 1e-8 (the steepest σ slope is ~0.04 per step near 0)
    assert (a[:3] - a[1]).abs().max() < 1e-8 and (s[:3] - s[1]).abs().max() < 1e-8
    # α falls and σ rises with t, and the midpoint is the mean of the two table entries
    assert a[1] > a[3] > a[4] and s[1] < s[3] < s[4]
    assert a[3].item() == pytest.approx(0.5 * (a[1] + a[4]).item(), abs=1e-12)


def test_gradient_per_sample_including_the_last_interval():
    sched = NoiseSchedule()
    a = sched.alphas_cumprod.sqrt()
    s = (1 - sched.alphas_cumprod).sqrt()
    t = torch.tensor([0.0, 20.5, 998.7, 999.0], dtype=torch.float64, requires_grad=True)
    (grad_a,) = torch.autograd.grad(sched.alpha(t).sum(), t)
    (grad_s,) = torch.autograd.grad(sched.sigma(t).sum(), t)
    for i, k in enumerate([0, 20, 998, 998]):  # t = 999 lies on the last interval [998, 999]
        assert grad_a[i].item() == pytest.approx((a[k + 1] - a[k]).item(), rel=1e-9)
        assert grad_s[i].item() == pytest.approx((s[k + 1] - s[k]).item(), rel=1e-9)


def test_w_is_sigma_over_alpha_of_the_interpolants_and_half_precision_t_gives_float32():
    sched = NoiseSchedule()
    t = torch.tensor([333.25, 2.75])
    torch.testing.assert_close(sched.w(t), sched.sigma(t) / sched.alpha(t))
    assert sched.alpha(t.half()).dtype == torch.float32
    assert sched.alphas_cumprod.dtype == torch.float64 and sched.alphas_cumprod.shape == (1000,)


def test_linear_schedule_from_the_beta_formula():
    cfg = ScheduleConfig(beta_schedule="linear", num_train_timesteps=10, beta_start=0.001, beta_end=0.019)
    betas = [0.001 + 0.002 * i for i in range(10)]  # linspace(0.001, 0.019, 10)
    expected, prod = [], 1.0
    for beta in betas:
        prod *= 1 - beta
        expected.append(prod)
    torch.testing.assert_close(NoiseSchedule(cfg).alphas_cumprod, torch.tensor(expected, dtype=torch.float64))


def test_scaled_linear_first_and_last_betas():
    abar = NoiseSchedule().alphas_cumprod
    assert abar[0].item() == pytest.approx(1 - 0.00085, abs=1e-12)
    assert (1 - abar[999] / abar[998]).item() == pytest.approx(0.012, abs=1e-12)


def test_diffusers_config_edge_cases():
    with pytest.raises(ValueError, match="trained_betas"):
        ScheduleConfig.from_diffusers({"trained_betas": [0.1, 0.2]})
    assert ScheduleConfig.from_diffusers({"trained_betas": None, "prediction_type": "epsilon"}) == ScheduleConfig()
    with pytest.raises(ValueError, match=r"`num_train_timesteps` must be an integer of at least 2; got 1000\.0"):
        ScheduleConfig(num_train_timesteps=1000.0)

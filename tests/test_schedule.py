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
    torch.testing.assert_close(sched.alpha(t), torch.stack([0.75 * a[100] + 0.25 * a[101], 0.5 * a[998] + 0.5 * a[999]]))
    torch.testing.assert_close(sched.sigma(t), torch.stack([0.75 * s[100] + 0.25 * s[101], 0.5 * s[998] + 0.5 * s[999]]))


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

"""LDG grouping (Eq. 5-6) and DAS ranges (Eq. 7) of RCOD, golden values from the paper and SPEC.md §6.1-6.2."""

from __future__ import annotations

import json

import pytest
import torch

from osd_core.ldg import (
    LEVELS,
    LDGConfig,
    das_range,
    group_index,
    latent_similarity,
    level_timestep,
    level_timesteps,
    named_timestep,
    sample_das_timestep,
    scan_bounds,
)


def _t(*values: float) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32)


def test_paper_worked_example_maps_0621_to_neutral():
    # Paper, qualitative comparisons: M_L = 0.621 lies in [0.5, 0.75) and RCOD-Adap. picks t = 500.
    assert level_timestep(_t(0.621)).tolist() == [500.0]


@pytest.mark.parametrize(
    "m, t",
    [(0.75, 250), (0.9, 250), (0.999, 250), (1.0, 250),  # [0.75, 1.0] -> fidelity (1.0 clamped)
     (0.5, 500), (0.6, 500), (0.7499, 500),  # [0.5, 0.75) -> neutral
     (0.25, 750), (0.49, 750)],  # [0.25, 0.5) -> realism
)
def test_group_boundaries_default_config(m, t):
    assert level_timestep(_t(m)).item() == t


def test_clamp_outside_bounds():
    assert level_timestep(_t(-0.3, 1.2)).tolist() == [750.0, 250.0]
    assert group_index(_t(-0.3, 1.2)).tolist() == [0, 2]


def test_per_sample_in_a_batch():
    t = level_timestep(_t(0.9, 0.3, 0.6, 0.621))
    assert t.tolist() == [250.0, 750.0, 500.0, 500.0]
    assert t.dtype == torch.float32 and t.shape == (4,)


def test_general_config_bins():
    # n = 4, k = 200 over [0, 1]: bins of width 0.25, t = 200 * (4 - q).
    config = LDGConfig(k=200, n=4, m_min=0.0, m_max=1.0)
    assert level_timestep(_t(0.1, 0.3, 0.6, 0.8, 1.0), config).tolist() == [800.0, 600.0, 400.0, 200.0, 200.0]
    assert config.timesteps == (200, 400, 600, 800)


def test_cosine_identical_negated_orthogonal():
    g = torch.Generator().manual_seed(0)
    z = torch.randn(2, 4, 5, 3, generator=g)
    assert torch.allclose(latent_similarity(z, z), torch.ones(2), atol=1e-6)
    assert torch.allclose(latent_similarity(z, -z), -torch.ones(2), atol=1e-6)
    assert torch.allclose(latent_similarity(z, 3.0 * z), torch.ones(2), atol=1e-6)  # scale invariant
    a = torch.zeros(1, 4, 2, 2)
    b = torch.zeros(1, 4, 2, 2)
    a[0, 0, 0, 0], b[0, 1, 1, 1] = 1.0, 2.0
    assert latent_similarity(a, b).item() == 0.0


def test_cosine_is_per_sample_over_flattened_latent():
    z_lq = torch.tensor([[[[1.0, 0.0]]], [[[1.0, 1.0]]]])  # (2, 1, 1, 2)
    z_hq = torch.tensor([[[[1.0, 1.0]]], [[[1.0, 1.0]]]])
    sim = latent_similarity(z_lq, z_hq)
    assert sim.shape == (2,)
    assert torch.allclose(sim, torch.tensor([2**-0.5, 1.0]), atol=1e-6)


def test_cosine_fp16_inputs_give_fp32():
    z = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1)).half()
    assert latent_similarity(z, z).dtype == torch.float32


def test_cosine_shape_mismatch_refused():
    with pytest.raises(ValueError, match="z_lq"):
        latent_similarity(torch.zeros(1, 4, 8, 8), torch.zeros(1, 4, 8, 9))


def test_metric_validation():
    with pytest.raises(ValueError, match="1-D"):
        level_timestep(torch.tensor(0.5))
    with pytest.raises(ValueError, match="finite"):
        level_timestep(_t(float("nan")))


def test_levels_named():
    assert LEVELS == {"fidelity": 250, "neutral": 500, "realism": 750}
    assert named_timestep("realism") == 750
    assert level_timesteps(LDGConfig(k=200, n=4)) == {"fidelity": 200, "neutral": 400, "realism": 800}
    assert level_timesteps(LDGConfig(k=100, n=5)) == {"fidelity": 100, "neutral": 300, "realism": 500}
    with pytest.raises(ValueError, match="fidelity"):
        named_timestep("Realsim")


@pytest.mark.parametrize(
    "kwargs, match",
    [({"m_min": 1.0, "m_max": 0.25}, "m_min"), ({"m_min": 0.5, "m_max": 0.5}, "m_min"), ({"n": 0}, "`n`"),
     ({"k": 250, "n": 4}, "999"), ({"k": 2.5}, "`k`"), ({"m_max": float("inf")}, "m_max")],
)
def test_config_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        LDGConfig(**kwargs)


def test_config_round_trip_and_unknown_key():
    config = LDGConfig(k=200, n=4, m_min=0.1, m_max=0.95)
    assert LDGConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    with pytest.raises(ValueError, match="m_mni"):
        LDGConfig.from_dict({"m_mni": 0.2})


def test_das_ranges_golden():
    lo, hi = das_range(_t(250, 500, 750))
    assert lo.tolist() == [20, 250, 500]
    assert hi.tolist() == [500, 750, 980]


def test_das_range_empty_refused():
    with pytest.raises(ValueError, match="DAS range"):
        das_range(_t(5), LDGConfig(k=5, n=3))


def test_das_samples_inside_range_and_cover_both_ends():
    t = _t(250, 500, 750).repeat(4000)  # (12000,)
    t_r = sample_das_timestep(t, torch.Generator().manual_seed(0))
    assert t_r.dtype == torch.float32 and t_r.shape == t.shape
    assert torch.equal(t_r, t_r.round())
    for t_value, lo, hi in [(250, 20, 500), (500, 250, 750), (750, 500, 980)]:
        draws = t_r[t == t_value]
        assert draws.min().item() == lo and draws.max().item() == hi
        # uniform: the mean is close to the centre of the range (std of the mean ~ 2.2 here)
        assert abs(draws.mean().item() - (lo + hi) / 2) < 10


def test_das_deterministic_per_seed():
    t = _t(250, 500, 750, 500)
    a = sample_das_timestep(t, torch.Generator().manual_seed(7))
    b = sample_das_timestep(t, torch.Generator().manual_seed(7))
    c = sample_das_timestep(t, torch.Generator().manual_seed(8))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_das_generator_required():
    with pytest.raises(ValueError, match="generator"):
        sample_das_timestep(_t(250), None)


def test_scan_bounds():
    assert scan_bounds(_t(0.4, 0.9, 0.3)) == pytest.approx((0.3, 0.9))
    assert scan_bounds([_t(0.5), _t(), _t(0.2, 0.95)]) == pytest.approx((0.2, 0.95))
    with pytest.raises(ValueError, match="empty"):
        scan_bounds([])
    with pytest.raises(ValueError, match="empty"):
        scan_bounds(_t())
    with pytest.raises(ValueError, match="finite"):
        scan_bounds(_t(0.5, float("nan")))

"""VSD loss, regulariser loss and the VSD timestep samplers, checked against SPEC §2, §3.4 and §6.2."""

from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest
import torch

from osd_core.schedule import NoiseSchedule
from osd_core.tiny import tiny_components
from training.losses.vsd import (
    ScoreModels,
    VSDConfig,
    adapters_disabled,
    cfg_combine,
    das_timesteps,
    regulariser_diffusion_loss,
    sample_timesteps,
    tavsd_timesteps,
    vsd_loss,
)
from training.methods.sd_lora import add_unet_lora

SCHEDULE = NoiseSchedule()


class StubUNet(torch.nn.Module):
    """ε̂ = a·z_t + mean(c) + t/1000: simple enough to recompute by hand, different for every input."""

    def __init__(self, a: float) -> None:
        super().__init__()
        self.a = torch.nn.Parameter(torch.tensor(a))
        self.calls = []

    def forward(self, z, t, encoder_hidden_states):
        self.calls.append(t.clone())
        c = encoder_hidden_states.mean(dim=(1, 2)).view(-1, 1, 1, 1)
        return SimpleNamespace(sample=self.a * z + c + t.float().view(-1, 1, 1, 1) / 1000)


def _inputs(batch=3):
    g = torch.Generator().manual_seed(1)
    z = torch.randn(batch, 4, 6, 5, generator=g)
    c_pos, c_neg = torch.randn(batch, 7, 8, generator=g), torch.randn(batch, 7, 8, generator=g)
    return z, c_pos, c_neg


def _expected_g(z, t, cfg, c_pos, c_neg, teacher_a, fake_a, seed):
    noise = torch.randn(z.shape, generator=torch.Generator().manual_seed(seed))
    alpha = SCHEDULE.alpha(t).view(-1, 1, 1, 1)
    sigma = SCHEDULE.sigma(t).view(-1, 1, 1, 1)
    z_t = alpha * z + sigma * noise

    def eps(a, c):
        return a * z_t + c.mean(dim=(1, 2)).view(-1, 1, 1, 1) + t.float().view(-1, 1, 1, 1) / 1000

    e_real = eps(teacher_a, c_neg) + cfg.view(-1, 1, 1, 1) * (eps(teacher_a, c_pos) - eps(teacher_a, c_neg))
    x0_real = (z_t - sigma * e_real) / alpha
    x0_fake = (z_t - sigma * eps(fake_a, c_pos)) / alpha
    weight = (z - x0_real).abs().mean(dim=(1, 2, 3), keepdim=True)
    return (x0_fake - x0_real) / weight


def test_vsd_gradient_is_two_g_over_numel():
    z, c_pos, c_neg = _inputs()
    t = torch.tensor([20, 500, 979])
    cfg = torch.tensor([7.5, 1.0, 9.0])
    scores = ScoreModels(teacher=StubUNet(0.3), regulariser=StubUNet(0.7), schedule=SCHEDULE)
    z_hat = z.clone().requires_grad_(True)
    loss = vsd_loss(z_hat, t, cfg, c_pos, c_neg, scores, torch.Generator().manual_seed(5))
    loss.backward()
    g = _expected_g(z, t, cfg, c_pos, c_neg, 0.3, 0.7, seed=5)
    torch.testing.assert_close(z_hat.grad, 2 * g / z.numel(), rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(loss.detach(), g.square().mean(), rtol=1e-4, atol=1e-7)
    assert scores.teacher.a.grad is None and scores.regulariser.a.grad is None


def test_vsd_scalar_cfg_equals_per_sample_cfg_and_is_deterministic():
    z, c_pos, c_neg = _inputs()
    t = torch.tensor([100, 200, 300])
    scores = ScoreModels(teacher=StubUNet(0.3), regulariser=StubUNet(0.7), schedule=SCHEDULE)
    a = vsd_loss(z, t, 7.5, c_pos, c_neg, scores, torch.Generator().manual_seed(2))
    b = vsd_loss(z, t, torch.full((3,), 7.5), c_pos, c_neg, scores, torch.Generator().manual_seed(2))
    c = vsd_loss(z, t, 7.5, c_pos, c_neg, scores, torch.Generator().manual_seed(3))
    assert torch.equal(a, b) and not torch.equal(a, c)
    with pytest.raises(ValueError, match="cfg_scale"):
        vsd_loss(z, t, torch.ones(2), c_pos, c_neg, scores, torch.Generator())


def test_cfg_branch_combination_is_batched_uncond_then_cond():
    z, c_pos, c_neg = _inputs()
    t = torch.tensor([10, 20, 30])
    teacher = StubUNet(0.5)
    scores = ScoreModels(teacher=teacher, regulariser=StubUNet(0.1), schedule=SCHEDULE)
    cfg = torch.tensor([0.0, 1.0, 7.5])
    e_real = scores.real_eps(z, t, c_pos, c_neg, cfg)
    e_u, e_c = teacher(z, t, c_neg).sample, teacher(z, t, c_pos).sample
    torch.testing.assert_close(e_real, e_u + cfg.view(-1, 1, 1, 1) * (e_c - e_u))
    torch.testing.assert_close(e_real[0], e_u[0])  # s = 0: unconditional
    torch.testing.assert_close(e_real[1], e_c[1])  # s = 1: conditional
    assert teacher.calls[0].shape == (6,)  # one batched call over [c_neg, c_pos]
    torch.testing.assert_close(cfg_combine(e_u, e_c, cfg), e_real)


def _tiny_unet_with_lora():
    unet = tiny_components(0).unet
    base = copy.deepcopy(unet)
    params = add_unet_lora(unet, rank=2, alpha=8.0, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        for p in params:  # non-zero B, so the LoRA changes the output
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    for p in params:
        p.requires_grad_(False)  # as in another phase of the trainer
    return base, unet, params


def test_shared_teacher_equals_unet_with_adapters_disabled():
    base, unet, params = _tiny_unet_with_lora()
    scores = ScoreModels.shared(unet, schedule=SCHEDULE)
    g = torch.Generator().manual_seed(0)
    z_t, c = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 77, 32, generator=g)
    t = torch.tensor([100, 700])
    with torch.no_grad():
        teacher = scores.real_eps(z_t, t, c, torch.zeros_like(c), torch.ones(2))  # cfg 1: the conditional branch
        reference = base(z_t, t, encoder_hidden_states=c).sample
        fake = scores.fake_eps(z_t, t, c)
    torch.testing.assert_close(teacher, reference, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(fake, reference, atol=1e-4)  # adapters are back on afterwards
    assert not any(p.requires_grad for p in params)  # peft's toggle must not leak requires_grad
    assert scores.is_shared and len(scores.regulariser_parameters()) == len(params)
    with torch.no_grad(), adapters_disabled(unet):
        torch.testing.assert_close(unet(z_t, t, encoder_hidden_states=c).sample, reference, rtol=1e-5, atol=1e-5)


def test_shared_teacher_needs_lora():
    scores = ScoreModels.shared(tiny_components(0).unet, schedule=SCHEDULE)
    z, c = torch.zeros(1, 4, 8, 8), torch.zeros(1, 77, 32)
    with pytest.raises(ValueError, match="no LoRA adapters"):
        scores.real_eps(z, torch.tensor([5]), c, c, torch.ones(1))


def test_regulariser_loss_trains_only_the_regulariser_on_its_timesteps():
    z, c_pos, _ = _inputs(batch=64)
    regulariser = StubUNet(0.7)
    scores = ScoreModels(teacher=StubUNet(0.3), regulariser=regulariser, schedule=SCHEDULE)
    z_hat = z.clone().requires_grad_(True)
    loss = regulariser_diffusion_loss(z_hat, c_pos, scores, torch.Generator().manual_seed(0))
    loss.backward()
    assert z_hat.grad is None and regulariser.a.grad is not None and scores.teacher.a.grad is None
    t = regulariser.calls[-1]
    assert t.min() >= 0 and t.max() <= 999 and t.dtype == torch.int64
    narrow = VSDConfig(reg_t_min=1, reg_t_max=2)
    regulariser_diffusion_loss(z, c_pos, scores, torch.Generator(), config=narrow)
    assert bool((regulariser.calls[-1] == 1).all())


def test_uniform_sampler_covers_20_to_979_inclusive():
    t = sample_timesteps(VSDConfig(), 40000, torch.Generator().manual_seed(0))
    assert t.dtype == torch.int64 and t.shape == (40000,)
    assert int(t.min()) == 20 and int(t.max()) == 979 and t.unique().numel() == 960
    again = sample_timesteps(VSDConfig(), 40000, torch.Generator().manual_seed(0))
    assert torch.equal(t, again)
    with pytest.raises(ValueError, match="vsd.t_min"):
        VSDConfig(t_min=500, t_max=400)


def test_vsd_config_round_trip():
    from training.schema import build, to_dict

    config = VSDConfig(t_min=2, t_max=500, reg_t_min=1)
    assert build(VSDConfig, to_dict(config), "vsd") == config


def test_tavsd_mapping_and_cfg():
    t_s = torch.tensor([1, 21, 41, 500, 978, 999])
    t_v, cfg = tavsd_timesteps(t_s)
    assert t_v.tolist() == [0, 10, 20, 250, 489, 499] and t_v.dtype == torch.int64
    torch.testing.assert_close(cfg, 7.5 + t_v.float() / 200)
    t_v, cfg = tavsd_timesteps(torch.tensor([100]), lam=0.8, gamma=30.0, cfg_base=5.0, cfg_slope=0.0)
    assert t_v.tolist() == [110] and cfg.tolist() == [5.0]
    with pytest.raises(ValueError, match="TAVSD"):
        tavsd_timesteps(torch.tensor([999]), lam=1.0, gamma=5.0)


@pytest.mark.parametrize("t, low, high", [(250, 20, 500), (500, 250, 750), (750, 500, 980)])
def test_das_ranges_are_inclusive(t, low, high):
    draws = das_timesteps(torch.full((20000,), float(t)), torch.Generator().manual_seed(t))
    assert draws.dtype == torch.int64
    assert int(draws.min()) == low and int(draws.max()) == high
    assert draws.unique().numel() == high - low + 1

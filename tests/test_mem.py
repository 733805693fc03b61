"""MEM, the metric estimation module of RCOD (SPEC.md §6.4 [RECON]): features, MLP shape, ranges and LDG hand-off."""

from __future__ import annotations

import json

import pytest
import torch

from osd_core.ldg import LDGConfig
from osd_core.mem import MEM, MEMConfig, mem_loss


def _inputs(batch: int = 3, seed: int = 0, token_dim: int = 1024):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(batch, 4, 6, 5, generator=g)  # (B, 4, h, w)
    tokens = torch.randn(batch, 7, token_dim, generator=g)  # (B, N, token_dim)
    return z, tokens


def _mem(seed: int = 0, **kwargs) -> MEM:
    mem = MEM(MEMConfig(**kwargs))
    mem.initialize_weights(torch.Generator().manual_seed(seed))
    return mem


def test_default_architecture_is_1032_512_256_1():
    mem = MEM(MEMConfig())
    linears = [layer for layer in mem.mlp if isinstance(layer, torch.nn.Linear)]
    assert [(lin.in_features, lin.out_features) for lin in linears] == [(1032, 512), (512, 256), (256, 1)]
    assert sum(isinstance(layer, torch.nn.SiLU) for layer in mem.mlp) == 2
    assert sum(p.numel() for p in mem.parameters()) == 1032 * 512 + 512 + 512 * 256 + 256 + 256 + 1


def test_features_are_gap_gsp_token_mean():
    z = torch.zeros(1, 4, 2, 2)
    z[0, 0] = torch.tensor([[1.0, 3.0], [1.0, 3.0]])  # channel 0: mean 2, population std 1
    z[0, 1] = 5.0  # channel 1: mean 5, std 0
    tokens = torch.zeros(1, 2, 1024)
    tokens[0, 0, 0], tokens[0, 1, 0] = 2.0, 4.0  # mean over tokens: 3 in dim 0
    f = MEM(MEMConfig()).features(z, tokens)
    assert f.shape == (1, 1032)
    assert f[0, :4].tolist() == [2.0, 5.0, 0.0, 0.0]
    assert f[0, 4:8].tolist() == [1.0, 0.0, 0.0, 0.0]
    assert f[0, 8].item() == 3.0 and f[0, 9:].abs().sum().item() == 0.0


def test_output_range_and_shape():
    z, tokens = _inputs(batch=5)
    m = _mem()(z * 50.0, tokens * 50.0)  # large inputs saturate but stay inside the sigmoid's range
    assert m.shape == (5,)
    assert bool(((m >= 0) & (m <= 1)).all())
    m = _mem()(z, tokens)
    assert bool(((m > 0) & (m < 1)).all())


def test_batch_item_equals_single():
    z, tokens = _inputs(batch=3)
    mem = _mem()
    batch = mem(z, tokens)
    singles = torch.cat([mem(z[i : i + 1], tokens[i : i + 1]) for i in range(3)])
    assert torch.allclose(batch, singles, atol=1e-6)
    assert not torch.allclose(batch[0], batch[1])


def test_seeded_init_is_deterministic():
    z, tokens = _inputs()
    assert torch.equal(_mem(seed=1)(z, tokens), _mem(seed=1)(z, tokens))
    assert not torch.equal(_mem(seed=1)(z, tokens), _mem(seed=2)(z, tokens))


def test_config_round_trip_and_unknown_key():
    config = MEMConfig(latent_channels=16, token_dim=1280, hidden=(64, 32, 16))
    restored = MEMConfig.from_dict(json.loads(json.dumps(config.to_dict())))
    assert restored == config and restored.hidden == (64, 32, 16)
    with pytest.raises(ValueError, match="hiden"):
        MEMConfig.from_dict({"hiden": [8]})


@pytest.mark.parametrize(
    "kwargs", [{"latent_channels": 0}, {"token_dim": -1}, {"hidden": ()}, {"hidden": (8, 0)}, {"hidden": 8}]
)
def test_config_validation(kwargs):
    with pytest.raises(ValueError):
        MEMConfig(**kwargs)


def test_gradient_reaches_every_parameter():
    z, tokens = _inputs()
    mem = _mem()
    loss = mem_loss(mem(z, tokens), torch.tensor([0.2, 0.6, 0.9]))
    loss.backward()
    for name, p in mem.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_mem_loss_is_l1():
    pred, target = torch.tensor([0.2, 0.7]), torch.tensor([0.5, 0.6])
    assert mem_loss(pred, target).item() == pytest.approx((0.3 + 0.1) / 2)
    with pytest.raises(ValueError, match="pred"):
        mem_loss(pred, target[:1])


def test_estimate_timestep_values_are_levels():
    z, tokens = _inputs(batch=8)
    t = _mem()(z, tokens)
    assert t.shape == (8,)
    t = _mem().estimate_timestep(z, tokens, LDGConfig())
    assert t.dtype == torch.float32 and set(t.tolist()) <= {250.0, 500.0, 750.0}


def test_estimate_timestep_per_sample_follows_ldg():
    # A zero MLP with a final bias b gives M̂ = sigmoid(b); pick b inside each LDG bin of the default config.
    mem = MEM(MEMConfig(token_dim=0, hidden=(4,)))
    z = torch.randn(2, 4, 3, 3, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        for p in mem.parameters():
            p.zero_()
        for m_hat, t in {0.9: 250.0, 0.6: 500.0, 0.3: 750.0}.items():
            mem.mlp[-1].bias.fill_(torch.logit(torch.tensor(m_hat)).item())
            assert mem.estimate_timestep(z, None).tolist() == [t, t]
        # per sample: route GAP channel 0 through one hidden unit, so two latents land in different bins
        mem.mlp[-1].bias.fill_(0.0)
        mem.mlp[0].weight[0, 0] = 1.0
        mem.mlp[-1].weight[0, 0] = 1.0
    z2 = torch.zeros(2, 4, 3, 3)
    z2[0, 0], z2[1, 0] = 5.0, -5.0  # SiLU(5) ~ 4.97 -> M̂ ~ 0.993; SiLU(-5) ~ -0.034 -> M̂ ~ 0.49
    assert mem.estimate_timestep(z2, None).tolist() == [250.0, 750.0]


def test_latent_only_mem_and_token_errors():
    z, tokens = _inputs()
    latent_only = MEM(MEMConfig(token_dim=0))
    assert latent_only(z, None).shape == (3,)
    with pytest.raises(ValueError, match="token_dim=0"):
        latent_only(z, tokens)
    with pytest.raises(ValueError, match="tokens"):
        _mem()(z, None)
    with pytest.raises(ValueError, match="1024"):
        _mem()(z, tokens[..., :512])
    with pytest.raises(ValueError, match="z_lq"):
        _mem()(z[:, :3], tokens)


def test_follows_module_dtype():
    z, tokens = _inputs()
    mem = _mem().double()
    assert mem(z, tokens).dtype == torch.float64

"""TADSR's Time-Aware VAE Encoder (SPEC.md §3.1; CHECKPOINTS.md §3 for the official key names and shapes)."""

from __future__ import annotations

import json

import pytest
import torch
from diffusers import AutoencoderKL
from diffusers.models.autoencoders.vae import Encoder
from diffusers.models.embeddings import TimestepEmbedding, Timesteps
from diffusers.models.resnet import Downsample2D, ResnetBlock2D
from diffusers.models.unets.unet_2d_blocks import UNetMidBlock2D
from torch import nn

from osd_core.tae import TAEConfig, TimeAwareEncoder

SMALL = dict(block_out_channels=(32, 32, 64, 64), layers_per_block=2, norm_num_groups=8)
SD = dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2, norm_num_groups=32)
SD_RESNET_CHANNELS = (128, 128, 256, 256, 512, 512, 512, 512, 512, 512)  # SPEC §3.1


def make_vae(seed: int = 0, **overrides) -> AutoencoderKL:
    arch = {**SMALL, **overrides}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)  # diffusers constructors draw from the global RNG; fork_rng restores it
        vae = AutoencoderKL(
            in_channels=3, out_channels=3, latent_channels=4, down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4, **arch,
        )
    return vae.eval()


def image(batch: int = 2, size: int = 32, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(batch, 3, size, size, generator=g) * 2 - 1  # (B, 3, H, W) in [-1, 1]


def plain_moments(vae: AutoencoderKL, x: torch.Tensor) -> torch.Tensor:
    return vae.quant_conv(vae.encoder(x))  # (B, 8, H/8, W/8)


@torch.no_grad()
def randomize_time_layers(tae: TimeAwareEncoder, seed: int = 1, std: float = 0.05) -> None:
    g = torch.Generator().manual_seed(seed)
    for _, p in tae.named_time_parameters():
        p.copy_(torch.randn(p.shape, generator=g) * std)


class OfficialLayoutTAE(nn.Module):
    """Independent reference: the released TimeAwareEncoder's layout, built from diffusers' own time-aware resnets
    (ResnetBlock2D with temb_channels=256, time_embedding_norm="scale_shift"), so its state-dict keys are the
    official ones without the VAE's leading "encoder."."""

    def __init__(self, block_out_channels, layers_per_block, norm_num_groups) -> None:
        super().__init__()
        self.time_proj = Timesteps(128, True, 0)
        self.time_embedding = TimestepEmbedding(128, 256)
        self.conv_in = nn.Conv2d(3, block_out_channels[0], 3, padding=1)
        self.down_blocks = nn.ModuleList()
        out_ch = block_out_channels[0]
        for i, width in enumerate(block_out_channels):
            block = nn.Module()
            block.resnets = nn.ModuleList([
                ResnetBlock2D(in_channels=out_ch if j == 0 else width, out_channels=width, temb_channels=256,
                              eps=1e-6, groups=norm_num_groups, time_embedding_norm="scale_shift")
                for j in range(layers_per_block)
            ])
            block.downsamplers = None
            if i < len(block_out_channels) - 1:
                block.downsamplers = nn.ModuleList([Downsample2D(width, use_conv=True, padding=0, name="op")])
            self.down_blocks.append(block)
            out_ch = width
        last = block_out_channels[-1]
        # The release keeps the mid attention's GroupNorm (SPEC §3.1), which stock diffusers drops for "scale_shift"
        # mid blocks; so take the stock encoder mid block and give it time-aware resnets.
        self.mid_block = UNetMidBlock2D(
            in_channels=last, resnet_eps=1e-6, resnet_act_fn="silu", output_scale_factor=1, attention_head_dim=last,
            resnet_groups=norm_num_groups, temb_channels=None,
        )
        self.mid_block.resnets = nn.ModuleList([
            ResnetBlock2D(in_channels=last, out_channels=last, temb_channels=256, eps=1e-6, groups=norm_num_groups,
                          time_embedding_norm="scale_shift")
            for _ in range(2)
        ])
        self.conv_norm_out = nn.GroupNorm(norm_num_groups, last, eps=1e-6)
        self.conv_act = nn.SiLU()
        self.conv_out = nn.Conv2d(last, 8, 3, padding=1)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        emb = self.time_embedding(self.time_proj(t))
        h = self.conv_in(x)
        for block in self.down_blocks:
            for resnet in block.resnets:
                h = resnet(h, emb)
            for downsampler in block.downsamplers or ():
                h = downsampler(h)
        h = self.mid_block(h, emb)
        return self.conv_out(self.conv_act(self.conv_norm_out(h)))


# --- config ----------------------------------------------------------------------------------------------------


def test_config_defaults_round_trip_and_json():
    config = TAEConfig(time_proj_channels=64, downscale_freq_shift=1 / 4, zero_init=False)
    d = json.loads(json.dumps(config.to_dict()))
    assert TAEConfig.from_dict(d) == config
    assert TAEConfig().to_dict() == dict(
        time_proj_channels=128, temb_channels=256, flip_sin_to_cos=True, downscale_freq_shift=0.0, zero_init=True,
    )
    assert isinstance(TAEConfig(downscale_freq_shift=0).downscale_freq_shift, float)


@pytest.mark.parametrize("bad, match", [
    ({"temb_chanels": 256}, "unknown keys"), ({"time_proj_channels": 127}, "time_proj_channels"),
    ({"temb_channels": 0}, "temb_channels"), ({"zero_init": 1}, "zero_init"),
    ({"downscale_freq_shift": 1.0}, "downscale_freq_shift"), ({"flip_sin_to_cos": "yes"}, "flip_sin_to_cos"),
])
def test_config_rejects_typos_and_bad_values(bad, match):
    with pytest.raises(ValueError, match=match):
        TAEConfig.from_dict(bad)


def test_module_keeps_config_and_rebuilds_from_dict():
    vae = make_vae()
    config = TAEConfig(zero_init=False)
    tae = TimeAwareEncoder.from_vae(vae, config)
    rebuilt = TimeAwareEncoder.from_vae(make_vae(), TAEConfig.from_dict(tae.config.to_dict()))
    rebuilt.load_state_dict(tae.state_dict(), strict=True)
    x, t = image(), torch.tensor([250.0, 750.0])
    with torch.no_grad():
        assert torch.equal(rebuilt(x, t), tae(x, t))


# --- structure -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("layers, expected", [(2, 10), (1, 6)])
def test_one_projection_per_encoder_resnet(layers, expected):
    vae = make_vae(layers_per_block=layers)
    tae = TimeAwareEncoder.from_vae(vae)
    resnets = [m for m in vae.encoder.modules() if type(m).__name__ == "ResnetBlock2D"]
    assert len(tae.time_emb_proj) == len(resnets) == expected  # 4 blocks x layers + 2 mid
    widths = [tae.encoder.get_submodule(p).conv2.out_channels for p in tae.resnet_paths]
    assert [lin.out_features for lin in tae.time_emb_proj.values()] == [2 * w for w in widths]
    assert all(lin.in_features == 256 for lin in tae.time_emb_proj.values())


def test_full_sd_encoder_new_parameter_count_and_official_shapes():
    with torch.device("meta"):
        encoder = Encoder(in_channels=3, out_channels=4, down_block_types=("DownEncoderBlock2D",) * 4, **SD)
        tae = TimeAwareEncoder(encoder, nn.Conv2d(8, 8, 1), TAEConfig())
    # Hand count from the layer shapes (SPEC §3.1): Linear(i, o) has i*o + o parameters.
    embedding = (128 * 256 + 256) + (256 * 256 + 256)  # 98,816 ≈ 0.10M
    projections = sum(256 * 2 * c + 2 * c for c in SD_RESNET_CHANNELS)  # 1,973,760 ≈ 1.97M
    assert embedding == 98_816 and projections == 1_973_760
    assert sum(p.numel() for p in tae.time_embedding.parameters()) == embedding
    assert sum(p.numel() for p in tae.time_emb_proj.parameters()) == projections
    assert sum(p.numel() for p in tae.time_parameters()) == 2_072_576
    assert round(2_072_576 / 1e6, 2) == 2.07

    shapes = {tae.official_key_map()[name]: tuple(p.shape) for name, p in tae.named_time_parameters()}
    assert len(shapes) == 24  # CHECKPOINTS.md §3: state_dict_vae_time holds 24 tensors
    assert shapes["encoder.time_embedding.linear_1.weight"] == (256, 128)
    assert shapes["encoder.time_embedding.linear_2.weight"] == (256, 256)
    assert shapes["encoder.down_blocks.0.resnets.0.time_emb_proj.weight"] == (256, 256)
    assert shapes["encoder.down_blocks.2.resnets.1.time_emb_proj.weight"] == (1024, 256)
    assert shapes["encoder.mid_block.resnets.1.time_emb_proj.bias"] == (1024,)


def test_sd_encoder_weights_load_one_to_one_and_vae_is_not_mutated():
    vae, source = make_vae(seed=0), make_vae(seed=5)
    vae_keys = set(vae.state_dict())
    tae = TimeAwareEncoder.from_vae(vae)
    assert set(vae.state_dict()) == vae_keys  # wrapping adds nothing to the VAE's own modules
    assert set(tae.encoder.state_dict()) == set(source.encoder.state_dict())
    non_time = {k for k in tae.state_dict() if "time" not in k}
    expected = {f"encoder.{k}" for k in source.encoder.state_dict()} | {f"quant_conv.{k}" for k in
                                                                         source.quant_conv.state_dict()}
    assert non_time == expected
    tae.encoder.load_state_dict(source.encoder.state_dict(), strict=True)
    tae.quant_conv.load_state_dict(source.quant_conv.state_dict(), strict=True)
    x = image()
    with torch.no_grad():
        assert torch.equal(tae(x, 500.0), plain_moments(source, x))


def test_time_parameter_split():
    tae = TimeAwareEncoder.from_vae(make_vae())
    names = [n for n, _ in tae.named_time_parameters()]
    assert len(names) == 4 + 2 * 10 and all("time" in n for n in names)
    time_ids = {id(p) for p in tae.time_parameters()}
    rest = [n for n, p in tae.named_parameters() if id(p) not in time_ids]
    assert rest and not any("time" in n for n in rest)
    assert all(n.startswith(("encoder.", "quant_conv.")) for n in rest)


# --- forward ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("t", [1, 500.0, 999, torch.tensor(999.0), torch.tensor([1.0, 999.0]),
                               torch.tensor([500.0])])
def test_zero_init_equals_plain_sd_encoder(t):
    vae = make_vae()
    tae = TimeAwareEncoder.from_vae(vae)
    x = image(batch=2)
    with torch.no_grad():
        out = tae(x, t)  # (2, 8, 4, 4)
        assert out.shape == (2, 8, 4, 4)
        assert torch.equal(out, plain_moments(vae, x))


def test_zero_init_equals_plain_encoder_with_mixed_batch_of_three():
    vae = make_vae()
    tae = TimeAwareEncoder.from_vae(vae)
    x = image(batch=3, size=48)
    with torch.no_grad():
        assert torch.equal(tae(x, torch.tensor([1.0, 500.0, 999.0])), plain_moments(vae, x))


def test_matches_diffusers_scale_shift_resnets_in_official_layout():
    """Golden: our resnet recomputation equals diffusers' own scale_shift ResnetBlock2D path, wired as released."""
    vae = make_vae()
    tae = TimeAwareEncoder.from_vae(vae, TAEConfig(zero_init=False))
    randomize_time_layers(tae)
    reference = OfficialLayoutTAE(**SMALL)
    official = {tae.official_key_map()[k]: v for k, v in tae.state_dict().items() if not k.startswith("quant_conv")}
    reference.load_state_dict({k.removeprefix("encoder."): v for k, v in official.items()}, strict=True)
    x, t = image(batch=3), torch.tensor([1.0, 500.0, 999.0])
    with torch.no_grad():
        expected = tae.quant_conv(reference.eval()(x, t))
        assert torch.allclose(tae(x, t), expected, atol=1e-6, rtol=0)


def test_nonzero_time_layers_make_output_depend_on_t_per_sample():
    vae = make_vae()
    tae = TimeAwareEncoder.from_vae(vae)
    randomize_time_layers(tae)
    x = image(batch=1).expand(3, -1, -1, -1)
    t = torch.tensor([1.0, 500.0, 999.0])
    with torch.no_grad():
        out = tae(x, t)
        plain = plain_moments(vae, x)
        singles = torch.cat([tae(x[i:i + 1], t[i]) for i in range(3)])
    assert not torch.allclose(out[0], out[1], atol=1e-4) and not torch.allclose(out[1], out[2], atol=1e-4)
    assert not torch.allclose(out, plain, atol=1e-4)
    assert torch.allclose(out, singles, atol=1e-6)


def test_gradients_reach_time_parameters():
    tae = TimeAwareEncoder.from_vae(make_vae()).train()
    tae(image(size=16), torch.tensor([100.0, 600.0])).square().mean().backward()
    for name, p in tae.time_emb_proj.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    # At step 0 the projections are zero, so nothing yet flows back into the embedding MLP.
    assert all(p.grad is not None and p.grad.abs().sum() == 0 for p in tae.time_embedding.parameters())

    tae.zero_grad()
    randomize_time_layers(tae)
    tae(image(size=16), torch.tensor([100.0, 600.0])).square().mean().backward()
    assert all(p.grad.abs().sum() > 0 for p in tae.time_parameters())


def test_gradient_checkpointing_gives_same_output_and_grads():
    tae = TimeAwareEncoder.from_vae(make_vae()).train()
    randomize_time_layers(tae)
    x, t = image(size=16), torch.tensor([100.0, 600.0])
    out = tae(x, t)
    out.square().mean().backward()
    grads = [p.grad.clone() for p in tae.time_parameters()]
    tae.zero_grad()
    tae.encoder.gradient_checkpointing = True
    out_ckpt = tae(x, t)
    out_ckpt.square().mean().backward()
    assert torch.allclose(out_ckpt, out, atol=1e-6)
    assert all(torch.allclose(p.grad, g, atol=1e-6) for p, g in zip(tae.time_parameters(), grads))


def test_new_layers_follow_encoder_dtype():
    vae = make_vae().to(torch.float64)
    tae = TimeAwareEncoder.from_vae(vae)
    assert all(p.dtype == torch.float64 for p in tae.time_parameters())
    x = image().double()
    with torch.no_grad():
        out = tae(x, 500)
    assert out.dtype == torch.float64 and torch.equal(out, plain_moments(vae, x))


def test_initialize_weights_is_seeded_and_zero_init_is_exact():
    tae = TimeAwareEncoder.from_vae(make_vae(), TAEConfig(zero_init=False))
    tae.initialize_weights(torch.Generator().manual_seed(3))
    first = [p.clone() for p in tae.time_parameters()]
    tae.initialize_weights(torch.Generator().manual_seed(3))
    assert all(torch.equal(a, b) for a, b in zip(first, tae.time_parameters()))
    assert all(p.abs().sum() > 0 for p in tae.time_parameters())
    bound = 1 / 16  # U(±1/√fan_in), fan_in = temb_channels = 256
    assert all(p.abs().max() <= bound for p in tae.time_emb_proj.parameters())

    zero = TimeAwareEncoder.from_vae(make_vae())
    assert all(p.abs().sum() == 0 for p in zero.time_emb_proj.parameters())
    assert all(p.abs().sum() > 0 for p in zero.time_embedding.parameters())


@pytest.mark.parametrize("t", [torch.tensor([1.0, 2.0, 3.0]), torch.ones(2, 1, 1), float("nan"), torch.tensor(True)])
def test_bad_timesteps_are_rejected(t):
    tae = TimeAwareEncoder.from_vae(make_vae())
    with pytest.raises(ValueError, match="`t`"):
        tae(image(batch=2), t)


def test_rejects_non_sd_encoder():
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        vae = AutoencoderKL(
            in_channels=3, out_channels=3, latent_channels=4, down_block_types=("AttnDownEncoderBlock2D",) * 2,
            up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(32, 32), norm_num_groups=8,
        )
    with pytest.raises(ValueError, match="DownEncoderBlock2D"):
        TimeAwareEncoder.from_vae(vae)


# --- official checkpoint keys --------------------------------------------------------------------------------


def test_official_time_state_dict_round_trip_and_strictness():
    source = TimeAwareEncoder.from_vae(make_vae())
    randomize_time_layers(source, seed=7)
    key_map = source.official_key_map()
    official = {key_map[n]: p.detach().clone() for n, p in source.named_time_parameters()}
    assert "encoder.mid_block.resnets.1.time_emb_proj.weight" in official
    assert "encoder.down_blocks.3.resnets.0.time_emb_proj.bias" in official
    assert all(key_map[k] == k for k in source.state_dict() if "time" not in k)

    target = TimeAwareEncoder.from_vae(make_vae())
    target.load_official_time_state_dict(official)
    assert all(torch.equal(a, b) for a, b in zip(target.time_parameters(), source.time_parameters()))

    missing = dict(official)
    missing.pop("encoder.mid_block.resnets.0.time_emb_proj.bias")
    with pytest.raises(KeyError, match="missing"):
        target.load_official_time_state_dict(missing)
    with pytest.raises(KeyError, match="unexpected"):
        target.load_official_time_state_dict({**official, "encoder.time_embedding.linear_3.weight": torch.ones(1)})

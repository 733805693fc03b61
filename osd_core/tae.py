"""TADSR's Time-Aware VAE Encoder (TAE): SD's KL encoder with a timestep scale/shift in every resnet (SPEC.md §3.1).

Paper: "Time-Aware One Step Diffusion Network for Real-World Image Super-Resolution" (TADSR, arXiv 2508.16557),
§3.3, Eq. 4 (z_L = E_θ(x_L, t_s)); layer shapes from the released code (zty557/TADSR@b0eaa30, vendored diffusers
``models/autoencoders/vae.py`` TimeAwareEncoder). For t_s (B,) and x_L (B, 3, H, W) in [-1, 1]:

    e        = Timesteps(128, flip_sin_to_cos=True, shift=0)(t_s)      (B, 128) sinusoid, always float32
    emb      = Linear(256 → 256)(SiLU(Linear(128 → 256)(e)))            (B, 256) "time_embedding"
    in each of the encoder's ResnetBlock2D (4 down blocks × 2 + 2 mid = 10 for SD), C = its output channels:
    h        = conv1(SiLU(GN1(x)))
    (s, b)   = chunk(Linear_C(256 → 2C)(SiLU(emb)), 2)                  "time_emb_proj", (B, C) each
    h        = GN2(h) · (1 + s) + b
    out      = (shortcut(x) + conv2(dropout(SiLU(h)))) / output_scale_factor

conv_in, the downsamplers, the mid-block attention, conv_norm_out, conv_out and quant_conv are the stock SD modules,
run unchanged; the output is the moments (B, 8, H/8, W/8) of the plain ``quant_conv(encoder(x))``, so a tiled encode
can call ``lambda tile: tae(tile, t)``. ``t`` may be continuous (float); the release feeds integers.

Reconstruction ([RECON], SPEC §3.1): the release loads the time layers from a prepared ``time_vae/`` folder, so
their initialisation is unknown. We zero every ``time_emb_proj`` (weight and bias), so a fresh TAE equals the SD
encoder exactly at every t, and give ``time_embedding`` PyTorch's default Linear initialisation.

The module wraps (does not copy) a diffusers ``AutoencoderKL``'s ``encoder`` and ``quant_conv``: their parameter
names stay ``encoder.*`` / ``quant_conv.*``, so SD-VAE weights and VAE-encoder LoRA names apply one to one, and the
wrapped modules themselves gain no parameters (``vae.state_dict()`` is unchanged). New parameters (all contain
"time"; trained fully, no LoRA, SPEC §3.1):

    ours                                         official TimeAwareAutoencoderKL key (``state_dict_vae_time``)
    time_embedding.linear_{1,2}.{weight,bias}    encoder.time_embedding.linear_{1,2}.{weight,bias}
    time_emb_proj.down_blocks_0_resnets_0.weight encoder.down_blocks.0.resnets.0.time_emb_proj.weight
    time_emb_proj.mid_block_resnets_1.bias       encoder.mid_block.resnets.1.time_emb_proj.bias   (and so on)
    encoder.* / quant_conv.* (incl. LoRA keys)   identical

:meth:`TimeAwareEncoder.official_key_map` gives the whole map, :meth:`load_official_time_state_dict` loads the 24
official time tensors strictly. For the SD encoder the new layers hold 2,072,576 parameters: 98,816 in the embedding
MLP and 1,973,760 = 514 · (2·128 + 2·256 + 6·512) in the ten projections (SPEC's ≈2.07M).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterator

import torch
import torch.nn.functional as F
from diffusers.models.embeddings import TimestepEmbedding, Timesteps
from diffusers.models.resnet import ResnetBlock2D
from torch import nn
from torch.utils.checkpoint import checkpoint
from .config_dict import DictConfig

OFFICIAL_PREFIX = "encoder."  # the released TimeAwareEncoder keeps its time layers inside ``vae.encoder``


@dataclass(frozen=True)
class TAEConfig(DictConfig):
    """Sinusoid width, embedding width and sinusoid flags of the TAE time path, and the [RECON] zero init."""

    time_proj_channels: int = 128  # max(128, block_out_channels[0]) in the release
    temb_channels: int = 256
    flip_sin_to_cos: bool = True
    downscale_freq_shift: float = 0.0
    zero_init: bool = True  # [RECON] time_emb_proj starts at zero: the TAE equals the SD encoder

    def __post_init__(self) -> None:
        for name in ("time_proj_channels", "temb_channels"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 2 or value % 2:
                raise ValueError(f"`{name}` must be an even integer >= 2; got {value!r}. TADSR uses 128 and 256.")
        for name in ("flip_sin_to_cos", "zero_init"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"`{name}` must be a bool; got {getattr(self, name)!r}.")
        shift = self.downscale_freq_shift
        if isinstance(shift, bool) or not isinstance(shift, (int, float)) or not 0 <= shift < 1:
            raise ValueError(f"`downscale_freq_shift` must be a float in [0, 1); got {shift!r}. TADSR uses 0.0.")
        object.__setattr__(self, "downscale_freq_shift", float(shift))


def scale_shift_resnet(resnet: ResnetBlock2D, x: torch.Tensor, scale_shift: torch.Tensor) -> torch.Tensor:
    """A diffusers ResnetBlock2D (no up/down sampling) with GN2(h)·(1 + s) + b; scale_shift (B, 2C) -> like x."""
    h = resnet.conv1(resnet.nonlinearity(resnet.norm1(x)))  # (B, C, h, w)
    scale, shift = scale_shift.to(h.dtype)[:, :, None, None].chunk(2, dim=1)  # (B, C, 1, 1) each
    h = resnet.norm2(h) * (1 + scale) + shift  # (B, C, h, w)
    h = resnet.conv2(resnet.dropout(resnet.nonlinearity(h)))  # (B, C, h, w)
    shortcut = x if resnet.conv_shortcut is None else resnet.conv_shortcut(x)  # (B, C, h, w)
    return (shortcut + h) / resnet.output_scale_factor  # (B, C, h, w)


def _check_resnet(resnet: nn.Module, path: str) -> ResnetBlock2D:
    if not isinstance(resnet, ResnetBlock2D):
        raise TypeError(f"encoder `{path}` must be a diffusers ResnetBlock2D; got {type(resnet).__name__}.")
    if resnet.time_emb_proj is not None or resnet.upsample is not None or resnet.downsample is not None:
        raise ValueError(
            f"encoder `{path}` must be a plain SD-VAE resnet (temb_channels=None, no up/down sampling); got one with "
            "a time path or resampling. Pass the `encoder` of a stock diffusers AutoencoderKL."
        )
    return resnet


class TimeAwareEncoder(nn.Module):
    """moments = TAE(x, t): x (B, 3, H, W) in [-1, 1], t (B,) or scalar timesteps -> (B, 2·latent, H/8, W/8)."""

    def __init__(self, vae_encoder: nn.Module, quant_conv: nn.Module, config: TAEConfig = TAEConfig()) -> None:
        super().__init__()
        self.config = config
        self.encoder = vae_encoder
        self.quant_conv = quant_conv
        self.resnet_paths = self._find_resnets()  # official module paths, e.g. "down_blocks.0.resnets.0"
        like = next(vae_encoder.parameters())
        c = config
        self.time_proj = Timesteps(c.time_proj_channels, c.flip_sin_to_cos, c.downscale_freq_shift)
        self.time_embedding = TimestepEmbedding(c.time_proj_channels, c.temb_channels)
        self.time_emb_proj = nn.ModuleDict({
            self._key(path): nn.Linear(c.temb_channels, 2 * self._resnet(path).norm2.num_channels)
            for path in self.resnet_paths
        })
        self.time_embedding.to(device=like.device, dtype=like.dtype)
        self.time_emb_proj.to(device=like.device, dtype=like.dtype)
        self.initialize_weights()

    @classmethod
    def from_vae(cls, vae: nn.Module, config: TAEConfig = TAEConfig()) -> TimeAwareEncoder:
        """Wrap ``vae.encoder`` and ``vae.quant_conv`` of a diffusers AutoencoderKL (shared, not copied)."""
        return cls(vae.encoder, vae.quant_conv, config)

    @torch.no_grad()
    def initialize_weights(self, generator: torch.Generator | None = None) -> None:
        """Default Linear init for time_embedding (drawn on the CPU); time_emb_proj zero if ``zero_init`` [RECON]."""
        projections = list(self.time_emb_proj.values())
        drawn = [self.time_embedding.linear_1, self.time_embedding.linear_2]
        if not self.config.zero_init:
            drawn += projections
        for linear in drawn:
            # nn.Linear's default (kaiming-uniform with a = √5) is U(±1/√fan_in) for weight and bias alike.
            bound = 1.0 / math.sqrt(linear.in_features)
            for param in (linear.weight, linear.bias):
                draw = torch.rand(param.shape, generator=generator, dtype=torch.float32)  # U[0, 1)
                param.copy_((2.0 * draw - 1.0) * bound)
        if self.config.zero_init:
            for linear in projections:
                linear.weight.zero_()
                linear.bias.zero_()

    def time_embed(self, t: torch.Tensor | float, batch_size: int, device: torch.device) -> torch.Tensor:
        """emb (batch_size, temb_channels) in the MLP's dtype from a scalar or (batch_size,) timestep t."""
        t = torch.as_tensor(t, device=device)
        if t.ndim <= 1 and t.numel() == 1:
            t = t.reshape(1).expand(batch_size)
        if t.shape != (batch_size,) or t.is_complex() or t.dtype == torch.bool:
            raise ValueError(
                f"`t` must be a real scalar or a (B,) tensor with B = {batch_size} (the batch of x); got shape "
                f"{tuple(t.shape)} and dtype {t.dtype}. Pass one timestep per sample, e.g. torch.full((B,), 500.0)."
            )
        if not torch.isfinite(t.float()).all():
            raise ValueError(f"`t` must be finite; got {t.tolist()}.")
        # The sinusoid is computed in float32 whatever the weights' dtype (t = 999 needs the precision).
        e = self.time_proj(t.float())  # (B, 128) float32
        return self.time_embedding(e.to(self.time_embedding.linear_1.weight.dtype))  # (B, 256)

    def forward(self, x: torch.Tensor, t: torch.Tensor | float) -> torch.Tensor:
        """x (B, 3, H, W) in [-1, 1] in the encoder's dtype, t scalar or (B,) -> moments (B, 8, H/8, W/8)."""
        if not isinstance(x, torch.Tensor) or x.ndim != 4:
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"`x` must be an image batch (B, 3, H, W) in [-1, 1]; got {shape}.")
        emb = F.silu(self.time_embed(t, x.shape[0], x.device))  # (B, 256), SiLU(emb) as every resnet reads it
        h = self.encoder.conv_in(x)  # (B, C0, H, W)
        stages = [(block, f"down_blocks.{i}", self._down_block) for i, block in enumerate(self.encoder.down_blocks)]
        stages.append((self.encoder.mid_block, "mid_block", self._mid_block))
        for block, path, run in stages:
            scale_shifts = [
                self.time_emb_proj[self._key(f"{path}.resnets.{j}")](emb) for j in range(len(block.resnets))
            ]  # per resnet: (B, 2C)
            if torch.is_grad_enabled() and getattr(self.encoder, "gradient_checkpointing", False):
                h = checkpoint(run, block, h, *scale_shifts, use_reentrant=False)  # (B, C, h, w)
            else:
                h = run(block, h, *scale_shifts)  # (B, C, h, w)
        h = self.encoder.conv_out(self.encoder.conv_act(self.encoder.conv_norm_out(h)))  # (B, 8, H/8, W/8)
        return self.quant_conv(h)  # (B, 8, H/8, W/8)

    @staticmethod
    def _down_block(block: nn.Module, h: torch.Tensor, *scale_shifts: torch.Tensor) -> torch.Tensor:
        for resnet, scale_shift in zip(block.resnets, scale_shifts):
            h = scale_shift_resnet(resnet, h, scale_shift)  # (B, C, h, w)
        for downsampler in block.downsamplers or ():
            h = downsampler(h)  # (B, C, h/2, w/2)
        return h

    @staticmethod
    def _mid_block(block: nn.Module, h: torch.Tensor, *scale_shifts: torch.Tensor) -> torch.Tensor:
        h = scale_shift_resnet(block.resnets[0], h, scale_shifts[0])  # (B, C, h, w)
        for attn, resnet, scale_shift in zip(block.attentions, block.resnets[1:], scale_shifts[1:]):
            if attn is not None:
                h = attn(h)  # (B, C, h, w), the stock VAE self-attention; it takes no time input
            h = scale_shift_resnet(resnet, h, scale_shift)  # (B, C, h, w)
        return h

    def named_time_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        """The TAE's new parameters (names contain "time"): trained fully, never LoRA-wrapped (SPEC §3.1)."""
        return ((name, p) for name, p in self.named_parameters() if "time" in name)

    def time_parameters(self) -> list[nn.Parameter]:
        return [p for _, p in self.named_time_parameters()]

    def official_key_map(self) -> dict[str, str]:
        """Our state-dict key -> the key in the released TimeAwareAutoencoderKL's state dict (see module docstring)."""
        paths = {self._key(path): path for path in self.resnet_paths}
        mapping = {}
        for name in self.state_dict():
            if name.startswith("time_embedding."):
                mapping[name] = OFFICIAL_PREFIX + name
            elif name.startswith("time_emb_proj."):
                key, tail = name[len("time_emb_proj."):].split(".", 1)
                mapping[name] = f"{OFFICIAL_PREFIX}{paths[key]}.time_emb_proj.{tail}"
            else:
                mapping[name] = name
        return mapping

    def load_official_time_state_dict(self, state_dict: dict[str, torch.Tensor]) -> None:
        """Load the released ``state_dict_vae_time`` (24 tensors for SD) into the time layers, strictly."""
        wanted = {official: ours for ours, official in self.official_key_map().items() if "time" in ours}
        missing = sorted(set(wanted) - set(state_dict))
        unexpected = sorted(set(state_dict) - set(wanted))
        if missing or unexpected:
            raise KeyError(
                f"TADSR time state dict does not match this TAE: missing {missing[:4]} ({len(missing)} in all), "
                f"unexpected {unexpected[:4]} ({len(unexpected)} in all). Expected the {len(wanted)} official keys "
                "such as 'encoder.time_embedding.linear_1.weight' (tadsr.pkl['state_dict_vae_time'])."
            )
        ours = {wanted[key]: tensor for key, tensor in state_dict.items()}
        time_modules = nn.ModuleDict({"time_embedding": self.time_embedding, "time_emb_proj": self.time_emb_proj})
        time_modules.load_state_dict(ours, strict=True)

    @staticmethod
    def _key(path: str) -> str:
        return path.replace(".", "_")  # ModuleDict keys may not contain dots

    def _resnet(self, path: str) -> ResnetBlock2D:
        return self.encoder.get_submodule(path)

    def _find_resnets(self) -> list[str]:
        """Module paths of every encoder resnet, down blocks first, then the mid block; validates the layout."""
        paths = []
        for i, block in enumerate(self.encoder.down_blocks):
            if getattr(block, "attentions", None) is not None:
                raise ValueError(
                    f"encoder `down_blocks.{i}` is {type(block).__name__} with attention; the TAE supports the SD "
                    "VAE's DownEncoderBlock2D only."
                )
            paths += [f"down_blocks.{i}.resnets.{j}" for j in range(len(block.resnets))]
        paths += [f"mid_block.resnets.{j}" for j in range(len(self.encoder.mid_block.resnets))]
        for path in paths:
            _check_resnet(self.encoder.get_submodule(path), path)
        stray = [n for n, m in self.encoder.named_modules() if isinstance(m, ResnetBlock2D) and n not in paths]
        if stray:
            raise ValueError(f"encoder has resnets outside the down and mid blocks: {stray}; not an SD VAE encoder.")
        return paths

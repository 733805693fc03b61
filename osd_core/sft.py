"""CODSR's LQ-guided feature modulation (LQFM): an SFT layer on the U-Net's ``conv_in`` output (SPEC.md §4.2).

Paper: "CODSR: Controllable One-step Diffusion for Image Super-Resolution" (CODSR), §3.2; layer shapes, the
pixel-unshuffle input and the time scaling from the released inference code (Chanson94/CODSR@68cad3c codsr.py).

    x̃_L    = PixelUnshuffle(8)(x_L)                                  (B, 192, H/8, W/8), x_L in [-1, 1]
    γ      = Conv3×3(320 → 320)(SiLU(Conv3×3(192 → 320)(x̃_L)))       scale branch, last conv zero-initialised
    β      = the same with its own weights                             shift branch
    λ_t    = 1 / w_t = α_t / σ_t                                       2.9076 at t = 100
    f′     = f ⊙ (1 + λ_t γ) + λ_t β                                   f = conv_in(z_t), 320 channels

The paper's "two MLP layers" are two 3×3 convs per branch in the code. The submodules carry the released file's
names (``SFT_scale_conv0`` ...), so the eight tensors of its ``state_dict_sft`` load with no renaming. The first
conv of each branch gets PyTorch's default Conv2d initialisation ([RECON]: the training code is not released; the
inference code builds plain ``nn.Conv2d`` layers), the last is zero so a fresh module leaves the U-Net unchanged.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from .config_dict import DictConfig
from .schedule import NoiseSchedule, per_sample
from .tiling import TileWindow


@dataclass(frozen=True)
class LQFMConfig(DictConfig):
    """Image channels, unshuffle factor (the VAE's downscale), branch widths and conv kernel size."""

    in_channels: int = 3
    downscale: int = 8
    hidden: int = 320
    out_channels: int = 320  # the U-Net's conv_in output channels (320 for SD 2.1)
    kernel: int = 3

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"`{f.name}` must be a positive integer; got {value!r}.")
        if self.kernel % 2 == 0:
            raise ValueError(
                f"`kernel` must be odd so the modulation maps keep the latent size; got {self.kernel}. CODSR uses 3."
            )

    @property
    def unshuffled_channels(self) -> int:
        return self.in_channels * self.downscale**2


class LQFM(nn.Module):
    """(γ, β) = 𝓜(PixelUnshuffle(x_L)): (B, 3, H, W) in [-1, 1] -> two (B, out_channels, H/8, W/8) maps."""

    def __init__(self, config: LQFMConfig) -> None:
        super().__init__()
        self.config = config
        c, k = config, config.kernel
        self.unshuffle = nn.PixelUnshuffle(c.downscale)
        self.SFT_scale_conv0 = nn.Conv2d(c.unshuffled_channels, c.hidden, k, padding=k // 2)
        self.SFT_scale_conv1 = nn.Conv2d(c.hidden, c.out_channels, k, padding=k // 2)
        self.SFT_shift_conv0 = nn.Conv2d(c.unshuffled_channels, c.hidden, k, padding=k // 2)
        self.SFT_shift_conv1 = nn.Conv2d(c.hidden, c.out_channels, k, padding=k // 2)
        self.act = nn.SiLU()
        self.initialize_weights()

    @torch.no_grad()
    def initialize_weights(self, generator: torch.Generator | None = None) -> None:
        """PyTorch's default Conv2d init for the first convs (drawn on the CPU), zeros for the last: γ = β = 0."""
        for conv in (self.SFT_scale_conv0, self.SFT_shift_conv0):
            # nn.Conv2d's default (kaiming-uniform with a = √5) is U(±1/√fan_in) for weight and bias alike.
            bound = 1.0 / math.sqrt(conv.weight[0].numel())
            for param in (conv.weight, conv.bias):
                draw = torch.rand(param.shape, generator=generator, dtype=torch.float32)  # U[0, 1)
                param.copy_((2.0 * draw - 1.0) * bound)
        for conv in (self.SFT_scale_conv1, self.SFT_shift_conv1):
            conv.weight.zero_()
            conv.bias.zero_()

    def forward(self, x_lq: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x_lq (B, in_channels, H, W) in [-1, 1], H and W multiples of ``downscale`` -> (γ, β)."""
        self._check(x_lq)
        x = self.unshuffle(x_lq.to(self.SFT_scale_conv0.weight.dtype))  # (B, 192, H/8, W/8)
        gamma = self.SFT_scale_conv1(self.act(self.SFT_scale_conv0(x)))  # (B, 320, H/8, W/8)
        beta = self.SFT_shift_conv1(self.act(self.SFT_shift_conv0(x)))  # (B, 320, H/8, W/8)
        return gamma, beta

    def _check(self, x_lq: torch.Tensor) -> None:
        c = self.config
        if not isinstance(x_lq, torch.Tensor) or x_lq.ndim != 4 or x_lq.shape[1] != c.in_channels:
            shape = tuple(x_lq.shape) if isinstance(x_lq, torch.Tensor) else type(x_lq).__name__
            raise ValueError(f"`x_lq` must be (B, {c.in_channels}, H, W) in [-1, 1]; got {shape}.")
        h, w = x_lq.shape[-2:]
        if h % c.downscale or w % c.downscale:
            r = c.downscale
            raise ValueError(
                f"`x_lq` height and width must be multiples of {r} for PixelUnshuffle({r}); got {h}x{w}. Pad the "
                f"upsampled LQ to {math.ceil(h / r) * r}x{math.ceil(w / r) * r} (as for the VAE) first."
            )


def lambda_t(t: torch.Tensor, schedule: NoiseSchedule) -> torch.Tensor:
    """λ_t = 1 / w_t = α_t / σ_t per sample: t (B,) float timesteps -> (B,) float32 on t's device."""
    return schedule.alpha(t) / schedule.sigma(t)


def modulate(features: torch.Tensor, gamma: torch.Tensor, beta: torch.Tensor, lam: torch.Tensor) -> torch.Tensor:
    """f′ = f ⊙ (1 + λ γ) + λ β; features, gamma, beta (B, C, h, w), lam (B,); result in features' device/dtype."""
    if gamma.shape != features.shape or beta.shape != features.shape:
        raise ValueError(
            f"`gamma` and `beta` must match the conv_in features {tuple(features.shape)}; got {tuple(gamma.shape)} "
            f"and {tuple(beta.shape)}. Build the LQFM with out_channels = the U-Net's conv_in output channels."
        )
    gamma = gamma.to(device=features.device, dtype=features.dtype)  # (B, C, h, w)
    beta = beta.to(device=features.device, dtype=features.dtype)  # (B, C, h, w)
    lam = per_sample(lam.to(features.device), features)  # (B, 1, 1, 1)
    return features * (1 + lam * gamma) + lam * beta  # (B, C, h, w)


def conv_in_hook(
    gamma: torch.Tensor, beta: torch.Tensor, lam: torch.Tensor
) -> Callable[[TileWindow], Callable[[torch.Tensor], torch.Tensor]]:
    """The ``conv_in_hook`` of ``one_step_denoise``: window (y0, y1, x0, x1 in latent px) -> f ↦ f′ on that tile.

    gamma, beta (B, C, h, w) computed once on the whole image; lam (B,) from ``lambda_t``.
    """

    def hook(window: TileWindow) -> Callable[[torch.Tensor], torch.Tensor]:
        rows, cols = slice(window.y0, window.y1), slice(window.x0, window.x1)
        gamma_tile = gamma[..., rows, cols]  # (B, C, th, tw)
        beta_tile = beta[..., rows, cols]  # (B, C, th, tw)
        return lambda features: modulate(features, gamma_tile, beta_tile, lam)

    return hook

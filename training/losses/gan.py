"""Discriminators trained from scratch and their adversarial losses (SPEC §5.5, §4.4, §10).

One spectral-normalised PatchGAN family (pix2pix's NLayer discriminator, Isola et al. 2017, without BatchNorm), two
presets of ``DiscriminatorConfig``:

* ``DiscriminatorConfig.latent_patchgan()`` — IDaS-SR's latent patch discriminator ([RECON], SPEC §5.5) on the
  4-channel scaled latents: Conv(4→64, k4 s2), Conv(→128, k4 s2), Conv(→256, k4 s2), Conv(→512, k4 s1), head
  Conv(512→1, k4 s1), all padding 1 and spectral-normalised, LeakyReLU 0.2 between them. 64² latents give a
  6 × 6 logit map. Real = VAE_enc_frozen(x_H).sample()·0.18215, fake = ẑ_H. Hinge loss:
      L_D = mean(relu(1 − D(real))) + mean(relu(1 + D(sg(fake))))        L_G = −mean(D(fake))
  IDaS-SR's D optimiser [RECON]: AdamW lr 1e-4, betas (0.5, 0.999) (the method's ``[optim.groups]``).
* ``DiscriminatorConfig.pixel_multilevel()`` — CODSR stage 1's GAN ([RECON], SPEC §4.4 + §10). S3Diff's
  vision-aided D needs frozen DINO weights we cannot download, so we keep its *loss* and train a pixel-space D from
  scratch: the same trunk on RGB in [-1, 1] with four stride-2 blocks (64, 128, 256, 512 channels) and a logit head
  (Conv k4 s1) after blocks 2, 3 and 4 (strides 4, 8, 16): three levels, as the vision-aided D has three heads.
  Loss: S3Diff's "multilevel_sigmoid_s", BCE-with-logits per level against 0.8 for real (one-sided label smoothing)
  and 0 for fake, averaged over positions and samples, summed over levels; the generator's loss is the same BCE of
  D(fake) against the real target 0.8. S3Diff steps D on real and on fake separately; we sum both into one D step.
  DiffAugment is left out.

Weights are N(0, 0.02) with zero biases and the spectral norms' power-iteration vectors drawn from a
``torch.Generator`` (``initialize_weights``), so a seed gives the same discriminator on any device.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.parametrizations import spectral_norm

LOSSES = ("hinge", "bce")
_POWER_ITERATIONS = 15  # what torch's spectral_norm runs when it is applied


@dataclass(frozen=True)
class DiscriminatorConfig:
    """A spectral-norm PatchGAN: conv blocks (k4, padding 1) of ``channels`` with ``strides``, a 1-channel logit head
    (k4, s1, padding 1) after each block listed in ``head_levels`` (1-based), and its loss. Defaults: the latent
    PatchGAN of IDaS-SR."""

    in_channels: int = 4
    channels: tuple[int, ...] = (64, 128, 256, 512)
    strides: tuple[int, ...] = (2, 2, 2, 1)
    head_levels: tuple[int, ...] = (4,)
    negative_slope: float = 0.2
    loss: str = "hinge"
    real_target: float = 0.8
    init_std: float = 0.02

    def __post_init__(self) -> None:
        object.__setattr__(self, "channels", tuple(self.channels))
        object.__setattr__(self, "strides", tuple(self.strides))
        object.__setattr__(self, "head_levels", tuple(self.head_levels))
        if self.in_channels < 1 or not self.channels or min(self.channels) < 1:
            raise ValueError(f"`in_channels` and `channels` must be positive; got {self.in_channels} and "
                             f"{self.channels}. The latent PatchGAN uses 4 and (64, 128, 256, 512).")
        if len(self.strides) != len(self.channels) or not set(self.strides) <= {1, 2}:
            raise ValueError(f"`strides` must give 1 or 2 for each of the {len(self.channels)} blocks; got "
                             f"{self.strides}.")
        if not self.head_levels or not all(1 <= k <= len(self.channels) for k in self.head_levels):
            raise ValueError(f"`head_levels` must name blocks 1..{len(self.channels)}; got {self.head_levels}.")
        if self.loss not in LOSSES:
            raise ValueError(f"`loss` must be one of {LOSSES}; got {self.loss!r}. IDaS-SR's latent D uses \"hinge\", "
                             "CODSR's pixel D \"bce\".")
        if not 0 < self.real_target <= 1:
            raise ValueError(f"`real_target` must be in (0, 1]; got {self.real_target}. S3Diff uses 0.8.")
        if not self.init_std > 0:
            raise ValueError(f"`init_std` must be positive; got {self.init_std}. pix2pix uses 0.02.")

    @classmethod
    def latent_patchgan(cls) -> DiscriminatorConfig:
        """IDaS-SR's latent PatchGAN with the hinge loss (SPEC §5.5)."""
        return cls()

    @classmethod
    def pixel_multilevel(cls) -> DiscriminatorConfig:
        """CODSR stage 1's pixel-space D with three logit levels and S3Diff's smoothed BCE (SPEC §4.4, §10)."""
        return cls(in_channels=3, strides=(2, 2, 2, 2), head_levels=(2, 3, 4), loss="bce")

    def min_input_size(self) -> int:
        """The smallest input side whose every logit map is at least 1 × 1 (24 for the latent PatchGAN, 32 for
        the pixel D). A k4/p1 conv maps n to n − 1 at stride 1 and ⌊n/2⌋ at stride 2; walk back from the head's
        minimum input 2."""
        smallest = 0
        for level in self.head_levels:
            need = 2  # the head (k4, s1, p1) needs 2 to give 1
            for stride in reversed(self.strides[:level]):
                need = need + 1 if stride == 1 else 2 * need
            smallest = max(smallest, need)
        return smallest


def _conv(c_in: int, c_out: int, stride: int) -> nn.Module:
    return spectral_norm(nn.Conv2d(c_in, c_out, kernel_size=4, stride=stride, padding=1))


class PatchDiscriminator(nn.Module):
    """forward(x): x (B, C_in, H, W) -> list of logit maps (B, 1, h_k, w_k), one per head level."""

    def __init__(self, config: DiscriminatorConfig = DiscriminatorConfig(),
                 generator: torch.Generator | None = None) -> None:
        super().__init__()
        self.config = config
        widths = (config.in_channels, *config.channels)
        self.blocks = nn.ModuleList(_conv(widths[i], widths[i + 1], s) for i, s in enumerate(config.strides))
        self.heads = nn.ModuleDict({str(k): _conv(config.channels[k - 1], 1, 1) for k in config.head_levels})
        self.initialize_weights(generator or torch.Generator().manual_seed(0))

    @torch.no_grad()
    def initialize_weights(self, generator: torch.Generator) -> None:
        """Conv weights N(0, init_std), zero biases, spectral-norm vectors u, v redrawn and power-iterated."""
        for conv in [*self.blocks, *self.heads.values()]:
            raw = conv.parametrizations.weight.original  # (C_out, C_in, 4, 4)
            raw.copy_(torch.randn(raw.shape, generator=generator) * self.config.init_std)
            conv.bias.zero_()
            norm = conv.parametrizations.weight[0]
            matrix = raw.flatten(1)  # (C_out, C_in·16)
            u = F.normalize(torch.randn(matrix.shape[0], generator=generator), dim=0).to(raw)  # (C_out,)
            v = F.normalize(torch.randn(matrix.shape[1], generator=generator), dim=0).to(raw)  # (C_in·16,)
            for _ in range(_POWER_ITERATIONS):
                u = F.normalize(matrix @ v, dim=0)  # (C_out,)
                v = F.normalize(matrix.t() @ u, dim=0)  # (C_in·16,)
            norm._u.copy_(u)  # torch keeps the power-iteration state in these buffers
            norm._v.copy_(v)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        if x.ndim != 4 or x.shape[1] != self.config.in_channels:
            raise ValueError(f"the discriminator takes (B, {self.config.in_channels}, H, W); got {tuple(x.shape)}.")
        smallest = self.config.min_input_size()
        if min(x.shape[-2:]) < smallest:
            raise ValueError(f"the discriminator needs inputs of at least {smallest} × {smallest} (its "
                             f"{len(self.config.channels)} conv blocks leave no logits below that); got "
                             f"{tuple(x.shape[-2:])}. Train on larger crops.")
        logits, h = [], x
        for level, block in enumerate(self.blocks, start=1):
            h = F.leaky_relu(block(h), self.config.negative_slope)  # (B, C_k, H / stride_k, W / stride_k)
            if str(level) in self.heads:
                logits.append(self.heads[str(level)](h))  # (B, 1, h_k, w_k)
        return logits


def hinge_d_loss(real: list[torch.Tensor], fake: list[torch.Tensor]) -> torch.Tensor:
    """Σ_levels mean(relu(1 − D(real))) + mean(relu(1 + D(fake))) -> scalar."""
    return sum(F.relu(1 - r).mean() + F.relu(1 + f).mean() for r, f in zip(real, fake, strict=True))


def hinge_g_loss(fake: list[torch.Tensor]) -> torch.Tensor:
    """Σ_levels −mean(D(fake)) -> scalar."""
    return sum(-f.mean() for f in fake)


def _bce(logits: torch.Tensor, target: float) -> torch.Tensor:
    return F.binary_cross_entropy_with_logits(logits.float(), torch.full_like(logits.float(), target))


def bce_d_loss(real: list[torch.Tensor], fake: list[torch.Tensor], real_target: float = 0.8) -> torch.Tensor:
    """Σ_levels BCE(D(real), real_target) + BCE(D(fake), 0), each averaged over samples and positions -> scalar."""
    return sum(_bce(r, real_target) + _bce(f, 0.0) for r, f in zip(real, fake, strict=True))


def bce_g_loss(fake: list[torch.Tensor], real_target: float = 0.8) -> torch.Tensor:
    """Σ_levels BCE(D(fake), real_target): the generator pulls its outputs to the real target -> scalar."""
    return sum(_bce(f, real_target) for f in fake)


def discriminator_loss(config: DiscriminatorConfig, real: list[torch.Tensor], fake: list[torch.Tensor]
                       ) -> torch.Tensor:
    """The D loss of ``config.loss`` on D's outputs for real and (detached) fake inputs."""
    if config.loss == "hinge":
        return hinge_d_loss(real, fake)
    return bce_d_loss(real, fake, config.real_target)


def generator_loss(config: DiscriminatorConfig, fake: list[torch.Tensor]) -> torch.Tensor:
    """The generator's adversarial loss of ``config.loss`` on D's outputs for its (non-detached) outputs."""
    if config.loss == "hinge":
        return hinge_g_loss(fake)
    return bce_g_loss(fake, config.real_target)

"""Metric estimation module (MEM) of RCOD: predicts the latent metric M_L from the LQ alone (SPEC.md §6.4).

Paper: "Realism Control One-step Diffusion for Real-World Image Super-Resolution" (RCOD), §Metric Estimation.
At inference z_H is unknown, so M_L = cos(z_L, z_H) (Eq. 6) cannot be computed; MEM estimates it as M̂_L and the
LDG grouping (Eq. 5, ``ldg.level_timestep``) turns the estimate into the timestep t ("RCOD-Adap.").

The paper only says "features from intermediate layers [of the pretrained model] and a simple MLP". Our
reconstruction ([RECON], SPEC.md §6.4):

* features = concat(GAP(z_L), GSP(z_L), mean over tokens of the CLIP vision tokens): 4 + 4 + 1024 = 1032 wide. GAP is
  the per-channel spatial mean, GSP the per-channel spatial (population) standard deviation. The tokens are the ones
  VPIM consumes, i.e. the vision tower's ``last_hidden_state`` before the VPIM Linear (B, 257, 1024 for ViT-L/14).
* MLP 1032 -> 512 -> 256 -> 1 with SiLU between layers, then a sigmoid: M̂_L in (0, 1).
* Trained after the main model, with L1 to the true M_L (``mem_loss``), AdamW 1e-4.

MEM without tokens: ``token_dim = 0`` builds a latent-only MEM (input 2·C) that takes ``tokens=None``. A MEM built with
``token_dim > 0`` refuses ``tokens=None`` rather than feeding zeros: a model trained on real tokens gives meaningless
estimates on zeros, and that silent failure would only show as a wrong realism level.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .config_dict import DictConfig
from .ldg import DEFAULT_LDG, LDGConfig, level_timestep


@dataclass(frozen=True)
class MEMConfig(DictConfig):
    """Latent channels C, CLIP token width (0: latent-only MEM) and the MLP hidden widths."""

    latent_channels: int = 4
    token_dim: int = 1024
    hidden: tuple[int, ...] = (512, 256)

    def __post_init__(self) -> None:
        if not _is_int(self.latent_channels) or self.latent_channels < 1:
            raise ValueError(f"`latent_channels` must be a positive integer; got {self.latent_channels!r}. SD uses 4.")
        if not _is_int(self.token_dim) or self.token_dim < 0:
            raise ValueError(
                f"`token_dim` must be a non-negative integer; got {self.token_dim!r}. "
                "Use 1024 for ViT-L/14 tokens, or 0 for a latent-only MEM."
            )
        hidden = tuple(self.hidden) if isinstance(self.hidden, (list, tuple)) else self.hidden
        if not isinstance(hidden, tuple) or not hidden or not all(_is_int(h) and h >= 1 for h in hidden):
            raise ValueError(f"`hidden` must be a non-empty sequence of positive integers; got {self.hidden!r}.")
        object.__setattr__(self, "hidden", hidden)

    @property
    def in_features(self) -> int:
        return 2 * self.latent_channels + self.token_dim


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


class MEM(nn.Module):
    """M̂_L = sigmoid(MLP([GAP(z_L), GSP(z_L), mean_N(tokens)])), per sample."""

    def __init__(self, config: MEMConfig) -> None:
        super().__init__()
        self.config = config
        widths = (config.in_features, *config.hidden, 1)
        layers: list[nn.Module] = []
        for i, (w_in, w_out) in enumerate(zip(widths[:-1], widths[1:])):
            layers.append(nn.Linear(w_in, w_out))
            if i < len(widths) - 2:
                layers.append(nn.SiLU())
        self.mlp = nn.Sequential(*layers)
        self.initialize_weights()

    @torch.no_grad()
    def initialize_weights(self, generator: torch.Generator | None = None) -> None:
        """Xavier-uniform weights, zero biases; drawn on the CPU (from ``generator`` if given) and copied in."""
        for layer in self.mlp:
            if isinstance(layer, nn.Linear):
                fan_out, fan_in = layer.weight.shape
                bound = math.sqrt(6.0 / (fan_in + fan_out))
                u = torch.rand(layer.weight.shape, generator=generator, dtype=torch.float32)  # (out, in)
                layer.weight.copy_((2.0 * u - 1.0) * bound)
                layer.bias.zero_()

    def features(self, z_lq: torch.Tensor, tokens: torch.Tensor | None) -> torch.Tensor:
        """(B, C, h, w) latent and (B, N, token_dim) tokens or None -> (B, in_features) in the module's dtype."""
        self._check_inputs(z_lq, tokens)
        dtype = self.mlp[0].weight.dtype
        z = z_lq.to(dtype)  # (B, C, h, w)
        gap = z.mean(dim=(2, 3))  # (B, C)
        # Population std (correction=0): defined for a 1x1 latent, and the spatial size is not a sample count.
        gsp = z.std(dim=(2, 3), correction=0)  # (B, C)
        parts = [gap, gsp]
        if tokens is not None:
            parts.append(tokens.to(dtype).mean(dim=1))  # (B, token_dim)
        return torch.cat(parts, dim=1)  # (B, in_features)

    def forward(self, z_lq: torch.Tensor, tokens: torch.Tensor | None = None) -> torch.Tensor:
        """M̂_L in (0, 1), shape (B,), in the module's dtype on its device."""
        h = self.features(z_lq, tokens)  # (B, in_features)
        return torch.sigmoid(self.mlp(h)).squeeze(1)  # (B,)

    @torch.no_grad()
    def estimate_timestep(
        self, z_lq: torch.Tensor, tokens: torch.Tensor | None, ldg_config: LDGConfig = DEFAULT_LDG
    ) -> torch.Tensor:
        """RCOD-Adap.: t = LDG(M̂_L) per sample (Eq. 5), (B,) float32 with values in ``ldg_config.timesteps``."""
        return level_timestep(self(z_lq, tokens).float(), ldg_config)  # (B,)

    def _check_inputs(self, z_lq: torch.Tensor, tokens: torch.Tensor | None) -> None:
        c = self.config.latent_channels
        if z_lq.ndim != 4 or z_lq.shape[1] != c or z_lq.shape[0] == 0:
            raise ValueError(f"`z_lq` must be a latent batch (B, {c}, h, w); got shape {tuple(z_lq.shape)}.")
        d = self.config.token_dim
        if tokens is None:
            if d > 0:
                raise ValueError(
                    f"`tokens` is None but this MEM was trained on {d}-wide CLIP vision tokens; pass the vision "
                    "tower's last_hidden_state (the tokens VPIM consumes), or use a MEM built with token_dim=0."
                )
            return
        if d == 0:
            raise ValueError("`tokens` were given but this MEM is latent-only (token_dim=0); pass tokens=None.")
        if tokens.ndim != 3 or tokens.shape[0] != z_lq.shape[0] or tokens.shape[2] != d:
            raise ValueError(
                f"`tokens` must have shape ({z_lq.shape[0]}, N, {d}) to match `z_lq`; got {tuple(tokens.shape)}."
            )


def mem_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """L1 between M̂_L and the true M_L (Eq. 6), both (B,) -> scalar."""
    if pred.shape != target.shape:
        raise ValueError(
            f"`pred` and `target` must have one shape (B,); got {tuple(pred.shape)} and {tuple(target.shape)}."
        )
    return F.l1_loss(pred, target.to(pred.dtype))

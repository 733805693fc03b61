"""Visual prompt injection module (VPIM) of RCOD: CLIP vision tokens of the LQ image in place of text (SPEC.md §6.3).

Paper: "Realism Control One-step Diffusion for Real-World Image Super-Resolution" (RCOD), §Visual Prompt Injection
Module, Alg. 1 line 8 (read as c_y = MLP(Y(x_L)): the text says the LR image is the input).

    c_y = Linear(CLIPVision(preprocess(x_L)))      # (B, 257, 1024), fed to every cross-attention as text would be

* The vision tower Y is frozen and not ours. In ComfyUI it is the native CLIP_VISION model; here the tokens are its
  ``last_hidden_state``: the encoder output before the post-layernorm, CLS included (257 tokens of width 1024 for
  ViT-L/14 at 224 px). ``encode_with_tower`` runs a transformers ``CLIPVisionModel`` the same way.
* The trainable "MLP" is one Linear(1024 -> 1024) ([RECON]: Tab. S3 counts ≈1.0M extra trainable parameters, one
  1024² Linear), initialised N(0, 0.02) with zero bias ([RECON]).
* Preprocessing ([RECON]): the upsampled LQ in [-1, 1] is resized to 224² (bicubic, antialiased; no centre crop, so
  the whole image is seen), mapped to [0, 1] and normalised with the CLIP mean/std. ComfyUI's ``encode_image`` takes a
  (B, H, W, 3) [0, 1] IMAGE and only quantises to 8 bit and normalises when it is already 224², so a node can hand it
  ``resize_for_clip(x_lq, config).movedim(1, -1)`` and get the same tokens up to that 8-bit rounding.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from .config_dict import DictConfig

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
# Vision-tower widths of the common CLIP towers, to name the likely model in width-mismatch errors.
TOWER_BY_WIDTH = {768: "ViT-B/16 or ViT-B/32", 1024: "ViT-L/14", 1280: "ViT-H/14", 1664: "ViT-bigG/14"}


@dataclass(frozen=True)
class VPIMConfig(DictConfig):
    """Tower token width, UNet cross-attention width, tower input size, CLIP normalisation and Linear init std."""

    vision_dim: int = 1024
    cond_dim: int = 1024
    image_size: int = 224
    mean: tuple[float, float, float] = CLIP_MEAN
    std: tuple[float, float, float] = CLIP_STD
    init_std: float = 0.02

    def __post_init__(self) -> None:
        for name in ("vision_dim", "cond_dim", "image_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"`{name}` must be a positive integer; got {value!r}.")
        for name in ("mean", "std"):
            value = getattr(self, name)
            if not isinstance(value, (list, tuple)) or len(value) != 3 or not all(_is_finite(v) for v in value):
                raise ValueError(f"`{name}` must be three finite numbers (R, G, B); got {value!r}.")
            object.__setattr__(self, name, tuple(float(v) for v in value))
        if min(self.std) <= 0:
            raise ValueError(f"`std` must be positive per channel; got {self.std}. CLIP uses {CLIP_STD}.")
        if not _is_finite(self.init_std) or self.init_std <= 0:
            raise ValueError(f"`init_std` must be a positive number; got {self.init_std!r}. The default is 0.02.")


def _is_finite(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def resize_for_clip(x_lq: torch.Tensor, config: VPIMConfig) -> torch.Tensor:
    """(B, 3, H, W) in [-1, 1] -> (B, 3, S, S) in [0, 1], S = ``config.image_size``; bicubic, antialiased, clamped."""
    if x_lq.ndim != 4 or x_lq.shape[1] != 3 or x_lq.shape[0] == 0:
        raise ValueError(f"`x_lq` must be an RGB batch (B, 3, H, W) in [-1, 1]; got shape {tuple(x_lq.shape)}.")
    size = config.image_size
    # fp32: antialiased bicubic has no half-precision kernel on every device.
    x = F.interpolate(x_lq.float(), size=(size, size), mode="bicubic", antialias=True)  # (B, 3, S, S)
    # Bicubic overshoots; CLIP saw 8-bit images, so clamp to the displayable range.
    return ((x + 1.0) / 2.0).clamp(0.0, 1.0).to(x_lq.dtype)  # (B, 3, S, S)


def preprocess(x_lq: torch.Tensor, config: VPIMConfig) -> torch.Tensor:
    """CLIP pixel values: (B, 3, H, W) in [-1, 1] -> (B, 3, S, S) normalised with ``config.mean``/``config.std``."""
    x01 = resize_for_clip(x_lq, config)  # (B, 3, S, S)
    mean = torch.tensor(config.mean, device=x01.device, dtype=x01.dtype).view(1, 3, 1, 1)
    std = torch.tensor(config.std, device=x01.device, dtype=x01.dtype).view(1, 3, 1, 1)
    return (x01 - mean) / std  # (B, 3, S, S)


def validate_tokens(tokens: torch.Tensor, config: VPIMConfig) -> None:
    """Refuse tokens that are not (B, N, vision_dim), naming the tower the bundle expects."""
    if not isinstance(tokens, torch.Tensor) or tokens.ndim != 3:
        shape = tuple(tokens.shape) if isinstance(tokens, torch.Tensor) else type(tokens).__name__
        raise ValueError(
            f"`vision_tokens` must be (B, N, {config.vision_dim}), the CLIP vision model's last_hidden_state; "
            f"got {shape}. Pass last_hidden_state, not image_embeds."
        )
    width = tokens.shape[-1]
    if width != config.vision_dim:
        expected = TOWER_BY_WIDTH.get(config.vision_dim, f"a {config.vision_dim}-wide tower")
        raise ValueError(
            f"the CLIP vision model gives {width}-wide tokens but this bundle's VPIM expects {config.vision_dim} "
            f"({expected}); load the CLIP vision model the bundle was trained with."
        )


class VPIM(nn.Module):
    """c_y = Linear(tokens): (B, N, vision_dim) CLIP vision tokens -> (B, N, cond_dim) cross-attention context."""

    def __init__(self, config: VPIMConfig) -> None:
        super().__init__()
        self.config = config
        self.proj = nn.Linear(config.vision_dim, config.cond_dim)
        self.initialize_weights()

    @torch.no_grad()
    def initialize_weights(self, generator: torch.Generator | None = None) -> None:
        """N(0, init_std) weight, zero bias; drawn on the CPU (from ``generator`` if given) and copied in."""
        w = torch.randn(self.proj.weight.shape, generator=generator, dtype=torch.float32)  # (cond_dim, vision_dim)
        self.proj.weight.copy_(w * self.config.init_std)
        self.proj.bias.zero_()

    def preprocess(self, x_lq: torch.Tensor) -> torch.Tensor:
        """CLIP pixel values for this VPIM's tower; see the module-level ``preprocess``."""
        return preprocess(x_lq, self.config)

    def forward(self, vision_tokens: torch.Tensor) -> torch.Tensor:
        validate_tokens(vision_tokens, self.config)
        return self.proj(vision_tokens.to(self.proj.weight.dtype))  # (B, N, cond_dim)


def encode_with_tower(tower: nn.Module, x_lq: torch.Tensor, config: VPIMConfig) -> torch.Tensor:
    """Vision tokens of a transformers ``CLIPVisionModel``: (B, 3, H, W) in [-1, 1] -> (B, N, vision_dim).

    Returns ``tower(pixel_values=...).last_hidden_state`` in the tower's dtype, checked against ``config``; the tower
    stays frozen (no gradient is recorded).
    """
    param = next(tower.parameters())
    pixel_values = preprocess(x_lq, config).to(device=param.device, dtype=param.dtype)  # (B, 3, S, S)
    with torch.no_grad():
        tokens = tower(pixel_values=pixel_values).last_hidden_state  # (B, N, vision_dim)
    validate_tokens(tokens, config)
    return tokens

"""The SD operations a training method differentiates through, with seeded randomness (SPEC §0.2, §0.4).

* ``sample_latent``: z = (μ + σ·n)·0.18215 from the VAE encoder's moments (the posterior ``.sample()`` every
  reference uses), with n drawn by the caller from a ``torch.Generator`` (``latent_noise``), so a step is
  reproducible; logvar is clamped to [-30, 20] like diffusers' DiagonalGaussianDistribution.
* ``decode``: x̂ = clamp(Dec(ẑ / 0.18215), -1, 1).
* ``PromptEncoder``: c = CLIPText(tokenize(prompt)) for a batch of prompts, frozen, with a small cache (sidecar
  prompts repeat every epoch).
"""

from __future__ import annotations

from collections import OrderedDict

import torch

from osd_core.text import encode_prompt
from osd_core.vae import sd_encoder_fn


def latent_noise(x: torch.Tensor, latent_channels: int, generator: torch.Generator) -> torch.Tensor:
    """N(0, I) noise for the latent of pixels x (B, 3, H, W): (B, C, H/8, W/8) float32, drawn on the CPU, on x's
    device."""
    b, _, h, w = x.shape
    return torch.randn((b, latent_channels, h // 8, w // 8), generator=generator).to(x.device)


def posterior_noise(x: torch.Tensor, vae, sampling: str, generator: torch.Generator) -> torch.Tensor | None:
    """The noise ``sample_latent`` takes for a ``latent_sampling`` setting: "sample" draws ``latent_noise``, "mode"
    gives None (the posterior mean)."""
    return None if sampling == "mode" else latent_noise(x, vae.config.latent_channels, generator)


def sample_latent(vae, x: torch.Tensor, noise: torch.Tensor | None, encoder=None) -> torch.Tensor:
    """x (B, 3, H, W) in [-1, 1] -> scaled latent (B, 4, H/8, W/8); ``noise`` None gives the mean (``mode``).

    ``encoder`` maps pixels to moments (default: the SD encoder + quant_conv; TADSR passes its time-aware one).
    """
    moments = (encoder or sd_encoder_fn(vae))(x)  # (B, 8, h, w)
    mean, logvar = moments.float().chunk(2, dim=1)  # (B, 4, h, w) each
    if noise is not None:
        mean = mean + torch.exp(0.5 * logvar.clamp(-30.0, 20.0)) * noise  # (B, 4, h, w)
    return mean * vae.config.scaling_factor


def decode(vae, z: torch.Tensor) -> torch.Tensor:
    """Scaled latent (B, 4, h, w) -> pixels (B, 3, 8h, 8w) in [-1, 1]."""
    return vae.decode(z / vae.config.scaling_factor).sample.clamp(-1.0, 1.0)


class PromptEncoder:
    """Batches of prompts -> (B, 77, D) conditioning on ``device`` in ``dtype``, with an LRU cache."""

    def __init__(self, text_encoder, tokenizer, device: torch.device, dtype: torch.dtype, cache_size: int = 64):
        self.text_encoder, self.tokenizer = text_encoder, tokenizer
        self.device, self.dtype, self.cache_size = device, dtype, cache_size
        self._cache: OrderedDict[str, torch.Tensor] = OrderedDict()

    @torch.no_grad()
    def __call__(self, prompts: list[str]) -> torch.Tensor:
        return torch.cat([self._one(p) for p in prompts])  # (B, 77, D)

    def _one(self, prompt: str) -> torch.Tensor:
        if prompt in self._cache:
            self._cache.move_to_end(prompt)
            return self._cache[prompt]
        cond = encode_prompt(self.text_encoder, self.tokenizer, prompt).to(self.device, self.dtype)  # (1, 77, D)
        self._cache[prompt] = cond
        if len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)
        return cond

"""CODSR's one-step generator as trained in both stages (SPEC §4.1–4.3): Chen et al., "Bridging Fidelity-Reality with
Controllable One-Step Diffusion for Image Super-Resolution" (CODSR), §3.1–3.2; constants from the released
inference code (Chanson94/CODSR@68cad3c).

x_L (B, 3, H, W) in [-1, 1] at output size, H and W multiples of 8:

    z_L    = VAE_enc_LoRA(x_L).sample() · 0.18215               (B, 4, h, w)
    W      = RGPA(x_L)                                          (B, 1, h, w), 0.3 … 1.0 (osd_core.sobel)
    ε_a    = W ⊙ ε,  ε ~ N(0, I)                                (B, 4, h, w)
    z_t    = α_t z_L + σ_t ε_a                                  t = t_s, per sample
    (γ, β) = LQFM(x_L),  λ_t = 1 / w_t                          (B, 320, h, w) each (osd_core.sft)
    ε̂      = UNet_LoRA(z_t, t, c), conv_in output f ↦ f ⊙ (1 + λ_t γ) + λ_t β
    ẑ_H    = z_L + w_t (ε_a − ε̂)                                x̂₀ form (N), SPEC §0.6
    x̂_H    = clamp(VAE_dec(ẑ_H / 0.18215), −1, 1)

The U-Net step is the nodes' own one-step denoise on one whole-latent tile (``training.methods.whole_latent``), so a
trained generator and its exported bundle compute the same thing.

Timesteps: training draws t_s ~ U_int[t_min, t_max] per sample ([RECON] 20 and 400: CODSR trains over a range of t_s
but gives no bounds, SPEC §4.1); validation and the bundle's default use the inference t_s = 100 [PAPER §5 + CODE].
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from osd_core.bundle import BundleMeta
from osd_core.method_defaults import METHOD_DEFAULTS
from osd_core.parameterisation import Parameterisation
from osd_core.schedule import NoiseSchedule
from osd_core.sft import LQFM, LQFMConfig, conv_in_hook, lambda_t
from osd_core.sobel import region_weights
from training.methods.sd_ops import decode, latent_noise, sample_latent
from training.methods.whole_latent import denoise_whole_latent

METHOD = "codsr"  # the bundle method both stages export (the CODSR nodes and importer read it)


def check_timesteps(timestep: int, t_min: int, t_max: int) -> None:
    """The inference t_s and the training range [t_min, t_max] must be DDPM timesteps with t_min <= t_max."""
    if not 0 <= timestep <= 999:
        raise ValueError(f"`timestep` must be in [0, 999]; got {timestep}. CODSR infers at t_s = 100.")
    if not 1 <= t_min <= t_max <= 999:
        raise ValueError(f"the training range needs 1 <= t_min <= t_max <= 999; got t_min={t_min}, t_max={t_max}. "
                         "The default [RECON] range is 20 .. 400; set t_min = t_max = 100 for a fixed t_s.")


class CODSRDraws(NamedTuple):
    """The random draws of one generator forward: VAE posterior noise (None: the mean), ε (B, 4, h, w) before the
    RGPA weighting, and t_s (B,) float."""

    latent: torch.Tensor | None
    eps: torch.Tensor
    t: torch.Tensor


def draw(x: torch.Tensor, generator: torch.Generator, *, t_range: tuple[int, int], sample_latent_noise: bool,
         latent_channels: int = 4) -> CODSRDraws:
    """Draw (posterior noise, ε, t_s ~ U_int[t_min, t_max]) for pixels x (B, 3, H, W) from a CPU ``generator``."""
    latent = latent_noise(x, latent_channels, generator) if sample_latent_noise else None  # (B, 4, h, w)
    eps = latent_noise(x, latent_channels, generator)  # (B, 4, h, w)
    t = torch.randint(t_range[0], t_range[1] + 1, (x.shape[0],), generator=generator).float()  # (B,)
    return CODSRDraws(latent, eps, t.to(x.device))


def build_lqfm(unet, generator: torch.Generator) -> LQFM:
    """A fresh LQFM for ``unet``: 192 -> C -> C per branch with C = conv_in's output channels (320 for SD 2.1, as in
    the release); first convs drawn from ``generator``, last convs zero, so it starts as the identity."""
    channels = unet.config.block_out_channels[0]
    lqfm = LQFM(LQFMConfig(hidden=channels, out_channels=channels))
    lqfm.initialize_weights(generator)
    return lqfm


class CODSRGenerator(torch.nn.Module):
    """x_L -> (ẑ_H, x̂_H): RGPA-weighted noise at t_s, LQFM on conv_in, x̂₀ (N); see the module docstring."""

    def __init__(self, unet, vae, lqfm: LQFM, schedule: NoiseSchedule) -> None:
        super().__init__()
        self.unet, self.vae, self.lqfm, self.schedule = unet, vae, lqfm, schedule

    def forward(self, x_lq: torch.Tensor, cond: torch.Tensor, draws: CODSRDraws):
        """x_lq (B, 3, H, W) in [-1, 1], cond (B, L, D); returns ẑ_H (B, 4, h, w) float32 and x̂_H (B, 3, H, W)."""
        z_lq = sample_latent(self.vae, x_lq, draws.latent)  # (B, 4, h, w)
        weights = region_weights(x_lq.float())  # (B, 1, h, w)
        eps_a = weights * draws.eps.to(z_lq.device)  # (B, 4, h, w)
        gamma, beta = self.lqfm(x_lq)  # (B, C, h, w) each
        lam = lambda_t(draws.t, self.schedule)  # (B,)
        z_hat = denoise_whole_latent(self.unet, self.schedule, Parameterisation.NOISE_RESIDUAL, z_lq, cond, draws.t,
                                     noise=eps_a, conv_in_hook=conv_in_hook(gamma, beta, lam))  # (B, 4, h, w)
        return z_hat, decode(self.vae, z_hat)  # (B, 4, h, w), (B, 3, H, W)


def codsr_meta(family: str, *, lora: dict, modules: tuple[str, ...], hyperparameters: dict,
               timestep: int) -> BundleMeta:
    """The metadata of a CODSR bundle: x̂₀ (N) and the release's inference defaults with ``timestep`` as t_s."""
    parameterisation, defaults = METHOD_DEFAULTS[METHOD]
    return BundleMeta(method=METHOD, base_family=family, parameterisation=parameterisation, lora=lora,
                      modules=modules, hyperparameters=hyperparameters,
                      defaults={**defaults, "timestep": timestep})

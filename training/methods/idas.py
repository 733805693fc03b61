"""IDaS-SR training (SPEC §5): "Adaptive Inversion and Degradation-aware Sampling for Real-ISR", §3.2–3.4, §4.1 and
supp. F (no public code; the [RECON] choices are SPEC's and are all configurable).

Generator (SPEC §5.1), x_L (B, 3, H, W) in [-1, 1] at output size, one steering scalar s per sample:

    s            ~ U(s_range) = U(0, 1) in training                  (§3.3: "uniformly sampled"; inference: a knob)
    z_L          = VAE_enc_LoRA(x_L).sample() · 0.18215             (B, 4, h, w)
    ε_inv, τ, d  = MINE(z_L)                                         osd_core.mine, Eq. 15 / 17
    c′           = c + d                                             d added to each of the 77 text tokens
    t′, ε_mix    = CHARIOT(τ, ε_inv, s, ε),  ε ~ N(0, I)             t′ = τ + s(999 − τ), Eq. 18–21 (osd_core.chariot)
    z_t          = α(t′) z_L + σ(t′) ε_mix                           α, σ piecewise linear in the float t′ (Eq. 16)
    ε̂            = UNet_LoRA(z_t, t′, c′)
    ẑ_H          = (z_t − σ(t′) ε̂) / α(t′)                          x̂₀ form (S)
    x̂_H          = clamp(VAE_dec(ẑ_H / 0.18215), −1, 1)

The gradient reaches τ through α(t′), σ(t′) and the U-Net's sinusoidal timestep embedding (d t′/d τ = 1 − s, F.2).
Three phases per step, each its own AdamW, in this order (the first two are OSEDiff's loop, reused):

1. ``generator``:     λ_l2 MSE(x̂_H, x_H) + λ_lpips LPIPS(x̂_H, x_H) + λ_vsd L_VSD(ẑ_H; c_pos, c_neg)
                      + λ_gan · (−mean D(ẑ_H)), weights (1, 2, 1, 0.1) [RECON, §5.5]; VSD teacher and regulariser see
                      the plain c_pos, not c′ (§5.5); parameter groups ``generator`` (LoRA + conv_in, lr 5e-5) and
                      ``mine`` (its own lr, 1e-4 [RECON], set in ``[optim.groups.mine]``);
2. ``regulariser``:   λ_reg L_diff (SPEC §2);
3. ``discriminator``: the latent PatchGAN with the hinge loss, real = the frozen SD encoder's sample of x_H (the
                      VAE-encoder LoRA switched off), fake = stopgrad ẑ_H; AdamW lr 1e-4, betas (0.5, 0.999)
                      (``[optim.groups.discriminator]``).

Ablation switches (Tab. 3/6, SPEC §5.6): ``use_tp`` off fixes τ at ``timestep`` (999 [RECON]: OSEDiff's t), ``use_ine``
off sets ε_inv = 0, ``use_deg_embed`` off sets d = 0 (c′ = c), ``use_chariot`` off trains at s = 0, ``use_lgan`` off
drops the discriminator phase and the GAN term. The exported bundle holds MINE under ``mine.`` as
``osd_core.method_modules`` rebuilds it; for an ablated part it holds what training used: a τ head that outputs the
fixed τ, a zero ε_inv head, a zero d head, so the shipped workflow computes what was trained.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from dataclasses import dataclass, field

import torch

from osd_core.adapters import CONV_IN_PREFIX, collect_bundle_tensors
from osd_core.bundle import BundleMeta
from osd_core.chariot import ChariotConfig, chariot
from osd_core.method_defaults import METHOD_DEFAULTS
from osd_core.mine import MINE, MINEConfig
from osd_core.parameterisation import Parameterisation, noisy_latent, predict_x0
from osd_core.text import add_embedding
from training.losses.gan import DiscriminatorConfig, discriminator_loss, generator_loss
from training.losses.vsd import adapters_disabled
from training.methods.base import Phase, PhaseOutput
from training.methods.osediff import OSEDiff, OSEDiffConfig
from training.methods.sd_lora import conv_in_base
from training.methods.sd_ops import decode, latent_noise, sample_latent
from training.methods.seeded import seeded_discriminator, seeded_global_rng
from training.schema import ConfigError

logger = logging.getLogger(__name__)



@dataclass(frozen=True)
class IDaSConfig(OSEDiffConfig):
    """The ``[idas]`` section (SPEC §5 defaults). ``timestep`` is the fixed τ used when ``use_tp`` is off."""

    s_range: tuple[float, float] = (0.0, 1.0)
    validation_s: float = 0.6
    lambda_gan: float = 0.1
    use_tp: bool = True
    use_ine: bool = True
    use_deg_embed: bool = True
    use_chariot: bool = True
    use_lgan: bool = True
    train_conv_in: bool = True
    mine: MINEConfig = field(default_factory=MINEConfig)
    chariot: ChariotConfig = field(default_factory=ChariotConfig)
    discriminator: DiscriminatorConfig = field(default_factory=DiscriminatorConfig.latent_patchgan)

    def __post_init__(self) -> None:
        super().__post_init__()
        low, high = self.s_range
        if not 0 <= low <= high <= 1:
            raise ValueError(f"`s_range` must satisfy 0 <= low <= high <= 1; got {list(self.s_range)}. IDaS-SR "
                             "samples s ~ U(0, 1).")
        if not 0 <= self.validation_s <= 1:
            raise ValueError(f"`validation_s` must be in [0, 1]; got {self.validation_s}. The paper's default is 0.6.")
        if self.lambda_gan < 0:
            raise ValueError(f"`lambda_gan` must be >= 0; got {self.lambda_gan}. SPEC's reconstruction uses 0.1.")


class IDaSGenerator(torch.nn.Module):
    """(x_L, c, s, ε) -> (ẑ_H, x̂_H, trace) through the LoRA VAE encoder, MINE, CHARIOT, the U-Net at t′ and x̂₀ (S).

    ``trace`` holds the intermediate values (τ, t′, d, ε_inv, ε_mix) for logging and tests.
    """

    def __init__(self, unet, vae, mine: MINE, schedule, config: IDaSConfig) -> None:
        super().__init__()
        self.unet, self.vae, self.mine, self.schedule, self.config = unet, vae, mine, schedule, config

    def estimate(self, z_lq: torch.Tensor, cond: torch.Tensor):
        """τ (B,) float32, ε_inv (B, 4, h, w) float32 and c′ (B, 77, D) with the ablation switches applied."""
        c = self.config
        est = self.mine(z_lq)
        tau = est.tau if c.use_tp else torch.full_like(est.tau, float(c.timestep))  # (B,)
        eps_inv = est.eps_inv.float() if c.use_ine else torch.zeros_like(z_lq)  # (B, 4, h, w)
        cond = add_embedding(cond, est.d) if c.use_deg_embed else cond  # (B, 77, D)
        return tau, eps_inv, cond

    def forward(self, x_lq: torch.Tensor, cond: torch.Tensor, s: torch.Tensor, eps: torch.Tensor,
                noise: torch.Tensor | None):
        """x_lq (B, 3, H, W) in [-1, 1], cond (B, 77, D), s (B,) in [0, 1], ε (B, 4, h, w), noise (B, 4, h, w) or
        None (the posterior mean)."""
        z_lq = sample_latent(self.vae, x_lq, noise)  # (B, 4, h, w) float32
        tau, eps_inv, cond_d = self.estimate(z_lq, cond)  # (B,), (B, 4, h, w), (B, 77, D)
        t, eps_mix = chariot(tau, eps_inv, s.to(z_lq.device), eps=eps.to(z_lq.device),
                             config=self.config.chariot)  # (B,), (B, 4, h, w)
        z_t = noisy_latent(z_lq, t, self.schedule, eps_mix)  # (B, 4, h, w)
        eps_hat = self.unet(z_t, t, encoder_hidden_states=cond_d).sample  # (B, 4, h, w)
        # x̂₀ in float32: 1/α(t′) reaches 14.6 near t′ = 999.
        z_hat = predict_x0(Parameterisation.STANDARD, z_in=z_t.float(), z_lq=z_lq, eps_hat=eps_hat.float(), t=t,
                           schedule=self.schedule)  # (B, 4, h, w)
        trace = {"tau": tau, "t": t, "eps_inv": eps_inv, "eps_mix": eps_mix, "cond": cond_d}
        return z_hat, decode(self.vae, z_hat), trace  # (B, 4, h, w), (B, 3, H, W), dict


def fixed_tau_head(config: MINEConfig, tensors: dict[str, torch.Tensor], tau: float, last: str):
    """A MINE config and tensors whose τ head outputs exactly ``tau`` for any input (for bundles trained with
    use_tp off): bounds tau ± 0.5 (clipped to [0, 999]); the head's last Linear (``last``, e.g. "tau_head.2") gets
    weight 0 and the bias at the matching logit."""
    low, high = max(0.0, tau - 0.5), min(999.0, tau + 0.5)
    fraction = (tau - low) / (high - low)
    # sigmoid(±30) is 0 or 1 in float32, so the bounds themselves are hit exactly
    bias = 30.0 if fraction >= 1 else -30.0 if fraction <= 0 else math.log(fraction / (1 - fraction))
    config = dataclasses.replace(config, tau_min=low, tau_max=high, tau_init=(low + high) / 2)
    tensors = {**tensors, f"{last}.weight": torch.zeros_like(tensors[f"{last}.weight"]),
               f"{last}.bias": torch.full_like(tensors[f"{last}.bias"], bias)}
    return config, tensors


def _check_latent_size(crop_size: int, vae, discriminator: DiscriminatorConfig) -> None:
    """The latent PatchGAN needs latents of at least ``min_input_size`` a side: fail before training starts."""
    factor = 2 ** (len(vae.config.block_out_channels) - 1)  # 8 for SD's VAE
    smallest = discriminator.min_input_size()
    if crop_size // factor < smallest:
        raise ConfigError(f"`data.crop_size` = {crop_size} gives {crop_size // factor}² latents, smaller than the "
                          f"latent PatchGAN's minimum {smallest}²; use data.crop_size >= {smallest * factor} "
                          "(IDaS-SR trains on 512) or idas.use_lgan=false.")


class IDaS(OSEDiff):
    """IDaS-SR: OSEDiff's generator with MINE + CHARIOT, the VSD regulariser and a latent PatchGAN."""

    name = "idas"
    config_class = IDaSConfig

    def __init__(self, config, components, context) -> None:
        super().__init__(config, components, context)
        if self.cfg.use_lgan:
            _check_latent_size(config.data.crop_size, components.vae, self.cfg.discriminator)
            self.discriminator = seeded_discriminator(self.cfg.discriminator, context.init_generator, context.device)

    def build_generator(self, components, context) -> torch.nn.Module:
        super().build_generator(components, context)  # OSEDiff's LoRA (U-Net, VAE encoder) and the whole conv_in
        c = self.cfg
        mine_config = dataclasses.replace(c.mine, in_channels=components.vae.config.latent_channels,
                                          cond_dim=components.unet.config.cross_attention_dim)
        if mine_config != c.mine:
            logger.info("MINE follows the base model: in_channels %d, cond_dim %d", mine_config.in_channels,
                        mine_config.cond_dim)
        with seeded_global_rng(context.init_generator):  # MINE's DiT init draws from the global RNG
            self.mine = MINE(mine_config).to(context.device)
        self.mine.requires_grad_(True)
        if not c.train_conv_in:
            conv_in_base(components.unet).requires_grad_(False)
        return IDaSGenerator(components.unet, components.vae, self.mine, components.schedule, c)

    def phases(self) -> list[Phase]:
        phases = super().phases()
        mine = list(self.mine.parameters())
        ids = {id(p) for p in mine}
        lora = [p for p in phases[0].groups["generator"] if id(p) not in ids]
        phases[0] = Phase("generator", {"generator": lora, "mine": mine})
        return phases

    def _steering(self, batch_size: int, generator: torch.Generator) -> torch.Tensor:
        """s (B,) ~ U(s_range), or 0 with use_chariot off (drawn either way, so the other streams stay aligned)."""
        low, high = self.cfg.s_range
        s = low + (high - low) * torch.rand(batch_size, generator=generator)  # (B,)
        return s if self.cfg.use_chariot else torch.zeros_like(s)

    def student(self, batch: dict, cond: torch.Tensor, carry: dict, generator: torch.Generator):
        lq = batch["lq"]
        s = self._steering(lq.shape[0], generator)  # (B,)
        eps = latent_noise(lq, self.components.vae.config.latent_channels, generator)  # (B, 4, h, w) CHARIOT's ε
        z_hat, x_hat, trace = self.models["generator"](lq, cond, s, eps, self._noise(lq, generator))
        carry["trace"] = {k: v.detach() for k, v in trace.items()}
        return z_hat, x_hat

    def extra_generator_terms(self, z_hat: torch.Tensor, batch: dict, carry: dict) -> dict:
        carry["z_fake"] = z_hat.detach()
        if self.discriminator is None:
            return {}
        fake = self.models["discriminator"](z_hat)  # logit maps (B, 1, h', w')
        return {"loss_gan": (self.cfg.lambda_gan, generator_loss(self.cfg.discriminator, fake))}

    @torch.no_grad()
    def real_latent(self, hq: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """The frozen SD encoder's latent of x_H (B, 4, h, w): the VAE-encoder LoRA switched off (SPEC §5.5)."""
        with adapters_disabled(self.components.vae):
            return sample_latent(self.components.vae, hq, self._noise(hq, generator))

    def phase_loss(self, phase: str, batch: dict, carry: dict, generator: torch.Generator) -> PhaseOutput:
        if phase != "discriminator":
            out = super().phase_loss(phase, batch, carry, generator)
            if phase == "generator":
                out.terms["tau"] = float(carry["trace"]["tau"].mean())
            return out
        disc = self.models["discriminator"]
        real = self.real_latent(batch["hq"], generator)  # (B, 4, h, w)
        loss = discriminator_loss(self.cfg.discriminator, disc(real), disc(carry["z_fake"]))
        return PhaseOutput(loss, {"loss_d": float(loss.detach())})

    @torch.no_grad()
    def generate(self, lq: torch.Tensor, prompts: list[str], generator: torch.Generator) -> torch.Tensor:
        s = torch.full((lq.shape[0],), self.cfg.validation_s)  # (B,)
        eps = latent_noise(lq, self.components.vae.config.latent_channels, generator)  # (B, 4, h, w)
        _, x_hat, _ = self.generator(lq, self.prompts(prompts), s, eps, self._noise(lq, generator))
        return x_hat  # (B, 3, H, W)

    def exported_mine(self) -> tuple[MINEConfig, dict[str, torch.Tensor]]:
        """MINE's config and tensors as the bundle holds them, the ablated parts set to what training used."""
        c, config = self.cfg, self.mine.config
        tensors = {k: v.detach().clone() for k, v in self.mine.state_dict().items()}
        if not c.use_tp:
            config, tensors = fixed_tau_head(config, tensors, float(c.timestep),
                                             last=f"tau_head.{len(self.mine.tau_head) - 1}")
        zeroed = [] if c.use_ine else ["spatial_head.weight", "spatial_head.bias"]
        last_d = f"d_head.{len(self.mine.d_head) - 1}"
        zeroed += [] if c.use_deg_embed else [f"{last_d}.weight", f"{last_d}.bias"]
        tensors.update({k: torch.zeros_like(tensors[k]) for k in zeroed})
        return config, tensors

    def bundle_modules(self) -> dict[str, torch.nn.Module]:
        return {"mine": self.mine}

    def export_bundle(self) -> tuple[BundleMeta, dict[str, torch.Tensor]]:
        mine_config, mine_tensors = self.exported_mine()
        modules = ("unet_lora", "vae_encoder_lora", *([CONV_IN_PREFIX] if self.cfg.train_conv_in else []), "mine")
        meta = BundleMeta(method="idas", base_family=self.components.family, parameterisation="S", lora=self.lora,
                          modules=modules, hyperparameters={"mine": mine_config.to_dict()},
                          defaults={**METHOD_DEFAULTS["idas"][1], "s": self.cfg.validation_s})
        tensors = collect_bundle_tensors(self.components, meta)
        tensors.update({f"mine.{k}": v for k, v in mine_tensors.items()})
        return meta, tensors


METHOD = IDaS

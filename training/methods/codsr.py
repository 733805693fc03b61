"""CODSR training, stage 1, the "GAN stage" (SPEC §4.4): Chen et al., "Bridging Fidelity-Reality with Controllable
One-Step Diffusion for Image Super-Resolution" (CODSR), §3.4, §4.1. The training code is not released; stage 2 is
``training.methods.codsr_stage2``.

Generator: ``training.methods.codsr_generator`` (RGPA noise at t_s, LQFM on conv_in, x̂₀ (N)). Trainable: the
VAE-encoder LoRA (r = 4), the U-Net LoRA (r = 16, adapters ``default_*``) and the LQFM; the whole conv_in only with
``train_conv_in`` ([RECON] default off, SPEC §4.4). Phases, each its own AdamW, in this order:

1. ``generator``:     λ_l2 MSE(x̂_H, x_H) + λ_lpips LPIPS(x̂_H, x_H) + λ_gan L_G(D(x̂_H)),  (λ_l2, λ_lpips, λ_gan) =
                      (2, 5, 0.5): S3Diff's weights in one combined step ([RECON], SPEC §4.4);
2. ``discriminator``: D on x_H (real, BCE target 0.8) and stopgrad x̂_H (fake, target 0).

D is the pixel-space spectral-norm discriminator of ``training.losses.gan``: S3Diff's vision-aided D needs DINO
weights that cannot be downloaded here (SPEC §10), so this from-scratch D with S3Diff's one-sided label smoothing
stands in for it ([RECON]). The OSEDiff loop (``training.methods.osediff``) runs the steps; its VSD terms are off
(λ_vsd = 0) in this stage. The bundle (method ``codsr``) holds the LoRA and the LQFM, and runs the CODSR workflow.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from osd_core.adapters import CONV_IN_PREFIX, collect_bundle_tensors
from osd_core.bundle import BundleMeta
from osd_core.method_modules import bundle_tensors
from training.losses.gan import DiscriminatorConfig, discriminator_loss, generator_loss
from training.methods.base import PhaseOutput
from training.methods.codsr_generator import CODSRDraws, CODSRGenerator, build_lqfm, check_timesteps, codsr_meta, draw
from training.methods.osediff import OSEDiff, OSEDiffConfig
from training.methods.sd_lora import conv_in_base
from training.methods.seeded import seeded_discriminator


@dataclass(frozen=True)
class CODSRConfig(OSEDiffConfig):
    """What both CODSR stages share: ``timestep`` is the inference t_s (validation, bundle default), training draws
    t_s ~ U_int[t_min, t_max] per sample ([RECON] 20 .. 400)."""

    timestep: int = 100
    t_min: int = 20
    t_max: int = 400

    def __post_init__(self) -> None:
        super().__post_init__()
        check_timesteps(self.timestep, self.t_min, self.t_max)


@dataclass(frozen=True)
class CODSRStage1Config(CODSRConfig):
    """The ``[codsr_stage1]`` section: SPEC §4.4's stage-1 weights ([RECON] S3Diff's), the discriminator, and
    whether conv_in trains whole ([RECON] no). VSD is off in this stage."""

    lambda_l2: float = 2.0
    lambda_lpips: float = 5.0
    lambda_vsd: float = 0.0
    lambda_gan: float = 0.5
    train_conv_in: bool = False
    discriminator: DiscriminatorConfig = field(default_factory=DiscriminatorConfig.pixel_multilevel)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.lambda_gan < 0:
            raise ValueError(f"`lambda_gan` must be >= 0 (0 drops the discriminator); got {self.lambda_gan}.")
        if self.discriminator.in_channels != 3:
            raise ValueError(f"`discriminator.in_channels` must be 3: stage 1's D judges RGB images; got "
                             f"{self.discriminator.in_channels}. Start from DiscriminatorConfig.pixel_multilevel() "
                             "(the [codsr_stage1.discriminator] table of training/configs/codsr_stage1.toml).")


class CODSRBase(OSEDiff):
    """The CODSR generator in OSEDiff's loop: ``_noise`` draws the posterior noise, ε and t_s of one forward, so
    OSEDiff's ``student`` runs it unchanged; validation renders at the inference t_s."""

    def draws(self, x: torch.Tensor, generator: torch.Generator, t_range: tuple[int, int]) -> CODSRDraws:
        """The random draws of one generator forward on pixels x, t_s ~ U_int[t_range]."""
        return draw(x, generator, t_range=t_range, sample_latent_noise=self.cfg.latent_sampling == "sample",
                    latent_channels=self.components.vae.config.latent_channels)

    def _noise(self, x: torch.Tensor, generator: torch.Generator) -> CODSRDraws:
        return self.draws(x, generator, (self.cfg.t_min, self.cfg.t_max))

    @torch.no_grad()
    def generate(self, lq: torch.Tensor, prompts: list[str], generator: torch.Generator) -> torch.Tensor:
        draws = self.draws(lq, generator, (self.cfg.timestep, self.cfg.timestep))
        return self.generator(lq, self.prompts(prompts), draws)[1]  # (B, 3, H, W)


class CODSRStage1(CODSRBase):
    """Stage 1: LoRA + LQFM trained with L2 + LPIPS + a pixel GAN (SPEC §4.4)."""

    name = "codsr_stage1"
    config_class = CODSRStage1Config

    def __init__(self, config, components, context) -> None:
        super().__init__(config, components, context)
        if self.cfg.lambda_gan > 0:
            self.discriminator = seeded_discriminator(self.cfg.discriminator, context.init_generator, context.device)

    def build_generator(self, components, context) -> torch.nn.Module:
        super().build_generator(components, context)  # OSEDiff's LoRA targets, at this run's ranks (U-Net 16)
        conv_in_base(components.unet).requires_grad_(self.cfg.train_conv_in)
        self.lqfm = build_lqfm(components.unet, context.init_generator).to(context.device).requires_grad_(True)
        return CODSRGenerator(components.unet, components.vae, self.lqfm, components.schedule)

    def student(self, batch: dict, cond: torch.Tensor, carry: dict, generator: torch.Generator):
        z_hat, x_hat = super().student(batch, cond, carry, generator)
        carry["x_hat"] = x_hat  # (B, 3, H, W), with gradient: the GAN term of this phase reads it
        return z_hat, x_hat

    def extra_generator_terms(self, z_hat: torch.Tensor, batch: dict, carry: dict) -> dict:
        if self.discriminator is None:
            return {}
        fake = self.models["discriminator"](carry["x_hat"])  # logit maps, one per level
        return {"loss_gan": (self.cfg.lambda_gan, generator_loss(self.cfg.discriminator, fake))}

    def phase_loss(self, phase: str, batch: dict, carry: dict, generator: torch.Generator) -> PhaseOutput:
        if phase != "discriminator":
            return super().phase_loss(phase, batch, carry, generator)
        disc = self.models["discriminator"]
        loss = discriminator_loss(self.cfg.discriminator, disc(batch["hq"]), disc(carry["x_hat"].detach()))
        return PhaseOutput(loss, {"loss_d": float(loss.detach())})

    def bundle_modules(self) -> dict[str, torch.nn.Module]:
        return {"lqfm": self.lqfm}

    def export_bundle(self) -> tuple[BundleMeta, dict[str, torch.Tensor]]:
        conv_in = [CONV_IN_PREFIX] if self.cfg.train_conv_in else []
        meta = codsr_meta(self.components.family, lora=self.lora,
                          modules=("unet_lora", "vae_encoder_lora", *conv_in, "lqfm"),
                          hyperparameters={"lqfm": self.lqfm.config.to_dict()}, timestep=self.cfg.timestep)
        tensors = collect_bundle_tensors(self.components, meta)
        tensors.update({f"lqfm.{k}": v for k, v in bundle_tensors("lqfm", self.lqfm).items()})
        return meta, tensors


METHOD = CODSRStage1

"""OSEDiff training (SPEC §1–2): Wu et al., "One-Step Effective Diffusion Network for Real-World Image
Super-Resolution", arXiv:2406.08177.

Generator G (SPEC §1.1), x_L (B, 3, H, W) in [-1, 1] at output size:

    z_L = VAE_enc_LoRA(x_L).sample() · 0.18215          (B, 4, H/8, W/8)
    ε̂   = UNet_LoRA(z_L, t = 999, c)                     c = CLIPText(prompt)
    ẑ_H = (z_L − σ_999 ε̂) / α_999                       x̂₀ form (S), SPEC §0.6
    x̂_H = clamp(VAE_dec(ẑ_H / 0.18215), −1, 1)

Trainable (SPEC §1.2): VAE-encoder LoRA r = 4, U-Net LoRA r = 4 in the three adapters, and the whole U-Net conv_in.
Two phases per step, each its own AdamW (lr 5e-5, betas (0.9, 0.999), wd 1e-2), in this order:

1. ``generator``:   L_G = λ_l2 MSE(x̂_H, x_H) + λ_lpips LPIPS(x̂_H, x_H) + λ_vsd L_VSD(ẑ_H; cfg 7.5, c, c_neg)
   with (λ_l2, λ_lpips, λ_vsd) = (1, 2, 1) and OSEDiff's negative prompt for the CFG branch;
2. ``regulariser``: λ_reg L_diff(stopgrad ẑ_H, c) trains the LoRA "fake score" U-Net (SPEC §2), λ_reg = 1.

The frozen teacher U-Net ("real score") and the text encoder are kept in ``model.dtype``. Setting λ_vsd = 0 drops
the VSD machinery (no teacher, no regulariser phase); λ_lpips = 0 drops the perceptual network.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from osd_core.adapters import collect_bundle_tensors
from osd_core.bundle import BundleMeta
from osd_core.method_defaults import METHOD_DEFAULTS
from osd_core.models import cast
from osd_core.parameterisation import Parameterisation, predict_x0
from osd_core.schedule import NoiseSchedule
from training.losses.vsd import ScoreModels, VSDConfig, regulariser_diffusion_loss, sample_timesteps, vsd_loss
from training.methods.base import Method, Phase, PhaseOutput
from training.methods.sd_lora import add_unet_lora, conv_in_base, inject_training_lora, training_lora_spec
from training.methods.sd_ops import PromptEncoder, decode, posterior_noise, sample_latent
from training.perceptual import PerceptualConfig, build_perceptual

# Verbatim from OSEDiff's training script (SPEC §1.2).
NEGATIVE_PROMPT = ("painting, oil painting, illustration, drawing, art, sketch, cartoon, CG Style, 3D render, "
                   "unreal engine, blurring, dirty, messy, worst quality, low quality, frames, watermark, signature, "
                   "jpeg artifacts, deformed, lowres, over-smooth")
LATENT_SAMPLING = ("sample", "mode")


@dataclass(frozen=True)
class OSEDiffConfig:
    """The ``[osediff]`` section: loss weights and VSD settings (SPEC §1.2, §2 defaults)."""

    timestep: int = 999
    lambda_l2: float = 1.0
    lambda_lpips: float = 2.0
    lambda_vsd: float = 1.0
    lambda_reg: float = 1.0
    cfg_scale: float = 7.5
    negative_prompt: str = NEGATIVE_PROMPT
    latent_sampling: str = "sample"
    perceptual: PerceptualConfig = field(default_factory=PerceptualConfig)
    vsd: VSDConfig = field(default_factory=VSDConfig)

    def __post_init__(self) -> None:
        if not 0 <= self.timestep <= 999:
            raise ValueError(f"`timestep` must be in [0, 999]; got {self.timestep}. OSEDiff uses 999.")
        for name in ("lambda_l2", "lambda_lpips", "lambda_vsd", "lambda_reg", "cfg_scale"):
            if getattr(self, name) < 0:
                raise ValueError(f"`{name}` must be >= 0; got {getattr(self, name)}.")
        if self.lambda_l2 == self.lambda_lpips == self.lambda_vsd == 0:
            raise ValueError("all generator loss weights (lambda_l2, lambda_lpips, lambda_vsd) are 0; nothing trains.")
        if self.latent_sampling not in LATENT_SAMPLING:
            raise ValueError(f"`latent_sampling` must be one of {LATENT_SAMPLING}; got {self.latent_sampling!r}.")


class OSEDiffGenerator(torch.nn.Module):
    """x_L -> (ẑ_H, x̂_H) through the LoRA-adapted VAE encoder, U-Net at a fixed t, x̂₀ (S) and the frozen decoder."""

    def __init__(self, unet, vae, schedule: NoiseSchedule, timestep: int) -> None:
        super().__init__()
        self.unet, self.vae, self.schedule, self.timestep = unet, vae, schedule, timestep

    def forward(self, x_lq: torch.Tensor, cond: torch.Tensor, noise: torch.Tensor | None):
        """x_lq (B, 3, H, W) in [-1, 1], cond (B, 77, D), noise (B, 4, H/8, W/8) or None (posterior mean)."""
        z_lq = sample_latent(self.vae, x_lq, noise)  # (B, 4, h, w)
        t = torch.full((x_lq.shape[0],), float(self.timestep), device=x_lq.device)  # (B,)
        eps = self.unet(z_lq, t, encoder_hidden_states=cond).sample  # (B, 4, h, w)
        # x̂₀ in float32: at t = 999 it divides by α ≈ 0.068, which would amplify half-precision rounding.
        z_hat = predict_x0(Parameterisation.STANDARD, z_in=z_lq.float(), z_lq=z_lq.float(), eps_hat=eps.float(),
                           t=t, schedule=self.schedule)  # (B, 4, h, w)
        return z_hat, decode(self.vae, z_hat)  # (B, 4, h, w), (B, 3, H, W)


class OSEDiff(Method):
    """OSEDiff's generator trained with MSE + LPIPS + VSD and a VSD regulariser (SPEC §1.2, §2)."""

    name = "osediff"
    config_class = OSEDiffConfig

    def __init__(self, config, components, context) -> None:
        super().__init__(config, components, context)
        c, lora = self.cfg, config.lora
        base_unet = components.unet  # before any LoRA: the teacher and the regulariser start from it
        self.teacher = self.regulariser = self.scores = None
        # an adversarial method (IDaS-SR, CODSR stage 1) sets its discriminator after this constructor; it is then a
        # trainable module with its own optimiser, the last phase ("discriminator", whose loss the method gives)
        self.discriminator: torch.nn.Module | None = None
        if c.lambda_vsd > 0:
            # SPEC §2: the real score is the frozen SD U-Net (weight dtype), the fake score SD + LoRA (float32)
            self.teacher = self.build_teacher(base_unet)
            self.regulariser = copy.deepcopy(base_unet)
            self.regulariser_params = add_unet_lora(self.regulariser, rank=lora.regulariser_rank, alpha=lora.alpha,
                                                    generator=context.init_generator)
        self.generator = self.build_generator(components, context)
        cast(components.text_encoder, context.weight_dtype)
        self.prompts = PromptEncoder(components.text_encoder, components.tokenizer, context.device, torch.float32)
        self.negative = self.prompts([c.negative_prompt])  # (1, 77, D)
        self.perceptual = None
        if c.lambda_lpips > 0:
            self.perceptual = build_perceptual(c.perceptual).to(context.device).eval().requires_grad_(False)

    def build_generator(self, components, context) -> torch.nn.Module:
        """Inject the trained LoRA (``self.lora``: the bundle's LoRA metadata) and build the generator; runs after
        the teacher and the regulariser were copied from the base U-Net. A hook: CODSR's stage 2 merges its stage-1
        bundle and adds the alignment LoRA instead."""
        lora = self.config.lora
        self.lora = training_lora_spec(components, unet_rank=lora.unet_rank, vae_encoder_rank=lora.vae_encoder_rank,
                                       alpha=lora.alpha)
        inject_training_lora(components, self.lora, context.init_generator)
        conv_in_base(components.unet).requires_grad_(True)
        return OSEDiffGenerator(components.unet, components.vae, components.schedule, self.cfg.timestep)

    def condition(self, batch: dict) -> torch.Tensor:
        """c_pos (B, L, D) for the generator and the VSD scores. A hook (RCOD's visual prompt)."""
        return self.prompts(batch["prompt"])  # (B, 77, D)

    def negative_condition(self, cond: torch.Tensor) -> torch.Tensor:
        """c_neg of the teacher's CFG branch, one per sample of ``cond``. A hook."""
        return self.negative.expand_as(cond)  # (B, 77, D)

    def build_teacher(self, base_unet: torch.nn.Module) -> torch.nn.Module | None:
        """The frozen VSD teacher: a copy of the base U-Net in the weight dtype. A hook: TADSR returns None, its
        teacher being the regulariser U-Net with the adapters off (SPEC §2)."""
        return cast(copy.deepcopy(base_unet), self.context.weight_dtype).requires_grad_(False).eval()

    def student(self, batch: dict, cond: torch.Tensor, carry: dict, generator: torch.Generator):
        """(ẑ_H, x̂_H) of the generator on ``batch``. A hook: TADSR and IDaS-SR draw their per-sample timesteps
        and noise here and leave what their other hooks need in ``carry``."""
        return self.models["generator"](batch["lq"], cond, self._noise(batch["lq"], generator))

    def pixel_loss(self, x_hat: torch.Tensor, hq: torch.Tensor, carry: dict) -> torch.Tensor:
        """The λ_l2 term: MSE(x̂_H, x_H). A hook (TADSR blurs both first)."""
        return F.mse_loss(x_hat.float(), hq.float())

    def vsd_timesteps(self, batch_size: int, carry: dict, generator: torch.Generator):
        """Per-sample VSD timesteps (B,) and CFG scale (a number or (B,)). A hook (TADSR's TAVSD)."""
        return sample_timesteps(self.cfg.vsd, batch_size, generator), self.cfg.cfg_scale

    def extra_generator_terms(self, z_hat: torch.Tensor, batch: dict, carry: dict) -> dict:
        """More generator loss terms, name -> (weight, scalar tensor). A hook (IDaS-SR's latent GAN)."""
        return {}

    def trainable_modules(self) -> dict[str, torch.nn.Module]:
        modules = {"generator": self.generator}
        if self.regulariser is not None:
            modules["regulariser"] = self.regulariser
        if self.discriminator is not None:
            modules["discriminator"] = self.discriminator
        return modules

    def phases(self) -> list[Phase]:
        params = [p for p in self.generator.parameters() if p.requires_grad]
        phases = [Phase("generator", {"generator": params})]
        if self.regulariser is not None:
            phases.append(Phase("regulariser", {"regulariser": self.regulariser_params}))
        if self.discriminator is not None:
            phases.append(Phase("discriminator", {"discriminator": list(self.discriminator.parameters())}))
        return phases

    def bind(self, prepared: dict[str, torch.nn.Module]) -> None:
        super().bind(prepared)
        if self.regulariser is not None:  # the scores call the prepared (possibly DDP-wrapped) regulariser
            self.scores = ScoreModels(teacher=self.teacher, regulariser=prepared["regulariser"],
                                      schedule=self.components.schedule)

    def _noise(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor | None:
        return posterior_noise(x, self.components.vae, self.cfg.latent_sampling, generator)  # (B, 4, h, w) or None

    def phase_loss(self, phase: str, batch: dict, carry: dict, generator: torch.Generator) -> PhaseOutput:
        c = self.cfg
        if phase == "regulariser":
            loss = regulariser_diffusion_loss(carry["z_hat"], carry["cond"], self.scores, generator, config=c.vsd)
            return PhaseOutput(c.lambda_reg * loss, {"loss_reg": float(loss.detach())})
        lq, hq = batch["lq"], batch["hq"]  # (B, 3, H, W) each
        cond = self.condition(batch)  # (B, L, D)
        z_hat, x_hat = self.student(batch, cond, carry, generator)
        terms, loss = {}, torch.zeros((), device=lq.device)
        if c.lambda_l2 > 0:
            l2 = self.pixel_loss(x_hat, hq, carry)
            loss, terms["loss_l2"] = loss + c.lambda_l2 * l2, float(l2.detach())
        if c.lambda_lpips > 0:
            lpips = self.perceptual(x_hat, hq).mean()
            loss, terms["loss_lpips"] = loss + c.lambda_lpips * lpips, float(lpips.detach())
        if c.lambda_vsd > 0:
            t, cfg_scale = self.vsd_timesteps(z_hat.shape[0], carry, generator)  # (B,) U[20, 980) in OSEDiff
            vsd = vsd_loss(z_hat, t.to(z_hat.device), cfg_scale, cond, self.negative_condition(cond), self.scores,
                           generator)
            loss, terms["loss_vsd"] = loss + c.lambda_vsd * vsd, float(vsd.detach())
            carry["z_hat"], carry["cond"] = z_hat.detach(), cond.detach()
        for name, (weight, value) in self.extra_generator_terms(z_hat, batch, carry).items():
            loss, terms[name] = loss + weight * value, float(value.detach())
        terms["loss_g"] = float(loss.detach())
        return PhaseOutput(loss, terms)

    @torch.no_grad()
    def generate(self, lq: torch.Tensor, prompts: list[str], generator: torch.Generator) -> torch.Tensor:
        _, x_hat = self.generator(lq, self.prompts(prompts), self._noise(lq, generator))
        return x_hat  # (B, 3, H, W)

    def export_bundle(self) -> tuple[BundleMeta, dict[str, torch.Tensor]]:
        parameterisation, defaults = METHOD_DEFAULTS["osediff"]
        meta = BundleMeta(method="osediff", base_family=self.components.family, parameterisation=parameterisation,
                          lora=self.lora, modules=("unet_lora", "vae_encoder_lora", "unet_conv_in"),
                          defaults={**defaults, "timestep": self.cfg.timestep})
        return meta, collect_bundle_tensors(self.components, meta)


METHOD = OSEDiff

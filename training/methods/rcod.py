"""RCOD_O training (SPEC §6, Alg. 1): Wu et al., "Realism Control One-step Diffusion for Real-World Image
Super-Resolution": OSEDiff (§1–2) with latent domain grouping (LDG), degradation-aware sampling (DAS) and a visual
prompt (VPIM).

Per sample, x_L and x_H (B, 3, H, W) in [-1, 1]:

    z_L, z_H = E_LoRA(x_L), E_LoRA(x_H)             z_H under no_grad with the current encoder (Alg. 1 l.6)
    M_L      = cos(vec z_L, vec z_H)                Eq. 6
    t        = k·(n − q),  q = clamp(⌊n (M_L − M_min)/(M_max − M_min)⌋, 0, n − 1)      Eq. 5: 250 / 500 / 750
    c_y      = Linear(CLIPVision(x_L))              VPIM, the tower frozen (Alg. 1 l.8)
    ẑ_H      = (z_L − σ_t ε_θ(z_L; t, c_y)) / α_t   x̂₀ (S) at the LDG t, no noise added
    L_G      = MSE + λ1 LPIPS + λ2 L_VSD(ẑ_H; t_r, c_y),   t_r ~ U_int[max(20, t − k), min(980, t + k)]   (DAS, Eq. 7)
    L_diff   = λ3 ε-MSE of the regulariser LoRA on stopgrad(ẑ_H) with c_y (its own optimiser, as in OSEDiff)

[RECON] (SPEC §6.3, §6.5): λ1, λ2, λ3 = 2, 1, 1 (OSEDiff's ``lambda_lpips``, ``lambda_vsd``, ``lambda_reg``); L_cls is
dropped (the paper never defines it); VPIM reads ViT-L/14's last_hidden_state through one Linear(1024 -> U-Net
context), N(0, 0.02) init; the teacher's CFG negative branch is the CLIP *text* embedding of OSEDiff's negative
prompt (``negative_prompt``; "" for the empty prompt), since a visual prompt has no negative counterpart; M_min and
M_max are 0.25 and 1.0, from the paper's worked example (``[rcod.ldg]``).

Trainable: OSEDiff's set (VAE-encoder LoRA, U-Net LoRA, the whole conv_in) plus the VPIM Linear. The CLIP tower, the
teacher and the text encoder are frozen. The bundle adds the ``vpim`` module and the LDG settings (hyperparameters
``ldg``, read by the Realism level node); ``rcod_mem`` later adds MEM.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

from osd_core.adapters import collect_bundle_tensors
from osd_core.bundle import BundleMeta
from osd_core.ldg import LDGConfig, latent_similarity, level_timestep, level_timesteps
from osd_core.method_defaults import METHOD_DEFAULTS
from osd_core.method_modules import bundle_tensors
from osd_core.models import cast
from osd_core.parameterisation import Parameterisation
from osd_core.schedule import NoiseSchedule
from osd_core.vpim import VPIM, VPIMConfig, encode_with_tower
from training.losses.vsd import das_timesteps
from training.methods.base import Phase
from training.methods.clip_vision import vision_tower
from training.methods.osediff import OSEDiff, OSEDiffConfig
from training.methods.sd_ops import decode, sample_latent
from training.methods.whole_latent import denoise_whole_latent

TimestepRule = Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class RCODConfig(OSEDiffConfig):
    """The ``[rcod]`` section: OSEDiff's loss settings (λ1 = ``lambda_lpips``, λ2 = ``lambda_vsd``, λ3 =
    ``lambda_reg``), the LDG grouping, the CLIP vision tower and the VPIM init. ``timestep`` is the level that
    validation renders and the bundle names as its default; training picks t per sample by LDG."""

    timestep: int = 500
    clip_vision: str = ""
    vpim_init_std: float = 0.02
    ldg: LDGConfig = field(default_factory=LDGConfig)

    def __post_init__(self) -> None:
        super().__post_init__()
        levels = level_timesteps(self.ldg)
        if self.timestep not in levels.values():
            raise ValueError(f"`timestep` must be one of the LDG levels {levels}; got {self.timestep}.")
        if not self.vpim_init_std > 0:
            raise ValueError(f"`vpim_init_std` must be positive; got {self.vpim_init_std}. [RECON] default: 0.02.")


def level_name(timestep: int, ldg: LDGConfig) -> str:
    """The name (fidelity / neutral / realism) of an LDG level timestep."""
    return next(name for name, t in level_timesteps(ldg).items() if t == timestep)


class RCODGenerator(torch.nn.Module):
    """(x_L, c_y) -> (ẑ_H, x̂_H, t): t = ``timestep(z_L)`` per sample, x̂₀ (S) with no noise, through the nodes' own
    one-step denoise on one whole-latent tile."""

    def __init__(self, unet, vae, schedule: NoiseSchedule) -> None:
        super().__init__()
        self.unet, self.vae, self.schedule = unet, vae, schedule

    def forward(self, x_lq: torch.Tensor, cond: torch.Tensor, noise: torch.Tensor | None, timestep: TimestepRule):
        """x_lq (B, 3, H, W) in [-1, 1], cond (B, N, D) the VPIM tokens, noise (B, 4, h, w) or None (posterior
        mean); ``timestep`` maps the detached z_L (B, 4, h, w) to t (B,): LDG in training, a level or MEM after."""
        z_lq = sample_latent(self.vae, x_lq, noise)  # (B, 4, h, w)
        t = timestep(z_lq.detach())  # (B,)
        z_hat = denoise_whole_latent(self.unet, self.schedule, Parameterisation.STANDARD, z_lq, cond, t)  # (B, 4, h, w)
        return z_hat, decode(self.vae, z_hat), t  # (B, 4, h, w), (B, 3, H, W), (B,)


def constant_timestep(t: float) -> TimestepRule:
    """The rule z_L ↦ t for every sample (a fixed realism level)."""
    return lambda z_lq: torch.full((z_lq.shape[0],), float(t), device=z_lq.device)  # (B,)


class RCOD(OSEDiff):
    """RCOD_O: OSEDiff's loop with VPIM conditioning, the generator at the LDG timestep and DAS-sampled VSD."""

    name = "rcod"
    config_class = RCODConfig

    def build_generator(self, components, context) -> torch.nn.Module:
        osediff = super().build_generator(components, context)  # OSEDiff's LoRA and trainable conv_in
        tower = vision_tower(self.cfg.clip_vision, self.config.model, "rcod.clip_vision")
        self.tower = cast(tower, context.weight_dtype).to(context.device)
        config = VPIMConfig(vision_dim=self.tower.config.hidden_size,
                            cond_dim=components.unet.config.cross_attention_dim,
                            image_size=self.tower.config.image_size, init_std=self.cfg.vpim_init_std)
        self.vpim = VPIM(config)
        self.vpim.initialize_weights(context.init_generator)
        self.vpim.to(context.device).requires_grad_(True)
        return RCODGenerator(osediff.unet, osediff.vae, components.schedule)

    def trainable_modules(self) -> dict[str, torch.nn.Module]:
        return {**super().trainable_modules(), "vpim": self.vpim}

    def phases(self) -> list[Phase]:
        phases = super().phases()
        phases[0].groups["vpim"] = list(self.vpim.parameters())  # ``[optim.groups.vpim]`` may give it its own lr
        return phases

    def tokens(self, lq: torch.Tensor) -> torch.Tensor:
        """The frozen tower's tokens of the LQ image (B, N, vision_dim), float32."""
        return encode_with_tower(self.tower, lq, self.vpim.config).float()

    def condition(self, batch: dict) -> torch.Tensor:
        return self.models["vpim"](self.tokens(batch["lq"]))  # (B, N, D) c_y, for the U-Net and the VSD scores

    def negative_condition(self, cond: torch.Tensor) -> torch.Tensor:
        return self.negative.expand(cond.shape[0], -1, -1)  # (B, 77, D) text: c_y has no negative [RECON]

    def student(self, batch: dict, cond: torch.Tensor, carry: dict, generator: torch.Generator):
        lq, hq = batch["lq"], batch["hq"]  # (B, 3, H, W) each
        noise_lq, noise_hq = self._noise(lq, generator), self._noise(hq, generator)
        z_hat, x_hat, carry["t"] = self.models["generator"](lq, cond, noise_lq, self.ldg_timestep(hq, noise_hq))
        return z_hat, x_hat

    def ldg_timestep(self, hq: torch.Tensor, noise: torch.Tensor | None) -> TimestepRule:
        """Eq. 5–6 as a rule z_L ↦ t, with z_H from the current encoder under no_grad (Alg. 1 l.6)."""

        def rule(z_lq: torch.Tensor) -> torch.Tensor:
            with torch.no_grad():
                z_hq = sample_latent(self.generator.vae, hq, noise)  # (B, 4, h, w)
            return level_timestep(latent_similarity(z_lq, z_hq), self.cfg.ldg)  # (B,)

        return rule

    def vsd_timesteps(self, batch_size: int, carry: dict, generator: torch.Generator):
        return das_timesteps(carry["t"], generator, self.cfg.ldg), self.cfg.cfg_scale  # (B,) DAS, Eq. 7

    @torch.no_grad()
    def generate(self, lq: torch.Tensor, prompts: list[str], generator: torch.Generator) -> torch.Tensor:
        cond = self.vpim(self.tokens(lq))  # (B, N, D)
        return self.generator(lq, cond, self._noise(lq, generator), constant_timestep(self.cfg.timestep))[1]

    def bundle_modules(self) -> dict[str, torch.nn.Module]:
        return {"vpim": self.vpim}

    def export_bundle(self) -> tuple[BundleMeta, dict[str, torch.Tensor]]:
        c = self.cfg
        meta = BundleMeta(method="rcod", base_family=self.components.family,
                          parameterisation=Parameterisation.STANDARD.value, lora=self.lora,
                          modules=("unet_lora", "vae_encoder_lora", "unet_conv_in", "vpim"),
                          hyperparameters={"vpim": self.vpim.config.to_dict(), "ldg": c.ldg.to_dict()},
                          defaults={**METHOD_DEFAULTS["rcod"][1], "level": level_name(c.timestep, c.ldg)})
        tensors = collect_bundle_tensors(self.components, meta)
        tensors.update({f"vpim.{k}": v for k, v in bundle_tensors("vpim", self.vpim).items()})
        return meta, tensors


METHOD = RCOD

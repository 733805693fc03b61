"""TADSR training (SPEC §3): "Time-Aware One Step Diffusion Network for Real-World Image Super-Resolution",
arXiv:2508.16557, §3.3–3.5 and supp. §7, with the choices of its released code (zty557/TADSR@b0eaa30).

Student (SPEC §3.2), x_L (B, 3, H, W) in [-1, 1] at output size, one timestep t_s per sample:

    t_s ~ U{⌊linspace(1, 999, 50)⌋} = {1, 21, 41, 62, ..., 978, 999}   [CODE] ("grid"; the paper's U[0, 999]: "uniform")
    z_L = TAE_LoRA(x_L, t_s).sample() · 0.18215                          time-aware encoder (osd_core.tae, Eq. 4)
    F   = UNet_LoRA(z_L, t_s, c)                                         the same t_s goes to the U-Net
    ẑ_H = z_L / α_{t_s} − F                                              x̂₀ form (R), SPEC §3.3 (the release's form)
    x̂_H = clamp(VAE_dec(ẑ_H / 0.18215), −1, 1)

Trainable (SPEC §3.1–3.2): the TAE's time layers fully (``time_embedding`` and the ten ``time_emb_proj``, which start
at zero [RECON], so step 0 encodes exactly like the SD encoder), the VAE-encoder LoRA r = 4 on OSEDiff's targets (the
time layers live outside ``vae.encoder`` and get none), the U-Net LoRA r = 4 in the three adapters and the whole
``conv_in``. Two phases per step, as in OSEDiff (``training.methods.osediff``), whose loop this class reuses:

1. ``generator``:   λ_l2 MSE(blur_{t_s}(x̂_H), blur_{t_s}(x_H)) + λ_lpips LPIPS(x̂_H, x_H) + λ_vsd L_TAVSD
   with (1, 2, 1) (SPEC §3.6); LPIPS on the unblurred images; the blur kernel 5 + 4⌊t_s/200⌋, σ = 1 + t_s/200
   (supp. Eq. 13–14, ``training.losses.blur_mse``); L_TAVSD is the VSD of SPEC §2 at t_v = ⌊λ t_s + γ⌋ (λ = 0.5,
   γ = 0, paper Eq. 5) with the per-sample CFG 7.5 + t_v/200 of the code;
2. ``regulariser``: λ_reg L_diff(stopgrad ẑ_H, c), t ~ U_int[0, 1000) (SPEC §3.4, unchanged).

One U-Net serves both scores (SPEC §2): the regulariser (SD + its own LoRA) is the fake score and, with its
adapters switched off, the teacher; no third U-Net is held. Data: with probability 1 − ``deg_prob`` (0.01) a
sample's LQ is the bicubic ×4 down-and-up of its GT (``training.methods.bicubic_lq``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from osd_core.adapters import collect_bundle_tensors
from osd_core.bundle import BundleMeta
from osd_core.method_defaults import METHOD_DEFAULTS
from osd_core.method_modules import bundle_tensors
from osd_core.parameterisation import Parameterisation, predict_x0
from osd_core.schedule import NoiseSchedule
from osd_core.tae import TAEConfig, TimeAwareEncoder
from osd_core.vae import time_aware_encoder_fn
from training.losses.blur_mse import blurred_mse
from training.losses.vsd import tavsd_timesteps
from training.methods.bicubic_lq import mix_bicubic_lq
from training.methods.osediff import OSEDiff, OSEDiffConfig
from training.methods.sd_ops import decode, sample_latent

TIMESTEP_SAMPLING = ("grid", "uniform")


@dataclass(frozen=True)
class TADSRConfig(OSEDiffConfig):
    """The ``[tadsr]`` section (SPEC §3 defaults); ``timestep`` is the t_s of validation and of the bundle."""

    timestep: int = 500
    timestep_sampling: str = "grid"
    grid_size: int = 50
    tavsd_lambda: float = 0.5
    tavsd_gamma: float = 0.0
    cfg_slope: float = 1.0 / 200.0
    blur: bool = True
    deg_prob: float = 0.99
    tae: TAEConfig = field(default_factory=TAEConfig)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.timestep_sampling not in TIMESTEP_SAMPLING:
            raise ValueError(f"`timestep_sampling` must be one of {TIMESTEP_SAMPLING}; got "
                             f"{self.timestep_sampling!r}. TADSR's code uses \"grid\".")
        if not 2 <= self.grid_size <= 1000:
            raise ValueError(f"`grid_size` must be in [2, 1000]; got {self.grid_size}. TADSR's code uses 50.")
        lam, gamma = self.tavsd_lambda, self.tavsd_gamma
        if lam < 0 or gamma < 0 or lam * 999 + gamma >= 1000:  # t_v = ⌊λ t_s + γ⌋ in [0, 999] for t_s in [0, 999]
            raise ValueError(f"TAVSD's t_v = floor(tavsd_lambda·t_s + tavsd_gamma) must stay in [0, 999] for every "
                             f"t_s in [0, 999]; got tavsd_lambda={lam}, tavsd_gamma={gamma}. TADSR uses 0.5 and 0.")
        if self.cfg_slope < 0:
            raise ValueError(f"`cfg_slope` must be >= 0; got {self.cfg_slope}. TADSR's code uses 1/200.")
        if not 0 <= self.deg_prob <= 1:
            raise ValueError(f"`deg_prob` must be a probability in [0, 1]; got {self.deg_prob}. TADSR uses 0.99.")


def student_timesteps(batch_size: int, config: TADSRConfig, generator: torch.Generator,
                      t_max: int = 999) -> torch.Tensor:
    """t_s (B,) int64 on the CPU: uniform over ⌊linspace(1, t_max, grid_size)⌋ ("grid") or over {0..t_max}."""
    if config.timestep_sampling == "uniform":
        return torch.randint(0, t_max + 1, (batch_size,), generator=generator)  # (B,)
    # float64 so the last grid point is exactly t_max, like numpy's linspace(...).astype(int)
    grid = torch.linspace(1.0, float(t_max), config.grid_size, dtype=torch.float64).floor().long()  # (N,)
    return grid[torch.randint(0, config.grid_size, (batch_size,), generator=generator)]  # (B,)


class TADSRGenerator(torch.nn.Module):
    """(x_L, c, t_s) -> (ẑ_H, x̂_H) through the TAE with LoRA, the U-Net at t_s, x̂₀ (R) and the frozen decoder."""

    def __init__(self, unet, vae, tae: TimeAwareEncoder, schedule: NoiseSchedule) -> None:
        super().__init__()
        self.unet, self.vae, self.tae, self.schedule = unet, vae, tae, schedule

    def forward(self, x_lq: torch.Tensor, cond: torch.Tensor, t_s: torch.Tensor, noise: torch.Tensor | None):
        """x_lq (B, 3, H, W) in [-1, 1], cond (B, 77, D), t_s (B,), noise (B, 4, H/8, W/8) or None (the mean)."""
        t = t_s.to(x_lq.device).float()  # (B,)
        z_lq = sample_latent(self.vae, x_lq, noise, encoder=time_aware_encoder_fn(self.tae, t))  # (B, 4, h, w)
        f = self.unet(z_lq, t, encoder_hidden_states=cond).sample  # (B, 4, h, w)
        # x̂₀ in float32: 1/α_t reaches 14.6 at t = 999, which would amplify half-precision rounding.
        z_hat = predict_x0(Parameterisation.SCALED_RESIDUAL, z_in=z_lq, z_lq=z_lq, eps_hat=f.float(), t=t,
                           schedule=self.schedule)  # (B, 4, h, w)
        return z_hat, decode(self.vae, z_hat)  # (B, 4, h, w), (B, 3, H, W)


class TADSR(OSEDiff):
    """TADSR's time-aware student with blurred MSE + LPIPS + TAVSD and a shared-U-Net VSD regulariser."""

    name = "tadsr"
    config_class = TADSRConfig

    def build_generator(self, components, context) -> torch.nn.Module:
        super().build_generator(components, context)  # OSEDiff's LoRA (U-Net, VAE encoder) and the whole conv_in
        self.tae = TimeAwareEncoder.from_vae(components.vae, self.cfg.tae)
        self.tae.initialize_weights(context.init_generator)  # seeded; the constructor's draw used the global RNG
        for param in self.tae.time_parameters():  # the wrapped SD encoder keeps its own flags (LoRA only)
            param.requires_grad_(True)
        return TADSRGenerator(components.unet, components.vae, self.tae, components.schedule)

    def build_teacher(self, base_unet: torch.nn.Module) -> None:
        """None: the regulariser U-Net with its adapters off is the teacher (``ScoreModels`` with no teacher is
        ``ScoreModels.shared``; SPEC §2, TADSR)."""
        return None

    def student(self, batch: dict, cond: torch.Tensor, carry: dict, generator: torch.Generator):
        c = self.cfg
        t_s = student_timesteps(cond.shape[0], c, generator, self.components.schedule.t_max)  # (B,)
        lq, _ = mix_bicubic_lq(batch["lq"], batch["hq"], deg_prob=c.deg_prob,
                               scale=self.config.data.degradation.scale, generator=generator)  # (B, 3, H, W)
        carry["t_s"] = t_s
        return self.models["generator"](lq, cond, t_s, self._noise(lq, generator))

    def pixel_loss(self, x_hat: torch.Tensor, hq: torch.Tensor, carry: dict) -> torch.Tensor:
        if not self.cfg.blur:
            return super().pixel_loss(x_hat, hq, carry)
        # float32 outside autocast: the blur's convolutions would otherwise run (and round) in half precision
        with torch.autocast(x_hat.device.type, enabled=False):
            return blurred_mse(x_hat.float(), hq.float(), carry["t_s"])

    def vsd_timesteps(self, batch_size: int, carry: dict, generator: torch.Generator):
        c = self.cfg
        return tavsd_timesteps(carry["t_s"], lam=c.tavsd_lambda, gamma=c.tavsd_gamma, cfg_base=c.cfg_scale,
                               cfg_slope=c.cfg_slope)  # (B,) t_v, (B,) cfg

    @torch.no_grad()
    def generate(self, lq: torch.Tensor, prompts: list[str], generator: torch.Generator) -> torch.Tensor:
        t_s = torch.full((lq.shape[0],), self.cfg.timestep, dtype=torch.long)  # (B,)
        _, x_hat = self.generator(lq, self.prompts(prompts), t_s, self._noise(lq, generator))
        return x_hat  # (B, 3, H, W)

    def bundle_modules(self) -> dict[str, torch.nn.Module]:
        return {"tae": self.tae}

    def export_bundle(self) -> tuple[BundleMeta, dict[str, torch.Tensor]]:
        parameterisation, defaults = METHOD_DEFAULTS["tadsr"]
        meta = BundleMeta(method="tadsr", base_family=self.components.family, parameterisation=parameterisation,
                          lora=self.lora, modules=("unet_lora", "vae_encoder_lora", "unet_conv_in", "tae"),
                          hyperparameters={"tae": self.cfg.tae.to_dict()},
                          defaults={**defaults, "timestep": self.cfg.timestep})
        tensors = collect_bundle_tensors(self.components, meta)
        tensors.update({f"tae.{k}": v for k, v in bundle_tensors("tae", self.tae).items()})
        return meta, tensors


METHOD = TADSR

"""Variational score distillation (VSD) as OSEDiff uses it, and its regulariser's diffusion loss (SPEC §2).

Paper: Wu et al., "One-Step Effective Diffusion Network for Real-World Image Super-Resolution" (OSEDiff),
arXiv:2406.08177, §3.3 (VSD in latent space, after ProlificDreamer / DMD). Symbols: z = ẑ_H the generator's latent
(B, 4, h, w) with gradient; t per-sample timesteps (B,); α_t, σ_t from ``osd_core.schedule``; c_pos / c_neg the
prompt embeddings; s the CFG scale (a number or per sample (B,)).

    n ~ N(0, I),  z_t = α_t z + σ_t n                                  (no gradient from here ...)
    x0_fake = (z_t − σ_t ε_fake(z_t, t, c_pos)) / α_t                  regulariser U-Net: SD + LoRA, "fake score"
    ε_real  = ε_u + s (ε_c − ε_u),  (ε_u, ε_c) = teacher(z_t, t, [c_neg, c_pos])   frozen SD U-Net, "real score"
    x0_real = (z_t − σ_t ε_real) / α_t
    w       = mean_{C,H,W} |z − x0_real|                               per sample
    g       = (x0_fake − x0_real) / w                                  (... to here)
    L_VSD   = mean((z − sg(z − g))²)                                   so dL/dz = 2 g / numel(z)

    L_diff  = mean((ε_fake(z_t, t, sg(c_pos)) − n)²),  z = sg(ẑ_H),  t ~ U_int[0, 1000)   trains the LoRA only

The teacher is either its own frozen U-Net or, as in TADSR, the regulariser U-Net with its LoRA switched off
(``ScoreModels.shared``), which saves one U-Net of memory; both give the same ε_real. Random draws (n, and t for
L_diff) are made on the CPU from the caller's generator and moved to the latent's device.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.nn.functional as F
from peft.tuners.tuners_utils import BaseTunerLayer

from osd_core.schedule import NoiseSchedule, per_sample
from training.methods.sd_lora import lora_parameters

from .vsd_timesteps import VSDConfig, das_timesteps, sample_timesteps, tavsd_timesteps, uniform_timesteps

__all__ = ["VSDConfig", "ScoreModels", "adapters_disabled", "cfg_combine", "vsd_loss", "regulariser_diffusion_loss",
           "sample_timesteps", "tavsd_timesteps", "das_timesteps", "uniform_timesteps"]

DEFAULT_VSD = VSDConfig()


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The module inside a DistributedDataParallel (or similar ``.module``) wrapper."""
    return getattr(model, "module", model)


@contextmanager
def adapters_disabled(model: torch.nn.Module):
    """Run ``model`` without its peft LoRA adapters (the base weights only), restoring them and every parameter's
    ``requires_grad`` afterwards (peft's toggle also flips requires_grad, which the trainer's phases own)."""
    layers = [m for m in _unwrap(model).modules() if isinstance(m, BaseTunerLayer)]
    if not layers:
        raise ValueError("the shared VSD teacher is the regulariser U-Net with its LoRA switched off, but this U-Net "
                         "has no LoRA adapters. Inject the regulariser LoRA first, or pass a separate teacher.")
    flags = [(p, p.requires_grad) for p in _unwrap(model).parameters()]
    states = [layer.disable_adapters for layer in layers]
    for layer in layers:
        layer.enable_adapters(False)
    try:
        yield model
    finally:
        for layer, was_disabled in zip(layers, states, strict=True):
            layer.enable_adapters(not was_disabled)
        for param, flag in flags:
            param.requires_grad_(flag)


def cfg_combine(eps_uncond: torch.Tensor, eps_cond: torch.Tensor, cfg_scale: torch.Tensor) -> torch.Tensor:
    """Classifier-free guidance ε_u + s (ε_c − ε_u); ε (B, C, h, w), s (B,) -> (B, C, h, w)."""
    return eps_uncond + per_sample(cfg_scale, eps_uncond) * (eps_cond - eps_uncond)


def _eps(unet: torch.nn.Module, z_t: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
    """ε̂ (B, 4, h, w) float32 of ``unet``, fed in its own weight dtype (a frozen teacher may be half precision)."""
    dtype = next(_unwrap(unet).parameters()).dtype
    return unet(z_t.to(dtype), t, encoder_hidden_states=cond.to(dtype)).sample.float()


class ScoreModels:
    """The two score networks of VSD: the frozen teacher ("real score") and the LoRA regulariser ("fake score").

    ``teacher`` None (see :meth:`shared`) means the teacher is the regulariser with its adapters switched off.
    ``regulariser`` may be the accelerate-prepared (DDP-wrapped) module; it is called as given, so its gradients
    are synchronised.
    """

    def __init__(self, *, teacher: torch.nn.Module | None, regulariser: torch.nn.Module,
                 schedule: NoiseSchedule) -> None:
        self.teacher, self.regulariser, self.schedule = teacher, regulariser, schedule

    @classmethod
    def shared(cls, regulariser: torch.nn.Module, *, schedule: NoiseSchedule) -> ScoreModels:
        """One U-Net for both scores (TADSR's memory saving): LoRA on = fake score, LoRA off = teacher."""
        return cls(teacher=None, regulariser=regulariser, schedule=schedule)

    @property
    def is_shared(self) -> bool:
        return self.teacher is None

    def regulariser_parameters(self) -> list[torch.nn.Parameter]:
        """The regulariser's trainable parameters: its LoRA A and B matrices."""
        return lora_parameters(_unwrap(self.regulariser))

    def fake_eps(self, z_t: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """ε_fake (B, 4, h, w) float32 from the regulariser (LoRA on)."""
        return _eps(self.regulariser, z_t, t, cond)

    def real_eps(self, z_t: torch.Tensor, t: torch.Tensor, c_pos: torch.Tensor, c_neg: torch.Tensor,
                 cfg_scale: torch.Tensor) -> torch.Tensor:
        """Guided teacher ε_real (B, 4, h, w) float32: one batched call on [c_neg, c_pos], then ``cfg_combine``.
        Two calls when the token counts differ (RCOD: a visual c_pos against a text c_neg, SPEC §6.3)."""
        if c_neg.shape[1:] != c_pos.shape[1:]:
            return cfg_combine(self.teacher_eps(z_t, t, c_neg), self.teacher_eps(z_t, t, c_pos), cfg_scale)
        z_in, t_in, c_in = torch.cat([z_t, z_t]), torch.cat([t, t]), torch.cat([c_neg, c_pos])  # (2B, ...)
        eps_uncond, eps_cond = self.teacher_eps(z_in, t_in, c_in).chunk(2)  # (B, 4, h, w) each
        return cfg_combine(eps_uncond, eps_cond, cfg_scale)

    def teacher_eps(self, z_t: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """Unguided teacher ε (B, 4, h, w) float32: the frozen teacher, or the regulariser with its LoRA off."""
        if self.teacher is not None:
            return _eps(self.teacher, z_t, t, cond)
        with adapters_disabled(self.regulariser):
            return _eps(_unwrap(self.regulariser), z_t, t, cond)


def _per_sample(value, batch: int, device: torch.device, name: str) -> torch.Tensor:
    value = torch.as_tensor(value, device=device)
    if value.ndim == 0:
        value = value.expand(batch)
    if value.shape != (batch,):
        raise ValueError(f"`{name}` must be a number or one value per sample, shape ({batch},); got shape "
                         f"{tuple(value.shape)}.")
    return value


def vsd_loss(z_hat: torch.Tensor, t: torch.Tensor, cfg_scale, c_pos: torch.Tensor, c_neg: torch.Tensor,
             scores: ScoreModels, generator: torch.Generator) -> torch.Tensor:
    """L_VSD (scalar) of the generator latent z_hat (B, 4, h, w) at per-sample timesteps t (B,) and CFG scale
    ``cfg_scale`` (a number or (B,)); c_pos, c_neg (B, L, D). Its gradient in z_hat is 2 g / numel."""
    batch, device = z_hat.shape[0], z_hat.device
    t = _per_sample(t, batch, device, "t")  # (B,) integer (or, for continuous-time teachers, float) timesteps
    cfg_scale = _per_sample(cfg_scale, batch, device, "cfg_scale").float()  # (B,)
    z = z_hat.float()  # (B, 4, h, w); x̂₀ divides by α_t (≈ 0.08 at t = 979), so float32
    noise = torch.randn(z.shape, generator=generator).to(device)  # (B, 4, h, w)
    with torch.no_grad():
        alpha = per_sample(scores.schedule.alpha(t), z)  # (B, 1, 1, 1)
        sigma = per_sample(scores.schedule.sigma(t), z)  # (B, 1, 1, 1)
        z_t = alpha * z + sigma * noise  # (B, 4, h, w)
        x0_fake = (z_t - sigma * scores.fake_eps(z_t, t, c_pos)) / alpha  # (B, 4, h, w)
        x0_real = (z_t - sigma * scores.real_eps(z_t, t, c_pos, c_neg, cfg_scale)) / alpha  # (B, 4, h, w)
        weight = (z - x0_real).abs().mean(dim=(1, 2, 3), keepdim=True)  # (B, 1, 1, 1)
        grad = (x0_fake - x0_real) / weight  # (B, 4, h, w)
    return F.mse_loss(z, (z - grad).detach())


def regulariser_diffusion_loss(z_hat: torch.Tensor, c_pos: torch.Tensor, scores: ScoreModels,
                               generator: torch.Generator, *, config: VSDConfig = DEFAULT_VSD) -> torch.Tensor:
    """L_diff (scalar): the regulariser's ε-prediction MSE on sg(z_hat) (B, 4, h, w) at t ~ U_int[reg_t_min,
    reg_t_max) (OSEDiff: [0, 1000)) with sg(c_pos) (B, L, D). Draws t, then the noise."""
    z = z_hat.detach().float()  # (B, 4, h, w)
    t = uniform_timesteps(z.shape[0], config.reg_t_min, config.reg_t_max, generator).to(z.device)  # (B,)
    noise = torch.randn(z.shape, generator=generator).to(z.device)  # (B, 4, h, w)
    z_t = per_sample(scores.schedule.alpha(t), z) * z + per_sample(scores.schedule.sigma(t), z) * noise  # (B, 4, h, w)
    return F.mse_loss(scores.fake_eps(z_t, t, c_pos.detach()), noise)

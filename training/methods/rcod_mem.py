"""RCOD's metric estimation module (MEM) stage (SPEC §6.4): trained after the main RCOD model, from its bundle.

    z_L, z_H = E(x_L), E(x_H)                 the trained encoder of the RCOD bundle, frozen (LoRA merged)
    M_L      = cos(vec z_L, vec z_H)          Eq. 6, the target
    M̂_L      = MEM(z_L, CLIPVision(x_L))      osd_core.mem (the tokens VPIM reads, before its Linear)
    L_MEM    = |M̂_L − M_L|                    L1, AdamW 1e-4 ([RECON], SPEC §6.4)

Only MEM trains (one phase, ``mem``); everything else comes frozen from the RCOD bundle (``mem.rcod_bundle``). The
exported bundle is that bundle plus the ``mem`` module, so the Realism level node's ``adaptive`` mode picks the LDG
group per image: t = LDG(M̂_L) with the bundle's own M_min / M_max. Validation renders that adaptive output.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass

import torch

from osd_core.adapters import apply_bundle
from osd_core.bundle import BundleMeta, load_bundle
from osd_core.ldg import LDGConfig, group_index, latent_similarity
from osd_core.mem import MEM, MEMConfig, mem_loss
from osd_core.method_modules import bundle_tensors, load_method_modules
from osd_core.models import cast
from osd_core.vpim import encode_with_tower
from training.methods.base import Method, Phase, PhaseOutput
from training.methods.clip_vision import vision_tower
from training.methods.osediff import LATENT_SAMPLING
from training.methods.rcod import RCODGenerator
from training.methods.sd_ops import posterior_noise, sample_latent

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class RCODMEMConfig:
    """The ``[rcod_mem]`` section: the RCOD bundle to extend, its CLIP vision tower, and MEM's shape ([RECON])."""

    rcod_bundle: str = ""
    clip_vision: str = ""
    use_tokens: bool = True
    hidden: tuple[int, ...] = (512, 256)
    latent_sampling: str = "sample"

    def __post_init__(self) -> None:
        if not self.rcod_bundle:
            raise ValueError("`rcod_bundle` is empty; set it to the RCOD bundle (.safetensors) that `python -m "
                             "training --config training/configs/rcod.toml` wrote.")
        if not self.hidden or any(h < 1 for h in self.hidden):
            raise ValueError(f"`hidden` must list positive MLP widths; got {list(self.hidden)}. SPEC: [512, 256].")
        if self.latent_sampling not in LATENT_SAMPLING:
            raise ValueError(f"`latent_sampling` must be one of {LATENT_SAMPLING}; got {self.latent_sampling!r}.")


class RCODMEM(Method):
    """MEM on top of a trained RCOD bundle (SPEC §6.4)."""

    name = "rcod_mem"
    config_class = RCODMEMConfig
    own_start_bundle = "rcod_mem.rcod_bundle"

    def __init__(self, config, components, context) -> None:
        super().__init__(config, components, context)
        c = self.cfg
        self.rcod = load_bundle(c.rcod_bundle, expected_family=components.family)
        if self.rcod.meta.method != "rcod" or "vpim" not in self.rcod.meta.modules:
            raise ValueError(f"`rcod_mem.rcod_bundle` {c.rcod_bundle!r} is a {self.rcod.meta.method!r} bundle with "
                             f"modules {list(self.rcod.meta.modules)}; MEM extends an RCOD bundle (with `vpim`).")
        if "mem" in self.rcod.meta.modules:
            logger.warning("%s already has a MEM; the exported bundle replaces it", c.rcod_bundle)
        apply_bundle(components, self.rcod)
        self.vpim = load_method_modules(components, self.rcod)["vpim"].to(context.device)
        self.ldg = LDGConfig.from_dict(self.rcod.meta.hyperparameters.get("ldg", {}))
        tower = vision_tower(c.clip_vision, config.model, "rcod_mem.clip_vision")
        self.tower = cast(tower, context.weight_dtype).to(context.device)
        token_dim = self.vpim.config.vision_dim if c.use_tokens else 0
        self.mem = MEM(MEMConfig(latent_channels=components.vae.config.latent_channels, token_dim=token_dim,
                                 hidden=c.hidden))
        self.mem.initialize_weights(context.init_generator)
        self.mem.to(context.device).requires_grad_(True)
        self.generator = RCODGenerator(components.unet, components.vae, components.schedule).eval()

    def trainable_modules(self) -> dict[str, torch.nn.Module]:
        return {"mem": self.mem}

    def phases(self) -> list[Phase]:
        return [Phase("mem", {"mem": list(self.mem.parameters())})]

    def _inputs(self, lq: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor | None]:
        """z_L (B, 4, h, w) and, for a token-reading MEM, the tower's tokens (B, N, vision_dim), without gradient."""
        with torch.no_grad():
            z_lq = sample_latent(self.components.vae, lq, self._noise(lq, generator))  # (B, 4, h, w)
            tokens = None
            if self.mem.config.token_dim:
                tokens = encode_with_tower(self.tower, lq, self.vpim.config).float()  # (B, N, vision_dim)
        return z_lq, tokens

    def _noise(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor | None:
        return posterior_noise(x, self.components.vae, self.cfg.latent_sampling, generator)  # (B, 4, h, w) or None

    def phase_loss(self, phase: str, batch: dict, carry: dict, generator: torch.Generator) -> PhaseOutput:
        lq, hq = batch["lq"], batch["hq"]  # (B, 3, H, W) each
        z_lq, tokens = self._inputs(lq, generator)
        with torch.no_grad():
            z_hq = sample_latent(self.components.vae, hq, self._noise(hq, generator))  # (B, 4, h, w)
            m_l = latent_similarity(z_lq, z_hq)  # (B,) Eq. 6
        m_hat = self.models["mem"](z_lq, tokens).float()  # (B,)
        loss = mem_loss(m_hat, m_l)
        agree = group_index(m_hat.detach(), self.ldg) == group_index(m_l, self.ldg)  # (B,) same LDG level
        return PhaseOutput(loss, {"loss_mem": float(loss.detach()), "m_l": float(m_l.mean()),
                                  "mem_level_accuracy": float(agree.float().mean())})

    @torch.no_grad()
    def generate(self, lq: torch.Tensor, prompts: list[str], generator: torch.Generator) -> torch.Tensor:
        """The adaptive output: t = LDG(M̂_L) per image, as the Realism level node's ``adaptive`` mode does."""
        tokens = encode_with_tower(self.tower, lq, self.vpim.config).float()  # (B, N, vision_dim)
        mem_tokens = tokens if self.mem.config.token_dim else None

        def adaptive(z_lq: torch.Tensor) -> torch.Tensor:
            return self.mem.estimate_timestep(z_lq, mem_tokens, self.ldg)  # (B,)

        return self.generator(lq, self.vpim(tokens), self._noise(lq, generator), adaptive)[1]  # (B, 3, H, W)

    def export_bundle(self) -> tuple[BundleMeta, dict[str, torch.Tensor]]:
        meta = self.rcod.meta
        meta = dataclasses.replace(
            meta, modules=(*[m for m in meta.modules if m != "mem"], "mem"),
            hyperparameters={**meta.hyperparameters, "mem": self.mem.config.to_dict()},
            extra={**meta.extra, "rcod_bundle": {"path": self.cfg.rcod_bundle,
                                                 "training": meta.extra.get("training")}})
        tensors = {k: v for k, v in self.rcod.tensors.items() if not k.startswith("mem.")}
        tensors.update({f"mem.{k}": v for k, v in bundle_tensors("mem", self.mem).items()})
        return meta, tensors


METHOD = RCODMEM

"""CODSR training, stage 2, "dual LoRA" (SPEC §4.4–4.5): Chen et al., "Bridging Fidelity-Reality with Controllable
One-Step Diffusion for Image Super-Resolution" (CODSR), §3.3–3.4. Starts from the stage-1 bundle
(``codsr_stage2.stage1_bundle``):

* the stage-1 LoRA is merged into the U-Net (and the VAE encoder) at weight 1.0, scale alpha / r; the VAE-encoder
  LoRA and the LQFM stay frozen (as the released loader does, the ``default_*`` deltas are plain weights now);
* a new LoRA set, ``default_{encoder,decoder,others}_alignment``, goes on the cross-attention projections
  ``attn2.{to_q, to_k, to_v, to_out.0}`` only, at the stage-1 U-Net rank (the release stores one ``rank_unet`` for
  both sets), and is all that trains (with the VSD regulariser's own LoRA).

Loss (OSEDiff's loop, ``training.methods.osediff``, with the CODSR generator of ``training.methods.codsr_generator``):

    L = λ_l2 MSE + λ_lpips LPIPS + λ_vsd L_VSD + η_pos L_pos,     (1, 2 [RECON], 2, 1), cfg 7.5 [RECON]
    regulariser phase: λ_reg L_diff (SPEC §2)

L_pos is CoMat's positive-area token loss (``training.losses.comat``) on the cross-attention maps of the generator's
single forward at t_s, averaged over heads and over all cross-attention layers at the latent resolution ([RECON],
SPEC §4.5), for the samples that carry TMG masks from the data layer (``data.masks_dir``); the nouns' token positions
come from tokenising each prompt. With masks configured, a batch without any logs ``loss_pos`` = 0.

The exported bundle (method ``codsr``) holds both LoRA sets under ``unet_lora`` in one ``unet`` entry (adapters
``default_*`` and ``default_*_alignment``, one rank), the stage-1 VAE-encoder LoRA and LQFM: the layout the CODSR
importer writes and the nodes merge.
"""

from __future__ import annotations

import dataclasses
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

import torch

from osd_core.adapters import apply_bundle, collect_bundle_tensors
from osd_core.bundle import BundleMeta, load_bundle
from osd_core.lora import unet_lora_targets
from osd_core.method_modules import load_method_modules
from training.losses.comat import capture_cross_attention, noun_token_indices, positive_area_loss
from training.methods.codsr import CODSRBase, CODSRConfig
from training.methods.codsr_generator import METHOD as BUNDLE_METHOD
from training.methods.codsr_generator import CODSRGenerator, codsr_meta
from training.methods.sd_lora import inject_training_lora

ALIGNMENT_SUFFIX = "_alignment"
ALIGNMENT_LAYERS = ("to_q", "to_k", "to_v", "to_out.0")  # of attn2, the cross-attention (SPEC §4.4)


@dataclass(frozen=True)
class CODSRStage2Config(CODSRConfig):
    """The ``[codsr_stage2]`` section: the stage-1 bundle, OSEDiff's loss settings with λ_vsd = 2 and
    [RECON] λ_lpips = 2, cfg 7.5, and η_pos of the TMG token loss."""

    stage1_bundle: str = ""
    lambda_lpips: float = 2.0
    lambda_vsd: float = 2.0
    eta_pos: float = 1.0

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.stage1_bundle:
            raise ValueError("`stage1_bundle` is empty; set it to the bundle `python -m training --config "
                             "training/configs/codsr_stage1.toml` wrote.")
        if self.eta_pos < 0:
            raise ValueError(f"`eta_pos` must be >= 0 (0 switches TMG off); got {self.eta_pos}. CODSR uses 1.")


@contextmanager
def without_checkpointing(model: torch.nn.Module) -> Iterator[None]:
    """Run ``model`` without gradient checkpointing inside the block. The TMG maps need their graph, and a
    checkpointed block would be recomputed in backward with the restored (non-capturing) attention processors, whose
    saved tensors differ; so the capturing forward trades checkpointing's memory saving for the maps."""
    flagged = [m for m in model.modules() if getattr(m, "gradient_checkpointing", False) is True]
    for module in flagged:
        module.gradient_checkpointing = False
    try:
        yield
    finally:
        for module in flagged:
            module.gradient_checkpointing = True


def alignment_targets(unet: torch.nn.Module) -> dict[str, list[str]]:
    """OSEDiff's three U-Net groups restricted to ``attn2.{to_q, to_k, to_v, to_out.0}``, named
    ``default_<group>_alignment``; groups without cross-attention are left out."""
    adapters = {}
    for adapter, targets in unet_lora_targets(unet).items():
        kept = [t for t in targets if ".attn2." in t and t.rsplit(".attn2.", 1)[1] in ALIGNMENT_LAYERS]
        if kept:
            adapters[adapter + ALIGNMENT_SUFFIX] = kept
    return adapters


def check_stage1(bundle, lora_config) -> None:
    """A stage-1 CODSR bundle (U-Net + VAE LoRA, LQFM, no alignment set yet) whose U-Net rank and alpha the
    alignment set can share (the layout has one rank for both sets)."""
    meta = bundle.meta
    if meta.method != BUNDLE_METHOD or "lqfm" not in meta.modules or not {"unet", "vae_encoder"} <= set(meta.lora):
        raise ValueError(f"`codsr_stage2.stage1_bundle` {bundle.path!r} is a {meta.method!r} bundle with modules "
                         f"{list(meta.modules)}; stage 2 starts from a CODSR stage-1 bundle (U-Net and VAE-encoder "
                         "LoRA and `lqfm`).")
    if any(name.endswith(ALIGNMENT_SUFFIX) for name in meta.lora["unet"]["adapters"]):
        raise ValueError(f"`codsr_stage2.stage1_bundle` {bundle.path!r} already has alignment adapters: it is a "
                         "stage-2 bundle. Point it at the stage-1 bundle.")
    spec = meta.lora["unet"]
    if (lora_config.unet_rank, lora_config.alpha) != (spec["rank"], spec["alpha"]):
        raise ValueError(f"`lora.unet_rank` / `lora.alpha` are {lora_config.unet_rank} / {lora_config.alpha} but the "
                         f"stage-1 U-Net LoRA has {spec['rank']} / {spec['alpha']}; the alignment set shares them (the "
                         f"CODSR layout stores one rank). Set lora.unet_rank={spec['rank']} "
                         f"lora.alpha={spec['alpha']}.")


class CODSRStage2(CODSRBase):
    """Stage 2: the alignment LoRA on cross-attention, OSEDiff's MSE + LPIPS + VSD + regulariser, and TMG."""

    name = "codsr_stage2"
    config_class = CODSRStage2Config
    own_start_bundle = "codsr_stage2.stage1_bundle"

    def build_generator(self, components, context) -> torch.nn.Module:
        self.stage1 = load_bundle(self.cfg.stage1_bundle, expected_family=components.family)
        check_stage1(self.stage1, self.config.lora)
        apply_bundle(components, self.stage1)  # merges default_* and the VAE-encoder LoRA; both frozen now
        self.lqfm = load_method_modules(components, self.stage1)["lqfm"].to(context.device)  # frozen
        stage1_unet = self.stage1.meta.lora["unet"]
        alignment = {"unet": {**stage1_unet, "adapters": alignment_targets(components.unet)}}
        inject_training_lora(components, alignment, context.init_generator)
        self.lora = {**self.stage1.meta.lora,
                     "unet": {**stage1_unet, "adapters": {**stage1_unet["adapters"], **alignment["unet"]["adapters"]}}}
        return CODSRGenerator(components.unet, components.vae, self.lqfm, components.schedule)

    def tmg_active(self, batch: dict) -> bool:
        """Whether this run trains with L_pos: η_pos > 0 and the data layer gives masks (``data.masks_dir``)."""
        return self.cfg.eta_pos > 0 and "masks" in batch

    def student(self, batch: dict, cond: torch.Tensor, carry: dict, generator: torch.Generator):
        if not self.tmg_active(batch):
            return super().student(batch, cond, carry, generator)
        unet = self.generator.unet  # the generator's own forward only: the VSD U-Nets are other modules
        with capture_cross_attention(unet) as maps, without_checkpointing(unet):
            out = super().student(batch, cond, carry, generator)
        carry["attention"] = maps
        return out

    def extra_generator_terms(self, z_hat: torch.Tensor, batch: dict, carry: dict) -> dict:
        if "attention" not in carry:
            return {}
        attention = carry.pop("attention").averaged(tuple(z_hat.shape[-2:]))  # (B, 77, h, w)
        masks, groups = [], []
        for prompt, nouns, sample_masks, valid in zip(batch["prompt"], batch["nouns"], batch["masks"],
                                                      batch["mask_valid"]):
            kept = [noun for noun, ok in zip(nouns, valid.tolist()) if ok]
            masks.append(sample_masks[valid])  # (N_b, H, W)
            groups.append(noun_token_indices(self.components.tokenizer, prompt, kept))
        return {"loss_pos": (self.cfg.eta_pos, positive_area_loss(attention, masks, groups))}

    def export_bundle(self) -> tuple[BundleMeta, dict[str, torch.Tensor]]:
        stage1 = self.stage1.meta
        meta = codsr_meta(self.components.family, lora=self.lora, modules=stage1.modules,
                          hyperparameters=stage1.hyperparameters, timestep=self.cfg.timestep)
        meta = dataclasses.replace(meta, extra={"stage1_bundle": {"path": self.cfg.stage1_bundle,
                                                                  "training": stage1.extra.get("training")}})
        # collected: the live alignment adapters (the merged stage-1 LoRA is no longer separable); the stage-1
        # tensors (default_* LoRA, VAE-encoder LoRA, LQFM, a trained conv_in) come from its bundle as they were
        return meta, {**collect_bundle_tensors(self.components, meta), **self.stage1.tensors}


METHOD = CODSRStage2

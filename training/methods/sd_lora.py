"""LoRA for training on the SD components, in the layout of the released weights (SPEC §0.5, CHECKPOINTS.md §1).

``training_lora_spec`` gives a bundle's ``lora`` metadata for OSEDiff's targets (U-Net in the three adapters
``default_encoder/decoder/others`` of rank r_unet, VAE encoder + quant_conv in ``default_encoder`` of rank r_vae,
scale alpha / r). ``inject_training_lora`` injects exactly that (``osd_core.adapters.inject_bundle_lora``, so the
exported bundle loads into the nodes unchanged) and re-draws every A ~ N(0, 1/r) from a seeded generator (peft's
"gaussian" init, which itself draws from the global RNG); B stays 0, so training starts from the base model's output.
"""

from __future__ import annotations

import torch

from osd_core.adapters import inject_bundle_lora
from osd_core.lora import inject_lora, unet_lora_targets, vae_encoder_lora_targets
from osd_core.models import SDComponents


def training_lora_spec(components: SDComponents, *, unet_rank: int, vae_encoder_rank: int | None,
                       alpha: float) -> dict:
    """The ``BundleMeta.lora`` entry for U-Net LoRA (and VAE-encoder LoRA unless ``vae_encoder_rank`` is None)."""
    spec = {"unet": {"rank": unet_rank, "alpha": alpha, "adapters": unet_lora_targets(components.unet)}}
    if vae_encoder_rank is not None:
        spec["vae_encoder"] = {"rank": vae_encoder_rank, "alpha": alpha,
                               "adapters": {"default_encoder": vae_encoder_lora_targets(components.vae)}}
    return spec


def lora_parameters(module: torch.nn.Module) -> list[torch.nn.Parameter]:
    """The LoRA A and B matrices of ``module``, in registration order."""
    return [p for name, p in module.named_parameters() if ".lora_A." in name or ".lora_B." in name]


@torch.no_grad()
def reinit_lora_(module: torch.nn.Module, generator: torch.Generator) -> None:
    """A ~ N(0, 1/r) from ``generator`` (drawn on the CPU), B = 0, for every LoRA in ``module``."""
    for name, param in module.named_parameters():
        if ".lora_A." in name:
            rank = param.shape[0]  # lora_A maps the input to r features (Linear and Conv alike)
            param.copy_(torch.randn(param.shape, generator=generator) / rank)
        elif ".lora_B." in name:
            param.zero_()


def inject_training_lora(components: SDComponents, spec: dict, generator: torch.Generator) -> list[torch.nn.Parameter]:
    """Inject ``spec``'s adapters into the components' U-Net / VAE, seeded; returns the LoRA parameters (trainable)."""
    inject_bundle_lora(components, spec)
    params = []
    for host in ([components.unet] if "unet" in spec else []) + ([components.vae] if "vae_encoder" in spec else []):
        reinit_lora_(host, generator)
        params.extend(lora_parameters(host))
    for param in params:
        param.requires_grad_(True)
    return params


def add_unet_lora(unet: torch.nn.Module, *, rank: int, alpha: float, generator: torch.Generator
                  ) -> list[torch.nn.Parameter]:
    """OSEDiff's three U-Net adapters on any U-Net (e.g. the VSD regulariser, SPEC §2), seeded; returns the LoRA
    parameters (trainable)."""
    for adapter, targets in unet_lora_targets(unet).items():
        inject_lora(unet, targets, rank=rank, alpha=alpha, adapter_name=adapter)
    reinit_lora_(unet, generator)
    params = lora_parameters(unet)
    for param in params:
        param.requires_grad_(True)
    return params


def conv_in_base(unet: torch.nn.Module) -> torch.nn.Conv2d:
    """The U-Net's own conv_in, also when a LoRA wraps it (OSEDiff trains it whole, SPEC §0.5)."""
    conv_in = unet.conv_in
    return conv_in.get_base_layer() if hasattr(conv_in, "get_base_layer") else conv_in

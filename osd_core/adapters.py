"""Apply an adapter bundle to the SD components, and collect one from a model being trained or a demo.

Applying: inject the LoRA adapters the bundle declares (U-Net and VAE encoder, with their own target lists, ranks and
alphas), load their weights strictly, load the fully trained ``conv_in`` when present, then merge every LoRA into the
base weights so inference runs at plain-model speed.
"""

from __future__ import annotations

import torch

from .bundle import Bundle, BundleMeta
from .lora import inject_lora, load_lora_state_dict, lora_state_dict, merge_lora
from .models import SDComponents, cast

LORA_COMPONENTS = {"unet": "unet_lora", "vae_encoder": "vae_encoder_lora"}


def _lora_host(components: SDComponents, component: str) -> torch.nn.Module:
    return components.unet if component == "unet" else components.vae


def inject_bundle_lora(components: SDComponents, lora: dict) -> None:
    """Inject (unloaded, identity) LoRA adapters as described by a bundle's ``lora`` metadata."""
    for component, spec in lora.items():
        if component not in LORA_COMPONENTS:
            raise ValueError(f"bundle LoRA component {component!r} is unknown; expected {sorted(LORA_COMPONENTS)}.")
        host = _lora_host(components, component)
        for adapter, targets in spec["adapters"].items():
            inject_lora(host, targets, rank=int(spec["rank"]), alpha=float(spec["alpha"]), adapter_name=adapter)


def _conv_in_base(components: SDComponents) -> torch.nn.Conv2d:
    """The U-Net's conv_in itself, also when a LoRA wraps it."""
    conv_in = components.unet.conv_in
    return conv_in.get_base_layer() if hasattr(conv_in, "get_base_layer") else conv_in


def apply_bundle(components: SDComponents, bundle: Bundle) -> None:
    """Load the bundle's conv_in, inject, load and merge its LoRA (on top of that conv_in), in place."""
    inject_bundle_lora(components, bundle.meta.lora)
    conv_in = bundle.component("unet_conv_in")
    if conv_in:
        base = _conv_in_base(components)
        base.load_state_dict({k: v.to(base.weight.dtype) for k, v in conv_in.items()}, strict=True)
    for component, prefix in LORA_COMPONENTS.items():
        if component in bundle.meta.lora:
            host = _lora_host(components, component)
            try:
                load_lora_state_dict(host, bundle.component(prefix))
            except ValueError as err:
                raise ValueError(f"bundle {bundle.path!r}: {err}") from err
            merge_lora(host)
    for module in components.modules():
        cast(module, components.dtype)


def collect_bundle_tensors(components: SDComponents, meta: BundleMeta) -> dict[str, torch.Tensor]:
    """The tensors a bundle with ``meta`` holds, read from components that carry injected (unmerged) LoRA."""
    tensors: dict[str, torch.Tensor] = {}
    for component, prefix in LORA_COMPONENTS.items():
        if component in meta.lora:
            state = lora_state_dict(_lora_host(components, component))
            tensors.update({f"{prefix}.{k}": v for k, v in state.items()})
    if "unet_conv_in" in meta.modules:
        tensors.update({f"unet_conv_in.{k}": v for k, v in _conv_in_base(components).state_dict().items()})
    return tensors

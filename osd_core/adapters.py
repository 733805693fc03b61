"""Apply an adapter bundle to the SD components, and collect one from a model being trained or a demo.

Applying (``apply_bundle``): inject the LoRA adapters the bundle declares (U-Net and VAE encoder, with their own
target lists, ranks and alphas, in the official peft naming of CHECKPOINTS.md §1), load their weights strictly, load
the fully trained ``conv_in`` when present (OSEDiff/TADSR train it whole, SPEC.md §0.5), then merge every LoRA into
the base weights, W += (alpha / r) · B A, so inference runs at plain-model speed with plain diffusers modules.

The order matters for ``conv_in``: its LoRA delta is added on top of the bundle's conv_in, as in the official code,
where the trained base weight sits under the LoRA wrapper (``conv_in.base_layer.weight``).
"""

from __future__ import annotations

import torch

from .bundle import LORA_PREFIXES, Bundle, BundleMeta
from .lora import inject_lora, load_lora_state_dict, lora_state_dict, merge_lora
from .models import SDComponents, cast

CONV_IN_PREFIX = "unet_conv_in"


def _lora_host(components: SDComponents, component: str) -> torch.nn.Module:
    """The module a LoRA component lives in: the U-Net, or the VAE (whose encoder side the targets name)."""
    return components.unet if component == "unet" else components.vae


def inject_bundle_lora(components: SDComponents, lora: dict) -> None:
    """Inject (identity-initialised) LoRA adapters as described by a bundle's ``lora`` metadata, in place."""
    for component, spec in lora.items():
        if component not in LORA_PREFIXES:
            raise ValueError(f"bundle LoRA component {component!r} is unknown; expected {sorted(LORA_PREFIXES)}.")
        host = _lora_host(components, component)
        for adapter, targets in spec["adapters"].items():
            inject_lora(host, targets, rank=int(spec["rank"]), alpha=float(spec["alpha"]), adapter_name=adapter)


def _conv_in_base(components: SDComponents) -> torch.nn.Conv2d:
    """The U-Net's conv_in itself, also when a LoRA wraps it."""
    conv_in = components.unet.conv_in
    return conv_in.get_base_layer() if hasattr(conv_in, "get_base_layer") else conv_in


def _load_conv_in(components: SDComponents, bundle: Bundle) -> None:
    base = _conv_in_base(components)
    state = bundle.component(CONV_IN_PREFIX)
    own = base.state_dict()
    if set(state) != set(own) or any(state[k].shape != v.shape for k, v in own.items()):
        got = {k: tuple(v.shape) for k, v in state.items()}
        expected = {k: tuple(v.shape) for k, v in own.items()}
        raise ValueError(f"bundle {bundle.path!r}: `{CONV_IN_PREFIX}` holds {got} but the U-Net's conv_in needs "
                         f"{expected}; the bundle was made for a different base model.")
    base.load_state_dict({k: v.to(own[k].dtype) for k, v in state.items()}, strict=True)


def apply_bundle(components: SDComponents, bundle: Bundle) -> None:
    """Load the bundle's conv_in, then inject, load and merge its LoRA (on top of that conv_in), in place.

    Afterwards the components hold plain diffusers modules in ``components.dtype``. Apply a bundle to freshly loaded
    components only: the merged deltas cannot be told apart from the base weights, so applying twice adds twice.
    """
    inject_bundle_lora(components, bundle.meta.lora)
    if CONV_IN_PREFIX in bundle.meta.modules:
        _load_conv_in(components, bundle)
    for component, prefix in LORA_PREFIXES.items():
        if component not in bundle.meta.lora:
            continue
        host = _lora_host(components, component)
        try:
            load_lora_state_dict(host, bundle.component(prefix))
        except ValueError as err:
            raise ValueError(f"bundle {bundle.path!r}, `{prefix}`: {err}") from err
        merge_lora(host)
    for module in components.modules():
        cast(module, components.dtype)


def collect_bundle_tensors(components: SDComponents, meta: BundleMeta) -> dict[str, torch.Tensor]:
    """The tensors a bundle with ``meta`` holds for its LoRA and conv_in, read from components that carry injected
    (unmerged) LoRA, e.g. after ``inject_bundle_lora`` and training. Method modules (``tae``, ``mine``, ...) are the
    caller's to add."""
    tensors: dict[str, torch.Tensor] = {}
    for component, prefix in LORA_PREFIXES.items():
        if component in meta.lora:
            state = lora_state_dict(_lora_host(components, component))
            tensors.update({f"{prefix}.{k}": v.detach() for k, v in state.items()})
    if CONV_IN_PREFIX in meta.modules:
        tensors.update({f"{CONV_IN_PREFIX}.{k}": v.detach() for k, v in _conv_in_base(components).state_dict().items()})
    return tensors

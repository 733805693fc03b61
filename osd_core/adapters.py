"""Apply an adapter bundle to the SD components, and collect one from a model being trained or a demo.

Applying (``apply_bundle``): load the VAE-encoder base weights when present (TADSR's ``time_vae/`` encoder where it
differs from the base), inject the LoRA adapters the bundle declares (U-Net and VAE encoder, with their own target
lists, ranks and alphas, in the official peft naming of CHECKPOINTS.md §1), load their weights strictly, load the
fully trained ``conv_in`` when present (OSEDiff/TADSR train it whole, SPEC.md §0.5), then merge those LoRA into the
base weights, W += (alpha / r) · B A, so inference runs at plain-model speed with plain diffusers modules.

The order matters for ``conv_in``: its LoRA delta is added on top of the bundle's conv_in, as in the official code,
where the trained base weight sits under the LoRA wrapper (``conv_in.base_layer.weight``).

Live LoRA (``bundle.LIVE_LORA``: PiSA-SR's semantic ``unet_sem``) is injected after that merge, on top of the merged
pixel LoRA, and is never merged: it stays a set of peft adapters that ``osd_core.pisa`` switches off for the pixel
pass of the λ control (SPEC.md §7.2). With the adapters on, the U-Net computes W0 + Δpix + Δsem, which is PiSA-SR's
fully merged "default" U-Net.
"""

from __future__ import annotations

import torch

from .bundle import LIVE_LORA, LORA_PREFIXES, Bundle, BundleMeta
from .lora import inject_lora, load_lora_state_dict, lora_state_dict, merge_lora
from .models import SDComponents, cast

CONV_IN_PREFIX = "unet_conv_in"
ENCODER_BASE_PREFIX = "vae_encoder_base"
ENCODER_BASE_ROOTS = ("encoder.", "quant_conv.")


def lora_host(components: SDComponents, component: str) -> torch.nn.Module:
    """The module a LoRA component lives in: the VAE (whose encoder side the targets name), else the U-Net."""
    return components.vae if component == "vae_encoder" else components.unet


def inject_bundle_lora(components: SDComponents, lora: dict) -> None:
    """Inject (identity-initialised) LoRA adapters as described by a bundle's ``lora`` metadata, in place."""
    for component, spec in lora.items():
        if component not in LORA_PREFIXES:
            raise ValueError(f"bundle LoRA component {component!r} is unknown; expected {sorted(LORA_PREFIXES)}.")
        host = lora_host(components, component)
        for adapter, targets in spec["adapters"].items():
            inject_lora(host, targets, rank=int(spec["rank"]), alpha=float(spec["alpha"]), adapter_name=adapter)


def _conv_in_base(components: SDComponents) -> torch.nn.Conv2d:
    """The U-Net's conv_in itself, also when a LoRA wraps it."""
    conv_in = components.unet.conv_in
    return conv_in.get_base_layer() if hasattr(conv_in, "get_base_layer") else conv_in


def load_conv_in(components: SDComponents, bundle: Bundle) -> None:
    """Replace the U-Net's own conv_in (under its LoRA wrapper, if any) with the bundle's ``unet_conv_in``."""
    base = _conv_in_base(components)
    state = bundle.component(CONV_IN_PREFIX)
    own = base.state_dict()
    if set(state) != set(own) or any(state[k].shape != v.shape for k, v in own.items()):
        got = {k: tuple(v.shape) for k, v in state.items()}
        expected = {k: tuple(v.shape) for k, v in own.items()}
        raise ValueError(f"bundle {bundle.path!r}: `{CONV_IN_PREFIX}` holds {got} but the U-Net's conv_in needs "
                         f"{expected}; the bundle was made for a different base model.")
    base.load_state_dict({k: v.to(own[k].dtype) for k, v in state.items()}, strict=True)


def load_encoder_base(components: SDComponents, bundle: Bundle) -> None:
    """Replace the VAE encoder weights the bundle holds (a subset: those that differ from the base); before any
    LoRA wraps the encoder, so the names are the plain diffusers ones."""
    state = bundle.component(ENCODER_BASE_PREFIX)
    own = components.vae.state_dict()
    wrong = [f"{k} {tuple(v.shape)}" for k, v in state.items()
             if not k.startswith(ENCODER_BASE_ROOTS) or k not in own or own[k].shape != v.shape]
    if wrong:
        raise ValueError(f"bundle {bundle.path!r}: `{ENCODER_BASE_PREFIX}` holds {len(wrong)} tensors that are not "
                         f"VAE-encoder weights of the loaded base model (first: {wrong[:3]}); the bundle was made for "
                         "a different base model.")
    # strict=False: the component holds only the weights that differ from the base; the names were checked above
    components.vae.load_state_dict({k: v.to(own[k].dtype) for k, v in state.items()}, strict=False)


def _load_lora(components: SDComponents, bundle: Bundle, component: str) -> None:
    prefix = LORA_PREFIXES[component]
    try:
        load_lora_state_dict(lora_host(components, component), bundle.component(prefix))
    except ValueError as err:
        raise ValueError(f"bundle {bundle.path!r}, `{prefix}`: {err}") from err


def apply_bundle(components: SDComponents, bundle: Bundle) -> None:
    """Load the bundle's base-weight replacements, inject, load and merge its LoRA (conv_in's on top of the bundle's
    conv_in), then inject and load its live LoRA unmerged, in place.

    Afterwards the components hold plain diffusers modules in ``components.dtype``, apart from the live adapters'
    peft layers (frozen, no gradients). Apply a bundle to freshly loaded components only: the merged deltas cannot be
    told apart from the base weights, so applying twice adds twice.
    """
    lora = bundle.meta.lora
    merged = [c for c in LORA_PREFIXES if c in lora and c not in LIVE_LORA]
    live = [c for c in LORA_PREFIXES if c in lora and c in LIVE_LORA]
    if ENCODER_BASE_PREFIX in bundle.meta.modules:
        load_encoder_base(components, bundle)
    inject_bundle_lora(components, {c: lora[c] for c in merged})
    if CONV_IN_PREFIX in bundle.meta.modules:
        load_conv_in(components, bundle)
    for component in merged:
        _load_lora(components, bundle, component)
        merge_lora(lora_host(components, component))
    inject_bundle_lora(components, {c: lora[c] for c in live})
    for component in live:
        _load_lora(components, bundle, component)
        lora_host(components, component).requires_grad_(False)  # peft's set_adapter made the adapters trainable
    for module in components.modules():
        cast(module, components.dtype)


def collect_bundle_tensors(components: SDComponents, meta: BundleMeta) -> dict[str, torch.Tensor]:
    """The tensors a bundle with ``meta`` holds for its LoRA and conv_in, read from components that carry injected
    (unmerged) LoRA, e.g. after ``inject_bundle_lora`` and training; each LoRA component takes exactly its own
    adapters (PiSA-SR's pixel and semantic adapters share the U-Net). Method modules (``tae``, ``mine``, ...) are
    the caller's to add."""
    tensors: dict[str, torch.Tensor] = {}
    for component, prefix in LORA_PREFIXES.items():
        if component not in meta.lora:
            continue
        adapters = set(meta.lora[component]["adapters"])
        state = lora_state_dict(lora_host(components, component))
        # keys read <module>.lora_{A,B}.<adapter>.weight
        tensors.update({f"{prefix}.{k}": v.detach() for k, v in state.items() if k.split(".")[-2] in adapters})
    if CONV_IN_PREFIX in meta.modules:
        tensors.update({f"{CONV_IN_PREFIX}.{k}": v.detach() for k, v in _conv_in_base(components).state_dict().items()})
    return tensors

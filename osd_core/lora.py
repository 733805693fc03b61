"""LoRA on the U-Net and the VAE encoder with OSEDiff's target lists (SPEC.md §0.5, CHECKPOINTS.md §1).

Targets are chosen the way OSEDiff's code does it, so module and adapter names match the officially released weights:
every *weight* parameter whose name contains one of the patterns below (plain substring match, so "conv" also
selects the down/upsampler convs), skipping names with "bias" or "norm". The U-Net matches are split into three
adapters of the same rank: ``default_encoder`` (down_blocks, conv_in), ``default_decoder`` (up_blocks, conv_out) and
``default_others`` (the mid block). The VAE encoder gets one adapter over its matches plus ``quant_conv`` (never
``post_quant_conv`` or the decoder). ``time_emb_proj`` and ``time_embedding.*`` match no pattern and stay untouched.

peft injects the adapters directly into the diffusers model (no PeftModel wrapper), so state-dict keys read
``<module path>.lora_A.<adapter>.weight`` / ``.lora_B.<adapter>.weight`` exactly as in the official files.

Initialisation and scale: A ~ N(0, 1/r), B = 0 (peft's "gaussian"), so a freshly injected model computes exactly
what it did before. The merged weight is W + (alpha / r) · B A (convs: B A reshaped to W's shape). peft's default
alpha is 8, which the official releases rely on: scale 8/r, i.e. 2.0 at r = 4 and 0.5 at r = 16.
"""

from __future__ import annotations

import warnings

import torch
from peft import LoraConfig, inject_adapter_in_model
from peft.tuners.tuners_utils import BaseTunerLayer

UNET_PATTERNS = ("to_k", "to_q", "to_v", "to_out.0", "conv", "conv1", "conv2", "conv_in", "conv_shortcut",
                 "conv_out", "proj_out", "proj_in", "ff.net.2", "ff.net.0.proj")
VAE_ENCODER_PATTERNS = ("conv1", "conv2", "conv_in", "conv_shortcut", "conv", "conv_out",
                        "to_k", "to_q", "to_v", "to_out.0")
UNET_ADAPTERS = ("default_encoder", "default_decoder", "default_others")
VAE_ENCODER_ADAPTER = "default_encoder"
# peft's LoraConfig default, never overridden by OSEDiff, TADSR, CODSR or PiSA-SR: their scale is 8 / r.
PEFT_DEFAULT_ALPHA = 8.0


def lora_scale(rank: int, alpha: float = PEFT_DEFAULT_ALPHA) -> float:
    """The factor on B A in the merged weight: alpha / r (8 / r with peft's default alpha)."""
    return alpha / rank


def _matching_modules(model: torch.nn.Module, patterns: tuple[str, ...], must_contain: str = "") -> list[str]:
    names = []
    for name, _ in model.named_parameters():
        if ".lora_" in name:  # a model that already carries LoRA: its base weights are the targets
            continue
        name = name.replace(".base_layer.", ".")
        if "bias" in name or "norm" in name or not name.endswith(".weight") or must_contain not in name:
            continue
        if any(pattern in name for pattern in patterns):
            names.append(name[: -len(".weight")])
    return names


def unet_lora_targets(unet: torch.nn.Module) -> dict[str, list[str]]:
    """The U-Net's target modules (full names, registration order) split into OSEDiff's three adapters."""
    adapters: dict[str, list[str]] = {name: [] for name in UNET_ADAPTERS}
    for name in _matching_modules(unet, UNET_PATTERNS):
        if "down_blocks" in name or "conv_in" in name:
            adapters["default_encoder"].append(name)
        elif "up_blocks" in name or "conv_out" in name:
            adapters["default_decoder"].append(name)
        else:
            adapters["default_others"].append(name)
    return adapters


def vae_encoder_lora_targets(vae: torch.nn.Module) -> list[str]:
    """The VAE encoder's target modules plus quant_conv (never post_quant_conv or the decoder), without duplicates."""
    return _matching_modules(vae, VAE_ENCODER_PATTERNS, must_contain="encoder") + ["quant_conv"]


def inject_lora(
    model: torch.nn.Module, targets: list[str], *, rank: int, alpha: float = PEFT_DEFAULT_ALPHA, adapter_name: str
) -> None:
    """Add a LoRA adapter to exactly the ``targets`` modules (full names), in place.

    A ~ N(0, 1/r) and B = 0, so the model's output is unchanged until B is trained or loaded. Scale alpha / r.
    Every adapter injected this way stays active (OSEDiff runs its three U-Net adapters together).
    """
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ValueError(f"LoRA `rank` must be a positive integer; got {rank!r}.")
    if not alpha > 0:
        raise ValueError(f"LoRA `alpha` must be positive; got {alpha!r}. peft's default, used by OSEDiff, is 8.")
    targets = list(dict.fromkeys(targets))  # official VAE lists repeat names; peft treats them as a set anyway
    if not targets:
        raise ValueError(f"adapter {adapter_name!r} has no target modules.")
    names = {name for name, _ in model.named_modules()}
    absent = [t for t in targets if t not in names]
    if absent:
        raise ValueError(
            f"adapter {adapter_name!r} targets {len(absent)} modules the model does not have (first: {absent[:3]}); "
            f"the LoRA was made for a different architecture."
        )
    config = LoraConfig(r=rank, lora_alpha=alpha, init_lora_weights="gaussian", target_modules=targets)
    with warnings.catch_warnings():
        # peft warns when a second adapter joins a model; three adapters side by side is OSEDiff's layout.
        warnings.filterwarnings("ignore", message="Already found a `peft_config`")
        inject_adapter_in_model(config, model, adapter_name=adapter_name)
    # peft makes the newest adapter the only active one model-wide; every adapter of ours is always on.
    for module in model.modules():
        if isinstance(module, BaseTunerLayer):
            module.set_adapter(list(module.lora_A.keys()))


def _adapter_of(key: str) -> str | None:
    """The adapter name in ``<module>.lora_{A,B}.<adapter>.weight``, or None for a non-LoRA key."""
    parts = key.split(".")
    for i, part in enumerate(parts[:-1]):
        if part in ("lora_A", "lora_B"):
            return parts[i + 1]
    return None


def lora_state_dict(model: torch.nn.Module, adapter_name: str | None = None) -> dict[str, torch.Tensor]:
    """``<module>.lora_{A,B}.<adapter>.weight`` tensors of one adapter (or of all), in the official key grammar."""
    out = {}
    for key, value in model.state_dict().items():
        adapter = _adapter_of(key)
        if adapter is not None and (adapter_name is None or adapter == adapter_name):
            out[key] = value
    return out


def load_lora_state_dict(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Load LoRA tensors strictly: every injected LoRA key must be present, with its shape, and nothing else.

    Tensors are cast to the LoRA weights' dtype. Raises ValueError listing the first missing/unexpected keys.
    """
    own = lora_state_dict(model)
    missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    if missing or unexpected:
        raise ValueError(
            f"LoRA weights do not match the injected adapters: {len(missing)} missing (first: {missing[:3]}), "
            f"{len(unexpected)} unexpected (first: {unexpected[:3]})."
        )
    wrong = [f"{k}: {tuple(state[k].shape)}, expected {tuple(v.shape)}" for k, v in own.items()
             if state[k].shape != v.shape]
    if wrong:
        raise ValueError(f"{len(wrong)} LoRA tensors have the wrong shape (first: {wrong[:3]}); the rank or the "
                         "base architecture differs from the one the weights were made for.")
    # strict=False because the model's base weights are not in ``state``; the LoRA keys were checked above
    model.load_state_dict(state, strict=False)


def merge_lora(model: torch.nn.Module) -> None:
    """Fuse every LoRA delta, W += (alpha / r) · B A, into its base weight and unwrap the peft layers, in place.

    Afterwards the model is a plain diffusers/transformers module (no peft layers, no ``peft_config``) that computes
    what the unmerged one did, at plain-model speed.
    """
    wrapped = [(name, module) for name, module in model.named_modules() if isinstance(module, BaseTunerLayer)]
    for name, module in wrapped:
        module.merge(adapter_names=list(module.lora_A.keys()))
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, module.get_base_layer())
    if hasattr(model, "peft_config"):
        del model.peft_config

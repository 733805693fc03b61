"""LoRA on the U-Net and the VAE encoder with OSEDiff's target lists (SPEC.md §0.5, CHECKPOINTS.md §1).

Targets are chosen the way OSEDiff's code does it, so module and adapter names match the officially released weights:
every *weight* parameter whose name contains one of the patterns below (plain substring match, so "conv" also
selects the down/upsampler convs), skipping names with "bias" or "norm". The U-Net matches are split into three
adapters of the same rank: ``default_encoder`` (down_blocks, conv_in), ``default_decoder`` (up_blocks, conv_out) and
``default_others`` (the mid block). The VAE encoder gets one adapter over its matches plus ``quant_conv``.

peft injects the adapters directly into the diffusers model (no PeftModel wrapper), so keys read
``<module path>.lora_A.<adapter>.weight``. The effective scale is alpha / r; peft's default alpha is 8, which the
official releases rely on (2.0 at r = 4).
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
PEFT_DEFAULT_ALPHA = 8.0


def _matching_modules(model: torch.nn.Module, patterns: tuple[str, ...], must_contain: str = "") -> list[str]:
    names = []
    for name, _ in model.named_parameters():
        if "bias" in name or "norm" in name or not name.endswith(".weight") or must_contain not in name:
            continue
        if any(pattern in name for pattern in patterns):
            names.append(name[: -len(".weight")])
    return names


def unet_lora_targets(unet: torch.nn.Module) -> dict[str, list[str]]:
    """The U-Net's target modules split into OSEDiff's three adapters."""
    adapters: dict[str, list[str]] = {"default_encoder": [], "default_decoder": [], "default_others": []}
    for name in _matching_modules(unet, UNET_PATTERNS):
        if "down_blocks" in name or "conv_in" in name:
            adapters["default_encoder"].append(name)
        elif "up_blocks" in name or "conv_out" in name:
            adapters["default_decoder"].append(name)
        else:
            adapters["default_others"].append(name)
    return adapters


def vae_encoder_lora_targets(vae: torch.nn.Module) -> list[str]:
    """The VAE encoder's target modules plus quant_conv (never post_quant_conv or the decoder)."""
    return _matching_modules(vae, VAE_ENCODER_PATTERNS, must_contain="encoder") + ["quant_conv"]


def inject_lora(
    model: torch.nn.Module, targets: list[str], *, rank: int, alpha: float = PEFT_DEFAULT_ALPHA, adapter_name: str
) -> None:
    """Add a LoRA adapter (A ~ N(0, 1/r), B = 0, so the model is unchanged) to exactly the ``targets`` modules."""
    if rank < 1:
        raise ValueError(f"LoRA `rank` must be at least 1; got {rank}.")
    if not targets:
        raise ValueError(f"adapter {adapter_name!r} has no target modules.")
    config = LoraConfig(r=rank, lora_alpha=alpha, init_lora_weights="gaussian", target_modules=list(targets))
    with warnings.catch_warnings():
        # peft warns when a second adapter joins a model; three adapters side by side is OSEDiff's layout.
        warnings.filterwarnings("ignore", message="Already found a `peft_config`")
        inject_adapter_in_model(config, model, adapter_name=adapter_name)
    # peft makes the newest adapter the only active one model-wide; every adapter of ours is always on.
    for module in model.modules():
        if isinstance(module, BaseTunerLayer):
            module.set_adapter(list(module.lora_A.keys()))


def lora_state_dict(model: torch.nn.Module, adapter_name: str | None = None) -> dict[str, torch.Tensor]:
    """``<module>.lora_{A,B}.<adapter>.weight`` tensors of one adapter (or all)."""
    out = {}
    for key, value in model.state_dict().items():
        if ".lora_A." not in key and ".lora_B." not in key:
            continue
        if adapter_name is None or f".{adapter_name}." in key:
            out[key] = value
    return out


def load_lora_state_dict(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Load LoRA tensors strictly: every injected LoRA key must be present and nothing else."""
    expected = set(lora_state_dict(model))
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or unexpected:
        raise ValueError(
            f"LoRA weights do not match the injected adapters: {len(missing)} missing (first: {missing[:3]}), "
            f"{len(unexpected)} unexpected (first: {unexpected[:3]})."
        )
    model.load_state_dict(state, strict=False)


def merge_lora(model: torch.nn.Module) -> None:
    """Fuse every LoRA delta (scale alpha/r) into its base weight and unwrap the peft layers."""
    wrapped = [(name, module) for name, module in model.named_modules() if isinstance(module, BaseTunerLayer)]
    for name, module in wrapped:
        module.merge(adapter_names=list(module.lora_A.keys()))
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, module.get_base_layer())
    if hasattr(model, "peft_config"):
        del model.peft_config

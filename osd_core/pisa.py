"""PiSA-SR's pixel/semantic control: two LoRA sets on one U-Net and a two-pass blend (SPEC.md §7.2).

PiSA-SR, "Pixel-level and Semantic-level Adjustable Super-resolution: A Dual-LoRA Approach" (arXiv 2412.03017).
The pixel adapters are merged into the U-Net; the semantic adapters stay live peft adapters (the bundle's
``unet_sem_lora``, see ``osd_core.adapters``) so they can be switched off for the first pass:

    ε_pix = UNet_{W0+Δpix}(z, t, c)                 semantic adapters off
    ε_ps  = UNet_{W0+Δpix+Δsem}(z, t, c)            semantic adapters on
    ε     = λ_pix · ε_pix + λ_sem · (ε_ps − ε_pix)

At λ_pix = λ_sem = 1 this is ε_ps, one pass (PiSA-SR's "default" mode). x̂₀ = z_L − ε at t = 1 (parameterisation P).
The official code swaps precomputed weight deltas instead; toggling the live adapters computes the same two U-Nets.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator

import torch
from peft.tuners.tuners_utils import BaseTunerLayer

from .onestep import plain_call

UnetCall = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def semantic_layers(unet: torch.nn.Module) -> list[BaseTunerLayer]:
    """The U-Net's live LoRA layers (after loading a PiSA-SR bundle: the semantic adapters)."""
    return [module for module in unet.modules() if isinstance(module, BaseTunerLayer)]


@contextmanager
def adapters_off(layers: list[BaseTunerLayer]) -> Iterator[None]:
    """Switch the layers' adapters off for the block; always back on after, with their ``requires_grad`` as before
    (peft's ``enable_adapters(True)`` would make every adapter trainable)."""
    grads = [(p, p.requires_grad) for layer in layers for name, p in layer.named_parameters() if "lora_" in name]
    for layer in layers:
        layer.enable_adapters(False)
    try:
        yield
    finally:
        for layer in layers:
            layer.enable_adapters(True)
        for param, requires_grad in grads:
            param.requires_grad_(requires_grad)


def semantic_guidance(unet: torch.nn.Module, lambda_pix: float, lambda_sem: float, *,
                      model_name: str = "the loaded model") -> UnetCall:
    """The U-Net call with PiSA-SR's λ control; one plain pass when both λ are 1 (any bundle).

    ``model_name`` names the model in the error raised when λ ≠ 1 and the U-Net has no live semantic adapters.
    """
    if lambda_pix == 1.0 and lambda_sem == 1.0:
        return plain_call(unet)
    layers = semantic_layers(unet)
    if not layers:
        raise ValueError(
            f"`lambda_pix` = {lambda_pix} and `lambda_sem` = {lambda_sem} need a PiSA-SR bundle (pixel + semantic "
            f"LoRA), but {model_name} has no semantic adapters. Set both to 1.0, or load a PiSA-SR bundle "
            "(pisa_sr.pkl or one imported with `onestep-sr import --method pisa-sr`)."
        )

    def call(z: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        with adapters_off(layers):
            eps_pix = unet(z, t, encoder_hidden_states=cond).sample  # (B, 4, h, w), W0 + Δpix
        eps_ps = unet(z, t, encoder_hidden_states=cond).sample  # (B, 4, h, w), W0 + Δpix + Δsem
        return lambda_pix * eps_pix + lambda_sem * (eps_ps - eps_pix)  # (B, 4, h, w)

    return call

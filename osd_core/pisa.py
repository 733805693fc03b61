"""PiSA-SR's pixel/semantic control: two LoRA sets on one U-Net and a two-pass blend (SPEC.md §7.2).

The pixel adapters are merged into the U-Net; the semantic adapters stay live peft adapters so they can be switched
off for the first pass:

    ε_pix = UNet_{W0+Δpix}(z, t, c)                 semantic adapters off
    ε_ps  = UNet_{W0+Δpix+Δsem}(z, t, c)            semantic adapters on
    ε     = λ_pix · ε_pix + λ_sem · (ε_ps − ε_pix)

At λ_pix = λ_sem = 1 this is ε_ps, one pass (PiSA-SR's "default" mode). x̂₀ = z_L − ε at t = 1 (parameterisation P).
"""

from __future__ import annotations

from typing import Callable

import torch
from peft.tuners.tuners_utils import BaseTunerLayer

from .onestep import plain_call

UnetCall = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def semantic_layers(unet: torch.nn.Module) -> list[BaseTunerLayer]:
    """The U-Net's live LoRA layers (after loading a PiSA-SR bundle: the semantic adapters)."""
    return [module for module in unet.modules() if isinstance(module, BaseTunerLayer)]


def semantic_guidance(unet: torch.nn.Module, lambda_pix: float, lambda_sem: float) -> UnetCall:
    """The U-Net call with PiSA-SR's λ control; one plain pass when both λ are 1 (any bundle)."""
    if lambda_pix == 1.0 and lambda_sem == 1.0:
        return plain_call(unet)
    layers = semantic_layers(unet)
    if not layers:
        raise ValueError(
            f"`lambda_pix`/`lambda_sem` ({lambda_pix}, {lambda_sem}) need a PiSA-SR bundle (pixel + semantic LoRA); "
            "the loaded bundle has no semantic adapters. Set both to 1.0 or load a PiSA-SR bundle."
        )

    def call(z: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        for layer in layers:
            layer.enable_adapters(False)
        try:
            eps_pix = unet(z, t, encoder_hidden_states=cond).sample  # (B, 4, h, w), W0 + Δpix
        finally:
            for layer in layers:
                layer.enable_adapters(True)
        eps_ps = unet(z, t, encoder_hidden_states=cond).sample  # (B, 4, h, w), W0 + Δpix + Δsem
        return lambda_pix * eps_pix + lambda_sem * (eps_ps - eps_pix)

    return call

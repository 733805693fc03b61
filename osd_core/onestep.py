"""The one-step denoise: z_L (+ optional noise) at a per-sample continuous timestep -> U-Net -> x̂₀ (SPEC.md §0.6, §1).

    z_in   = z_L                          (no noise: OSEDiff, TADSR, RCOD, PiSA-SR)
           = α_t z_L + σ_t ε              (with noise: CODSR's ε_a, IDaS-SR's ε_mix)
    ε̂      = UNet(z_in, t, c)             blended over gaussian-weighted latent tiles (SPEC §1.3)
    ẑ₀     = x̂₀(z_in, z_L, ε̂, t, ε)       by the bundle's parameterisation (S, R, P or N), applied ONCE to the
                                           blended ε̂, never per tile

t is a float tensor all the way into the U-Net (diffusers' sinusoidal embedding accepts it), so IDaS-SR's
continuous timesteps and gradients through t work unchanged.

``conv_in_hook`` is the hook point on the U-Net's first conv (CODSR's LQFM): given the tile window it returns a
function applied to conv_in's output (B, C, th, tw); it is registered for that one call and always removed.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator

import torch

from .parameterisation import Parameterisation, noisy_latent, predict_x0
from .schedule import NoiseSchedule
from .tiling import TileWindow, blend_tiles, validate_tiling

ConvInHook = Callable[[TileWindow], Callable[[torch.Tensor], torch.Tensor]]
Callback = Callable[[int, int], None]


def plain_call(unet) -> Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]:
    """ε̂ = UNet(z, t, c): the one-pass U-Net call."""
    return lambda z, t, cond: unet(z, t, encoder_hidden_states=cond).sample


@contextmanager
def _conv_in_modulation(unet, modulate: Callable[[torch.Tensor], torch.Tensor] | None) -> Iterator[None]:
    """Apply ``modulate`` to the output of ``unet.conv_in`` for the duration of the block."""
    if modulate is None:
        yield
        return
    handle = unet.conv_in.register_forward_hook(lambda _module, _inputs, out: modulate(out))
    try:
        yield
    finally:
        handle.remove()


def one_step_denoise(
    unet,
    schedule: NoiseSchedule,
    parameterisation: Parameterisation,
    z_lq: torch.Tensor,
    cond: torch.Tensor,
    t: torch.Tensor,
    *,
    noise: torch.Tensor | None = None,
    tile_latent: int = 96,
    overlap_latent: int = 32,
    conv_in_hook: ConvInHook | None = None,
    unet_call: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    callback: Callback | None = None,
) -> torch.Tensor:
    """Return ẑ₀ (B, 4, h, w) float32 on z_lq's device.

    z_lq (B, 4, h, w) scaled latent; cond (B, L, D) cross-attention states; t (B,) float timesteps in [0, T-1];
    noise (B, 4, h, w) or None. ``unet_call(z, t, cond) -> ε̂`` replaces the plain U-Net call (PiSA-SR's two-pass
    λ control, ``osd_core.pisa``). The U-Net runs in its own dtype and device; the x̂₀ arithmetic in float32 because
    at t = 999 it divides by α ≈ 0.068, which amplifies half-precision rounding of ε̂ fifteen-fold.
    """
    validate_tiling(tile_latent, overlap_latent)
    param = next(unet.parameters())
    z_lq = z_lq.float()
    t = t.float().to(z_lq.device)
    if noise is not None:
        noise = noise.float().to(z_lq.device)
    z_in = noisy_latent(z_lq, t, schedule, noise)  # (B, 4, h, w)
    unet_t = t.to(param.device)
    unet_cond = cond.to(device=param.device, dtype=param.dtype)
    call = unet_call or plain_call(unet)

    def predict(win: TileWindow) -> torch.Tensor:
        tile = win.slice(z_in).to(device=param.device, dtype=param.dtype)  # (B, 4, th, tw)
        with _conv_in_modulation(unet, conv_in_hook(win) if conv_in_hook is not None else None):
            eps = call(tile, unet_t, unet_cond)  # (B, 4, th, tw)
        return eps.float().to(z_lq.device)

    eps_hat = blend_tiles(
        predict, tuple(z_in.shape), tile_latent=tile_latent, overlap_latent=overlap_latent,
        device=z_lq.device, dtype=torch.float32, callback=callback,
    )  # (B, 4, h, w)
    return predict_x0(
        parameterisation, z_in=z_in, z_lq=z_lq, eps_hat=eps_hat, t=t, schedule=schedule, noise=noise
    )  # (B, 4, h, w)

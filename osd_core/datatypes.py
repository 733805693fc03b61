"""The typed values that flow between the stages (and between the ComfyUI nodes that wrap them).

DESIGN.md "What flows between nodes": every ComfyUI custom type of the pack is one of these dataclasses.

=============  ===================  ==========================================================================
ComfyUI type   class                holds
=============  ===================  ==========================================================================
OSD_MODEL      ``OSDModel``         base SD components + the loaded adapter bundle and its method metadata
OSD_LATENT     ``OSDLatent``        latent (B, 4, h, w) scaled by the VAE factor + the prepared LQ image
OSD_TIMESTEP   ``OSDTimestep``      per-sample float timesteps (B,) (or one shared (1,)) in [0, T-1]
OSD_NOISE      ``OSDNoise``         a noise tensor shaped like the latent
OSD_COND       ``OSDCond``          encoder hidden states for the U-Net cross-attention (1 or B, L, D)
OSD_EMBED      ``OSDEmbed``         a per-sample embedding (B, D) added to every conditioning token
OSD_SFT        ``OSDSFT``           LQFM modulation maps γ, β (B, C, h, w) and λ_t (B,) for the U-Net's conv_in
=============  ===================  ==========================================================================

Tensors are kept in float32 on the CPU between stages (a few MB even for large images); each stage moves what it
needs to its device and dtype. Per-sample tensors of batch size 1 broadcast over any batch.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from .imageprep import PreparedImage
from .parameterisation import Parameterisation

if TYPE_CHECKING:
    from .bundle import Bundle
    from .models import SDComponents

# Which method's bundle provides each optional module (for "missing module" messages).
MODULE_PROVIDERS = {
    "unet_lora": "any trained bundle (OSEDiff, TADSR, CODSR, IDaS-SR, RCOD, PiSA-SR)",
    "unet_sem_lora": "a PiSA-SR bundle",
    "vae_encoder_lora": "any trained bundle (OSEDiff, TADSR, CODSR, IDaS-SR, RCOD)",
    "tae": "a TADSR bundle",
    "mine": "an IDaS-SR bundle",
    "lqfm": "a CODSR bundle",
    "vpim": "an RCOD bundle",
    "mem": "an RCOD bundle with the MEM stage trained",
}


def _expand_batch(x: torch.Tensor, batch: int, what: str) -> torch.Tensor:
    """Broadcast a batch-1 tensor to ``batch`` items; refuse any other mismatch with a clear message."""
    if x.shape[0] == batch:
        return x
    if x.shape[0] == 1:
        return x.expand(batch, *x.shape[1:])
    raise ValueError(
        f"`{what}` has batch size {x.shape[0]} but the image batch has {batch} items. "
        f"Feed the {what} from the same image batch, or use a batch of 1 to share it."
    )


@dataclass
class OSDModel:
    """A base SD model with an adapter bundle applied (``bundle`` is None for plain SD)."""

    components: SDComponents
    bundle: Bundle | None
    parameterisation: Parameterisation
    defaults: dict[str, Any]
    name: str
    extra_modules: dict[str, torch.nn.Module] = field(default_factory=dict)

    @property
    def method(self) -> str:
        return self.bundle.meta.method if self.bundle is not None else "none"

    def require_module(self, module: str, *, needed_by: str) -> torch.nn.Module:
        """Return the bundle module ``module`` or fail naming the bundle, the module and who provides it."""
        if module in self.extra_modules:
            return self.extra_modules[module]
        provider = MODULE_PROVIDERS.get(module, "a bundle that declares it")
        bundle = self.bundle.path if self.bundle is not None else "none (plain SD)"
        raise ValueError(
            f"{needed_by} needs the `{module}` module, but the loaded bundle {bundle} has no `{module}`. "
            f"Load {provider} in the Load model node."
        )


@dataclass
class OSDLatent:
    """A latent and the frame it came from.

    ``z``: (B, 4, h, w) float32, already multiplied by the VAE scaling factor.
    ``image``: the prepared (upsampled, padded) LQ image the latent was encoded from; stages that need the LQ in pixel
    space (CODSR's Sobel map and LQFM, colour fix) read it here, and Decode crops back with its frame.
    """

    z: torch.Tensor
    image: PreparedImage

    @property
    def batch(self) -> int:
        return self.z.shape[0]

    def with_z(self, z: torch.Tensor) -> OSDLatent:
        return OSDLatent(z=z, image=self.image)


@dataclass
class OSDTimestep:
    """Per-sample continuous timesteps ``t`` (B,) or one shared (1,), float32 in [0, T-1]."""

    t: torch.Tensor

    def for_batch(self, batch: int) -> torch.Tensor:
        return _expand_batch(self.t, batch, "timestep")


@dataclass
class OSDNoise:
    """A noise tensor (B, 4, h, w) float32 shaped like the latent it was made for; ``kind`` says how it was made."""

    eps: torch.Tensor
    kind: str

    def for_latent(self, latent: OSDLatent) -> torch.Tensor:
        eps = _expand_batch(self.eps, latent.batch, "noise")
        if eps.shape[1:] != latent.z.shape[1:]:
            raise ValueError(
                f"`noise` has shape {tuple(eps.shape[1:])} but the latent is {tuple(latent.z.shape[1:])}. "
                "Make the noise from the same latent (same image and upscale factor)."
            )
        return eps


@dataclass
class OSDCond:
    """Cross-attention conditioning (1 or B, L, D) float32 (text tokens, text + embedding, or visual tokens)."""

    hidden: torch.Tensor
    source: str

    def for_batch(self, batch: int) -> torch.Tensor:
        return _expand_batch(self.hidden, batch, "conditioning")


@dataclass
class OSDEmbed:
    """A per-sample embedding (B, D) float32 added to every conditioning token (IDaS-SR's degradation embedding)."""

    d: torch.Tensor


@dataclass
class OSDSFT:
    """CODSR's LQFM modulation of the U-Net's first conv: γ, β (B, C, h, w) float32 and λ_t = 1/w_t (B,)."""

    gamma: torch.Tensor
    beta: torch.Tensor
    lam: torch.Tensor

    def for_latent(self, latent: OSDLatent) -> OSDSFT:
        if self.gamma.shape[0] != latent.batch or self.gamma.shape[-2:] != latent.z.shape[-2:]:
            raise ValueError(
                f"the SFT maps are {tuple(self.gamma.shape)} but the latent is {tuple(latent.z.shape)}; make them "
                "from the same latent (SFT modulation node fed by the same Encode)."
            )
        return self

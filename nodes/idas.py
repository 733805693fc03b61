"""IDaS-SR nodes: MINE estimate (τ, inversion noise, degradation embedding) and the CHARIOT mix (SPEC §5)."""

from __future__ import annotations

from ..osd_core.chariot import ChariotConfig, chariot
from ..osd_core.datatypes import OSDEmbed, OSDNoise, OSDTimestep
from ..osd_core.idas import mine_estimate
from ..osd_core.tiling import validate_tiling
from . import comfy_glue as glue


class OneStepSRMINEEstimate:
    DESCRIPTION = (
        "IDaS-SR's MINE: from the LQ latent, an adaptive timestep tau (one per image), the inversion noise the image "
        "would carry at tau, and a degradation embedding to add to the prompt. Large latents: tau from one global "
        "estimate, the inversion noise per tile. Needs an IDaS-SR bundle."
    )
    CATEGORY = glue.CATEGORY + "/IDaS-SR"
    RETURN_TYPES = ("OSD_TIMESTEP", "OSD_NOISE", "OSD_EMBED")
    RETURN_NAMES = ("tau", "inversion_noise", "degradation_embedding")
    FUNCTION = "estimate"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": ("OSD_MODEL", {"tooltip": "From Load model, with an IDaS-SR bundle (it holds MINE)."}),
                "latent": ("OSD_LATENT", {"tooltip": "From Encode."}),
                "tile_size": ("INT", {"default": 64, "min": 8, "max": 512, "step": 8,
                                      "tooltip": "Latent tile for the inversion noise (64 = 512 image px, the "
                                                 "training size)."}),
                "tile_overlap": ("INT", {"default": 16, "min": 0, "max": 504, "step": 8,
                                         "tooltip": "Overlap of those tiles."}),
            }
        }

    def estimate(self, model, latent, tile_size, tile_overlap):
        validate_tiling(tile_size, tile_overlap)
        mine = model.require_module("mine", needed_by="MINE estimate")
        with glue.on_device(mine):
            result = mine_estimate(mine, latent.z, tile_latent=tile_size, overlap_latent=tile_overlap,
                                   callback=glue.progress_callback())
        return (OSDTimestep(t=result.tau), OSDNoise(eps=result.eps_inv, kind="inversion"), OSDEmbed(d=result.d))


class OneStepSRChariotMix:
    DESCRIPTION = (
        "IDaS-SR's CHARIOT control s: reschedules the timestep t' = tau + s (999 - tau) and mixes the inversion "
        "noise with fresh noise, renormalising the energy. s = 0 keeps the structure (best PSNR), higher s generates "
        "more texture (the paper's default 0.6). Any noise can be mixed in, e.g. Sobel-weighted noise."
    )
    CATEGORY = glue.CATEGORY + "/IDaS-SR"
    RETURN_TYPES = ("OSD_TIMESTEP", "OSD_NOISE")
    RETURN_NAMES = ("timestep", "noise")
    FUNCTION = "mix"

    @classmethod
    def INPUT_TYPES(cls):
        s_max = ChariotConfig().s_max
        return {
            "required": {
                "timestep": ("OSD_TIMESTEP", {"tooltip": "tau from MINE estimate (any timestep works)."}),
                "inversion_noise": ("OSD_NOISE", {"tooltip": "From MINE estimate."}),
                "s": ("FLOAT", {"default": 0.6, "min": 0.0, "max": s_max, "step": 0.05,
                                "tooltip": f"Fidelity (0) to realism; capped at {s_max} as in the paper's tables."}),
                "seed": ("INT", {"default": 0, "min": 0, "max": 0xFFFFFFFFFFFFFFFF,
                                 "tooltip": "Seed of the fresh Gaussian noise (unused when noise is connected)."}),
                "energy_mode": (["std", "var"], {"default": "std",
                                                 "tooltip": "Target energy interpolated in std (default) or variance "
                                                            "(both readings of Eq. 20)."}),
            },
            "optional": {
                "noise": ("OSD_NOISE", {"tooltip": "Unit-variance noise to mix instead of fresh Gaussian noise."}),
            },
        }

    def mix(self, timestep, inversion_noise, s, seed, energy_mode, noise=None):
        eps_inv = inversion_noise.eps
        tau = timestep.for_batch(eps_inv.shape[0])
        config = ChariotConfig(energy_mode=energy_mode)
        if noise is not None:
            t, eps_mix = chariot(tau, eps_inv, s, eps=noise.eps.expand_as(eps_inv), config=config)
        else:
            t, eps_mix = chariot(tau, eps_inv, s, seed=seed, config=config)
        return (OSDTimestep(t=t), OSDNoise(eps=eps_mix, kind=f"chariot(s={s:g})"))

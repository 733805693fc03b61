"""TADSR's ``time_vae/`` folder: the VAE its official loader builds, whose encoder may differ from SD 2.1's.

TADSR ("Time-Aware One Step Diffusion Network for Real-World Image Super-Resolution", arXiv 2508.16557; layout in
CHECKPOINTS.md §3) loads its VAE from a diffusers folder ``time_vae/`` (class ``TimeAwareAutoencoderKL`` of its
vendored diffusers: the SD VAE plus time layers in the encoder), then copies the ``.pkl``'s VAE LoRA and time layers
on top. The time layers therefore come from the ``.pkl`` (``state_dict_vae_time``, imported as the bundle's ``tae``);
what the folder adds is the rest of its encoder, which nobody has confirmed equals SD 2.1's. ``encoder_base_tensors``
keeps exactly the non-time encoder weights (``encoder.*`` without "time", and ``quant_conv.*``) that differ from a
given base VAE; the bundle stores them as ``vae_encoder_base``, which replaces the base's before the VAE LoRA is
merged. When they all equal the base, nothing is stored and the import says the folder was verified.

The folder is read without running any code: ``config.json`` (checked for an SD-VAE class) and
``diffusion_pytorch_model.safetensors``, or the ``.bin`` through ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from .adapters import ENCODER_BASE_ROOTS

logger = logging.getLogger(__name__)

VAE_CLASSES = ("TimeAwareAutoencoderKL", "AutoencoderKL")
WEIGHT_FILES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin",
                "diffusion_pytorch_model.fp16.safetensors", "diffusion_pytorch_model.fp16.bin")


def _is_encoder_base(key: str) -> bool:
    """A non-time weight of the encoding path: the encoder (minus TADSR's time layers) and quant_conv."""
    return key.startswith(ENCODER_BASE_ROOTS) and "time" not in key


def _read_weights(path: Path) -> dict[str, torch.Tensor]:
    try:
        if path.suffix == ".safetensors":
            return load_file(str(path), device="cpu")
        state = torch.load(str(path), map_location="cpu", weights_only=True)
    except (SafetensorError, OSError, RuntimeError, ValueError) as err:
        raise ValueError(f"time_vae weights {str(path)!r} cannot be read weights-only ({err}); re-download the "
                         "folder.") from err
    if not isinstance(state, dict):
        raise ValueError(f"time_vae weights {str(path)!r} hold a {type(state).__name__}, not a state dict.")
    return state


def read_time_vae(folder: str | Path) -> dict[str, torch.Tensor]:
    """The state dict of a diffusers-format ``time_vae/`` folder (config checked), on the CPU."""
    folder = Path(folder)
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"--time-vae {str(folder)!r} has no config.json; pass TADSR's time_vae/ folder "
                                "(the one holding config.json and diffusion_pytorch_model.safetensors).")
    config = json.loads(config_path.read_text())
    if config.get("_class_name") not in VAE_CLASSES:
        raise ValueError(f"--time-vae {str(folder)!r}: config.json describes a {config.get('_class_name')!r}, "
                         f"expected one of {VAE_CLASSES}.")
    weights = next((folder / name for name in WEIGHT_FILES if (folder / name).is_file()), None)
    if weights is None:
        raise FileNotFoundError(f"--time-vae {str(folder)!r} holds none of {list(WEIGHT_FILES)}.")
    state = _read_weights(weights)
    if not any(_is_encoder_base(k) for k in state):
        raise ValueError(f"--time-vae {str(weights)!r} has no encoder weights (encoder.*); first keys: "
                         f"{sorted(state)[:5]}.")
    return state


def encoder_base_tensors(
    state: dict[str, torch.Tensor], base_vae: torch.nn.Module | None = None
) -> tuple[dict[str, torch.Tensor], str]:
    """(the non-time encoder weights to store, a sentence saying what was found), float32.

    With ``base_vae`` only the weights that differ from it are kept (compared at the folder's precision, so an fp16
    copy of the base counts as equal); without one, all of them. A weight the base lacks, or has with another shape,
    is an error: the folder belongs to another architecture.
    """
    encoder = {k: v for k, v in state.items() if _is_encoder_base(k)}
    if base_vae is None:
        return ({k: v.detach().float().contiguous() for k, v in encoder.items()},
                f"time_vae: stored all {len(encoder)} non-time encoder weights (no base given to compare with)")
    own = base_vae.state_dict()
    wrong = [f"{k} {tuple(v.shape)}" for k, v in encoder.items() if k not in own or own[k].shape != v.shape]
    if wrong:
        raise ValueError(f"time_vae has {len(wrong)} encoder weights the base VAE lacks or has in another shape "
                         f"(first: {wrong[:3]}); it was made for another base model.")
    differ = {k: v.detach().float().contiguous() for k, v in encoder.items()
              if not torch.equal(v, own[k].to(v.dtype))}
    decoder = [k for k, v in state.items() if k in own and not _is_encoder_base(k) and "time" not in k
               and not torch.equal(v, own[k].to(v.dtype))]
    if decoder:
        logger.warning("time_vae's decoder side differs from the base in %d tensors (first: %s); only the encoder "
                       "is imported, so decoding uses the base model's decoder", len(decoder), decoder[:3])
    if not differ:
        return {}, f"time_vae: verified, its {len(encoder)} non-time encoder weights equal the base's; none stored"
    return differ, f"time_vae: {len(differ)} of {len(encoder)} non-time encoder weights differ from the base; stored"

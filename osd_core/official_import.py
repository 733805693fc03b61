"""Import the officially released .pkl checkpoints into adapter bundles (CHECKPOINTS.md §1–4).

Supported layouts: OSEDiff (``osediff.pkl``), TADSR (``tadsr.pkl``, time layers in ``state_dict_vae_time``) and
CODSR (``codsr.pkl``, two LoRA families + the 8-key SFT module). What the official loaders do, and what the bundle
therefore records:

* LoRA injected with peft's default ``lora_alpha = 8`` (the files never set it), so the effective scale is 8/r;
  adapter names and target lists as saved (the VAE list de-duplicated: the official selection appends a module once
  per matching pattern).
* OSEDiff/TADSR replace the U-Net's ``conv_in`` by the trained one (``conv_in.base_layer.*``, or ``conv_in.*`` from
  peft < 0.7) and LoRA-adapt it too. CODSR's loader copies LoRA tensors only, so its ``conv_in`` stays SD's.
* CODSR merges the ``default_*`` adapters, then adds and merges ``default_*_alignment`` on top: the same as merging
  both families at once (the deltas add), which is what applying the bundle does.

Files are read with ``torch.load(weights_only=True, map_location="cpu")`` only: a pickle that needs anything more is
refused. CUDA-saved and fp16 tensors load on the CPU and are stored as float32.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import torch

from .bundle import BundleMeta
from .lora import PEFT_DEFAULT_ALPHA
from .sft import LQFMConfig
from .tae import TAEConfig

logger = logging.getLogger(__name__)

UNET_GROUPS = ("encoder", "decoder", "others")
OSEDIFF_KEYS = {"vae_lora_encoder_modules", "unet_lora_encoder_modules", "unet_lora_decoder_modules",
                "unet_lora_others_modules", "rank_unet", "rank_vae", "state_dict_unet", "state_dict_vae"}
CODSR_KEYS = {"state_dict_sft", "rank_vae", "vae_lora_encoder_modules", "state_dict_vae", "rank_unet",
              "state_dict_unet"} | {f"unet_lora_{g}_modules_{f}" for g in UNET_GROUPS for f in ("default", "sam")}
SFT_KEYS = {f"SFT_{branch}_conv{i}.{p}" for branch in ("scale", "shift") for i in (0, 1) for p in ("weight", "bias")}
DEFAULTS = {
    "osediff": ("S", {"timestep": 999, "tile_size": 96, "tile_overlap": 32, "color_fix": "adain"}),
    "tadsr": ("R", {"timestep": 500, "tile_size": 96, "tile_overlap": 32, "color_fix": "adain"}),
    # CODSR's released tiles are 150/50 latent px; ours must be multiples of 8, so the nearest are used.
    "codsr": ("N", {"timestep": 100, "tile_size": 152, "tile_overlap": 48, "color_fix": "adain"}),
}


def read_official(path: str | Path) -> dict:
    """The checkpoint dict, read weights-only on the CPU; anything else is refused with the reason."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"official checkpoint {str(path)!r} does not exist.")
    try:
        checkpoint = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises several types for pickles it will not load weights-only
        raise ValueError(
            f"{str(path)!r} was refused: it cannot be loaded weights-only ({type(err).__name__}: {err}). Only "
            "tensors, numbers, strings, lists and dicts are accepted from a pickle, so nothing in it can run code."
        ) from err
    if not isinstance(checkpoint, dict):
        raise ValueError(f"{str(path)!r} holds a {type(checkpoint).__name__}, not the dict the official savers write.")
    return checkpoint


def detect_layout(checkpoint: dict) -> str:
    keys = set(checkpoint)
    if CODSR_KEYS <= keys:
        return "codsr"
    if OSEDIFF_KEYS <= keys:
        return "tadsr" if "state_dict_vae_time" in keys else "osediff"
    raise ValueError(
        f"unknown checkpoint layout; top-level keys found: {sorted(keys)[:12]}. Known: OSEDiff {sorted(OSEDIFF_KEYS)}, "
        f"TADSR (OSEDiff + state_dict_vae_time), CODSR (with state_dict_sft and *_default/*_sam module lists)."
    )


def _unique(names: list[str]) -> list[str]:
    return list(dict.fromkeys(names))


def _lora_tensors(state: dict, prefix: str) -> dict[str, torch.Tensor]:
    return {f"{prefix}.{k}": v.detach().float().contiguous() for k, v in state.items() if "lora" in k}


def _check_lora(tensors: dict[str, torch.Tensor], adapters: dict[str, list[str]], rank: int, where: str) -> None:
    """Every adapter/target has its A and B with rank ``rank``; nothing else is there."""
    expected = {f"{where}.{m}.lora_{ab}.{adapter}.weight" for adapter, targets in adapters.items()
                for m in targets for ab in "AB"}
    found = {k for k in tensors if k.startswith(where + ".")}
    missing, unexpected = sorted(expected - found), sorted(found - expected)
    if missing:
        raise ValueError(f"the checkpoint lacks {len(missing)} LoRA tensors its module lists name: {missing[:5]}")
    if unexpected:
        logger.warning("ignoring %d LoRA tensors that no module list names: %s", len(unexpected), unexpected[:5])
        for key in unexpected:
            del tensors[key]
    for key in expected:
        shape = tensors[key].shape
        if (".lora_A." in key and shape[0] != rank) or (".lora_B." in key and shape[1] != rank):
            raise ValueError(f"{key} has shape {tuple(shape)}, which does not fit the saved rank {rank}.")


def _unet_adapters(checkpoint: dict, layout: str) -> dict[str, list[str]]:
    if layout != "codsr":
        return {f"default_{g}": _unique(checkpoint[f"unet_lora_{g}_modules"]) for g in UNET_GROUPS}
    adapters = {f"default_{g}": _unique(checkpoint[f"unet_lora_{g}_modules_default"]) for g in UNET_GROUPS}
    adapters.update({f"default_{g}_alignment": _unique(checkpoint[f"unet_lora_{g}_modules_sam"]) for g in UNET_GROUPS})
    return {name: targets for name, targets in adapters.items() if targets}


def _conv_in(state: dict) -> dict[str, torch.Tensor]:
    for prefix in ("conv_in.base_layer.", "conv_in."):
        found = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix) and "lora" not in k}
        if {"weight", "bias"} <= set(found):
            return {f"unet_conv_in.{k}": found[k].detach().float().contiguous() for k in ("weight", "bias")}
    raise ValueError("the checkpoint has no trained conv_in (conv_in.base_layer.weight/bias or conv_in.weight/bias)")


def _tae(checkpoint: dict) -> tuple[TAEConfig, dict[str, torch.Tensor]]:
    """Official ``encoder.*time*`` keys -> our TAE names (see osd_core.tae)."""
    tensors = {}
    for key, value in checkpoint["state_dict_vae_time"].items():
        name = key.removeprefix("encoder.")
        if name.startswith("time_embedding."):
            ours = name
        else:
            module, _, param = name.rpartition(".time_emb_proj.")
            ours = f"time_emb_proj.{module.replace('.', '_')}.{param}"
        tensors[f"tae.{ours}"] = value.detach().float().contiguous()
    linear_1 = tensors["tae.time_embedding.linear_1.weight"]
    return TAEConfig(time_proj_channels=linear_1.shape[1], temb_channels=linear_1.shape[0]), tensors


def _lqfm(checkpoint: dict) -> tuple[LQFMConfig, dict[str, torch.Tensor]]:
    state = checkpoint["state_dict_sft"]
    if set(state) != SFT_KEYS:
        raise ValueError(f"state_dict_sft must hold exactly {sorted(SFT_KEYS)}; got {sorted(state)[:10]}")
    conv0, conv1 = state["SFT_scale_conv0.weight"], state["SFT_scale_conv1.weight"]
    config = LQFMConfig(in_channels=conv0.shape[1] // 64, hidden=conv0.shape[0], out_channels=conv1.shape[0],
                        kernel=conv0.shape[-1])
    return config, {f"lqfm.{k}": v.detach().float().contiguous() for k, v in state.items()}


def convert_official(
    checkpoint: dict, *, method: str | None = None, source: str = "", sha256: str = "", base_family: str = "sd2"
) -> tuple[BundleMeta, dict[str, torch.Tensor]]:
    """An adapter bundle (meta, tensors) from an official checkpoint dict; ``method`` must match the layout.

    The released weights are for SD 2.1-base (family "sd2"); ``base_family`` exists for tests on tiny models."""
    layout = detect_layout(checkpoint)
    if method is not None and method != layout:
        raise ValueError(f"--method {method} was given, but the file has the {layout} layout.")
    rank_unet, rank_vae = int(checkpoint["rank_unet"]), int(checkpoint["rank_vae"])
    unet_adapters = _unet_adapters(checkpoint, layout)
    vae_adapters = {"default_encoder": _unique(checkpoint["vae_lora_encoder_modules"])}
    tensors = {**_lora_tensors(checkpoint["state_dict_unet"], "unet_lora"),
               **_lora_tensors(checkpoint["state_dict_vae"], "vae_encoder_lora")}
    _check_lora(tensors, unet_adapters, rank_unet, "unet_lora")
    _check_lora(tensors, vae_adapters, rank_vae, "vae_encoder_lora")
    modules, hyper = ["unet_lora", "vae_encoder_lora"], {}
    if layout in ("osediff", "tadsr"):
        tensors.update(_conv_in(checkpoint["state_dict_unet"]))
        modules.append("unet_conv_in")
    extra_module = {"tadsr": ("tae", _tae), "codsr": ("lqfm", _lqfm)}.get(layout)
    if extra_module is not None:
        name, read = extra_module
        config, module_tensors = read(checkpoint)
        tensors.update(module_tensors)
        modules.append(name)
        hyper[name] = config.to_dict()
    parameterisation, defaults = DEFAULTS[layout]
    meta = BundleMeta(
        method=layout, base_family=base_family, parameterisation=parameterisation,
        lora={"unet": {"rank": rank_unet, "alpha": PEFT_DEFAULT_ALPHA, "adapters": unet_adapters},
              "vae_encoder": {"rank": rank_vae, "alpha": PEFT_DEFAULT_ALPHA, "adapters": vae_adapters}},
        modules=tuple(modules), hyperparameters=hyper, defaults=defaults,
        extra={"source": source, "source_sha256": sha256,
               "conversion": f"official {layout} layout; LoRA scale 8/r (peft default alpha)"},
    )
    return meta, tensors


def import_official(path: str | Path, *, method: str | None = None) -> tuple[BundleMeta, dict[str, torch.Tensor]]:
    """Read, check and convert an official .pkl file."""
    path = Path(path)
    sha256 = hashlib.sha256(path.read_bytes()).hexdigest()
    return convert_official(read_official(path), method=method, source=path.name, sha256=sha256)


def cached_bundle(path: str | Path) -> tuple[Path, str]:
    """The bundle converted from an official .pkl, written once next to it as ``<name>.onestep-sr.safetensors``
    (the original is never touched) and reused while it matches the file's SHA-256. Returns (path, what happened)."""
    from .bundle import load_bundle, save_bundle

    path = Path(path)
    target = path.with_name(path.stem + ".onestep-sr.safetensors")
    sha256 = hashlib.sha256(path.read_bytes()).hexdigest()
    if target.is_file():
        try:
            if load_bundle(target).meta.extra.get("source_sha256") == sha256:
                return target, f"reused {target.name}, converted earlier from {path.name}"
        except ValueError:
            logger.warning("re-converting %s: the cached bundle %s is unreadable", path, target)
    meta, tensors = convert_official(read_official(path), source=path.name, sha256=sha256)
    save_bundle(target, meta, tensors)
    return target, f"converted {path.name} ({meta.method} layout) to {target.name}"

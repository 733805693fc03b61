"""Import the officially released .pkl checkpoints into adapter bundles (CHECKPOINTS.md §1–5).

Supported layouts: OSEDiff (``osediff.pkl``, ``osediff_face.pkl``), TADSR (``tadsr.pkl``, time layers in
``state_dict_vae_time``; optionally its ``time_vae/`` folder, see ``osd_core.official_time_vae``), CODSR
(``codsr.pkl``, two LoRA families + the 8-key SFT module) and PiSA-SR (``pisa_sr.pkl``, pixel + semantic U-Net LoRA).
What the official loaders do, and what the bundle therefore records:

* LoRA injected with peft's default ``lora_alpha = 8`` (the files never set it), so the effective scale is 8/r;
  adapter names and target lists as saved (the VAE list de-duplicated: the official selection appends a module once
  per matching pattern).
* OSEDiff/TADSR replace the U-Net's ``conv_in`` by the trained one (``conv_in.base_layer.*``, or ``conv_in.*`` from
  peft < 0.7) and LoRA-adapt it too. CODSR's and PiSA-SR's loaders copy LoRA tensors only, so ``conv_in`` stays SD's.
* CODSR merges the ``default_*`` adapters, then adds and merges ``default_*_alignment`` on top: the same as merging
  both families at once (the deltas add), which is what applying the bundle does.
* PiSA-SR merges the ``*_pix`` adapters (rank ``lora_rank_unet_pix``), then adds the ``*_sem`` adapters (rank
  ``lora_rank_unet_sem``, may differ) on top. The bundle keeps the pixel LoRA as ``unet_lora`` (merged when applied)
  and the semantic LoRA as ``unet_sem_lora`` (kept live, for the λ_pix/λ_sem control of ``osd_core.pisa``); with both
  λ at 1 the U-Net is the official fully merged "--default" one. No VAE LoRA, no conv_in.

Files are read with ``torch.load(weights_only=True, map_location="cpu")`` only: a pickle that needs anything more is
refused. CUDA-saved and fp16 tensors load on the CPU and are stored as float32.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import torch

from .adapters import ENCODER_BASE_PREFIX
from .bundle import BundleMeta
from .lora import PEFT_DEFAULT_ALPHA
from .method_defaults import METHOD_DEFAULTS
from .official_time_vae import encoder_base_tensors, read_time_vae
from .sft import LQFMConfig
from .tae import TAEConfig

logger = logging.getLogger(__name__)

UNET_GROUPS = ("encoder", "decoder", "others")
PISA_FAMILIES = {"pix": "unet", "sem": "unet_sem"}  # adapter-name suffix -> bundle LoRA component
OSEDIFF_KEYS = {"vae_lora_encoder_modules", "unet_lora_encoder_modules", "unet_lora_decoder_modules",
                "unet_lora_others_modules", "rank_unet", "rank_vae", "state_dict_unet", "state_dict_vae"}
CODSR_KEYS = {"state_dict_sft", "rank_vae", "vae_lora_encoder_modules", "state_dict_vae", "rank_unet",
              "state_dict_unet"} | {f"unet_lora_{g}_modules_{f}" for g in UNET_GROUPS for f in ("default", "sam")}
PISA_KEYS = {"lora_rank_unet_pix", "lora_rank_unet_sem", "state_dict_unet"} | {
    f"unet_lora_{g}_modules_{f}" for g in UNET_GROUPS for f in PISA_FAMILIES}
# Top-level keys each layout's loader reads, most specific first (a TADSR file is an OSEDiff file plus time layers).
LAYOUT_KEYS = {"codsr": CODSR_KEYS, "pisa-sr": PISA_KEYS, "tadsr": OSEDIFF_KEYS | {"state_dict_vae_time"},
               "osediff": OSEDIFF_KEYS}
SFT_KEYS = {f"SFT_{branch}_conv{i}.{p}" for branch in ("scale", "shift") for i in (0, 1) for p in ("weight", "bias")}
DEFAULTS = {layout: METHOD_DEFAULTS[layout] for layout in LAYOUT_KEYS}  # the released methods' (method_defaults)


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
    """The layout whose top-level keys the file holds all of; otherwise an error naming the closest layout and the
    keys it lacks."""
    keys = set(checkpoint)
    for layout, required in LAYOUT_KEYS.items():
        if required <= keys:
            return layout
    closest = max(LAYOUT_KEYS, key=lambda name: len(LAYOUT_KEYS[name] & keys) / len(LAYOUT_KEYS[name]))
    hint = ""
    if LAYOUT_KEYS[closest] & keys - {"state_dict_unet"}:
        hint = f" It looks like {closest} but lacks {sorted(LAYOUT_KEYS[closest] - keys)}."
    raise ValueError(
        f"unknown checkpoint layout; top-level keys found: {sorted(keys)[:12]}.{hint} Known: OSEDiff "
        f"{sorted(OSEDIFF_KEYS)}, TADSR (OSEDiff + state_dict_vae_time), CODSR (with state_dict_sft and "
        "*_default/*_sam module lists), PiSA-SR (*_pix/*_sem module lists and lora_rank_unet_pix/_sem)."
    )


def _layout(checkpoint: dict, method: str | None) -> str:
    """The file's layout, checked against ``method``; top-level keys its loader would not read are reported."""
    keys = set(checkpoint)
    if method is not None and method not in LAYOUT_KEYS:
        raise ValueError(f"--method {method!r} is not an official layout; expected one of {sorted(LAYOUT_KEYS)}.")
    if method is not None and not LAYOUT_KEYS[method] <= keys and not any(r <= keys for r in LAYOUT_KEYS.values()):
        raise ValueError(f"--method {method} was given, but the file lacks the top-level keys that layout needs: "
                         f"{sorted(LAYOUT_KEYS[method] - keys)}.")
    layout = detect_layout(checkpoint)
    if method is not None and method != layout:
        raise ValueError(f"--method {method} was given, but the file has the {layout} layout.")
    unexpected = sorted(keys - LAYOUT_KEYS[layout])
    if unexpected:
        logger.warning("ignoring top-level keys the official %s loader does not read: %s", layout, unexpected)
    return layout


def _unique(names: list[str]) -> list[str]:
    return list(dict.fromkeys(names))


def _adapter(key: str) -> str:
    """``<module>.lora_{A,B}.<adapter>.weight`` -> ``<adapter>`` ("" for a key without that grammar)."""
    parts = key.split(".")
    return parts[-2] if len(parts) > 1 else ""


def _lora_tensors(state: dict, prefix: str, adapter_suffix: str = "") -> dict[str, torch.Tensor]:
    """The LoRA tensors (of the adapters whose name ends with ``adapter_suffix``) under ``prefix.``, as float32."""
    return {f"{prefix}.{k}": v.detach().float().contiguous() for k, v in state.items()
            if "lora" in k and _adapter(k).endswith(adapter_suffix)}


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


def _osediff_family(checkpoint: dict, layout: str) -> tuple[dict, list[str], dict, dict]:
    """OSEDiff, TADSR and CODSR: one U-Net LoRA family (two for CODSR, one rank), the VAE-encoder LoRA, conv_in
    (OSEDiff/TADSR) and the method module (TADSR's TAE time layers, CODSR's LQFM)."""
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
    lora = {"unet": {"rank": rank_unet, "alpha": PEFT_DEFAULT_ALPHA, "adapters": unet_adapters},
            "vae_encoder": {"rank": rank_vae, "alpha": PEFT_DEFAULT_ALPHA, "adapters": vae_adapters}}
    return lora, modules, tensors, hyper


def _pisa(checkpoint: dict) -> tuple[dict, list[str], dict, dict]:
    """PiSA-SR: the ``*_pix`` adapters as ``unet_lora``, the ``*_sem`` adapters as ``unet_sem_lora``, each at its own
    rank with scale 8/r; U-Net entries that are neither are reported and left out (the official loader ignores
    them too)."""
    state = checkpoint["state_dict_unet"]
    lora, tensors = {}, {}
    for family, component in PISA_FAMILIES.items():
        prefix = "unet_lora" if component == "unet" else "unet_sem_lora"
        rank = int(checkpoint[f"lora_rank_unet_{family}"])
        adapters = {f"default_{g}_{family}": _unique(checkpoint[f"unet_lora_{g}_modules_{family}"])
                    for g in UNET_GROUPS}
        adapters = {name: targets for name, targets in adapters.items() if targets}
        family_tensors = _lora_tensors(state, prefix, f"_{family}")
        _check_lora(family_tensors, adapters, rank, prefix)
        tensors.update(family_tensors)
        lora[component] = {"rank": rank, "alpha": PEFT_DEFAULT_ALPHA, "adapters": adapters}
    stray = sorted(k for k in state if not ("lora" in k and _adapter(k).endswith(("_pix", "_sem"))))
    if stray:
        logger.warning("ignoring %d state_dict_unet entries of neither the pixel nor the semantic LoRA: %s",
                       len(stray), stray[:5])
    return lora, ["unet_lora", "unet_sem_lora"], tensors, {}


def convert_official(
    checkpoint: dict, *, method: str | None = None, source: str = "", sha256: str = "", base_family: str = "sd2",
    encoder_base: dict[str, torch.Tensor] | None = None, encoder_note: str = "",
) -> tuple[BundleMeta, dict[str, torch.Tensor]]:
    """An adapter bundle (meta, tensors) from an official checkpoint dict; ``method`` must match the layout.

    ``encoder_base`` (TADSR only): VAE-encoder weights from its ``time_vae/`` folder that replace the base's
    (``official_time_vae.encoder_base_tensors``), stored as the ``vae_encoder_base`` component; ``encoder_note`` says
    how they were chosen. The released weights are for SD 2.1-base (family "sd2"); ``base_family`` exists for tests
    on tiny models."""
    layout = _layout(checkpoint, method)
    if layout == "pisa-sr":
        lora, modules, tensors, hyper = _pisa(checkpoint)
    else:
        lora, modules, tensors, hyper = _osediff_family(checkpoint, layout)
    extra = {"source": source, "source_sha256": sha256,
             "conversion": f"official {layout} layout; LoRA scale 8/r (peft default alpha)"}
    if encoder_base is not None:
        if layout != "tadsr":
            raise ValueError(f"--time-vae is TADSR's time_vae/ folder, but the file has the {layout} layout.")
        if encoder_base:
            tensors.update({f"{ENCODER_BASE_PREFIX}.{k}": v for k, v in encoder_base.items()})
            modules.insert(0, ENCODER_BASE_PREFIX)
        extra["time_vae"] = encoder_note
    parameterisation, defaults = DEFAULTS[layout]
    meta = BundleMeta(
        method=layout, base_family=base_family, parameterisation=parameterisation, lora=lora,
        modules=tuple(modules), hyperparameters=hyper, defaults=dict(defaults), extra=extra,
    )
    return meta, tensors


def import_official(
    path: str | Path, *, method: str | None = None, time_vae: str | Path | None = None,
    base_vae: torch.nn.Module | None = None,
) -> tuple[BundleMeta, dict[str, torch.Tensor]]:
    """Read, check and convert an official .pkl file; for TADSR optionally with its ``time_vae/`` folder, whose
    non-time encoder weights are kept where they differ from ``base_vae`` (all of them without one)."""
    path = Path(path)
    sha256 = hashlib.sha256(path.read_bytes()).hexdigest()
    encoder_base, note = None, ""
    if time_vae is not None:
        encoder_base, note = encoder_base_tensors(read_time_vae(time_vae), base_vae)
        logger.info("%s", note)
    return convert_official(read_official(path), method=method, source=path.name, sha256=sha256,
                            encoder_base=encoder_base, encoder_note=note)


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

"""The adapter bundle: one .safetensors file per trained model (DESIGN.md "Adapter bundle format").

Tensors live under component prefixes (``unet_lora.``, ``vae_encoder_lora.``, ``unet_sem_lora.``, ``unet_conv_in.``,
``vae_encoder_base.``, ``tae.``, ``mine.``, ``lqfm.``, ``vpim.``, ``mem.``); LoRA tensors keep the official peft key
grammar after the prefix (``unet_lora.<module>.lora_A.<adapter>.weight``).

* ``unet_lora`` / ``vae_encoder_lora``: merged into the base weights when the bundle is applied.
* ``unet_sem_lora``: PiSA-SR's semantic U-Net LoRA (adapters ``default_{encoder,decoder,others}_sem``), applied on
  top of the merged pixel LoRA and kept as live peft adapters, so the λ_sem control can switch it off for a pass.
* ``unet_conv_in``: a fully trained U-Net ``conv_in`` (weight, bias) that replaces the base one before its LoRA.
* ``vae_encoder_base``: VAE encoder (and ``quant_conv``) weights, keyed as in the VAE's state dict, that replace the
  base model's before the VAE-encoder LoRA (TADSR's ``time_vae/`` encoder where it differs from the base).

The string metadata holds everything needed to rebuild the modules without any other file, one entry per
``BundleMeta`` field, nested values JSON-encoded:

* ``format_version`` (``BUNDLE_FORMAT_VERSION``), ``method``, ``base_family`` (``models.base_family``),
  ``parameterisation`` (x̂₀ formula letter S/R/P/N, SPEC.md §0.6);
* ``lora``: per LoRA component ("unet", "vae_encoder", "unet_sem") ``{"rank", "alpha", "adapters": {name:
  [module names]}}``; the scale is alpha / rank (official releases: peft's default alpha 8);
* ``modules``: the component prefixes present; ``hyperparameters``: each method module's config (and the method
  settings of ``METHOD_SETTINGS``, e.g. RCOD's ``ldg``);
  ``defaults``: the method's inference defaults (timestep, tile_size, tile_overlap, color_fix, ...);
  ``extra``: free-form provenance (source file, its sha256, ...).
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .parameterisation import Parameterisation

BUNDLE_FORMAT_VERSION = 1
KNOWN_MODULES = ("unet_lora", "vae_encoder_lora", "unet_sem_lora", "unet_conv_in", "vae_encoder_base", "tae", "mine",
                 "lqfm", "vpim", "mem")
# LoRA component in ``BundleMeta.lora`` -> the prefix its tensors live under.
LORA_PREFIXES = {"unet": "unet_lora", "vae_encoder": "vae_encoder_lora", "unet_sem": "unet_sem_lora"}
# LoRA components kept as live (unmerged) adapters when applied: PiSA-SR's λ_sem switches them per pass.
LIVE_LORA = ("unet_sem",)
# ``hyperparameters`` entries that configure the method rather than a module: RCOD's LDG grouping (k, n, M_min, M_max),
# which the Realism level node and MEM's adaptive level read.
METHOD_SETTINGS = ("ldg",)
METHODS = ("osediff", "tadsr", "codsr", "idas", "rcod", "pisa-sr", "custom", "none")
_JSON_FIELDS = ("lora", "modules", "hyperparameters", "defaults", "extra")
_REQUIRED = ("format_version", "method", "base_family")


def _check_lora(component: str, spec: Any) -> None:
    where = f"bundle LoRA entry {component!r}"
    if component not in LORA_PREFIXES:
        raise ValueError(f"{where} is unknown; expected one of {sorted(LORA_PREFIXES)}.")
    if not isinstance(spec, dict) or not {"rank", "alpha", "adapters"} <= set(spec):
        got = sorted(spec) if isinstance(spec, dict) else type(spec).__name__
        raise ValueError(f"{where} needs rank, alpha and adapters; got {got}.")
    rank, alpha, adapters = spec["rank"], spec["alpha"], spec["adapters"]
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ValueError(f"{where}: `rank` must be a positive integer; got {rank!r}.")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or alpha <= 0:
        raise ValueError(f"{where}: `alpha` must be a positive number; got {alpha!r}.")
    if not isinstance(adapters, dict) or not adapters:
        raise ValueError(f"{where}: `adapters` must map adapter names to module-name lists; got {adapters!r}.")
    for name, targets in adapters.items():
        if not isinstance(targets, list) or not targets or not all(isinstance(t, str) for t in targets):
            raise ValueError(f"{where}: adapter {name!r} must list its target module names; got {targets!r}.")


@dataclass(frozen=True)
class BundleMeta:
    """What a bundle declares about itself (the fields of its metadata); validated on construction."""

    method: str
    base_family: str
    parameterisation: str = "S"
    lora: dict[str, Any] = field(default_factory=dict)
    modules: tuple[str, ...] = ()
    hyperparameters: dict[str, Any] = field(default_factory=dict)
    defaults: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)
    format_version: int = BUNDLE_FORMAT_VERSION

    def __post_init__(self) -> None:
        _check_version(self.format_version)
        if self.method not in METHODS:
            raise ValueError(f"bundle method {self.method!r} is unknown; expected one of {METHODS}.")
        if not isinstance(self.base_family, str) or not self.base_family:
            raise ValueError(
                f"bundle `base_family` must be a non-empty string such as 'sd2'; got {self.base_family!r}."
            )
        Parameterisation.parse(self.parameterisation)
        for name in ("lora", "hyperparameters", "defaults", "extra"):
            if not isinstance(getattr(self, name), dict):
                raise ValueError(f"bundle `{name}` must be a dict; got {type(getattr(self, name)).__name__}.")
        unknown = [m for m in self.modules if m not in KNOWN_MODULES]
        if unknown:
            raise ValueError(f"bundle declares unknown modules {unknown}; known: {KNOWN_MODULES}.")
        for component, spec in self.lora.items():
            _check_lora(component, spec)
            if LORA_PREFIXES[component] not in self.modules:
                raise ValueError(f"bundle has a {component!r} LoRA entry but does not list "
                                 f"{LORA_PREFIXES[component]!r} in its modules.")
        undeclared = [m for m in self.modules if m in LORA_PREFIXES.values() and
                      m not in {LORA_PREFIXES[c] for c in self.lora}]
        if undeclared:
            raise ValueError(f"bundle lists {undeclared} in its modules but has no `lora` entry (rank, alpha, "
                             "adapters) for them.")
        stray = sorted(set(self.hyperparameters) - set(self.modules) - set(METHOD_SETTINGS))
        if stray:
            raise ValueError(f"bundle has hyperparameters for {stray}, which its modules {list(self.modules)} lack.")

    def lora_scale(self, component: str) -> float:
        """alpha / rank of a LoRA component ("unet", "vae_encoder" or "unet_sem")."""
        spec = self.lora[component]
        return spec["alpha"] / spec["rank"]

    def to_metadata(self) -> dict[str, str]:
        """The safetensors ``__metadata__``: one string per field, nested values as JSON."""
        out = {}
        for f in fields(self):
            value = getattr(self, f.name)
            out[f.name] = json.dumps(list(value) if f.name == "modules" else value) if f.name in _JSON_FIELDS \
                else str(value)
        return out

    @classmethod
    def from_metadata(cls, metadata: dict[str, str]) -> BundleMeta:
        """Parse ``to_metadata``'s output; the format version is checked before anything else is read."""
        if "format_version" not in metadata or "method" not in metadata:
            raise ValueError("it has no OneStep SR bundle metadata (format_version, method); it is not an adapter "
                             "bundle. Export bundles with the training package or `onestep-sr import`")
        try:
            version = int(metadata["format_version"])
        except ValueError as err:
            raise ValueError(f"its format_version {metadata['format_version']!r} is not an integer") from err
        _check_version(version)
        absent = [k for k in _REQUIRED if k not in metadata]
        if absent:
            raise ValueError(f"its metadata lacks {absent}; re-export the bundle")
        values: dict[str, Any] = {"format_version": version}
        for key in _JSON_FIELDS:
            if key in metadata:
                try:
                    values[key] = json.loads(metadata[key])
                except json.JSONDecodeError as err:
                    raise ValueError(f"its metadata field {key!r} is not valid JSON ({err}); re-export the bundle") \
                        from err
        if not isinstance(values.get("modules", []), list):
            raise ValueError(f"its metadata field 'modules' must be a list; got {metadata['modules']!r}")
        values["modules"] = tuple(values.get("modules", ()))
        for key in ("method", "base_family", "parameterisation"):
            if key in metadata:
                values[key] = metadata[key]
        return cls(**values)


def _check_version(version: Any) -> None:
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise ValueError(f"bundle format version {version!r} is not a OneStep SR format version (1 and up).")
    if version > BUNDLE_FORMAT_VERSION:
        raise ValueError(
            f"bundle format version {version} is newer than this pack supports ({BUNDLE_FORMAT_VERSION}); "
            "update comfyui-onestep-sr."
        )


@dataclass
class Bundle:
    """A loaded bundle: validated metadata, its tensors (prefixed keys) and the file it came from."""

    meta: BundleMeta
    tensors: dict[str, torch.Tensor]
    path: str

    def component(self, prefix: str) -> dict[str, torch.Tensor]:
        """The tensors of one component with its ``prefix.`` stripped."""
        head = prefix + "."
        return {k[len(head):]: v for k, v in self.tensors.items() if k.startswith(head)}

    def summary(self) -> str:
        """A human-readable multi-line description: method, family, x̂₀ formula, LoRA, modules, defaults."""
        m = self.meta
        formula = Parameterisation.parse(m.parameterisation).name.lower()
        header = (f"bundle {Path(self.path).name}: method {m.method}, base family {m.base_family}, "
                  f"x0 parameterisation {formula} ({m.parameterisation}), format v{m.format_version}")
        lines = [header]
        for component, spec in m.lora.items():
            tensors = self.component(LORA_PREFIXES[component])
            sizes = []
            for name, targets in spec["adapters"].items():
                count = sum(v.numel() for k, v in tensors.items()
                            if f".lora_A.{name}." in k or f".lora_B.{name}." in k)
                sizes.append(f"{name} ({len(set(targets))} modules, {count:,} parameters)")
            live = ", kept live for lambda_sem" if component in LIVE_LORA else ""
            lines.append(f"  LoRA {component}: rank {spec['rank']}, alpha {spec['alpha']} "
                         f"(scale {m.lora_scale(component):g}{live}); " + ", ".join(sizes))
        for module in m.modules:
            count = sum(v.numel() for v in self.component(module).values())
            lines.append(f"  module {module}: {count:,} parameters")
        if m.defaults:
            lines.append("  defaults: " + ", ".join(f"{k}={v}" for k, v in m.defaults.items()))
        return "\n".join(lines)


def save_bundle(path: str | Path, meta: BundleMeta, tensors: dict[str, torch.Tensor]) -> None:
    """Write a bundle atomically (a temp file in the same folder, then ``os.replace``), tensors moved to the CPU."""
    _check_modules(meta, tensors, repr(str(path)))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, tmp, metadata=meta.to_metadata())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _check_modules(meta: BundleMeta, tensors: dict[str, torch.Tensor], where: str) -> None:
    empty = [m for m in meta.modules if not any(k.startswith(m + ".") for k in tensors)]
    if empty:
        raise ValueError(f"bundle {where} declares modules {empty} but holds no tensors for them; re-export it.")
    stray = sorted({k.split(".", 1)[0] for k in tensors} - set(meta.modules))
    if stray:
        raise ValueError(f"bundle {where} holds tensors of undeclared components {stray}; declare them in "
                         "`modules` or leave them out.")


def load_bundle(path: str | Path, *, expected_family: str | None = None) -> Bundle:
    """Read and validate a bundle on the CPU; ``expected_family`` is the loaded base model's family."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"bundle {str(path)!r} does not exist. Put bundles in ComfyUI's models/onestep_sr folder."
        )
    try:
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            metadata = dict(handle.metadata() or {})
            tensors = {k: handle.get_tensor(k) for k in handle.keys()}  # noqa: SIM118 (not a dict)
    except (SafetensorError, OSError, ValueError) as err:
        raise ValueError(
            f"bundle {str(path)!r} is not a valid safetensors file ({err}); it is probably truncated or corrupt. "
            "Re-download or re-export it."
        ) from err
    try:
        meta = BundleMeta.from_metadata(metadata)
    except (ValueError, TypeError) as err:
        raise ValueError(f"bundle {str(path)!r} cannot be used: {err}") from err
    if expected_family is not None and meta.base_family != expected_family:
        wanted = "an SD 2.x base model (SD 2.1-base or SD-Turbo)" if meta.base_family == "sd2" \
            else f"the {meta.base_family!r} base model it was made for"
        raise ValueError(
            f"bundle {str(path)!r} was made for base family {meta.base_family!r} but the loaded model is "
            f"{expected_family!r}; load {wanted} or a bundle trained for the loaded model."
        )
    _check_modules(meta, tensors, repr(str(path)))
    return Bundle(meta=meta, tensors=tensors, path=str(path))

"""The adapter bundle: one .safetensors file per trained model (DESIGN.md "Adapter bundle format").

Tensors live under component prefixes (``unet_lora.``, ``vae_encoder_lora.``, ``unet_conv_in.``, ``tae.``, ``mine.``,
``lqfm.``, ``vpim.``, ``mem.``); the string metadata holds everything needed to rebuild the modules without any other
file: format version, method, base-model family, x̂₀ parameterisation, LoRA ranks/alphas/adapters with their target
modules, each module's hyperparameters and the method's inference defaults. Nested values are JSON-encoded.
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
KNOWN_MODULES = ("unet_lora", "vae_encoder_lora", "unet_conv_in", "tae", "mine", "lqfm", "vpim", "mem")
METHODS = ("osediff", "tadsr", "codsr", "idas", "rcod", "pisa-sr", "custom")
_JSON_FIELDS = ("lora", "modules", "hyperparameters", "defaults", "extra")


@dataclass(frozen=True)
class BundleMeta:
    """What a bundle declares about itself; validated on construction."""

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
        if self.format_version < 1:
            raise ValueError(f"bundle format version {self.format_version} is not a OneStep SR format (1 and up).")
        if self.format_version > BUNDLE_FORMAT_VERSION:
            raise ValueError(
                f"bundle format version {self.format_version} is newer than this pack supports "
                f"({BUNDLE_FORMAT_VERSION}); update comfyui-onestep-sr."
            )
        if self.method not in METHODS:
            raise ValueError(f"bundle method {self.method!r} is unknown; expected one of {METHODS}.")
        Parameterisation.parse(self.parameterisation)
        unknown = [m for m in self.modules if m not in KNOWN_MODULES]
        if unknown:
            raise ValueError(f"bundle declares unknown modules {unknown}; known: {KNOWN_MODULES}.")
        for component, spec in self.lora.items():
            if not {"rank", "alpha", "adapters"} <= set(spec):
                raise ValueError(f"LoRA entry {component!r} needs rank, alpha and adapters; got {sorted(spec)}.")

    def to_metadata(self) -> dict[str, str]:
        out = {}
        for f in fields(self):
            value = getattr(self, f.name)
            out[f.name] = json.dumps(list(value) if f.name == "modules" else value) if f.name in _JSON_FIELDS \
                else str(value)
        return out

    @classmethod
    def from_metadata(cls, metadata: dict[str, str]) -> BundleMeta:
        if "format_version" not in metadata or "method" not in metadata:
            raise ValueError("it has no OneStep SR bundle metadata (format_version, method)")
        try:
            values: dict[str, Any] = {k: json.loads(metadata[k]) for k in _JSON_FIELDS if k in metadata}
            values["format_version"] = int(metadata["format_version"])
        except (ValueError, json.JSONDecodeError) as err:
            raise ValueError(f"its metadata is not valid ({err})") from err
        values["modules"] = tuple(values.get("modules", ()))
        for key in ("method", "base_family", "parameterisation"):
            if key in metadata:
                values[key] = metadata[key]
        return cls(**values)


@dataclass
class Bundle:
    meta: BundleMeta
    tensors: dict[str, torch.Tensor]
    path: str

    def component(self, prefix: str) -> dict[str, torch.Tensor]:
        """The tensors of one component with its ``prefix.`` stripped."""
        head = prefix + "."
        return {k[len(head):]: v for k, v in self.tensors.items() if k.startswith(head)}

    def summary(self) -> str:
        m = self.meta
        lines = [f"bundle {Path(self.path).name}: method {m.method}, base family {m.base_family}, "
                 f"x0 parameterisation {m.parameterisation}, format v{m.format_version}"]
        for component, spec in m.lora.items():
            sizes = ", ".join(f"{name} ({len(targets)} modules)" for name, targets in spec["adapters"].items())
            lines.append(f"  LoRA {component}: rank {spec['rank']}, alpha {spec['alpha']} "
                         f"(scale {spec['alpha'] / spec['rank']:g}); {sizes}")
        for module in m.modules:
            count = sum(v.numel() for v in self.component(module).values())
            lines.append(f"  module {module}: {count:,} parameters")
        if m.defaults:
            lines.append("  defaults: " + ", ".join(f"{k}={v}" for k, v in m.defaults.items()))
        return "\n".join(lines)


def save_bundle(path: str | Path, meta: BundleMeta, tensors: dict[str, torch.Tensor]) -> None:
    """Write atomically (temp file in the same folder, then rename)."""
    _check_modules(meta, tensors, str(path))
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
        raise ValueError(f"bundle {where} declares modules {empty} but holds no tensors for them.")
    stray = sorted({k.split(".", 1)[0] for k in tensors} - set(meta.modules))
    if stray:
        raise ValueError(f"bundle {where} holds tensors of undeclared components {stray}.")


def load_bundle(path: str | Path, *, expected_family: str | None = None) -> Bundle:
    """Read and validate a bundle; ``expected_family`` is the loaded base model's family."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"bundle {str(path)!r} does not exist. Put bundles in ComfyUI's models/onestep_sr folder."
        )
    try:
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            metadata = dict(handle.metadata() or {})
            tensors = {k: handle.get_tensor(k) for k in handle.keys()}
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
        raise ValueError(
            f"bundle {str(path)!r} was made for base family {meta.base_family!r} but the loaded model is "
            f"{expected_family!r}; load the base model it was trained on (e.g. SD 2.1-base for 'sd2') or a bundle "
            "trained for this model."
        )
    _check_modules(meta, tensors, repr(str(path)))
    return Bundle(meta=meta, tensors=tensors, path=str(path))

"""The training configuration: one TOML file per method, read into a tree of frozen, validated dataclasses.

A config file has a top-level ``method = "<name>"`` and the sections below, plus one section named after the method
(``[osediff]``) whose dataclass the method registers (``training.methods``); the loss library's configs
(``PerceptualConfig``, ``VSDConfig``, ...) nest inside it as sub-tables. Command-line overrides are dotted keys with
TOML values (``train.max_steps=10``, ``optim.betas=[0.9,0.99]``, ``osediff.negative_prompt="blurry"``); a value that
is not valid TOML is taken as a bare string (``train.output_dir=runs/a``).

Everything is checked on load: unknown keys (with the closest known one), types, ranges and cross-section rules.
``to_dict`` gives the resolved tree, which is saved as ``config.toml`` with every checkpoint and as JSON in the final
bundle's metadata; ``config_from_dict(c.to_dict()) == c``.
"""

from __future__ import annotations

import copy
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from training.degradation import DegradationConfig
from training.schema import ConfigError, build, suggest, to_dict

DTYPES = ("auto", "fp32", "fp16", "bf16")
MIXED_PRECISION = ("no", "fp16", "bf16")
LR_SCHEDULES = ("constant", "constant_with_warmup")
PROMPT_SOURCES = ("auto", "sidecar", "fixed")
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"`{name}` must be one of {list(choices)}; got {value!r}.{suggest(value, choices)}")


def _check_int(name: str, value: int, low: int) -> None:
    if value < low:
        raise ValueError(f"`{name}` must be an integer >= {low}; got {value}.")


@dataclass(frozen=True)
class ModelConfig:
    """The base model: a local SD 2.1-base (diffusers folder or single file), or tiny random components (tests).

    ``dtype`` is the weight dtype of the frozen-only models (text encoder, teacher U-Net); "auto" follows
    ``train.mixed_precision``. Trainable models stay in float32 (AdamW and the fp16 grad scaler need fp32 master
    weights) and run under autocast. ``init_bundle``: an adapter bundle (e.g. an imported official release) whose
    LoRA, conv_in and method modules are the starting point instead of a fresh initialisation
    (``training.warm_start``).
    """

    base: str = ""
    tiny: bool = False
    tiny_seed: int = 0
    tokenizer: str = ""
    dtype: str = "auto"
    gradient_checkpointing: bool = False
    init_bundle: str = ""

    def __post_init__(self) -> None:
        if bool(self.base) == self.tiny:
            raise ValueError("set exactly one of `model.base` (a local SD 2.1-base diffusers folder or .safetensors "
                             f"file) and `model.tiny = true` (test models); got base={self.base!r}, "
                             f"tiny={self.tiny}.")
        _check_choice("model.dtype", self.dtype, DTYPES)


@dataclass(frozen=True)
class LoraConfig:
    """LoRA ranks (SPEC §0.5, §1.2); scale alpha / rank, peft's default alpha 8 as in the releases."""

    unet_rank: int = 4
    vae_encoder_rank: int = 4
    regulariser_rank: int = 4
    alpha: float = 8.0

    def __post_init__(self) -> None:
        for name in ("unet_rank", "vae_encoder_rank", "regulariser_rank"):
            _check_int(f"lora.{name}", getattr(self, name), 1)
        if not self.alpha > 0:
            raise ValueError(f"`lora.alpha` must be positive; got {self.alpha}. peft's default, used by OSEDiff, is 8.")


@dataclass(frozen=True)
class DataConfig:
    """Training images: HQ folder degraded on the fly (SPEC §8), or paired LQ/HQ folders (``lq_dir``).

    Prompts: ``prompt_source`` "sidecar" reads ``<image stem>.txt`` beside each HQ image, "fixed" uses ``prompt``,
    "auto" the sidecar where one exists and ``prompt`` elsewhere. ``masks_dir`` holds CODSR TMG masks
    (``training.data`` documents the layout).
    """

    hq_dir: str
    lq_dir: str = ""
    crop_size: int = 512
    hflip: bool = True
    prompt: str = ""
    prompt_source: str = "auto"
    masks_dir: str = ""
    max_masks: int = 8
    num_workers: int = 0
    extensions: tuple[str, ...] = IMAGE_EXTENSIONS
    degradation: DegradationConfig = field(default_factory=DegradationConfig)

    def __post_init__(self) -> None:
        if not self.hq_dir:
            raise ValueError("`data.hq_dir` is empty; set it to a folder of HQ training images.")
        if self.crop_size < 8 or self.crop_size % 8 or self.crop_size % self.degradation.scale:
            raise ValueError(f"`data.crop_size` must be a multiple of 8 and of the degradation scale "
                             f"{self.degradation.scale}; got {self.crop_size}. OSEDiff uses 512.")
        _check_choice("data.prompt_source", self.prompt_source, PROMPT_SOURCES)
        _check_int("data.max_masks", self.max_masks, 1)
        _check_int("data.num_workers", self.num_workers, 0)
        if not self.extensions or any(not e.startswith(".") for e in self.extensions):
            raise ValueError(f"`data.extensions` must list file suffixes such as \".png\"; got {self.extensions}.")


@dataclass(frozen=True)
class GroupConfig:
    """Per-parameter-group overrides of ``[optim]`` (``[optim.groups.<group name>]``); unset fields inherit."""

    lr: float | None = None
    betas: tuple[float, float] | None = None
    weight_decay: float | None = None
    eps: float | None = None


@dataclass(frozen=True)
class OptimConfig:
    """AdamW for every optimiser (SPEC §1.2 defaults), constant LR with an optional linear warm-up.

    diffusers' "constant" ignores warm-up; OSEDiff passes 500 warm-up steps with it, so its effective schedule is
    ``constant`` with none, the default here. ``max_grad_norm`` 0 disables clipping.
    """

    lr: float = 5e-5
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 1e-2
    eps: float = 1e-8
    max_grad_norm: float = 1.0
    schedule: str = "constant"
    warmup_steps: int = 0
    groups: dict[str, GroupConfig] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name, group in {"": GroupConfig(self.lr, self.betas, self.weight_decay, self.eps), **self.groups}.items():
            where = f"optim.groups.{name}" if name else "optim"
            if group.lr is not None and not group.lr > 0:
                raise ValueError(f"`{where}.lr` must be positive; got {group.lr}.")
            if group.betas is not None and not all(0 <= b < 1 for b in group.betas):
                raise ValueError(f"`{where}.betas` must lie in [0, 1); got {list(group.betas)}.")
            if group.weight_decay is not None and group.weight_decay < 0:
                raise ValueError(f"`{where}.weight_decay` must be >= 0; got {group.weight_decay}.")
            if group.eps is not None and not group.eps > 0:
                raise ValueError(f"`{where}.eps` must be positive; got {group.eps}.")
        if self.max_grad_norm < 0:
            raise ValueError(f"`optim.max_grad_norm` must be >= 0 (0 = no clipping); got {self.max_grad_norm}.")
        _check_choice("optim.schedule", self.schedule, LR_SCHEDULES)
        _check_int("optim.warmup_steps", self.warmup_steps, 0)
        if self.warmup_steps and self.schedule == "constant":
            raise ValueError(f"`optim.warmup_steps` = {self.warmup_steps} has no effect with schedule \"constant\"; "
                             "use schedule = \"constant_with_warmup\" or warmup_steps = 0.")


@dataclass(frozen=True)
class TrainConfig:
    """The loop: optimiser steps (each of ``grad_accumulation`` micro-batches of ``batch_size`` per process),
    precision, seed, and the cadence of logs, checkpoints and validation (in optimiser steps; 0 = never)."""

    output_dir: str
    max_steps: int = 100_000
    batch_size: int = 4
    grad_accumulation: int = 1
    mixed_precision: str = "no"
    seed: int = 0
    log_every: int = 10
    save_every: int = 500
    keep_last: int = 3
    val_every: int = 0
    resume: str = ""
    bundle_name: str = ""
    progress_bar: bool = True

    def __post_init__(self) -> None:
        if not self.output_dir:
            raise ValueError("`train.output_dir` is empty; name the folder for logs, checkpoints and the bundle.")
        for name, low in (("max_steps", 1), ("batch_size", 1), ("grad_accumulation", 1), ("seed", 0),
                          ("log_every", 1), ("save_every", 0), ("keep_last", 1), ("val_every", 0)):
            _check_int(f"train.{name}", getattr(self, name), low)
        _check_choice("train.mixed_precision", self.mixed_precision, MIXED_PRECISION)
        if self.bundle_name and not self.bundle_name.endswith(".safetensors"):
            raise ValueError(f"`train.bundle_name` must end in .safetensors; got {self.bundle_name!r}.")


@dataclass(frozen=True)
class ValConfig:
    """Held-out validation: HQ images (centre-cropped to ``crop_size``) degraded with a fixed seed, or paired LQ.
    Writes LQ | output | HQ images and PSNR/SSIM/LPIPS per image to CSV. ``perceptual`` holds the settings of the
    LPIPS network (``training.perceptual.PerceptualConfig``; kind "lpips-alex" unless set, the LPIPS of the papers'
    tables), checked when the trainer starts: the metric is an optional dependency of validation only."""

    hq_dir: str = ""
    lq_dir: str = ""
    crop_size: int = 512
    max_images: int = 8
    prompt: str = ""
    seed: int = 0
    lpips: bool = True
    perceptual: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.crop_size < 8 or self.crop_size % 8:
            raise ValueError(f"`val.crop_size` must be a positive multiple of 8; got {self.crop_size}.")
        _check_int("val.max_images", self.max_images, 1)
        _check_int("val.seed", self.seed, 0)


SECTIONS = {"model": ModelConfig, "lora": LoraConfig, "data": DataConfig, "optim": OptimConfig,
            "train": TrainConfig, "val": ValConfig}


@dataclass(frozen=True)
class TrainingConfig:
    """The whole resolved config; ``method_config`` is the ``[<method>]`` section."""

    method: str
    model: ModelConfig
    lora: LoraConfig
    data: DataConfig
    optim: OptimConfig
    train: TrainConfig
    val: ValConfig
    method_config: Any

    def __post_init__(self) -> None:
        if self.train.val_every and not self.val.hq_dir:
            raise ValueError(f"`train.val_every` = {self.train.val_every} but `val.hq_dir` is empty; name a folder "
                             "of held-out images or set train.val_every=0.")

    def to_dict(self) -> dict:
        """The TOML/JSON tree: ``method``, the fixed sections, and the method section under its name."""
        out = {"method": self.method}
        out.update({name: to_dict(getattr(self, name)) for name in SECTIONS})
        out[self.method] = to_dict(self.method_config)
        return out


def _method_config_class(method: Any) -> type:
    from training.methods import available_methods, method_class

    if not isinstance(method, str) or method not in available_methods():
        raise ConfigError(f"`method` must be one of {available_methods()}; got {method!r}."
                          f"{suggest(str(method), available_methods())}")
    return method_class(method).config_class


def config_from_dict(data: dict) -> TrainingConfig:
    """Validate a parsed config tree (a TOML document or ``to_dict`` output)."""
    data = dict(data)
    if "method" not in data:
        raise ConfigError('the config has no top-level `method = "..."` (e.g. method = "osediff").')
    method = data.pop("method")
    config_class = _method_config_class(method)
    known = set(SECTIONS) | {method}
    for key in data:
        if key not in known:
            raise ConfigError(f"unknown section `[{key}]`.{suggest(key, known)} Sections: {', '.join(sorted(known))}.")
    sections = {name: build(cls, data.get(name, {}), name) for name, cls in SECTIONS.items()}
    method_config = build(config_class, data.get(method, {}), method)
    try:
        return TrainingConfig(method=method, method_config=method_config, **sections)
    except ValueError as err:
        raise ConfigError(str(err)) from err


def parse_override(text: str) -> tuple[list[str], Any]:
    """``"a.b.c=VALUE"`` -> (["a", "b", "c"], VALUE parsed as TOML, else the raw string)."""
    key, sep, raw = text.partition("=")
    path = [part.strip() for part in key.split(".")]
    if not sep or not all(path):
        raise ConfigError(f"override {text!r} must look like section.key=value (e.g. train.max_steps=100).")
    try:
        value = tomllib.loads(f"value = {raw.strip()}")["value"]
    except tomllib.TOMLDecodeError:
        value = raw.strip()
    return path, value


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """``data`` with every dotted override set (tables created as needed); ``data`` itself is not changed."""
    data = copy.deepcopy(data)
    for text in overrides:
        path, value = parse_override(text)
        table = data
        for i, part in enumerate(path[:-1]):
            table = table.setdefault(part, {})
            if not isinstance(table, dict):
                raise ConfigError(f"override {text!r}: `{'.'.join(path[:i + 1])}` is a value, not a section.")
        table[path[-1]] = value
    return data


def load_config(path: str | Path, overrides: list[str] = ()) -> TrainingConfig:
    """Read a TOML config, apply ``overrides`` and validate; errors name the file and the key."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file {str(path)!r} does not exist; see training/configs/ for examples.")
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"config file {str(path)!r} is not valid TOML: {err}.") from err
    try:
        return config_from_dict(apply_overrides(data, list(overrides)))
    except ConfigError as err:
        raise ConfigError(f"{path.name}: {err}") from err


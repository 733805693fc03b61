"""The training config: validation errors that name the key and the fix, overrides, and round trips."""

from __future__ import annotations

import tomllib
from dataclasses import dataclass

import pytest

from training.config import (
    ConfigError,
    apply_overrides,
    config_from_dict,
    load_config,
    parse_override,
)
from training.degradation import DegradationConfig
from training.methods.osediff import NEGATIVE_PROMPT
from training.schema import build, to_dict
from training.toml_write import dumps
from training_support import OSEDIFF_TOML

BASE = ["model.tiny=true", "data.hq_dir=/data/hq"]


def _load(*overrides: str):
    return load_config(OSEDIFF_TOML, [*BASE, *overrides])


def test_shipped_osediff_config_has_the_spec_defaults():
    config = _load()
    c = config.method_config
    assert (c.timestep, c.lambda_l2, c.lambda_lpips, c.lambda_vsd, c.lambda_reg, c.cfg_scale) == (999, 1, 2, 1, 1, 7.5)
    assert c.negative_prompt == NEGATIVE_PROMPT and c.negative_prompt.endswith("lowres, over-smooth")
    o = config.optim
    assert (o.lr, o.betas, o.weight_decay, o.eps, o.max_grad_norm, o.schedule) == \
        (5e-5, (0.9, 0.999), 1e-2, 1e-8, 1.0, "constant")
    assert (config.lora.unet_rank, config.lora.vae_encoder_rank, config.lora.alpha) == (4, 4, 8.0)
    assert (config.train.batch_size, config.train.mixed_precision, config.train.save_every) == (4, "fp16", 500)
    assert config.data.crop_size == 512 and config.data.degradation == DegradationConfig()


def test_unknown_key_suggests_the_closest():
    with pytest.raises(ConfigError, match=r"unknown key `train\.max_step`.*Did you mean `max_steps`"):
        _load("train.max_step=3")
    with pytest.raises(ConfigError, match=r"unknown key `osediff\.lambda_lpip`.*`lambda_lpips`"):
        _load("osediff.lambda_lpip=1")
    with pytest.raises(ConfigError, match=r"unknown key `data\.degradation\.kernel1\.sinc_prb`.*`sinc_prob`"):
        _load("data.degradation.kernel1.sinc_prb=0.2")


def test_unknown_section_and_method():
    with pytest.raises(ConfigError, match=r"unknown section `\[trian\]`.*Did you mean `train`"):
        _load("trian.max_steps=3")
    data = tomllib.loads(OSEDIFF_TOML.read_text())
    data["method"] = "osedif"
    with pytest.raises(ConfigError, match=r"`method` must be one of .*Did you mean `osediff`"):
        config_from_dict(apply_overrides(data, BASE))
    del data["method"]
    with pytest.raises(ConfigError, match="no top-level `method"):
        config_from_dict(data)


@pytest.mark.parametrize("override,message", [
    ("train.max_steps=2.5", r"`train\.max_steps` must be an integer; got 2\.5"),
    ("train.batch_size=\"4\"", r"`train\.batch_size` must be an integer; got '4'"),
    ("data.hflip=1", r"`data\.hflip` must be true or false"),
    ("optim.betas=[0.9]", r"`optim\.betas` must be a list of 2 values"),
    ("optim.lr=\"fast\"", r"`optim\.lr` must be a number"),
    ("data.degradation.resize_prob=[0.5, 0.5, 0.5]", r"\[data\.degradation\] `resize_prob` must sum to 1"),
    # values out of range
    ("train.max_steps=0", r"`train\.max_steps` must be an integer >= 1; got 0"),
    ("optim.lr=-1e-4", r"`optim\.lr` must be positive"),
    ("data.crop_size=100", r"`data\.crop_size` must be a multiple of 8 and of the degradation scale 4"),
    ("train.mixed_precision=fp8", r"`train\.mixed_precision` must be one of .*fp8"),
    ("osediff.timestep=1000", r"`timestep` must be in \[0, 999\]"),
    ("optim.warmup_steps=500", r"no effect with schedule \"constant\""),
    ("train.val_every=100", r"`val\.hq_dir` is empty"),
])
def test_wrong_types_and_values_out_of_range_name_key_and_value(override, message):
    with pytest.raises(ConfigError, match=message):
        _load(override)


def test_model_needs_exactly_one_source():
    with pytest.raises(ConfigError, match=r"exactly one of `model\.base`.*`model\.tiny = true`"):
        load_config(OSEDIFF_TOML, ["data.hq_dir=/data/hq"])
    with pytest.raises(ConfigError, match=r"missing key `train\.output_dir`|`data\.hq_dir` is empty"):
        load_config(OSEDIFF_TOML, ["model.tiny=true"])


def test_overrides_parse_as_toml_or_bare_strings():
    assert parse_override("train.max_steps=10") == (["train", "max_steps"], 10)
    assert parse_override("optim.betas=[0.9, 0.99]") == (["optim", "betas"], [0.9, 0.99])
    assert parse_override("train.output_dir=runs/a b") == (["train", "output_dir"], "runs/a b")
    assert parse_override('osediff.negative_prompt="x = y"') == (["osediff", "negative_prompt"], "x = y")
    with pytest.raises(ConfigError, match="section.key=value"):
        parse_override("max_steps")
    config = _load("optim.groups.generator.lr=1e-4", "data.degradation.kernel2.sinc_prob=0.2",
                   "train.output_dir=runs/x")
    assert config.optim.groups["generator"].lr == 1e-4 and config.optim.groups["generator"].betas is None
    assert config.data.degradation.kernel2.sinc_prob == 0.2 and config.train.output_dir == "runs/x"


def test_round_trip_through_dict_and_toml():
    config = _load("optim.groups.generator.lr=1e-4", "optim.groups.regulariser.betas=[0.5, 0.9]",
                   "osediff.negative_prompt=\"a \\\"quoted\\\" prompt\\nwith a newline, ünïcode\"",
                   "data.degradation.resize_prob=[0.25, 0.5, 0.25]")
    as_dict = config.to_dict()
    assert config_from_dict(as_dict) == config
    text = dumps(as_dict)
    assert tomllib.loads(text) == as_dict
    assert config_from_dict(tomllib.loads(text)) == config


@dataclass(frozen=True)
class Inner:
    size: int = 3


@dataclass(frozen=True)
class Outer:
    name: str
    inner: Inner = Inner()
    limit: float | None = None
    table: dict[str, Inner] | None = None


def test_schema_handles_optional_and_nested_dataclasses():
    value = build(Outer, {"name": "a", "limit": 2, "table": {"x": {"size": 5}}}, "outer")
    assert value == Outer("a", Inner(), 2.0, {"x": Inner(5)}) and isinstance(value.limit, float)
    assert build(Outer, to_dict(value), "outer") == value
    with pytest.raises(ConfigError, match=r"missing key `outer\.name`"):
        build(Outer, {}, "outer")
    with pytest.raises(ConfigError, match=r"`outer\.table\.x\.size` must be an integer"):
        build(Outer, {"name": "a", "table": {"x": {"size": "big"}}}, "outer")

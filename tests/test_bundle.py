"""The adapter-bundle format: round trip, summary, and every refusal with its message."""

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from osd_core import bundle as bundle_module
from osd_core.bundle import (
    BUNDLE_FORMAT_VERSION,
    Bundle,
    BundleMeta,
    load_bundle,
    save_bundle,
)
from osd_core.tiny import tiny_bundle

LORA = {"unet": {"rank": 4, "alpha": 8.0, "adapters": {"default_encoder": ["conv_in"]}}}


@pytest.fixture(scope="module")
def made():
    return tiny_bundle(seed=0)


def _rewrite(tmp_path, made, name="x.safetensors", **changes):
    """The bundle written with some metadata fields replaced (None removes a field), bypassing validation."""
    meta, tensors = made
    metadata = {k: v for k, v in {**meta.to_metadata(), **changes}.items() if v is not None}
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp_path / name), metadata=metadata)
    return tmp_path / name


# ---- round trip --------------------------------------------------------------------------------------------------

def test_metadata_round_trip(tmp_path, made):
    meta, tensors = made
    assert BundleMeta.from_metadata(meta.to_metadata()) == meta
    assert all(isinstance(v, str) for v in meta.to_metadata().values())
    save_bundle(tmp_path / "b.safetensors", meta, tensors)
    loaded = load_bundle(tmp_path / "b.safetensors", expected_family=meta.base_family)
    assert loaded.meta == meta and loaded.path == str(tmp_path / "b.safetensors")
    assert set(loaded.tensors) == set(tensors)
    assert all(torch.equal(loaded.tensors[k], tensors[k]) for k in tensors)
    assert [p.name for p in tmp_path.iterdir()] == ["b.safetensors"]  # the atomic write leaves nothing behind


def test_file_layout_is_prefixed_tensors_and_string_metadata(tmp_path, made):
    save_bundle(tmp_path / "b.safetensors", *made)
    with safe_open(str(tmp_path / "b.safetensors"), framework="pt") as handle:
        keys, metadata = list(handle.keys()), handle.metadata()
    assert "unet_lora.conv_in.lora_A.default_encoder.weight" in keys
    assert "vae_encoder_lora.quant_conv.lora_B.default_encoder.weight" in keys
    assert {"unet_conv_in.weight", "unet_conv_in.bias"} <= set(keys)
    assert metadata["format_version"] == "1" and metadata["method"] == "osediff" and metadata["parameterisation"] == "S"
    assert json.loads(metadata["lora"])["unet"]["rank"] == 4
    assert json.loads(metadata["defaults"])["timestep"] == 999


def test_failed_save_keeps_the_previous_file(tmp_path, made, monkeypatch):
    meta, tensors = made
    save_bundle(tmp_path / "b.safetensors", meta, tensors)
    before = (tmp_path / "b.safetensors").read_bytes()

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(bundle_module, "save_file", broken)
    with pytest.raises(OSError, match="disk full"):
        save_bundle(tmp_path / "b.safetensors", meta, tensors)
    assert (tmp_path / "b.safetensors").read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["b.safetensors"]


def test_component_strips_its_prefix():
    bundle = Bundle(meta=BundleMeta(method="none", base_family="sd2", modules=("unet_conv_in",)),
                    tensors={"unet_conv_in.weight": torch.ones(2), "unet_conv_in.bias": torch.zeros(2)}, path="b")
    assert set(bundle.component("unet_conv_in")) == {"weight", "bias"}
    assert bundle.component("unet") == {}


def test_summary_is_readable(tmp_path, made):
    meta, tensors = made
    save_bundle(tmp_path / "b.safetensors", meta, tensors)
    text = load_bundle(tmp_path / "b.safetensors").summary()
    assert "method osediff" in text and "base family custom-" in text and "standard (S)" in text
    assert "LoRA unet: rank 4, alpha 8.0 (scale 2)" in text and "LoRA vae_encoder: rank 4" in text
    encoder = sum(v.numel() for k, v in tensors.items() if k.startswith("unet_lora.") and ".default_encoder." in k)
    n_modules = len(meta.lora["unet"]["adapters"]["default_encoder"])
    assert f"default_encoder ({n_modules} modules, {encoder:,} parameters)" in text
    conv_in = tensors["unet_conv_in.weight"].numel() + tensors["unet_conv_in.bias"].numel()
    assert f"module unet_conv_in: {conv_in:,} parameters" in text
    assert "timestep=999" in text and "color_fix=adain" in text


# ---- refusals ----------------------------------------------------------------------------------------------------

def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="absent.safetensors.*models/onestep_sr"):
        load_bundle(tmp_path / "absent.safetensors")


def test_corrupt_file(tmp_path):
    (tmp_path / "bad.safetensors").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="(?i)bad.safetensors.*not a valid safetensors file.*re-download or re-export"):
        load_bundle(tmp_path / "bad.safetensors")


def test_truncated_file(tmp_path, made):
    save_bundle(tmp_path / "b.safetensors", *made)
    data = (tmp_path / "b.safetensors").read_bytes()
    (tmp_path / "b.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="not a valid safetensors file"):
        load_bundle(tmp_path / "b.safetensors")


def test_file_without_bundle_metadata(tmp_path):
    save_file({"x": torch.zeros(1)}, str(tmp_path / "plain.safetensors"))
    with pytest.raises(ValueError, match="plain.safetensors.*no OneStep SR bundle metadata"):
        load_bundle(tmp_path / "plain.safetensors")


def test_invalid_json_metadata(tmp_path, made):
    with pytest.raises(ValueError, match="'lora' is not valid JSON"):
        load_bundle(_rewrite(tmp_path, made, lora="{rank: 4"))


def test_missing_base_family(tmp_path, made):
    with pytest.raises(ValueError, match=r"lacks \['base_family'\]"):
        load_bundle(_rewrite(tmp_path, made, base_family=None))


def test_newer_format_version(tmp_path, made):
    # also with metadata this pack could not parse: the version is checked first
    path = _rewrite(tmp_path, made, format_version=str(BUNDLE_FORMAT_VERSION + 6), lora="<new encoding>")
    with pytest.raises(ValueError, match=r"format version 7 is newer than this pack supports \(1\); update "
                                         "comfyui-onestep-sr"):
        load_bundle(path)


@pytest.mark.parametrize("version", ["0", "one"])
def test_invalid_format_version(tmp_path, made, version):
    with pytest.raises(ValueError, match=f"format.version '?{version}"):
        load_bundle(_rewrite(tmp_path, made, format_version=version))


def test_wrong_base_family(tmp_path, made):
    path = _rewrite(tmp_path, made, base_family="sd1")
    with pytest.raises(ValueError, match="x.safetensors' was made for base family 'sd1' but the loaded model is "
                                         "'sd2'; load the 'sd1' base model"):
        load_bundle(path, expected_family="sd2")
    with pytest.raises(ValueError, match="load an SD 2.x base model"):
        load_bundle(_rewrite(tmp_path, made, "y.safetensors", base_family="sd2"), expected_family="custom-12345678")
    assert load_bundle(path).meta.base_family == "sd1"  # no expectation, no check


def test_declared_module_without_tensors(tmp_path, made):
    meta, _ = made
    path = _rewrite(tmp_path, made, modules=json.dumps([*meta.modules, "mine"]))
    with pytest.raises(ValueError, match=r"declares modules \['mine'\] but holds no tensors"):
        load_bundle(path)


def test_tensors_of_undeclared_components(tmp_path, made):
    meta, tensors = made
    with pytest.raises(ValueError, match=r"undeclared components \['mem'\]"):
        save_bundle(tmp_path / "b.safetensors", meta, {**tensors, "mem.head.weight": torch.zeros(1)})


def test_meta_validation():
    base = dict(method="osediff", base_family="sd2")
    cases = [
        (dict(method="magic"), "method 'magic' is unknown"),
        (dict(parameterisation="Z"), "parameterisation"),
        (dict(modules=("warp",)), "unknown modules"),
        (dict(base_family=""), "base_family"),
        (dict(lora={"text": LORA["unet"]}, modules=("unet_lora",)), "'text' is unknown"),
        (dict(lora={"unet": {"rank": 4}}, modules=("unet_lora",)), "needs rank, alpha and adapters"),
        (dict(lora={"unet": {**LORA["unet"], "rank": 0}}, modules=("unet_lora",)), "`rank` must be a positive"),
        (dict(lora={"unet": {**LORA["unet"], "alpha": -1}}, modules=("unet_lora",)), "`alpha` must be a positive"),
        (dict(lora={"unet": {**LORA["unet"], "adapters": {"a": []}}}, modules=("unet_lora",)), "must list its"),
        (dict(lora=LORA), "does not list 'unet_lora'"),
        (dict(modules=("unet_lora",)), "no `lora` entry"),
        (dict(hyperparameters={"mine": {}}), r"hyperparameters for \['mine'\]"),
        (dict(defaults=[1]), "`defaults` must be a dict"),
        (dict(format_version=2), "newer than this pack supports"),
    ]
    for change, message in cases:
        with pytest.raises(ValueError, match=message):
            BundleMeta(**{**base, **change})
    meta = BundleMeta(**base, lora=LORA, modules=("unet_lora",))
    assert meta.lora_scale("unet") == 2.0

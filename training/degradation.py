"""On-the-fly LQ synthesis: the Real-ESRGAN second-order degradation model, as OSEDiff configures it (SPEC §8.2).

Wang et al., "Real-ESRGAN: Training Real-World Blind Super-Resolution with Pure Synthetic Data", arXiv:2107.10833,
§3 (Fig. 2), with the settings of OSEDiff (Wu et al., arXiv:2406.08177, ``params_realesrgan.yml``). For one HQ
image (3, H, W) in [0, 1] and scale s:

1.  blur with kernel 1 (``filter2d``: reflect padding k//2, cross-correlation);
2.  resize by r₁ (up / down / keep) with a random mode;
3.  Gaussian noise σ/255 or Poisson noise × scale, either "gray" (one map for R, G, B); clip to [0, 1];
4.  JPEG at quality q₁;
5.  with probability ``second_blur_prob``, blur with kernel 2;
6.  resize to (H/s·r₂, W/s·r₂);
7.  noise as in 3 with the stage-2 ranges (steps 5-7 run with probability ``second_order_prob``);
8.  order A: resize to (H/s, W/s), final sinc, JPEG q₂ — or order B: JPEG q₂, resize, final sinc;
9.  (``resize_back``) resize to (H, W) with a random mode;
10. clamp and round to 8 bit (×255, round, /255).

Choices, and where we depart from the text of SPEC §8:

* JPEG is the real codec (libjpeg through Pillow, 4:2:0 chroma subsampling, integer quality), run on the CPU. SPEC
  names DiffJPEG in its non-differentiable mode, which re-implements the same standard codec in torch; neither
  passes gradients, so ``degrade`` runs under ``torch.no_grad``. Qualities are drawn uniformly from the integers in
  ``jpeg_range`` (DiffJPEG took a float quality).
* Steps 9 and 10 run in the order of OSEDiff's code (resize back, then clamp and round), so the LQ is always an
  8-bit image in [0, 1] even after a bicubic resize; SPEC §8.2 lists the rounding first.
* ``filter2d`` keeps folding the reflection for an image narrower than the padding (only tiny test crops get there);
  for pad < size it equals ``F.pad(mode="reflect")``.
* ``gray_prob`` and ``color_jitter_prob`` are carried for completeness with OSEDiff's config, where both are 0;
  only 0 is accepted.

Randomness comes only from the ``torch.Generator`` passed in (a CPU generator). Each batch item draws its own
``DegradationParams`` with ``sample_params`` (cheap, no pixels), then its pixel work draws the noise realisations
from the same generator; ``degrade`` returns the per-item parameters beside the LQ for tests and logs.
"""

from __future__ import annotations

import dataclasses
import io
import math
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from .kernels import (
    FinalSincConfig,
    KernelConfig,
    KernelSpec,
    check_modes,
    check_probability,
    check_range,
    draw_bernoulli,
    draw_blur_spec,
    draw_choice,
    draw_final_spec,
    draw_index,
    draw_uniform,
)

RESIZE_MODES = ("area", "bilinear", "bicubic")
RESIZE_KINDS = ("up", "down", "keep")
BT601 = (0.299, 0.587, 0.114)  # luminance weights for gray Poisson noise


@dataclass(frozen=True)
class DegradationConfig:
    """Every parameter and probability of the second-order model; defaults are OSEDiff's (SPEC §8).

    ``resize_prob*`` are the (up, down, keep) probabilities; ``resize_range*`` = (lo, hi) gives U[1, hi] for up and
    U[lo, 1] for down. ``noise_range*`` is σ in 8-bit units. InvSR's variant is ``second_order_prob=0.5,
    resize_back=False``.
    """

    scale: int = 4
    kernel1: KernelConfig = field(default_factory=KernelConfig)
    kernel2: KernelConfig = field(default_factory=lambda: KernelConfig(sigma_range=(0.2, 1.5)))
    final_sinc: FinalSincConfig = field(default_factory=FinalSincConfig)
    # first stage
    resize_prob: tuple[float, float, float] = (0.2, 0.7, 0.1)
    resize_range: tuple[float, float] = (0.15, 1.5)
    resize_modes: tuple[str, ...] = RESIZE_MODES
    gaussian_noise_prob: float = 0.5
    noise_range: tuple[float, float] = (1.0, 30.0)
    poisson_scale_range: tuple[float, float] = (0.05, 3.0)
    gray_noise_prob: float = 0.4
    jpeg_range: tuple[int, int] = (30, 95)
    # second stage
    second_order_prob: float = 1.0
    second_blur_prob: float = 0.8
    resize_prob2: tuple[float, float, float] = (0.3, 0.4, 0.3)
    resize_range2: tuple[float, float] = (0.3, 1.2)
    resize_modes2: tuple[str, ...] = RESIZE_MODES
    gaussian_noise_prob2: float = 0.5
    noise_range2: tuple[float, float] = (1.0, 25.0)
    poisson_scale_range2: tuple[float, float] = (0.05, 2.5)
    gray_noise_prob2: float = 0.4
    jpeg_range2: tuple[int, int] = (30, 95)
    # final stage
    final_order_a_prob: float = 0.5
    final_resize_modes: tuple[str, ...] = RESIZE_MODES
    resize_back: bool = True
    resize_back_modes: tuple[str, ...] = RESIZE_MODES
    gray_prob: float = 0.0
    color_jitter_prob: float = 0.0

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, list):
                object.__setattr__(self, f.name, tuple(value))
            elif isinstance(value, dict) and f.name in _NESTED:
                object.__setattr__(self, f.name, _NESTED[f.name].from_dict(value))
        if isinstance(self.scale, bool) or not isinstance(self.scale, int) or self.scale < 1:
            raise ValueError(f"`scale` must be a positive integer; got {self.scale!r}. OSEDiff uses 4.")
        for name, cls in _NESTED.items():
            if not isinstance(getattr(self, name), cls):
                raise TypeError(f"`{name}` must be a {cls.__name__} (or its dict); got {getattr(self, name)!r}.")
        for suffix in ("", "2"):
            self._check_stage(suffix)
        for name in ("second_order_prob", "second_blur_prob", "final_order_a_prob"):
            check_probability(name, getattr(self, name))
        check_modes("final_resize_modes", self.final_resize_modes, RESIZE_MODES)
        check_modes("resize_back_modes", self.resize_back_modes, RESIZE_MODES)
        if not isinstance(self.resize_back, bool):
            raise TypeError(f"`resize_back` must be True or False; got {self.resize_back!r}.")
        for name in ("gray_prob", "color_jitter_prob"):
            if getattr(self, name) != 0:
                raise ValueError(f"`{name}` must be 0 (as in OSEDiff); got {getattr(self, name)!r}. Gray conversion "
                                 "and colour jitter of the LQ are not implemented.")

    def _check_stage(self, suffix: str) -> None:
        probs = getattr(self, "resize_prob" + suffix)
        if not isinstance(probs, tuple) or len(probs) != 3:
            raise ValueError(f"`resize_prob{suffix}` must be three probabilities (up, down, keep); got {probs!r}.")
        for p in probs:
            check_probability("resize_prob" + suffix, p)
        if abs(sum(probs) - 1.0) > 1e-6:
            raise ValueError(f"`resize_prob{suffix}` must sum to 1; got {probs!r} (sum {sum(probs)}).")
        check_range("resize_range" + suffix, getattr(self, "resize_range" + suffix), low=1e-6, around=1.0)
        check_modes("resize_modes" + suffix, getattr(self, "resize_modes" + suffix), RESIZE_MODES)
        check_probability("gaussian_noise_prob" + suffix, getattr(self, "gaussian_noise_prob" + suffix))
        check_range("noise_range" + suffix, getattr(self, "noise_range" + suffix), low=0.0)
        check_range("poisson_scale_range" + suffix, getattr(self, "poisson_scale_range" + suffix), low=0.0)
        check_probability("gray_noise_prob" + suffix, getattr(self, "gray_noise_prob" + suffix))
        check_range("jpeg_range" + suffix, getattr(self, "jpeg_range" + suffix), low=1, high=100, integer=True)

    def to_dict(self) -> dict:
        """A JSON-ready dict (nested dicts for the kernel configs)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> DegradationConfig:
        """The config of ``data``; unknown keys (at any level) raise ValueError, missing keys take defaults."""
        if not isinstance(data, dict):
            raise TypeError(f"`DegradationConfig.from_dict` needs a dict; got {type(data).__name__}.")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown DegradationConfig keys {unknown}; expected a subset of {sorted(known)}.")
        return cls(**data)


_NESTED = {"kernel1": KernelConfig, "kernel2": KernelConfig, "final_sinc": FinalSincConfig}


# ---------------------------------------------------------------- drawn parameters


@dataclass(frozen=True)
class ResizeDraw:
    kind: str  # "up" | "down" | "keep"
    scale: float
    mode: str  # "area" | "bilinear" | "bicubic"


@dataclass(frozen=True)
class NoiseDraw:
    kind: str  # "gaussian" | "poisson"
    gray: bool
    sigma_255: float | None = None  # Gaussian σ in 8-bit units
    poisson_scale: float | None = None


@dataclass(frozen=True)
class DegradationParams:
    """What one sample drew. Stage-2 fields are None when that step was skipped; ``order`` is "A" or "B"."""

    kernel1: KernelSpec
    resize1: ResizeDraw
    noise1: NoiseDraw
    jpeg1: int
    second_order: bool
    kernel2: KernelSpec | None
    resize2: ResizeDraw | None
    noise2: NoiseDraw | None
    order: str
    final_resize_mode: str
    final_kernel: KernelSpec
    jpeg2: int
    resize_back_mode: str | None

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _draw_resize(generator, probs, scale_range, modes) -> ResizeDraw:
    kind = RESIZE_KINDS[draw_index(generator, probs)]
    if kind == "up":
        scale = draw_uniform(generator, 1.0, scale_range[1])
    elif kind == "down":
        scale = draw_uniform(generator, scale_range[0], 1.0)
    else:
        scale = 1.0
    return ResizeDraw(kind, scale, draw_choice(generator, modes))


def _draw_noise(generator, gaussian_prob, sigma_range, poisson_range, gray_prob) -> NoiseDraw:
    if draw_bernoulli(generator, gaussian_prob):
        sigma_255 = draw_uniform(generator, *sigma_range)
        return NoiseDraw("gaussian", draw_bernoulli(generator, gray_prob), sigma_255=sigma_255)
    poisson_scale = draw_uniform(generator, *poisson_range)
    return NoiseDraw("poisson", draw_bernoulli(generator, gray_prob), poisson_scale=poisson_scale)


def _draw_quality(generator, quality_range) -> int:
    low, high = quality_range
    return int(torch.randint(low, high + 1, (), generator=generator).item())


def sample_params(generator: torch.Generator, config: DegradationConfig | None = None) -> DegradationParams:
    """Draw every random choice of one sample's degradation (no pixel work; noise maps are drawn later)."""
    c = config or DegradationConfig()
    kernel1 = draw_blur_spec(generator, c.kernel1)
    resize1 = _draw_resize(generator, c.resize_prob, c.resize_range, c.resize_modes)
    noise1 = _draw_noise(generator, c.gaussian_noise_prob, c.noise_range, c.poisson_scale_range, c.gray_noise_prob)
    jpeg1 = _draw_quality(generator, c.jpeg_range)
    second_order = draw_bernoulli(generator, c.second_order_prob)
    kernel2 = resize2 = noise2 = None
    if second_order:
        if draw_bernoulli(generator, c.second_blur_prob):
            kernel2 = draw_blur_spec(generator, c.kernel2)
        resize2 = _draw_resize(generator, c.resize_prob2, c.resize_range2, c.resize_modes2)
        noise2 = _draw_noise(generator, c.gaussian_noise_prob2, c.noise_range2, c.poisson_scale_range2,
                             c.gray_noise_prob2)
    final_kernel = draw_final_spec(generator, c.final_sinc)
    order = "A" if draw_bernoulli(generator, c.final_order_a_prob) else "B"
    final_resize_mode = draw_choice(generator, c.final_resize_modes)
    jpeg2 = _draw_quality(generator, c.jpeg_range2)
    resize_back_mode = draw_choice(generator, c.resize_back_modes) if c.resize_back else None
    return DegradationParams(kernel1, resize1, noise1, jpeg1, second_order, kernel2, resize2, noise2, order,
                             final_resize_mode, final_kernel, jpeg2, resize_back_mode)


# ---------------------------------------------------------------- pixel operations


def _reflect_index(n: int, pad: int, device: torch.device) -> torch.Tensor:
    """Indices of a reflect-padded axis (edge not repeated), folding again when pad >= n."""
    i = torch.arange(-pad, n + pad, device=device)  # (n + 2 pad,)
    if n == 1:
        return torch.zeros_like(i)
    period = 2 * (n - 1)
    i = torch.remainder(i, period)
    return torch.where(i >= n, period - i, i)


def filter2d(image: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
    """Cross-correlate each channel with ``kernel`` (k, k), k odd, after reflect padding by k//2.

    image (B, C, h, w) float -> (B, C, h, w); the kernel is moved to the image's device and dtype.
    """
    if kernel.ndim != 2 or kernel.shape[0] != kernel.shape[1] or kernel.shape[0] % 2 == 0:
        raise ValueError(f"`kernel` must be square with an odd side; got shape {tuple(kernel.shape)}.")
    _, c, h, w = image.shape
    k = kernel.shape[-1]
    pad = k // 2
    rows = _reflect_index(h, pad, image.device)  # (h + 2 pad,)
    cols = _reflect_index(w, pad, image.device)  # (w + 2 pad,)
    padded = image[:, :, rows][:, :, :, cols]  # (B, C, h + 2 pad, w + 2 pad)
    weight = kernel.to(image).expand(c, 1, k, k)  # (C, 1, k, k)
    return F.conv2d(padded, weight, groups=c)  # (B, C, h, w)


def _interpolate(image: torch.Tensor, mode: str, *, size=None, scale_factor=None) -> torch.Tensor:
    align = {} if mode == "area" else {"align_corners": False}
    return F.interpolate(image, size=size, scale_factor=scale_factor, mode=mode, **align)


def gaussian_noise(image: torch.Tensor, sigma: float, *, gray: bool, generator: torch.Generator) -> torch.Tensor:
    """N(0, σ²) noise shaped like ``image`` (B, C, h, w); ``gray`` shares one map across channels.

    Drawn on the CPU, then moved to the image's device and dtype.
    """
    b, c, h, w = image.shape
    eps = torch.randn((b, 1 if gray else c, h, w), generator=generator, dtype=torch.float32)  # (B, 1|C, h, w)
    return (eps * sigma).expand(b, c, h, w).to(image)  # (B, C, h, w)


def poisson_noise(image: torch.Tensor, scale: float, *, gray: bool, generator: torch.Generator) -> torch.Tensor:
    """Poisson noise × ``scale`` for ``image`` (B, 3, h, w) in [0, 1] (SPEC §8.2 step 3).

    The image (or its BT.601 luminance when ``gray``) is quantised to 8 bit; with vals = 2^⌈log₂ #unique⌉ per
    item, noise = Poisson(img·vals)/vals − img. Computed on the CPU (Poisson rates depend on the image and the
    generator lives there), then moved to the image's device and dtype.
    """
    b, c, h, w = image.shape
    x = image.detach().to(device="cpu", dtype=torch.float32)  # (B, C, h, w)
    if gray:
        weights = torch.tensor(BT601, dtype=torch.float32).view(1, 3, 1, 1)
        x = (x * weights).sum(dim=1, keepdim=True)  # (B, 1, h, w)
    x = torch.clamp((x * 255.0).round(), 0, 255) / 255.0
    noise = torch.empty_like(x)
    for i in range(b):
        vals = 2.0 ** math.ceil(math.log2(torch.unique(x[i]).numel()))
        noise[i] = torch.poisson(x[i] * vals, generator=generator) / vals - x[i]
    return (noise * scale).expand(b, c, h, w).to(image)  # (B, C, h, w)


def _add_noise(image: torch.Tensor, draw: NoiseDraw, generator: torch.Generator) -> torch.Tensor:
    if draw.kind == "gaussian":
        noise = gaussian_noise(image, draw.sigma_255 / 255.0, gray=draw.gray, generator=generator)
    else:
        noise = poisson_noise(image, draw.poisson_scale, gray=draw.gray, generator=generator)
    return torch.clamp(image + noise, 0.0, 1.0)  # (B, C, h, w)


def jpeg_compress(image: torch.Tensor, quality: int) -> torch.Tensor:
    """Encode and decode each item as a JPEG at ``quality`` (libjpeg via Pillow, 4:2:0 subsampling).

    image (B, 3, h, w) float in [0, 1] (clamped here) -> same shape, device and dtype, values k/255. Not
    differentiable; runs on the CPU.
    """
    pixels = (image.detach().clamp(0, 1) * 255.0).round().to(device="cpu", dtype=torch.uint8)  # (B, 3, h, w)
    decoded = []
    for item in pixels.permute(0, 2, 3, 1).numpy():  # (h, w, 3) uint8 each
        buffer = io.BytesIO()
        Image.fromarray(np.ascontiguousarray(item)).save(buffer, format="JPEG", quality=int(quality), subsampling=2)
        buffer.seek(0)
        with Image.open(buffer) as jpeg:
            decoded.append(np.asarray(jpeg.convert("RGB")))
    out = torch.from_numpy(np.stack(decoded)).permute(0, 3, 1, 2)  # (B, 3, h, w) uint8
    return (out.to(torch.float32) / 255.0).to(image)


def _degrade_item(hq: torch.Tensor, p: DegradationParams, generator: torch.Generator, s: int) -> torch.Tensor:
    """Steps 1-10 for one item, hq (1, 3, H, W) float32 -> LQ (1, 3, H/s, W/s) or (1, 3, H, W)."""
    h, w = hq.shape[-2:]
    out = filter2d(hq, p.kernel1.build())  # (1, 3, H, W)
    out = _interpolate(out, p.resize1.mode, scale_factor=p.resize1.scale)  # (1, 3, h1, w1)
    out = _add_noise(out, p.noise1, generator)
    out = jpeg_compress(out, p.jpeg1)
    if p.second_order:
        if p.kernel2 is not None:
            out = filter2d(out, p.kernel2.build())
        size2 = (int(h / s * p.resize2.scale), int(w / s * p.resize2.scale))
        out = _interpolate(out, p.resize2.mode, size=size2)  # (1, 3, h2, w2)
        out = _add_noise(out, p.noise2, generator)
    final_kernel = p.final_kernel.build()
    if p.order == "A":
        out = _interpolate(out, p.final_resize_mode, size=(h // s, w // s))  # (1, 3, H/s, W/s)
        out = filter2d(out, final_kernel)
        out = jpeg_compress(out, p.jpeg2)
    else:
        out = jpeg_compress(out, p.jpeg2)
        out = _interpolate(out, p.final_resize_mode, size=(h // s, w // s))  # (1, 3, H/s, W/s)
        out = filter2d(out, final_kernel)
    if p.resize_back_mode is not None:
        out = _interpolate(out, p.resize_back_mode, size=(h, w))  # (1, 3, H, W)
    return torch.clamp((out * 255.0).round(), 0, 255) / 255.0


def _min_side(config: DegradationConfig) -> int:
    """The smallest HQ side (a multiple of the scale) for which every resize keeps at least one pixel."""
    side = config.scale
    while int(side * config.resize_range[0]) < 1 or int(side / config.scale * config.resize_range2[0]) < 1:
        side += config.scale
    return side


@torch.no_grad()
def degrade(hq: torch.Tensor, generator: torch.Generator,
            config: DegradationConfig | None = None) -> tuple[torch.Tensor, tuple[DegradationParams, ...]]:
    """Synthesise LQ images from HQ ones with the second-order model; each item draws its own parameters.

    hq: (B, 3, H, W) float in [0, 1], H and W divisible by ``config.scale``; any device.
    generator: a CPU ``torch.Generator``; all randomness comes from it, so a seed gives the same LQ anywhere.
    Returns (lq, params): lq (B, 3, H, W) with ``resize_back`` else (B, 3, H/s, W/s), on hq's device and dtype,
    values k/255 in [0, 1]; params holds one ``DegradationParams`` per item, in batch order.
    The pixel work runs in float32 (8-bit rounding and JPEG need no more; half has no CPU resize kernels).
    """
    config = config or DegradationConfig()
    if hq.ndim != 4 or hq.shape[1] != 3 or not hq.is_floating_point():
        raise ValueError(f"`hq` must be a float tensor (B, 3, H, W); got {hq.dtype} of shape {tuple(hq.shape)}.")
    h, w = hq.shape[-2:]
    s = config.scale
    if h % s or w % s:
        raise ValueError(f"`hq` height and width must be divisible by the scale {s}; got {h}x{w}. "
                         f"Crop to {h - h % s}x{w - w % s}.")
    min_side = _min_side(config)
    if min(h, w) < min_side:
        raise ValueError(f"`hq` is too small for this config; got {h}x{w}, expected at least {min_side} px a side.")
    if generator.device.type != "cpu":
        raise ValueError(f"`generator` must be a CPU torch.Generator; got one on {generator.device}. "
                         "Use torch.Generator().manual_seed(seed).")
    items, params = [], []
    for item in hq.detach().to(torch.float32):  # (3, H, W)
        drawn = sample_params(generator, config)
        items.append(_degrade_item(item.unsqueeze(0), drawn, generator, s))  # (1, 3, h_lq, w_lq)
        params.append(drawn)
    return torch.cat(items).to(hq.dtype), tuple(params)  # (B, 3, h_lq, w_lq)

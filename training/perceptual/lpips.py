"""LPIPS v0.1 (Zhang, Isola, Efros, Shechtman, Wang, "The Unreasonable Effectiveness of Deep Features as a Perceptual
Metric", CVPR 2018, arXiv:1801.03924) in plain torch: our own AlexNet / VGG16 feature slices (no torchvision).

For images x, y (B, 3, H, W) in [-1, 1]:

    h      = (x − shift) / scale                 shift = (−0.030, −0.088, −0.188), scale = (0.458, 0.448, 0.450)
    f_k    = trunk slice k output (k = 1..5)     AlexNet relu1..relu5, VGG16 relu1_2, relu2_2, relu3_3, relu4_3, relu5_3
    f̂_k    = f_k / (‖f_k‖₂ over channels + 1e-10)
    d(x,y) = Σ_k mean_{h,w} Σ_c w_{k,c} (f̂_k(x) − f̂_k(y))²_c      w_k: the calibrated 1×1 "lin" heads (no bias)

Module names follow the torchvision feature indices inside each slice (``net.slice{k}.{i}``), so a torchvision
``features.{i}`` state dict maps onto them by index alone (SPEC §10 option 1); the heads are ``lins.{k-1}.weight``
(1, C_k, 1, 1). Dropout in front of the heads is inference-only identity in LPIPS and is left out.
"""

from __future__ import annotations

import math
from collections import OrderedDict

import torch
from torch import nn

NETS = ("alex", "vgg")
SHIFT = (-0.030, -0.088, -0.188)
SCALE = (0.458, 0.448, 0.450)
NORM_EPS = 1e-10
# Layer lists in torchvision's `features` order: ("conv", in, out, kernel, stride, padding), ("relu",),
# ("pool", kernel, stride). SLICE_ENDS are the exclusive feature indices where slices 1..5 end.
_ALEX_LAYERS = (
    ("conv", 3, 64, 11, 4, 2), ("relu",), ("pool", 3, 2),
    ("conv", 64, 192, 5, 1, 2), ("relu",), ("pool", 3, 2),
    ("conv", 192, 384, 3, 1, 1), ("relu",), ("conv", 384, 256, 3, 1, 1), ("relu",),
    ("conv", 256, 256, 3, 1, 1), ("relu",),
)
_VGG_WIDTHS = (64, 64, "pool", 128, 128, "pool", 256, 256, 256, "pool", 512, 512, 512, "pool", 512, 512, 512)
SLICE_ENDS = {"alex": (2, 5, 8, 10, 12), "vgg": (4, 9, 16, 23, 30)}
CHANNELS = {"alex": (64, 192, 384, 256, 256), "vgg": (64, 128, 256, 512, 512)}
# The smallest image side whose features survive every pooling layer.
MIN_SIDE = {"alex": 31, "vgg": 16}


def _vgg_layers() -> tuple[tuple, ...]:
    layers, width = [], 3
    for item in _VGG_WIDTHS:
        if item == "pool":
            layers.append(("pool", 2, 2))
        else:
            layers += [("conv", width, item, 3, 1, 1), ("relu",)]
            width = item
    return tuple(layers)


def trunk_layers(net: str) -> tuple[tuple, ...]:
    """The layer list of ``net`` ("alex" or "vgg") in torchvision feature order."""
    if net not in NETS:
        raise ValueError(f"LPIPS `net` must be one of {NETS}; got {net!r}.")
    return _ALEX_LAYERS if net == "alex" else _vgg_layers()


def conv_indices(net: str) -> list[int]:
    """Torchvision feature indices of the trunk's convolutions, in order (AlexNet 0, 3, 6, 8, 10; VGG16 0, 2, ...)."""
    return [i for i, layer in enumerate(trunk_layers(net)) if layer[0] == "conv"]


def trunk_key(net: str, index: int) -> str:
    """Our state-dict prefix of torchvision feature ``index``: ``net.slice{k}.{index}``."""
    for k, end in enumerate(SLICE_ENDS[net], start=1):
        if index < end:
            return f"net.slice{k}.{index}"
    raise ValueError(f"feature index {index} lies past the last LPIPS slice of {net!r} (ends at {end}).")


def _make(layer: tuple) -> nn.Module:
    if layer[0] == "conv":
        _, c_in, c_out, kernel, stride, padding = layer
        return nn.Conv2d(c_in, c_out, kernel, stride=stride, padding=padding)
    if layer[0] == "relu":
        return nn.ReLU()
    return nn.MaxPool2d(layer[1], stride=layer[2])


class LPIPSTrunk(nn.Module):
    """The five feature slices of AlexNet or VGG16; forward returns the five ReLU outputs."""

    def __init__(self, net: str) -> None:
        super().__init__()
        layers, start = trunk_layers(net), 0
        for k, end in enumerate(SLICE_ENDS[net], start=1):
            modules = OrderedDict((str(i), _make(layers[i])) for i in range(start, end))
            self.add_module(f"slice{k}", nn.Sequential(modules))
            start = end

    def forward(self, h: torch.Tensor) -> list[torch.Tensor]:
        features = []
        for k in range(1, 6):
            h = getattr(self, f"slice{k}")(h)  # (N, C_k, H_k, W_k)
            features.append(h)
        return features


class LPIPS(nn.Module):
    """LPIPS distance; forward(x, y) with x, y (B, 3, H, W) in [-1, 1] -> (B,) float32. Frozen use only."""

    def __init__(self, net: str = "vgg") -> None:
        super().__init__()
        self.net_name = net
        self.register_buffer("shift", torch.tensor(SHIFT).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("scale", torch.tensor(SCALE).view(1, 3, 1, 1), persistent=False)
        self.net = LPIPSTrunk(net)
        self.lins = nn.ModuleList(nn.Conv2d(c, 1, 1, bias=False) for c in CHANNELS[net])
        self.variant = f"lpips-{net} (uninitialised)"

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if x.shape != y.shape or x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"LPIPS needs x and y of one shape (B, 3, H, W) in [-1, 1]; got {tuple(x.shape)} and "
                             f"{tuple(y.shape)}.")
        if min(x.shape[-2:]) < MIN_SIDE[self.net_name]:
            raise ValueError(f"LPIPS-{self.net_name} needs images of at least {MIN_SIDE[self.net_name]} px a side; "
                             f"got {tuple(x.shape[-2:])}. Use larger crops.")
        both = torch.cat([x, y]).float()  # (2B, 3, H, W)
        h = ((both - self.shift.float()) / self.scale.float()).to(self.lins[0].weight.dtype)  # (2B, 3, H, W)
        distance = torch.zeros(x.shape[0], device=x.device)  # (B,)
        for feature, lin in zip(self.net(h), self.lins, strict=True):
            # float32 from here: squared feature norms over 512 channels overflow half precision.
            feature = feature.float()  # (2B, C, h, w)
            # the clamp only keeps the gradient finite where a whole feature vector is 0 (sqrt'(0) = inf)
            norm = feature.square().sum(dim=1, keepdim=True).clamp_min(NORM_EPS ** 2).sqrt()  # (2B, 1, h, w)
            f_x, f_y = (feature / (norm + NORM_EPS)).chunk(2)  # (B, C, h, w) each
            weights = lin.weight.float().view(1, -1, 1, 1)  # (1, C, 1, 1)
            distance = distance + ((f_x - f_y).square() * weights).sum(dim=1).mean(dim=(1, 2))  # (B,)
        return distance


@torch.no_grad()
def randomise_(model: LPIPS, generator: torch.Generator) -> LPIPS:
    """He-normal trunk weights, zero biases and positive heads w = |N(0, 1)| / C, all drawn from ``generator``.

    For plumbing tests only (SPEC §10: a random trunk is no perceptual metric).
    """
    for name, param in model.named_parameters():
        if name.startswith("lins."):
            param.copy_(torch.randn(param.shape, generator=generator).abs() / param.shape[1])
        elif name.endswith(".weight"):
            fan_in = math.prod(param.shape[1:])
            param.copy_(torch.randn(param.shape, generator=generator) * math.sqrt(2.0 / fan_in))
        else:
            param.zero_()
    model.variant = f"random-trunk ({model.net_name}, tests only)"
    return model

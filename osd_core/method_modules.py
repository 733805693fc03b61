"""Rebuild a bundle's method modules (MINE, LQFM, VPIM, MEM, TAE) from its metadata alone.

Each module's config lives in the bundle's ``hyperparameters[<prefix>]`` and its tensors under ``<prefix>.``; this
module maps a prefix to its config class and constructor, builds the module, loads its tensors strictly and returns
it ready for inference (eval, no grad, the components' dtype). A new method module is one entry in ``REGISTRY``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from .bundle import Bundle
from .mem import MEM, MEMConfig
from .mine import MINE, MINEConfig
from .models import SDComponents, cast
from .sft import LQFM, LQFMConfig
from .vpim import VPIM, VPIMConfig


@dataclass(frozen=True)
class ModuleSpec:
    config_class: type
    build: Callable[[object, SDComponents], torch.nn.Module]


REGISTRY: dict[str, ModuleSpec] = {
    "mine": ModuleSpec(MINEConfig, lambda config, _components: MINE(config)),
    "lqfm": ModuleSpec(LQFMConfig, lambda config, _components: LQFM(config)),
    "vpim": ModuleSpec(VPIMConfig, lambda config, _components: VPIM(config)),
    "mem": ModuleSpec(MEMConfig, lambda config, _components: MEM(config)),
}


def build_module(name: str, config, components: SDComponents) -> torch.nn.Module:
    return REGISTRY[name].build(config, components)


def load_method_modules(components: SDComponents, bundle: Bundle) -> dict[str, torch.nn.Module]:
    """Every registered module the bundle declares, built from its hyperparameters and loaded strictly."""
    modules = {}
    for name in bundle.meta.modules:
        if name not in REGISTRY:
            continue
        if name not in bundle.meta.hyperparameters:
            raise ValueError(f"bundle {bundle.path!r} declares `{name}` but its metadata has no hyperparameters "
                             f"for it; re-export the bundle.")
        config = REGISTRY[name].config_class.from_dict(bundle.meta.hyperparameters[name])
        module = build_module(name, config, components)
        try:
            module.load_state_dict(bundle.component(name), strict=True)
        except RuntimeError as err:
            raise ValueError(f"bundle {bundle.path!r}: the `{name}` tensors do not fit its hyperparameters: "
                             f"{err}") from err
        modules[name] = cast(module, components.dtype).eval().requires_grad_(False)
    return modules

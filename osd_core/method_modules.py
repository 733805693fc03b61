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
from .tae import TAEConfig, TimeAwareEncoder
from .vpim import VPIM, VPIMConfig


def _all_tensors(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return module.state_dict()


@dataclass(frozen=True)
class ModuleSpec:
    """How to build a module from its config (and the SD components), and which of its tensors a bundle holds."""

    config_class: type
    build: Callable[[object, SDComponents], torch.nn.Module]
    bundle_tensors: Callable[[torch.nn.Module], dict[str, torch.Tensor]] = _all_tensors


REGISTRY: dict[str, ModuleSpec] = {
    "mine": ModuleSpec(MINEConfig, lambda config, _components: MINE(config)),
    "lqfm": ModuleSpec(LQFMConfig, lambda config, _components: LQFM(config)),
    "vpim": ModuleSpec(VPIMConfig, lambda config, _components: VPIM(config)),
    "mem": ModuleSpec(MEMConfig, lambda config, _components: MEM(config)),
    # The TAE wraps the (LoRA-merged) SD encoder of the components; the bundle holds only its time layers.
    "tae": ModuleSpec(TAEConfig, lambda config, components: TimeAwareEncoder.from_vae(components.vae, config),
                      lambda module: {name: p.detach() for name, p in module.named_time_parameters()}),
}


def build_module(name: str, config, components: SDComponents) -> torch.nn.Module:
    return REGISTRY[name].build(config, components)


def bundle_tensors(name: str, module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The tensors of ``module`` that a bundle stores under ``<name>.``."""
    return REGISTRY[name].bundle_tensors(module)


def load_module_tensors(name: str, module: torch.nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    """Load the tensors a bundle stores under ``<name>.`` (prefix removed) into ``module``, strictly; RuntimeError
    listing the first missing/unexpected keys (shape errors come from ``load_state_dict``)."""
    expected = set(bundle_tensors(name, module))
    missing, unexpected = sorted(expected - set(tensors)), sorted(set(tensors) - expected)
    if missing or unexpected:
        raise RuntimeError(f"{len(missing)} missing (first: {missing[:3]}), {len(unexpected)} unexpected "
                           f"(first: {unexpected[:3]})")
    module.load_state_dict(tensors, strict=expected == set(module.state_dict()))


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
            load_module_tensors(name, module, bundle.component(name))
        except RuntimeError as err:
            raise ValueError(f"bundle {bundle.path!r}: the `{name}` tensors do not fit its hyperparameters: "
                             f"{err}") from err
        modules[name] = cast(module, components.dtype).eval().requires_grad_(False)
    return modules

"""Assemble an ``OSDModel``: a base SD model plus an optional adapter bundle (DESIGN.md "Adapter bundle format").

A base model with no bundle runs as plain SD with the standard ε→x₀ parameterisation at the OSEDiff defaults, which is
useful to check the wiring of a graph before any trained weights are at hand.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from .adapters import apply_bundle
from .bundle import load_bundle
from .datatypes import OSDModel
from .method_defaults import METHOD_DEFAULTS
from .method_modules import load_method_modules
from .models import load_sd_components
from .parameterisation import Parameterisation

logger = logging.getLogger(__name__)

# OSEDiff's inference recipe (SPEC §1.3): the defaults of a model without a bundle.
OSEDIFF_DEFAULTS = METHOD_DEFAULTS["osediff"][1]


def load_osd_model(
    base_path: str | Path,
    bundle_path: str | Path | None = None,
    *,
    dtype: torch.dtype = torch.float32,
    tokenizer_dir: str | Path | None = None,
) -> OSDModel:
    """Load the base model at ``base_path`` (diffusers folder or single file) on the CPU and apply the bundle."""
    components = load_sd_components(base_path, dtype=dtype, tokenizer_dir=tokenizer_dir)
    if bundle_path is None:
        return OSDModel(
            components=components, bundle=None, parameterisation=Parameterisation.STANDARD,
            defaults=dict(OSEDIFF_DEFAULTS), name=Path(base_path).name,
        )
    bundle = load_bundle(bundle_path, expected_family=components.family)
    apply_bundle(components, bundle)
    extra_modules = load_method_modules(components, bundle)
    logger.info("applied bundle %s:\n%s", bundle_path, bundle.summary())
    return OSDModel(
        components=components, bundle=bundle,
        parameterisation=Parameterisation.parse(bundle.meta.parameterisation),
        defaults={**OSEDIFF_DEFAULTS, **bundle.meta.defaults},
        name=f"{Path(base_path).name} + {Path(bundle_path).name}", extra_modules=extra_modules,
    )

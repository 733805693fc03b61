"""Warm start: a run's trained weights initialised from an adapter bundle (``model.init_bundle``).

An imported official release (``onestep-sr import``) or an earlier run's bundle becomes the generator's starting
point: TADSR fine-tuned from the released ``tadsr.pkl`` (the release's optional ``pretrained_lora_path``, SPEC §3.6),
IDaS-SR started from an OSEDiff bundle, a run continued on new data. What loads:

* ``vae_encoder_base`` (TADSR's ``time_vae/`` encoder): replaces the base VAE encoder weights before any LoRA wraps
  them (``apply_base_weights``, on the freshly loaded components);
* each LoRA component the bundle and the run share (``unet``, ``vae_encoder``): the same adapters, targets and rank,
  with B rescaled by scale_bundle / scale_run so that the delta scale·B·A is the bundle's at the run's alpha;
* ``unet_conv_in``;
* each method module both have (``tae``, ``mine``, ``lqfm``, ``vpim``, ``mem``: ``Method.bundle_modules``).

Everything else starts as the method initialises it (the VSD regulariser, a discriminator, a module the bundle
lacks). Bundle parts the run does not use are named in a warning; a part that does not fit (rank, targets, shapes) is
an error naming it and the setting to change.
"""

from __future__ import annotations

import logging

import torch

from osd_core.adapters import CONV_IN_PREFIX, ENCODER_BASE_PREFIX, load_conv_in, load_encoder_base, lora_host
from osd_core.bundle import LORA_PREFIXES, Bundle, load_bundle
from osd_core.lora import load_lora_state_dict
from osd_core.method_modules import load_module_tensors
from osd_core.models import SDComponents
from training.methods import method_class
from training.methods.base import Method
from training.methods.sd_lora import conv_in_base
from training.schema import ConfigError

logger = logging.getLogger(__name__)

RANK_SETTINGS = {"unet": "lora.unet_rank", "vae_encoder": "lora.vae_encoder_rank"}


def load_init_bundle(config) -> Bundle | None:
    """The bundle of ``model.init_bundle`` (``config`` a ``TrainingConfig``), or None when the setting is empty."""
    path = config.model.init_bundle
    if not path:
        return None
    own = method_class(config.method).own_start_bundle
    if own:
        raise ConfigError(f"method {config.method!r} starts from `{own}`; leave `model.init_bundle` empty.")
    try:
        return load_bundle(path)
    except (OSError, ValueError) as err:
        raise ConfigError(f"`model.init_bundle` = {path!r} cannot be used: {err}") from err


def apply_base_weights(components: SDComponents, bundle: Bundle) -> None:
    """Check that the bundle was made for the loaded base model's family, then load its replacements of base weights
    (``vae_encoder_base``), on components no LoRA wraps yet."""
    if bundle.meta.base_family != components.family:
        raise ConfigError(f"`model.init_bundle` {bundle.path!r} was made for base family {bundle.meta.base_family!r}, "
                          f"but model.base is {components.family!r}; use a bundle made for this base model.")
    if ENCODER_BASE_PREFIX in bundle.meta.modules:
        load_encoder_base(components, bundle)


def _lora_tensors(bundle: Bundle, component: str, run_spec: dict) -> dict[str, torch.Tensor]:
    """The bundle's tensors of a LoRA component with B rescaled to the run's alpha; the rank must match."""
    spec = bundle.meta.lora[component]
    if spec["rank"] != run_spec["rank"]:
        raise ConfigError(f"`model.init_bundle` {bundle.path!r} has {component} LoRA rank {spec['rank']}, this run "
                          f"{run_spec['rank']}; set {RANK_SETTINGS.get(component, 'the rank')}={spec['rank']}.")
    ratio = (spec["alpha"] / spec["rank"]) / (run_spec["alpha"] / run_spec["rank"])
    tensors = bundle.component(LORA_PREFIXES[component])
    return {k: v * ratio if ".lora_B." in k else v for k, v in tensors.items()}


@torch.no_grad()
def warm_start(method: Method, bundle: Bundle) -> list[str]:
    """Load what ``bundle`` holds for ``method``'s trained weights (module docstring); returns the parts loaded."""
    components, meta = method.components, bundle.meta
    loaded = [ENCODER_BASE_PREFIX] if ENCODER_BASE_PREFIX in meta.modules else []
    for component, run_spec in method.lora.items():
        if component not in meta.lora:
            continue
        tensors = _lora_tensors(bundle, component, run_spec)
        try:
            load_lora_state_dict(lora_host(components, component), tensors)
        except ValueError as err:
            raise ConfigError(f"`model.init_bundle` {bundle.path!r}, {component} LoRA: {err} Its adapters must "
                              "target the modules this run trains (OSEDiff's layout).") from err
        loaded.append(LORA_PREFIXES[component])
    if CONV_IN_PREFIX in meta.modules and conv_in_base(components.unet).weight.requires_grad:
        load_conv_in(components, bundle)
        loaded.append(CONV_IN_PREFIX)
    for name, module in method.bundle_modules().items():
        if name in meta.modules:
            try:
                load_module_tensors(name, module, bundle.component(name))
            except RuntimeError as err:
                raise ConfigError(f"`model.init_bundle` {bundle.path!r}: its `{name}` does not fit this run's "
                                  f"({err}); set [{method.name}.{name}] to the bundle's hyperparameters "
                                  f"{meta.hyperparameters.get(name)}.") from err
            loaded.append(name)
    unused = sorted(set(meta.modules) - set(loaded))
    if unused:
        logger.warning("model.init_bundle %s: %s not used by this %s run (it starts them as usual)", bundle.path,
                       ", ".join(unused), method.name)
    logger.info("warm start from %s (%s bundle): %s", bundle.path, meta.method, ", ".join(loaded) or "nothing")
    return loaded

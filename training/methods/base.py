"""The interface between a training method (OSEDiff, TADSR, CODSR, ...) and the trainer.

A method builds its models from the SD components, names the modules that hold trainable parameters, and splits each
training step into **phases**: one optimiser each, stepped in a fixed order (e.g. generator → VSD regulariser →
discriminator). For every micro-batch the trainer runs the phases in order; for each phase it

1. lets only this phase's parameters require gradients (so, e.g., a generator loss that runs the discriminator
   leaves no gradient in the discriminator),
2. calls ``phase_loss(phase, batch, carry, generator)`` under autocast; ``carry`` is a dict shared by the phases of
   one micro-batch (the generator phase leaves its detached output there for the regulariser or discriminator),
3. back-propagates (divided by the accumulation count), and on the last micro-batch of an optimiser step clips this
   phase's gradients, steps its AdamW and LR schedule and zeroes its gradients.

Every phase parameter group has a name; ``[optim.groups.<name>]`` overrides lr/betas/weight_decay/eps for it (e.g.
MINE's own learning rate). Frozen models (a teacher U-Net, the text encoder) are the method's own business: they are
never prepared by accelerate, never checkpointed, and should be stored in the weight dtype ``context.weight_dtype``.

Checkpoints hold, per trainable module, the parameters of its phases and its buffers; methods with other state
(running statistics, ...) add it with ``extra_state``/``load_extra_state``.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from osd_core.bundle import BundleMeta
from osd_core.models import SDComponents


@dataclass(frozen=True)
class RunContext:
    """Where the method's models live: the device, the weight dtype of frozen models, and a seeded generator for
    initialisation (e.g. LoRA A matrices), independent of the global RNG."""

    device: torch.device
    weight_dtype: torch.dtype
    init_generator: torch.Generator


@dataclass
class Phase:
    """One optimiser of a step: its name and its parameter groups (group name -> parameters)."""

    name: str
    groups: dict[str, list[torch.nn.Parameter]]

    def parameters(self) -> list[torch.nn.Parameter]:
        return [p for params in self.groups.values() for p in params]


@dataclass
class PhaseOutput:
    """A phase's scalar loss (to back-propagate) and the named terms to log (floats)."""

    loss: torch.Tensor
    terms: dict[str, float]


class Method(abc.ABC):
    """Base class of training methods; subclasses set ``name`` and ``config_class`` (the ``[<name>]`` section)."""

    name: ClassVar[str]
    config_class: ClassVar[type]
    # The method's own setting that names its starting bundle (CODSR stage 2, RCOD's MEM stage); such methods take
    # no ``model.init_bundle``.
    own_start_bundle: ClassVar[str] = ""

    def __init__(self, config, components: SDComponents, context: RunContext) -> None:
        self.config = config  # training.config.TrainingConfig
        self.cfg = config.method_config
        self.components = components
        self.context = context
        self.models: dict[str, torch.nn.Module] = {}
        # the trained LoRA as a bundle's ``lora`` metadata (component -> rank, alpha, adapters), set by the method
        self.lora: dict = {}

    @abc.abstractmethod
    def trainable_modules(self) -> dict[str, torch.nn.Module]:
        """The modules holding trainable parameters, by name (prepared by accelerate, checkpointed)."""

    @abc.abstractmethod
    def phases(self) -> list[Phase]:
        """The optimisers of one step, in the order they are stepped."""

    def bind(self, prepared: dict[str, torch.nn.Module]) -> None:
        """Receive the accelerate-prepared (possibly DDP-wrapped) trainable modules; call these in ``phase_loss``
        (their ``forward``), and the unwrapped originals for anything else."""
        self.models = prepared

    @abc.abstractmethod
    def phase_loss(self, phase: str, batch: dict, carry: dict, generator: torch.Generator) -> PhaseOutput:
        """The loss of ``phase`` on ``batch`` (tensors on ``context.device``); random draws come from
        ``generator`` (a CPU generator; draw there and move)."""

    @abc.abstractmethod
    def generate(self, lq: torch.Tensor, prompts: list[str], generator: torch.Generator) -> torch.Tensor:
        """Inference for validation: lq (B, 3, H, W) in [-1, 1] at output size -> (B, 3, H, W) in [-1, 1]."""

    @abc.abstractmethod
    def export_bundle(self) -> tuple[BundleMeta, dict[str, torch.Tensor]]:
        """The adapter bundle (metadata and prefixed tensors) of the current weights, as ``osd_core.bundle``
        stores it; the trainer adds the training provenance to ``extra``."""

    def bundle_modules(self) -> dict[str, torch.nn.Module]:
        """The trained method modules by bundle name (``tae``, ``mine``, ``lqfm``, ``vpim``, ``mem``), which a warm
        start loads from ``model.init_bundle`` (``training.warm_start``)."""
        return {}

    def after_step(self, step: int) -> None:
        """Called after every optimiser step (all phases), with the number of steps done."""

    def extra_state(self) -> dict[str, Any]:
        """State outside the trainable modules to checkpoint (tensors, numbers, strings)."""
        return {}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        """Restore ``extra_state``."""
        if state:
            raise ValueError(f"method {self.name!r} keeps no extra state but the checkpoint has {sorted(state)}.")

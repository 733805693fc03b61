"""One AdamW per phase, with per-group overrides, and its learning-rate schedule (SPEC §1.2).

Group g of a phase uses ``[optim]`` with the fields of ``[optim.groups.<g>]`` that are set in its place.
Schedules: "constant" (lr throughout; what OSEDiff's diffusers "constant" actually does, SPEC §1.2) and
"constant_with_warmup" (lr · min(1, (k + 1) / warmup_steps) at optimiser step k, then constant).
"""

from __future__ import annotations

import torch

from training.config import OptimConfig
from training.methods.base import Phase
from training.schema import ConfigError


class WarmupConstant:
    """The LR factor at optimiser step k: min(1, (k + 1) / warmup_steps), or 1 without warm-up (picklable)."""

    def __init__(self, warmup_steps: int) -> None:
        self.warmup_steps = warmup_steps

    def __call__(self, k: int) -> float:
        return 1.0 if self.warmup_steps <= 0 else min(1.0, (k + 1) / self.warmup_steps)


def check_group_names(config: OptimConfig, phases: list[Phase]) -> None:
    """Every ``[optim.groups.<name>]`` must name a parameter group of the method; group names are unique."""
    names = [g for phase in phases for g in phase.groups]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ValueError(f"parameter group names {duplicates} appear in more than one phase; name them apart.")
    unknown = sorted(set(config.groups) - set(names))
    if unknown:
        raise ConfigError(f"[optim.groups] names {unknown}, but this method's parameter groups are {names}.")


def build_optimiser(config: OptimConfig, phase: Phase) -> torch.optim.AdamW:
    """AdamW over the phase's groups (each group keeps its name under ``"name"``)."""
    groups = []
    for name, params in phase.groups.items():
        if not params:
            raise ValueError(f"phase {phase.name!r}: parameter group {name!r} is empty.")
        override = config.groups.get(name)
        settings = {field: getattr(config, field) for field in ("lr", "betas", "weight_decay", "eps")}
        if override is not None:
            settings.update({k: v for k, v in vars(override).items() if v is not None})
        groups.append({"params": params, "name": name, **settings})
    return torch.optim.AdamW(groups)


def build_schedule(config: OptimConfig, optimiser: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LambdaLR:
    """The phase's LR schedule, stepped once per optimiser step."""
    warmup = config.warmup_steps if config.schedule == "constant_with_warmup" else 0
    return torch.optim.lr_scheduler.LambdaLR(optimiser, WarmupConstant(warmup))

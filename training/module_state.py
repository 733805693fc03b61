"""Which tensors of the trainable modules a checkpoint holds, and putting them back.

Per trainable module (unwrapped): the parameters that belong to a phase and every persistent buffer, keyed
``<module>.<name>``. Frozen base weights (most of a LoRA-adapted U-Net) are left out: they never change and are
rebuilt from the base model, which keeps a checkpoint at the size of what is trained.
"""

from __future__ import annotations

import torch

from training.methods.base import Phase


class ModuleState:
    """The checkpointed tensors of ``modules`` given the method's ``phases``."""

    def __init__(self, modules: dict[str, torch.nn.Module], phases: list[Phase]) -> None:
        self.modules = modules
        names = [p.name for p in phases]
        if len(set(names)) != len(names):
            raise ValueError(f"phase names must be unique; got {names}.")
        trainable = {id(p): p for phase in phases for p in phase.parameters()}
        self.keys: dict[str, list[str]] = {}
        found: set[int] = set()
        for module_name, module in modules.items():
            persistent = set(module.state_dict(keep_vars=True))
            params = [n for n, p in module.named_parameters() if id(p) in trainable]
            found.update(id(p) for n, p in module.named_parameters() if id(p) in trainable)
            buffers = [n for n, _ in module.named_buffers() if n in persistent]
            self.keys[module_name] = params + buffers
        if len(found) != len(trainable):
            raise ValueError(f"{len(trainable) - len(found)} phase parameters belong to no module of "
                             f"trainable_modules() ({sorted(modules)}); every trained parameter must live in one.")
        self.parameters = list(trainable.values())

    def capture(self) -> dict[str, torch.Tensor]:
        """Detached CPU copies of the checkpointed tensors."""
        out = {}
        for module_name, module in self.modules.items():
            state = module.state_dict(keep_vars=True)
            out.update({f"{module_name}.{k}": state[k].detach().cpu().clone() for k in self.keys[module_name]})
        return out

    @torch.no_grad()
    def restore(self, tensors: dict[str, torch.Tensor], where: str) -> None:
        """Copy ``capture()`` output back in place; the key sets and shapes must match exactly."""
        expected = {f"{m}.{k}" for m, keys in self.keys.items() for k in keys}
        missing, unexpected = sorted(expected - set(tensors)), sorted(set(tensors) - expected)
        if missing or unexpected:
            raise ValueError(f"checkpoint {where!r} does not fit this method's trainable modules: {len(missing)} "
                             f"missing (first: {missing[:3]}), {len(unexpected)} unexpected (first: "
                             f"{unexpected[:3]}); it was made with another method or LoRA configuration.")
        for module_name, module in self.modules.items():
            state = module.state_dict(keep_vars=True)
            for key in self.keys[module_name]:
                value = tensors[f"{module_name}.{key}"]
                if value.shape != state[key].shape:
                    raise ValueError(f"checkpoint {where!r}: `{module_name}.{key}` has shape {tuple(value.shape)}, "
                                     f"the model needs {tuple(state[key].shape)}.")
                state[key].copy_(value)

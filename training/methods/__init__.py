"""The registry of training methods: a name (the config's ``method``) -> the module that defines its ``METHOD``.

Modules are imported on first use, so a method whose optional dependencies are missing does not stop the others.
A new method is one entry here (or ``register_method`` at run time) plus a config in ``training/configs/``.
"""

from __future__ import annotations

import importlib

from training.methods.base import Method

_METHODS: dict[str, str | type[Method]] = {
    "osediff": "training.methods.osediff",
    "tadsr": "training.methods.tadsr",
    "idas": "training.methods.idas",
    "codsr_stage1": "training.methods.codsr",
    "codsr_stage2": "training.methods.codsr_stage2",
    "rcod": "training.methods.rcod",
    "rcod_mem": "training.methods.rcod_mem",
}


def register_method(name: str, method: str | type[Method]) -> None:
    """Register a ``Method`` subclass, or the dotted path of a module whose ``METHOD`` is one, under ``name``."""
    if not name or not name.replace("_", "").isalnum():
        raise ValueError(f"method name must be a non-empty identifier such as 'osediff'; got {name!r}.")
    _METHODS[name] = method


def available_methods() -> list[str]:
    """The registered method names, sorted."""
    return sorted(_METHODS)


def method_class(name: str) -> type[Method]:
    """The ``Method`` subclass registered as ``name`` (its module is imported now)."""
    if name not in _METHODS:
        raise KeyError(f"unknown training method {name!r}; registered: {available_methods()}.")
    entry = _METHODS[name]
    if isinstance(entry, str):
        entry = importlib.import_module(entry).METHOD
        _METHODS[name] = entry
    if not (isinstance(entry, type) and issubclass(entry, Method)):
        raise TypeError(f"training method {name!r} is registered as {entry!r}, which is not a Method subclass.")
    return entry

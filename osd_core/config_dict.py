"""Frozen-dataclass configs that round-trip through JSON (a bundle's ``hyperparameters``, a training checkpoint).

``to_dict`` gives JSON-ready values (tuples as lists); ``from_dict`` refuses unknown keys, so a typo fails loudly,
lets missing keys take their defaults, and turns lists back into tuples.
"""

from __future__ import annotations

from dataclasses import fields
from typing import TypeVar

T = TypeVar("T", bound="DictConfig")


class DictConfig:
    """Mixin for ``@dataclass(frozen=True)`` configs."""

    def to_dict(self) -> dict:
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        return {name: list(value) if isinstance(value, tuple) else value for name, value in values.items()}

    @classmethod
    def from_dict(cls: type[T], d: dict) -> T:
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"{cls.__name__} got unknown keys {unknown}; expected a subset of {sorted(names)}.")
        return cls(**{name: tuple(value) if isinstance(value, list) else value for name, value in d.items()})

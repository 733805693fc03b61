"""Frozen dataclass trees from nested dicts (parsed TOML), with type checks, and back (``to_dict``).

``build(cls, data, where)`` reads the field types from ``cls``'s annotations and checks every value before the
dataclass is constructed (its ``__post_init__`` then checks ranges and cross-field rules). Supported field types:
``bool``, ``int``, ``float`` (an integer is accepted), ``str``, ``tuple[X, ...]``, ``tuple[X, Y]``, ``list[X]``,
``dict[str, X]``, ``X | None``, ``Literal[...]``, ``Any`` and nested dataclasses (a sub-table), so any config
dataclass, ours or the loss library's, plugs in without code. Errors are ``ConfigError`` and name the dotted key,
the value received, what was expected, and for an unknown key the closest known one.

``to_dict`` is the inverse: tuples become lists and ``None`` fields are left out (TOML has no null; every field that
may be ``None`` defaults to ``None``), so ``build(cls, to_dict(x)) == x``.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from typing import Any, Literal, Mapping

T = typing.TypeVar("T")


class ConfigError(ValueError):
    """A training config that cannot be used; the message names the key and the fix."""


def suggest(name: str, known: typing.Iterable[str]) -> str:
    """' Did you mean `x`?' for the closest of ``known``, or ''."""
    close = difflib.get_close_matches(name, list(known), n=1, cutoff=0.6)
    return f" Did you mean `{close[0]}`?" if close else ""


def _describe(hint: Any) -> str:
    return getattr(hint, "__name__", None) or str(hint).replace("typing.", "")


def _fail(where: str, value: Any, expected: str) -> ConfigError:
    return ConfigError(f"`{where}` must be {expected}; got {value!r} ({type(value).__name__}).")


def _convert_union(args: tuple, value: Any, where: str) -> Any:
    if value is None and type(None) in args:
        return None
    errors = []
    for arg in (a for a in args if a is not type(None)):
        try:
            return convert(arg, value, where)
        except ConfigError as err:
            errors.append(str(err))
    raise ConfigError(errors[0] if len(errors) == 1 else f"`{where}` matches none of {_describe_union(args)}; "
                      f"got {value!r}.")


def _describe_union(args: tuple) -> str:
    return " | ".join(_describe(a) for a in args)


def _convert_tuple(args: tuple, value: Any, where: str) -> tuple:
    if not isinstance(value, (list, tuple)):
        raise _fail(where, value, "a list")
    if len(args) == 2 and args[1] is Ellipsis:
        return tuple(convert(args[0], v, f"{where}[{i}]") for i, v in enumerate(value))
    if len(value) != len(args):
        raise _fail(where, value, f"a list of {len(args)} values")
    return tuple(convert(a, v, f"{where}[{i}]") for i, (a, v) in enumerate(zip(args, value)))


def _convert_scalar(hint: type, value: Any, where: str) -> Any:
    if hint is bool:
        if not isinstance(value, bool):
            raise _fail(where, value, "true or false")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise _fail(where, value, "an integer")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise _fail(where, value, "a number")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise _fail(where, value, 'a string (in quotes: "...")')
        return value
    if not isinstance(value, hint):
        raise _fail(where, value, f"a {_describe(hint)}")
    return value


def convert(hint: Any, value: Any, where: str) -> Any:
    """``value`` checked against (and converted to) the type ``hint``; ``where`` is its dotted key."""
    if hint is Any or hint is object:
        return value
    if dataclasses.is_dataclass(hint):
        if isinstance(value, hint):
            return value
        if not isinstance(value, Mapping):
            raise _fail(where, value, f"a table of {hint.__name__} settings")
        return build(hint, value, where)
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return _convert_union(args, value, where)
    if origin is Literal:
        if value not in args:
            hint = suggest(str(value), map(str, args))
            raise ConfigError(f"`{where}` must be one of {list(args)}; got {value!r}.{hint}")
        return value
    if origin is tuple:
        return _convert_tuple(args, value, where)
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise _fail(where, value, "a list")
        return [convert(args[0], v, f"{where}[{i}]") for i, v in enumerate(value)] if args else list(value)
    if origin is dict:
        if not isinstance(value, Mapping):
            raise _fail(where, value, "a table")
        value_hint = args[1] if args else Any
        return {str(k): convert(value_hint, v, f"{where}.{k}") for k, v in value.items()}
    return _convert_scalar(hint, value, where)


def build(cls: type[T], data: Mapping[str, Any], where: str) -> T:
    """An instance of the dataclass ``cls`` from ``data``; missing keys take the defaults.

    Raises ConfigError for an unknown key (with the closest known one), a missing required key, a value of the
    wrong type, or a value ``cls.__post_init__`` refuses (its message, prefixed with ``where``).
    """
    if not isinstance(data, Mapping):
        raise _fail(where, data, f"a table of {cls.__name__} settings")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    values = {}
    for key, value in data.items():
        dotted = f"{where}.{key}" if where else key
        if key not in fields:
            raise ConfigError(f"unknown key `{dotted}`.{suggest(key, fields)} Known keys of "
                              f"[{where or 'top level'}]: {', '.join(sorted(fields))}.")
        values[key] = convert(hints[key], value, dotted)
    missing = [name for name, f in fields.items() if name not in values and f.default is dataclasses.MISSING
               and f.default_factory is dataclasses.MISSING]
    if missing:
        raise ConfigError(f"missing key `{where}.{missing[0]}` ({cls.__name__} has no default for it); set it in "
                          f"the config file or as an override {where}.{missing[0]}=...")
    try:
        return cls(**values)
    except (ValueError, TypeError) as err:
        if isinstance(err, ConfigError):
            raise
        raise ConfigError(f"[{where}] {err}") from err


def to_dict(obj: Any) -> Any:
    """A dataclass tree as plain dicts, lists and scalars (``None`` fields dropped), ready for TOML or JSON."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        out = {}
        for f in dataclasses.fields(obj):
            value = getattr(obj, f.name)
            if value is not None:
                out[f.name] = to_dict(value)
        return out
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, Mapping):
        return {str(k): to_dict(v) for k, v in obj.items()}
    return obj

"""Write a dict tree of TOML values (str, bool, int, float, lists, nested dicts) as a TOML document.

The standard library reads TOML (``tomllib``) but does not write it; resolved configs are saved as TOML so a saved
config is itself a valid ``--config`` file. Scalars of a table come first, then its sub-tables as ``[a.b]`` sections;
dicts inside lists become inline tables. Strings use JSON escapes, which are valid TOML basic-string escapes.
"""

from __future__ import annotations

import json
import math
import re
from typing import Any, Mapping

_BARE_KEY = re.compile(r"^[A-Za-z0-9_-]+$")


def _key(key: str) -> str:
    return key if _BARE_KEY.match(key) else json.dumps(key, ensure_ascii=False)


def _value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_value(v) for v in value) + "]"
    if isinstance(value, Mapping):
        return "{" + ", ".join(f"{_key(str(k))} = {_value(v)}" for k, v in value.items()) + "}"
    raise TypeError(f"cannot write a {type(value).__name__} ({value!r}) as TOML; convert it to a plain value.")


def _table(lines: list[str], path: list[str], table: Mapping[str, Any]) -> None:
    scalars = {k: v for k, v in table.items() if not isinstance(v, Mapping)}
    tables = {k: v for k, v in table.items() if isinstance(v, Mapping)}
    if path:
        lines.append("")
        lines.append("[" + ".".join(_key(p) for p in path) + "]")
    lines.extend(f"{_key(str(k))} = {_value(v)}" for k, v in scalars.items())
    for key, sub in tables.items():
        _table(lines, [*path, str(key)], sub)


def dumps(data: Mapping[str, Any]) -> str:
    """A TOML document for ``data``; ``tomllib.loads(dumps(d)) == d`` for TOML-representable ``d``."""
    lines: list[str] = []
    _table(lines, [], data)
    return "\n".join(lines).lstrip("\n") + "\n"

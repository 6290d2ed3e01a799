"""Building a config from a tree of nested dicts: every key checked against its section's
fields (an unknown one names the closest valid key) and every value against its field's type and
range (a bad one names the key, the value and what is allowed); ``ConfigError`` is what a config
that cannot run raises.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import sys
import typing
from typing import Literal

__all__ = ["ConfigError"]


class ConfigError(ValueError):
    """A config that cannot run: the message names the key, the value and what is allowed."""


def _bad(key: str, value, allowed: str) -> str:
    return f"{key} = {value!r} is not allowed: expected {allowed}"


def _check_value(key: str, value, annotation, meta: dict, base_dir: str):
    """``value`` converted to the field's type, or ConfigError naming ``key``."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin is typing.Union or (sys.version_info >= (3, 10) and origin is _union_type()):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _check_value(key, value, inner[0], meta, base_dir)
    if origin is Literal:
        if value not in args:
            raise ConfigError(_bad(key, value, "one of " + ", ".join(repr(a) for a in args)))
        return value
    if origin is list:
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list):
            raise ConfigError(_bad(key, value, "a list"))
        return [
            _check_value(f"{key}[{i}]", v, args[0], meta, base_dir) for i, v in enumerate(value)
        ]
    if annotation is bool:
        if not isinstance(value, bool):
            raise ConfigError(_bad(key, value, "true or false"))
        return value
    if annotation is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(_bad(key, value, "an integer" + _range_text(meta)))
        _check_range(key, value, meta)
        return value
    if annotation is float:
        if (
            isinstance(value, bool)
            or not isinstance(value, (int, float))
            or not math.isfinite(value)
        ):
            raise ConfigError(_bad(key, value, "a finite number" + _range_text(meta)))
        _check_range(key, float(value), meta)
        return float(value)
    if annotation is str:
        if not isinstance(value, str):
            raise ConfigError(_bad(key, value, "a string"))
        if meta.get("path") and value:
            value = os.path.normpath(os.path.join(base_dir, os.path.expanduser(value)))
        return value
    raise TypeError(f"unsupported config type {annotation!r} of {key}")


def _union_type():
    import types

    return types.UnionType


def _range_text(meta: dict) -> str:
    low, high = meta.get("range", (None, None))
    if low is None and high is None:
        return ""
    if high is None:
        return f" >= {low}"
    opening = "(" if meta.get("low_open") else "["
    return f" in {opening}{low}, {high}{')' if meta.get('high_open') else ']'}"


def _check_range(key: str, value, meta: dict) -> None:
    low, high = meta.get("range", (None, None))
    above = high is not None and (value >= high if meta.get("high_open") else value > high)
    below = low is not None and (value <= low if meta.get("low_open") else value < low)
    if below or above:
        raise ConfigError(_bad(key, value, "a number" + _range_text(meta)))


def _closest(key: str, options: list[str]) -> str | None:
    """The valid key ``key`` most likely meant: one that begins the other (``lr_rate`` ->
    ``lr``), else the closest spelling."""
    prefixed = [o for o in options if key.startswith(o) or o.startswith(key)]
    if prefixed:
        return max(prefixed, key=len)
    close = difflib.get_close_matches(key, options, n=1, cutoff=0.5)
    return close[0] if close else None


def _build(cls, tree, prefix: str, base_dir: str):
    if not isinstance(tree, dict):
        raise ConfigError(
            f"{prefix.rstrip('.') or 'the config'} must be a table of keys; got {tree!r}"
        )
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    values = {}
    for key, value in tree.items():
        full = f"{prefix}{key}"
        if key not in fields:
            close = _closest(str(key), list(fields))
            hint = (
                f"; did you mean {prefix}{close}?"
                if close
                else f"; valid keys: {', '.join(prefix + f for f in fields)}"
            )
            raise ConfigError(f"unknown key {full}{hint}")
        annotation = hints[key]
        if dataclasses.is_dataclass(annotation):
            values[key] = _build(annotation, value, f"{full}.", base_dir)
        else:
            values[key] = _check_value(
                full, value, annotation, dict(fields[key].metadata), base_dir
            )
    return cls(**values)

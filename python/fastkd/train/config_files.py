"""Reading a config: a TOML or YAML file, and ``--set section.key=value`` overrides, each as a
tree of nested dicts, and the merging of the overrides into the file's tree.
"""

from __future__ import annotations

import os
from typing import Any

from .config_build import ConfigError

__all__ = ["parse_overrides"]


def _read_file(path: str) -> dict:
    if not os.path.isfile(path):
        raise ConfigError(f"config file not found: {path}")
    if path.endswith((".yaml", ".yml")):
        try:
            import yaml
        except ImportError as exc:
            raise ConfigError(
                f"{path} is YAML, which needs PyYAML (pip install pyyaml); or "
                f"write the config as TOML"
            ) from exc
        with open(path, encoding="utf-8") as f:
            try:
                tree = yaml.safe_load(f)
            except yaml.YAMLError as exc:
                raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
        return tree or {}
    with open(path, "rb") as f:
        try:
            return _toml().load(f)
        except _toml().TOMLDecodeError as exc:
            raise ConfigError(f"{path}: not valid TOML: {exc}") from exc


def _toml():
    # tomllib is in the standard library from Python 3.11; tomli is the same parser for 3.10.
    try:
        import tomllib
    except ModuleNotFoundError:
        import tomli as tomllib

    return tomllib


def parse_overrides(items: list[str]) -> dict:
    """``["train.lr=1e-3", "data.train=['a.txt']"]`` as a nested dict. A value is read as a
    TOML value where it parses as one (numbers, booleans, strings in quotes, lists), else as a
    bare string."""
    tree: dict = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"--set takes section.key=value; got {item!r}")
        key, text = item.split("=", 1)
        parts = key.strip().split(".")
        if not all(parts):
            raise ConfigError(f"--set {item!r}: empty key part in {key!r}")
        try:
            value: Any = _toml().loads(f"v = {text}")["v"]
        except _toml().TOMLDecodeError:
            value = text
        if text.strip().lower() in ("none", "null"):
            value = None
        node = tree
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--set {item!r}: {part} is a value, not a section")
        node[parts[-1]] = value
    return tree


def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out

"""Dotted config keys (`model.dropout_rate`): the one walker over nested configs and dicts.

Configs (`ml_collections.ConfigDict`) and their JSON form (`config.json`, checkpoint metadata)
are both trees of mappings; every module that names a field by its dotted key goes through here.
Imports nothing heavy, so the sweep grid and experiment files can use it without JAX.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


def _is_node(value: Any) -> bool:
    # ConfigDict is not a Mapping subclass, but has items(); JSON trees are plain dicts.
    return isinstance(value, Mapping) or (hasattr(value, "items") and hasattr(value, "keys"))


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    """{'model.dropout_rate': 0.5, ...}: every leaf of a nested config or dict, by dotted key."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        if _is_node(value):
            flat |= flatten(value, f"{prefix}{key}.")
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def get(tree: Any, key: str, default: Any = KeyError) -> Any:
    """The value at a dotted key; `default` (or KeyError) where any part is missing."""
    node = tree
    for part in key.split("."):
        if not _is_node(node) or part not in node:
            if default is KeyError:
                raise KeyError(key)
            return default
        node = node[part]
    return node


def parent(tree: Any, key: str) -> tuple[Any, str]:
    """(the node that holds a dotted key's leaf, the leaf's name)."""
    *parts, leaf = key.split(".")
    node = tree
    for part in parts:
        node = node[part]
    return node, leaf


def matches(key: str, patterns: tuple[str, ...]) -> bool:
    """Whether `key` is one of `patterns`, or lies under one that ends with a dot ('optim.')."""
    return any(key == p or (p.endswith(".") and key.startswith(p)) for p in patterns)

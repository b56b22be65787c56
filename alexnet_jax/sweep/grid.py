"""Defining a sweep's grid: what experiment files import. No JAX, no TensorFlow, no Orbax.

An experiment file becomes a sweep by defining `sweep(arg=None)`, which returns a list of override
dicts (dotted config keys -> Python values); `axis`, `product` and `zipped` build the usual grids.
`point_name` names each point's sub-workdir.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Sequence
from typing import Any

from alexnet_jax.errors import UsageError

Point = dict[str, Any]

SEED_KEY = "seed"  # repeats of a point, not a point of its own: averaged over in the table


def axis(key: str, values: Sequence[Any]) -> list[Point]:
    """One swept key: [{key: v} for v in values]."""
    return [{key: v} for v in values]


def product(*axes: Sequence[Point]) -> list[Point]:
    """Every combination of the axes' points, the first axis varying slowest."""
    return [_merge(combo) for combo in itertools.product(*axes)]


def zipped(*axes: Sequence[Point]) -> list[Point]:
    """The axes' points side by side (all axes must have the same length)."""
    lengths = {len(a) for a in axes}
    if len(lengths) > 1:
        raise UsageError(f"zipped() needs axes of one length; got lengths {sorted(lengths)}")
    return [_merge(combo) for combo in zip(*axes, strict=True)]


def _merge(points: Sequence[Point]) -> Point:
    merged: Point = {}
    for p in points:
        clash = set(merged) & set(p)
        if clash:
            raise UsageError(f"a sweep sets {sorted(clash)[0]!r} twice in one point")
        merged |= p
    return merged


def override_text(value: Any) -> str:
    """The `--config.KEY=TEXT` form of a value, which `config.apply_overrides` parses back."""
    return value if isinstance(value, str) else repr(value)


def _name_text(value: Any) -> str:
    if isinstance(value, (tuple, list)):
        return "x".join(_name_text(v) for v in value)
    return re.sub(r"[^A-Za-z0-9._+-]", "_", override_text(value))


def point_name(point: Point) -> str:
    """The sub-workdir of a point: 'model.dropout_rate=0.25,model.use_lrn=False'.

    Keys keep the sweep's order; characters other than letters, digits and `._+-` in values
    become `_`, so the name is safe on every filesystem and in a shell.
    """
    if not point:
        return "base"
    return ",".join(f"{k}={_name_text(v)}" for k, v in point.items())


def swept_keys(points: Sequence[Point]) -> list[str]:
    """The keys the points set, in order of first appearance."""
    keys: dict[str, None] = {}
    for p in points:
        keys.update(dict.fromkeys(p))
    return list(keys)

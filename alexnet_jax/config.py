"""Experiment configs: load `EXPERIMENT.py[:ARG]`, apply `--config.KEY=VALUE` overrides, validate.

Every error here is a `UsageError` with a one-line message, which the launcher turns into exit 2.
"""

from __future__ import annotations

import ast
import difflib
import importlib.util
import os
from typing import Any

import ml_collections

from alexnet_jax.errors import UsageError

DATASETS = ("imagenet2012", "folder", "digits", "synthetic")


def split_spec(spec: str) -> tuple[str, str | None]:
    """'experiments/digits.py:ARG' -> ('experiments/digits.py', 'ARG')."""
    path, sep, arg = spec.partition(":")
    return path, (arg if sep else None)


def load_module(path: str) -> Any:
    """Imports an experiment file by path."""
    if not path.endswith(".py") or not os.path.isfile(path):
        raise UsageError(f"experiment file not found: {path}")
    name = "experiment_" + os.path.splitext(os.path.basename(path))[0]
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not hasattr(module, "get_config"):
        raise UsageError(f"{path} defines no get_config(arg=None)")
    return module


def load_config(spec: str) -> ml_collections.ConfigDict:
    """Runs `get_config(arg)` of the experiment file that `spec` names."""
    path, arg = split_spec(spec)
    try:
        return load_module(path).get_config(arg)
    except ValueError as e:  # an experiment's way to reject its arg
        raise UsageError(f"{spec}: {e}") from None


def _all_keys(config: ml_collections.ConfigDict, prefix: str = "") -> list[str]:
    keys = []
    for key, value in config.items():
        full = f"{prefix}{key}"
        if isinstance(value, ml_collections.ConfigDict):
            keys.extend(_all_keys(value, full + "."))
        else:
            keys.append(full)
    return keys


def _a(name: str) -> str:
    return f"an {name}" if name[0] in "aeiou" else f"a {name}"


def _parse(text: str, current: Any, key: str) -> Any:
    """Parses `text` as the type of the field's current value."""
    if isinstance(current, bool):
        lowered = text.strip().lower()
        if lowered in ("true", "1", "yes"):
            return True
        if lowered in ("false", "0", "no"):
            return False
        raise UsageError(f"--config.{key} expects true or false, got {text!r}")
    if isinstance(current, str):
        return text
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        raise UsageError(
            f"--config.{key} expects {_a(type(current).__name__)}, got {text!r}"
        ) from None
    if isinstance(current, float) and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if isinstance(current, tuple) and isinstance(value, (list, int, float)):
        value = tuple(value) if isinstance(value, list) else (value,)
    if current is not None and not isinstance(value, type(current)):
        raise UsageError(f"--config.{key} expects {_a(type(current).__name__)}, got {text!r}")
    return value


def apply_overrides(config: ml_collections.ConfigDict, overrides: dict[str, str]) -> None:
    """Sets `KEY=VALUE` pairs (dotted keys) in place; unknown keys suggest the closest known one."""
    known = _all_keys(config)
    for key, text in overrides.items():
        if key not in known:
            close = difflib.get_close_matches(key, known, n=1, cutoff=0.5)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise UsageError(f"unknown config key {key!r}{hint}")
        *parents, leaf = key.split(".")
        node = config
        for p in parents:
            node = node[p]
        value = _parse(text, node[leaf], key)
        try:
            node[leaf] = value
        except TypeError as e:
            raise UsageError(f"--config.{key}: {e}") from None


def validate(config: ml_collections.ConfigDict, *, num_devices: int) -> None:
    """Checks that the values make sense together, before any data or compilation."""
    if config.dataset not in DATASETS:
        raise UsageError(f"dataset must be one of {', '.join(DATASETS)}; got {config.dataset!r}")
    rate = config.model.dropout_rate
    if not 0.0 <= rate < 1.0:
        raise UsageError(f"model.dropout_rate must be in [0, 1); got {rate}")
    for key in ("batch_size", "eval.batch_size"):
        value = config[key.split(".")[0]] if "." not in key else config.eval.batch_size
        if value <= 0:
            raise UsageError(f"{key} must be positive; got {value}")
        if value % num_devices:
            raise UsageError(
                f"{key}={value} is not divisible by the {num_devices} devices; "
                f"use a multiple of {num_devices}"
            )
    if config.eval.crops not in (1, 10):
        raise UsageError(f"eval.crops must be 1 or 10; got {config.eval.crops}")
    if config.num_train_steps <= 0 and config.num_epochs <= 0:
        raise UsageError("set num_epochs or num_train_steps to a positive number")
    if config.model.groups < 1:
        raise UsageError(f"model.groups must be >= 1; got {config.model.groups}")
    for key in ("log_every_steps", "eval_every_steps", "checkpoint_every_steps"):
        if config[key] < 0:
            raise UsageError(f"{key} must be >= 0 (0 turns it off); got {config[key]}")

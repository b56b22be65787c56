"""Experiment configs: load `EXPERIMENT.py[:ARG]`, apply `--config.KEY=VALUE` overrides, validate.

Every error here is a `UsageError` with a one-line message, which the launcher turns into exit 2.
`validate` checks every choice field against the registry of the module that implements it, and
the network's geometry against the input size, before any data is opened or anything compiles.
"""

from __future__ import annotations

import ast
import difflib
import importlib.util
import inspect
import os
import sys
from collections.abc import Iterable, Sequence
from typing import Any

import ml_collections

from alexnet_jax import keys
from alexnet_jax.errors import UsageError

_MISSING = object()
PRESET_KEY = "model.preset"  # applied before the other overrides: a preset is only a base


def split_spec(spec: str) -> tuple[str, str | None]:
    """'experiments/digits.py:ARG' -> ('experiments/digits.py', 'ARG')."""
    path, sep, arg = spec.partition(":")
    return path, (arg if sep else None)


def load_module(path: str) -> Any:
    """Imports an experiment file by path."""
    if not path.endswith(".py") or not os.path.isfile(path):
        raise UsageError(f"experiment file not found: {path}")
    _import_root(path)
    name = "experiment_" + os.path.splitext(os.path.basename(path))[0]
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:  # a .py file always has one; say so if not
        raise UsageError(f"cannot import {path} as a Python file")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    get_config = getattr(module, "get_config", None)
    if not callable(get_config):
        raise UsageError(f"{path} defines no get_config(arg=None)")
    try:
        inspect.signature(get_config).bind(None)
    except TypeError:
        message = f"{path}: get_config must take one argument: get_config(arg=None)"
        raise UsageError(message) from None
    return module


def _import_root(path: str) -> None:
    """Puts the folder above the experiment's package on sys.path, so that its own imports
    (`from experiments import imagenet`) resolve wherever the command runs from.

    `python launch.py` gets the checkout's root on sys.path for free (the script's folder); the
    installed `alexnet-jax` command and `python -m alexnet_jax.bench` do not, and experiments are
    files passed by path, never installed.
    """
    root = os.path.dirname(os.path.abspath(path))
    while os.path.isfile(os.path.join(root, "__init__.py")):
        root = os.path.dirname(root)
    if root not in sys.path:
        sys.path.insert(0, root)


def load_config(spec: str) -> ml_collections.ConfigDict:
    """Runs `get_config(arg)` of the experiment file that `spec` names."""
    path, arg = split_spec(spec)
    try:
        config = load_module(path).get_config(arg)
    except (ValueError, KeyError) as e:  # an experiment's way to reject its arg
        raise UsageError(f"{spec}: {e}") from None
    if not isinstance(config, ml_collections.ConfigDict):
        raise UsageError(
            f"{path}: get_config returned {type(config).__name__}, not an ml_collections.ConfigDict"
        )
    return config


def split_overrides(argv: Iterable[str]) -> tuple[list[str], dict[str, str]]:
    """(the other arguments, {KEY: VALUE}) from `--config.KEY=VALUE` or `--config.KEY VALUE`."""
    overrides: dict[str, str] = {}
    rest: list[str] = []
    argv = list(argv)
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg.startswith("--config."):
            key, sep, value = arg[len("--config.") :].partition("=")
            if not sep:
                if i + 1 >= len(argv):
                    raise UsageError(f"{arg} needs a value: --config.{key}=VALUE")
                i += 1
                value = argv[i]
            overrides[key] = value
        else:
            rest.append(arg)
        i += 1
    return rest, overrides


def resolve(spec: str, overrides: dict[str, str]) -> ml_collections.ConfigDict:
    """`get_config(arg)` of the experiment, then the command line's overrides."""
    config = load_config(spec)
    apply_overrides(config, overrides)
    return config


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
    """Sets `KEY=VALUE` pairs (dotted keys) in place; unknown keys suggest the closest known one.

    `model.preset` goes first and writes its architecture into the config, so that every other
    override applies on top of it (a preset is a base, never a reason to drop an override).
    """
    known = list(keys.flatten(config))
    ordered = sorted(overrides.items(), key=lambda kv: kv[0] != PRESET_KEY)
    for key, text in ordered:
        if key not in known:
            raise UsageError(f"unknown config key {key!r}{_suggest(key, known)}")
        node, leaf = keys.parent(config, key)
        value = _parse(text, node[leaf], key)
        if key == PRESET_KEY:
            from alexnet_jax.model import PRESETS, apply_preset

            check_choice(key, value, PRESETS)
            apply_preset(config.model, value)
            continue
        try:
            node[leaf] = value
        except TypeError as e:
            raise UsageError(f"--config.{key}: {e}") from None


def _suggest(value: str, choices: Iterable[str]) -> str:
    close = difflib.get_close_matches(value, [str(c) for c in choices], n=1, cutoff=0.5)
    return f"; did you mean {close[0]!r}?" if close else ""


def check_choice(key: str, value: Any, choices: Iterable[Any]) -> None:
    """UsageError naming the key, the value, the allowed ones and the closest match."""
    choices = list(choices)
    if value not in choices:
        allowed = ", ".join(repr(c) for c in choices)
        hint = _suggest(value, choices) if isinstance(value, str) else ""
        raise UsageError(f"{key} must be one of {allowed}; got {value!r}{hint}")


def validate(config: ml_collections.ConfigDict, *, num_devices: int) -> None:
    """Checks every choice and how the values fit together, before any data or compilation."""
    _check_choices(config)
    _check_ranges(config)
    _check_batches(config, num_devices)
    from alexnet_jax import model_parallel
    from alexnet_jax.layers import check_kernels
    from alexnet_jax.model import check_geometry

    problem = check_geometry(config.model, config.data.image_size)
    problem = problem or check_kernels(config.model.kernels)
    problem = problem or model_parallel.check(config, num_devices)
    if problem:
        raise UsageError(problem)


def choice_registries() -> dict[str, Sequence[Any]]:
    """Each choice field and the registry that holds its allowed values."""
    from alexnet_jax import data, optim, parallel
    from alexnet_jax.data import base, leakage
    from alexnet_jax.layers import KERNELS
    from alexnet_jax.model import DROPOUT_MASKS, DTYPES, INIT_SCHEMES, PRESETS

    return {
        "dataset": list(data.DATASETS),
        "model.preset": list(PRESETS),
        "model.init": list(INIT_SCHEMES),
        "model.dtype": list(DTYPES),
        "model.kernels": list(KERNELS),
        "model.dropout_masks": list(DROPOUT_MASKS),
        "optim.update_rule": list(optim.UPDATE_RULES),
        "optim.schedule": list(optim.SCHEDULES),
        "parallel.mode": list(parallel.PLANS),
        "data.mean_mode": list(base.MEAN_MODES),
        "data.pca_scale": list(base.PCA_SCALES),
        "data.augment_on": list(base.AUGMENT_ON),
        "data.prepare_storage": list(base.PREPARED_STORAGE),
        "data.prepared_file_format": list(base.PREPARED_FILE_FORMATS),
        "data.folder_scan": list(base.FOLDER_SCANS),
        "data.on_leakage": list(leakage.ON_LEAKAGE_CHOICES),
        "eval.crops": [1, 10],
    }


def _check_choices(config: ml_collections.ConfigDict) -> None:
    from alexnet_jax import data
    from alexnet_jax.model import preset_applied

    for key, choices in choice_registries().items():
        value = keys.get(config, key, _MISSING)
        if value is not _MISSING:  # an experiment file may leave out a block it does not use
            check_choice(key, value, choices)
    if not preset_applied(config.model):
        raise UsageError(
            f"model.preset={config.model.preset!r} is set but its architecture is not: set it "
            "with --config.model.preset or alexnet_jax.model.apply_preset in the experiment file"
        )
    if config.eval.crops == 10 and not data.DATASETS[config.dataset].ten_crops:
        raise UsageError(f"eval.crops=10: dataset {config.dataset!r} evaluates centre crops only")


def _check_ranges(config: ml_collections.ConfigDict) -> None:
    rate = config.model.dropout_rate
    if not 0.0 <= rate < 1.0:
        raise UsageError(f"model.dropout_rate must be in [0, 1); got {rate}")
    positive = ["optim.learning_rate", "data.image_size", "model.dense_features"]
    at_least = {"seed": 0, "keep_checkpoints": 1, "model.groups": 1, "model.num_classes": 1}
    for key in ("log_every_steps", "eval_every_steps", "checkpoint_every_steps", "profile_steps"):
        at_least[key] = 0  # 0 turns it off
    for key in positive:
        if keys.get(config, key, 1) <= 0:
            raise UsageError(f"{key} must be positive; got {keys.get(config, key)}")
    for key, low in at_least.items():
        value = keys.get(config, key, low)
        if value < low:
            off = " (0 turns it off)" if low == 0 else ""
            raise UsageError(f"{key} must be >= {low}{off}; got {value}")
    if config.num_train_steps <= 0 and config.num_epochs <= 0:
        raise UsageError("set num_epochs or num_train_steps to a positive number")
    d = config.data
    if d.get("resize_size", d.image_size) < d.image_size:
        raise UsageError(
            f"data.resize_size={d.resize_size} is smaller than data.image_size={d.image_size}: "
            "the crops are cut from the resized image"
        )
    quality = d.get("prepare_quality", 90)
    if not 1 <= quality <= 100:
        raise UsageError(f"data.prepare_quality must be in [1, 100]; got {quality}")
    fractions = {k: d[k] for k in ("val_fraction", "test_fraction") if k in d}
    for key, value in fractions.items():
        if not 0.0 <= value < 1.0:
            raise UsageError(f"data.{key} must be in [0, 1); got {value}")
    if sum(fractions.values()) >= 1.0:
        raise UsageError(
            f"data.val_fraction + data.test_fraction = {sum(fractions.values()):g} leaves no "
            "training examples; keep the sum below 1"
        )


def _check_batches(config: ml_collections.ConfigDict, num_devices: int) -> None:
    for key in ("batch_size", "eval.batch_size"):
        value = keys.get(config, key)
        if value <= 0:
            raise UsageError(f"{key} must be positive; got {value}")
        if value % num_devices:
            raise UsageError(
                f"{key}={value} is not divisible by the {num_devices} devices; "
                f"use a multiple of {num_devices}"
            )

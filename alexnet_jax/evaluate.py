"""The modes that score a trained workdir: `--mode eval` (validation) and `--mode test`.

- Crops: `eval.crops=1` scores the centre crop; `eval.crops=10` the paper's ten views (four
  corners and the centre, and their mirrors) with the softmax averaged (section 4.1). The
  sources make the views; `steps.eval_step` averages them. Every score says its protocol.
- Exact counting: sources pad the last batch and mask the padding (`data.base`), and processes
  with fewer examples add fully masked batches, so every example counts exactly once.
- The same data: a workdir is scored only under the config it was trained with, up to what
  `compat.POLICIES['evaluate']` allows (the protocol, data locations, training-only fields).
- Test once: `records` keeps the ledger; a second `--mode test` needs `--force_test`.
"""

from __future__ import annotations

import os
import sys
from typing import Any

import ml_collections

from alexnet_jax import checkpoint, compat, model_parallel, records, steps, workdir
from alexnet_jax.data import make_source
from alexnet_jax.data.device_augment import make_preprocess
from alexnet_jax.errors import UsageError
from alexnet_jax.metrics import MetricWriter
from alexnet_jax.model import from_config

CHECKPOINT_CHOICES = "'latest', 'best' or a step number"


def open_checkpoints(path: str) -> checkpoint.Checkpointer:
    """The workdir's Checkpointer; a UsageError when it has no checkpoint (nothing is created)."""
    directory = workdir.path(path, workdir.CHECKPOINTS)
    if os.path.isdir(directory):
        ckpt = checkpoint.Checkpointer(path)
        if ckpt.all_steps():
            return ckpt
        ckpt.close()
    raise UsageError(f"no checkpoint in {directory}: train first")


def choose_step(ckpt: checkpoint.Checkpointer, which: str, path: str) -> tuple[int, str]:
    """(step, label) of the checkpoint that `which` names: latest, best (validation) or a step."""
    kept = ckpt.all_steps()
    if which == "latest":
        return max(kept), "latest"
    if which == "best":
        best = ckpt.best_step()  # the lowest validation top-1 error saved with a checkpoint
        if best is None:  # else the training run's val lines at the kept steps
            line = records.best_val(path, kept)
            best = None if line is None else int(line["step"])
        if best is None:
            raise UsageError(
                f"none of the kept checkpoints {kept} has a validation result; "
                "use --checkpoint latest"
            )
        return best, "best"
    if which.isdigit() and int(which) in kept:
        return int(which), which
    raise UsageError(f"--checkpoint must be {CHECKPOINT_CHOICES}; kept steps: {kept}")


def load_params(
    config: ml_collections.ConfigDict,
    path: str,
    which: str = "latest",
    image_shape: tuple[int, int, int] | None = None,
) -> tuple[int, Any, str]:
    """(step, host params, label) of a workdir's checkpoint, restored through the TrainState."""
    size = config.data.image_size
    shape = image_shape or (size, size, 3)
    ckpt = open_checkpoints(path)
    step = None
    try:
        step, label = choose_step(ckpt, which, path)
        compat.require_same(
            ckpt.restore_meta(step)["config"],
            config,
            "evaluate",
            f"{path} was trained with another model or data",
            f"give the training run's experiment and --config overrides ({path}/config.json "
            "lists them all)",
        )
        # The structure only: nothing is initialised, the checkpoint fills in the values.
        state = ckpt.restore(steps.abstract_state(config, shape), step)
    except checkpoint.DamagedCheckpoint as e:
        raise UsageError(
            f"{path}: {e}; choose another with --checkpoint (kept: {ckpt.all_steps()}), or give "
            "the training run's --config overrides if it was trained with others"
        ) from None
    finally:
        ckpt.close()
    return step, state.params, label


def score(
    config: ml_collections.ConfigDict,
    source: Any,
    params: Any,
    split: str,
    *,
    return_confusion: bool = False,
) -> Any:
    """`steps.evaluate` (padded, masked, exact) with the eval step alone."""
    device = make_preprocess(source.info.device_augment, config.seed, config.eval.crops)
    run = steps.eval_steps(from_config(config.model), model_parallel.mode_of(config), device)
    placed = run.plan.put_state(params)
    try:
        return steps.evaluate(run, placed, source, split, config, return_confusion=return_confusion)
    except ValueError as e:  # e.g. a source without 10-crop views
        raise UsageError(str(e)) from None


def _writer(path: str) -> MetricWriter:
    return MetricWriter(path, enabled=workdir.is_primary())  # appends; keeps the log whole


def run_eval(
    config: ml_collections.ConfigDict, path: str, *, checkpoint: str = "latest"
) -> dict[str, Any]:
    """Scores the validation split; appends a `val` line with `mode: eval` to metrics.jsonl."""
    source = make_source(config)
    step, params, label = load_params(config, path, checkpoint, source.info.image_shape)
    metrics = score(config, source, params, "val")
    if workdir.is_primary():
        print(records.describe(step, "val", metrics) + f"  [{label} checkpoint]", flush=True)
    try:  # the result is printed first: a read-only copy of a run can still be scored
        writer = _writer(path)
        writer.write(step, "val", {**metrics, "mode": "eval", "checkpoint": label})
        writer.close()
    except OSError as e:
        print(f"warning: the result was not logged in {path} ({e.strerror})", file=sys.stderr)
    return metrics


def run_test(
    config: ml_collections.ConfigDict,
    path: str,
    *,
    force: bool = False,
    checkpoint: str = "latest",
) -> dict[str, Any]:
    """Scores the test split once per workdir (again only with `force`), and records it."""
    records.check_test_allowed(path, force)
    source = make_source(config)
    step, params, label = load_params(config, path, checkpoint, source.info.image_shape)
    metrics, confusion = score(config, source, params, "test", return_confusion=True)
    records.test_report(metrics, confusion, path, source.info.class_names)
    writer = _writer(path)
    records.record_test(
        path,
        step,
        metrics,
        config,
        mode="test",
        checkpoint=label,
        forced=force and bool(records.test_history(path)),
        writer=writer,
    )
    writer.close()
    if workdir.is_primary():
        print(records.describe(step, "test", metrics) + f"  [{label} checkpoint]", flush=True)
        print(f"Recorded in {workdir.path(path, workdir.LEDGER)}.", flush=True)
    return metrics

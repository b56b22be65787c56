"""Orbax checkpoints in `<workdir>/checkpoints`: save, keep, auto-resume, refuse changed configs.

A checkpoint holds two items: `state` (the TrainState: parameters, optimiser state with its
injected learning rate, the plateau schedule's state and the step) and `meta` (JSON: the config,
the seed that every PRNG key is folded from, and the input pipeline's position). The sources
make the data order a function of the step, so the position *is* the step; it is stored
explicitly so that a source with its own iterator state can add to it.

Orbax writes each step into a temporary directory and renames it when complete, so a run killed
in the middle of a save leaves the previous checkpoint as the latest one: a half-written
checkpoint is never loaded.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
from collections.abc import Callable, Iterator
from typing import Any

import ml_collections
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as policies

from alexnet_jax.errors import UsageError

# Keys that may differ on resume: they cannot change the numbers a run produces (logging and
# saving intervals, where the data lives), or they extend the run (the "may be extended").
HARMLESS_CHANGES = (
    "log_every_steps",
    "checkpoint_every_steps",
    "keep_checkpoints",
    "eval.batch_size",
    "data.data_dir",
    "data.manual_dir",
)
RESUMABLE_CHANGES = (*HARMLESS_CHANGES, "num_train_steps", "num_epochs")


def _val_error(metrics: dict[str, float]) -> float:
    return metrics["val_top1_error"]


class Checkpointer:
    """The run's CheckpointManager: keeps the latest `keep` checkpoints and the best one."""

    def __init__(self, workdir: str, *, keep: int = 3):
        self.directory = os.path.abspath(os.path.join(workdir, "checkpoints"))
        # The best checkpoint by validation top-1 error survives even when it is older than the
        # latest `keep` (model selection uses validation, never test).
        preservation = policies.AnyPreservationPolicy(
            [
                policies.LatestN(n=keep),
                policies.BestN(
                    get_metric_fn=_val_error,
                    reverse=True,  # BestN keeps the end of the sorted list: lowest error last
                    n=1,
                    keep_checkpoints_without_metrics=False,
                ),
            ]
        )
        self._manager = ocp.CheckpointManager(
            self.directory,
            item_names=("state", "meta"),
            options=ocp.CheckpointManagerOptions(
                preservation_policy=preservation,
                # Orbax stores the metrics on disk only when best_fn is set; without them a
                # reopened manager (a resumed run) would no longer know the best checkpoint.
                best_fn=_val_error,
                best_mode="min",
                create=True,
            ),
        )

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        """The steps of the kept checkpoints, ascending."""
        return sorted(self._manager.all_steps())

    def best_step(self) -> int | None:
        """The kept checkpoint with the lowest validation top-1 error (None if none has one)."""
        scored = [
            (info.metrics["val_top1_error"], info.step)
            for info in self._manager._checkpoints
            if info.metrics and "val_top1_error" in info.metrics
        ]
        return min(scored)[1] if scored else None

    def save(
        self, step: int, state: Any, meta: dict[str, Any], val_top1_error: float | None = None
    ) -> None:
        """Saves a host-side (unreplicated) state; returns once the write is under way (async)."""
        metrics = None if val_top1_error is None else {"val_top1_error": float(val_top1_error)}
        self._manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)
            ),
            metrics=metrics,
            force=True,
        )

    def restore(self, abstract_state: Any, step: int | None = None) -> Any:
        """Restores `step` (default: the latest) into the structure of `abstract_state`."""
        step = self._manager.latest_step() if step is None else step
        restored = self._manager.restore(
            step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state))
        )
        return restored["state"]

    def restore_meta(self, step: int | None = None) -> dict[str, Any]:
        step = self._manager.latest_step() if step is None else step
        restored = self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
        return restored["meta"]

    def wait(self) -> None:
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()


def make_meta(config: ml_collections.ConfigDict, step: int) -> dict[str, Any]:
    return {
        "config": json.loads(config.to_json_best_effort()),
        "seed": config.seed,  # every PRNG key is folded from it and the step
        "data_position": step,  # the sources' order is a function of the step
    }


def _flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat |= _flatten(value, f"{prefix}{key}.")
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def config_changes(
    saved: dict[str, Any],
    config: ml_collections.ConfigDict,
    allowed: tuple[str, ...] = RESUMABLE_CHANGES,
) -> list[str]:
    """'key: old -> new' for every result-changing difference between two configs.

    Only keys that both configs have are compared: a field added to the code since the run
    started defaults to the old behaviour, and must not lock old workdirs.
    """
    old = _flatten(saved)
    new = _flatten(json.loads(config.to_json_best_effort()))
    return [
        f"{key}: {old[key]!r} -> {new[key]!r}"
        for key in sorted(old.keys() & new.keys())
        if old[key] != new[key] and key not in allowed
    ]


def resume(
    ckpt: Checkpointer, state: Any, config: ml_collections.ConfigDict, workdir: str
) -> tuple[int, Any]:
    """(step, state) from the latest checkpoint, or (0, `state`) for a new run.

    Refuses (UsageError, exit 2) a resume whose config differs in a result-changing key: a
    run that silently continued under other hyper-parameters would poison every ablation.
    """
    step = ckpt.latest_step()
    if step is None:
        return 0, state
    changes = config_changes(ckpt.restore_meta(step)["config"], config)
    if changes:
        raise UsageError(
            f"{workdir} holds a run with a different config; refusing to resume it "
            f"({'; '.join(changes)}). Use another --workdir or the original config."
        )
    return step, ckpt.restore(state, step)


@contextlib.contextmanager
def sigterm_requested() -> Iterator[Callable[[int], bool]]:
    """Within the block, SIGTERM sets a flag instead of killing the process.

    Schedulers (SLURM, Kubernetes, Cloud TPU maintenance) send SIGTERM before they kill; the
    loop asks `requested(step)` once after each step, saves, and exits cleanly.

    In a multi-process run every process must stop at the same step (each step and each save is
    collective), but SIGTERM reaches them at different steps, or reaches only one. There JAX's
    preemption service, which catches SIGTERM itself once jax.distributed is initialised, picks
    a step that every process reaches, and `requested(step)` is true at that step on all of them.
    """
    from jax.experimental import multihost_utils

    if _preemption_service():
        yield multihost_utils.reached_preemption_sync_point
        return
    received = []
    try:
        previous = signal.signal(signal.SIGTERM, lambda *_: received.append(True))
    except ValueError:  # not the main thread (e.g. a sweep in a worker): no handler
        yield lambda step: False
        return
    try:
        yield lambda step: bool(received)
    finally:
        signal.signal(signal.SIGTERM, previous)


def _preemption_service() -> bool:
    """Whether this is a multi-process run with JAX's preemption service listening for SIGTERM."""
    import jax
    from jax._src import distributed  # the state multihost_utils itself reads

    return jax.process_count() > 1 and distributed.global_state.preemption_sync_manager is not None

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
import errno
import glob
import hashlib
import json
import os
import shutil
import signal
from collections.abc import Callable, Iterator
from typing import Any

import ml_collections
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as policies

from alexnet_jax import compat, workdir
from alexnet_jax.errors import SaveError, UsageError


def _val_error(metrics: dict[str, float]) -> float:
    return metrics["val_top1_error"]


class Checkpointer:
    """The run's CheckpointManager: keeps the latest `keep` checkpoints and the best one."""

    def __init__(self, workdir_path: str, *, keep: int = 3):
        self.directory = os.path.abspath(os.path.join(workdir_path, workdir.CHECKPOINTS))
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
        return self._manager.best_step()  # best_fn/best_mode rank by validation error

    def save(
        self, step: int, state: Any, meta: dict[str, Any], val_top1_error: float | None = None
    ) -> None:
        """Saves a host-side (unreplicated) state; returns once the write is under way (async).

        The meta holds a digest of every array, checked on restore: TensorStore verifies no
        checksum of its own, and a flipped byte would otherwise load without complaint.
        """
        meta = {**meta, "digests": digests(state)}
        metrics = None if val_top1_error is None else {"val_top1_error": float(val_top1_error)}
        with self._write_faults(step):
            self._save(step, state, meta, metrics)

    def _save(self, step: int, state: Any, meta: dict[str, Any], metrics: Any) -> None:
        self._manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)
            ),
            metrics=metrics,
            force=True,
        )

    def restore(self, abstract_state: Any, step: int | None = None) -> Any:
        """Restores `step` (default: the latest) into the structure of `abstract_state`, and
        verifies it against the digests saved with it (DamagedCheckpoint if any differs)."""
        step = self._manager.latest_step() if step is None else step
        try:
            meta = self.restore_meta(step)
            restored = self._manager.restore(
                step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state))
            )["state"]
        except (UsageError, KeyboardInterrupt):
            raise
        except Exception as e:  # Orbax and TensorStore raise many kinds for damaged files
            raise DamagedCheckpoint(step, _first_line(e)) from None
        saved = meta.get("digests")
        if saved is not None:
            now = digests(restored)
            bad = sorted(k for k in saved if now.get(k) != saved[k])
            if bad:
                raise DamagedCheckpoint(step, f"{bad[0]} does not match its saved digest")
        return restored

    def move_aside(self, steps: list[int], workdir_path: str) -> str | None:
        """Moves damaged checkpoints out of the way (kept, for a look), so that the run can
        write those steps again; returns where they went (None on the other processes).

        Only process 0 moves, and only once every process has stopped reading them (the caller
        agrees on the step to resume from, a collective that each process reaches after its
        own restore); the others wait for the move before their manager reads the directory
        again, or it would still list the moved steps and refuse to save them.
        """
        moved = None
        if workdir.is_primary():
            moved = os.path.join(workdir_path, workdir.DAMAGED)
            os.makedirs(moved, exist_ok=True)
            for step in steps:
                target = os.path.join(moved, str(step))
                if os.path.exists(target):  # damaged before, on an earlier resume
                    target += f".{os.getpid()}"
                os.replace(os.path.join(self.directory, str(step)), target)
        _barrier("alexnet_jax: damaged checkpoints moved aside")
        self._manager.reload()
        return moved

    def restore_meta(self, step: int | None = None) -> dict[str, Any]:
        step = self._manager.latest_step() if step is None else step
        restored = self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
        return restored["meta"]

    def wait(self) -> None:
        with self._write_faults(None):
            self._manager.wait_until_finished()

    def close(self) -> None:
        try:
            self.wait()
        finally:
            self._manager.close()

    @contextlib.contextmanager
    def _write_faults(self, step: int | None) -> Iterator[None]:
        """A failed write (a full disk, found now or by the async save of an earlier step)
        stops the run at once with one line; the partial folder goes, the last one stays."""
        try:
            yield
        except Exception as e:
            if not _is_write_fault(e):
                raise
            for tmp in glob.glob(os.path.join(self.directory, "*.orbax-checkpoint-tmp*")):
                shutil.rmtree(tmp, ignore_errors=True)
            kept = self._manager.latest_step()
            when = "" if step is None else f" by step {step}"
            what = "no space left" if "No space left" in str(e) else _first_line(e)
            raise SaveError(
                f"{what} on the device of {self.directory}: a checkpoint save failed{when}; "
                + (f"checkpoint {kept} is intact" if kept is not None else "no checkpoint yet")
            ) from None


class DamagedCheckpoint(Exception):
    def __init__(self, step: int, reason: str):
        super().__init__(f"checkpoint {step} is damaged ({reason})")
        self.step = step


def _is_write_fault(e: BaseException) -> bool:
    seen: BaseException | None = e
    while seen is not None:  # Orbax wraps the OSError of its writer thread
        if isinstance(seen, OSError) and seen.errno in (errno.ENOSPC, errno.EDQUOT, errno.EROFS):
            return True
        if "No space left on device" in str(seen):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0][:200]}" if text else type(e).__name__


def digests(tree: Any) -> dict[str, str]:
    """path -> blake2b of each array's dtype, shape and bytes (host arrays)."""
    import jax
    import numpy as np

    out = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        a = np.ascontiguousarray(np.asarray(leaf))
        h = hashlib.blake2b(f"{a.dtype}{a.shape}".encode(), digest_size=16)
        h.update(a.tobytes())
        out[jax.tree_util.keystr(path)] = h.hexdigest()
    return out


def make_meta(
    config: ml_collections.ConfigDict, step: int, total_steps: int | None = None
) -> dict[str, Any]:
    return {
        "config": json.loads(config.to_json_best_effort()),
        "total_steps": total_steps,  # what the schedule was stretched over
        "seed": config.seed,  # every PRNG key is folded from it and the step
        "data_position": step,  # the sources' order is a function of the step
    }


def resume(
    ckpt: Checkpointer,
    state: Any,
    config: ml_collections.ConfigDict,
    workdir_path: str,
    total_steps: int | None = None,
) -> tuple[int, Any]:
    """(step, state) from the latest checkpoint, or (0, `state`) for a new run.

    Refuses (UsageError, exit 2) a resume whose config differs in a result-changing key: a
    run that silently continued under other hyper-parameters would poison every ablation. A run
    may be extended, except where the schedule depends on its length (cosine), which a longer
    run would re-stretch from the resumed step on; it may not be shortened below its step.
    """
    steps = sorted(ckpt.all_steps(), reverse=True)
    if not steps:
        return 0, state
    skipped: list[DamagedCheckpoint] = []
    for step in steps:
        restored, damage = None, None
        try:
            meta = ckpt.restore_meta(step)
        except Exception as e:
            damage = DamagedCheckpoint(step, _first_line(e))
        else:
            compat.require_same(
                meta["config"],
                config,
                "resume",
                f"{workdir_path} holds a run with a different config; refusing to resume it",
                "use another --workdir or the original config",
            )
            if total_steps is not None:
                _check_length(meta, config, step, total_steps, workdir_path)
            try:
                restored = ckpt.restore(state, step)
            except DamagedCheckpoint as e:
                damage = e
        damage = _agree(step, damage)
        if damage is None:
            break
        skipped.append(damage)  # newer than the one that restores: damaged, not incompatible
    else:
        raise UsageError(
            f"no checkpoint in {ckpt.directory} can be restored: {'; '.join(map(str, skipped))}"
        )
    if skipped:
        moved = ckpt.move_aside([bad.step for bad in skipped], workdir_path)
        where = f"moved to {moved}" if moved else "moved aside by process 0"
        for bad in skipped:
            print(f"warning: {bad}; resuming from step {step} instead ({where})", flush=True)
    return step, restored


def _agree(step: int, damage: DamagedCheckpoint | None) -> DamagedCheckpoint | None:
    """The verdict of all processes on checkpoint `step`: damaged for every one of them if any
    could not restore it, so that all resume from the same step (a collective)."""
    import jax

    if jax.process_count() == 1:
        return damage
    import numpy as np
    from jax.experimental import multihost_utils

    restored = multihost_utils.process_allgather(np.int32(damage is None))
    if damage is None and not restored.all():
        failed = int(np.argmin(restored))
        damage = DamagedCheckpoint(step, f"it does not restore or verify on process {failed}")
    return damage


def _barrier(name: str) -> None:
    import jax

    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def _check_length(
    meta: dict[str, Any], config: ml_collections.ConfigDict, step: int, total: int, where: str
) -> None:
    if total < step:
        raise UsageError(
            f"{where} is at step {step}, past the {total} steps asked for; a run cannot be "
            "shortened: use another --workdir, or --mode eval/test on this one"
        )
    planned = meta.get("total_steps")
    if planned is not None and planned != total and config.optim.schedule == "cosine":
        raise UsageError(
            f"{where} was planned for {planned} steps with optim.schedule='cosine', whose "
            f"learning rate depends on the run's length: extending it to {total} would not be "
            f"the run a {total}-step plan gives; start a new --workdir with num_train_steps={total}"
        )


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

    return (
        jax.process_count() > 1
        and jax.distributed.is_initialized()
        # Every flag is an attribute of jax.config at run time (JAX's documented way to read
        # one); the type stubs list none of them.
        and bool(jax.config.jax_enable_preemption_service)  # type: ignore[attr-defined]
    )

"""The training loop: steps, logging, validation, checkpoints, and the one final test.

What a step computes is `steps.py`'s; where it runs is the parallel plan's (`steps.plan`): this
loop only orders the work and decides when to wait for the devices.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable
from typing import Any

import jax
import ml_collections
import numpy as np

from alexnet_jax import checkpoint, optim, records, workdir
from alexnet_jax.data import leakage, make_source
from alexnet_jax.errors import NonFiniteError, Preempted, UsageError
from alexnet_jax.metrics import (
    InputWait,
    MetricWriter,
    Progress,
    Throughput,
    flatten_table,
    format_layer_table,
    layer_norms,
)
from alexnet_jax.steps import TrainState, build, dropout_base_key, evaluate

Array = jax.Array


def _every(step: int, interval: int) -> bool:
    return interval > 0 and step % interval == 0


def train_and_evaluate(config: ml_collections.ConfigDict, path: str) -> dict[str, Any]:
    """Trains, validates periodically, checkpoints, and evaluates the test split once at the end.

    Running it again on the same workdir resumes from the latest checkpoint and continues
    exactly as an uninterrupted run would. Returns the final train, validation, test metrics.
    """
    primary = workdir.is_primary()
    source = make_source(config)
    os.makedirs(path, exist_ok=True)
    # Before any compilation: a held-out split that copies training examples would inflate
    # every number this run reports (data.on_leakage='refuse' stops here).
    _check_splits(config, source.info)
    leakage.check(source, path, config.data.get("on_leakage", "warn"))
    state, steps, steps_per_epoch, total_steps = build(config, source.info)

    ckpt = checkpoint.Checkpointer(path, keep=config.keep_checkpoints)
    try:
        start, state = checkpoint.resume(ckpt, state, config, path, total_steps)
    except BaseException:
        ckpt.close()
        raise
    if start and primary:
        print(f"Resuming {path} from step {start} of {total_steps}.", flush=True)
    if primary:
        text = config.to_json_best_effort(indent=2, sort_keys=True) + "\n"
        workdir.write_atomic(workdir.path(path, workdir.CONFIG), text)
    writer = MetricWriter(path, enabled=primary, resume_step=start)
    loop = _Loop(config, source, steps, ckpt, writer, steps_per_epoch, total_steps, primary)
    if primary:  # process 0's host only: one trace, in the workdir it writes anyway
        loop.trace = _Trace(workdir.path(path, workdir.PROFILE), config.get("profile_steps", 0))
    t_start = time.time()
    try:
        dstate, step = loop.run(steps.plan.put_state(state), start)
    finally:
        loop.progress.close()
        ckpt.close()

    result: dict[str, Any] = {"train": loop.train_metrics, "val": loop.val_metrics}
    val_metrics = loop.val_metrics
    if not val_metrics:  # resumed after the end: evaluate the restored state again
        val_metrics = evaluate(steps, dstate.params, source, "val", config)
        result["val"] = val_metrics

    # The seed notes' discipline: the test split is evaluated once, after everything is fixed;
    # records.final_test records it in the test ledger (and a rerun does not look again).
    def test_report() -> dict[str, Any]:
        metrics, confusion = evaluate(
            steps, dstate.params, source, "test", config, return_confusion=True
        )
        return records.test_report(metrics, confusion, path, source.info.class_names)

    test_metrics = records.final_test(
        test_report,
        path,
        step,
        config,
        writer,
    )
    writer.close()
    result["test"] = test_metrics
    wall = time.time() - t_start
    if primary:
        print(records.describe(step, "val", val_metrics), flush=True)
        print(records.describe(step, "test", test_metrics), flush=True)
        print(f"Trained {step - start} steps in {wall:.1f} s.", flush=True)
    records.write_summary(path, last_step=step, first_step=start, wall_s=wall, test=test_metrics)
    return result


def _check_splits(config: ml_collections.ConfigDict, info: Any) -> None:
    """Refuses, before anything compiles, a run that could not end: a global batch larger than
    the training split, or no validation or test examples to score at the end."""
    n = info.num_examples
    if config.batch_size > n.get("train", 0):
        raise UsageError(
            f"batch_size={config.batch_size} is larger than the training split "
            f"({n.get('train', 0)} examples)"
        )
    for split in ("val", "test"):
        if n.get(split, 0) == 0:
            raise UsageError(
                f"the {split} split of dataset {config.dataset!r} is empty (or missing); a run "
                f"ends with its {split} evaluation, so it is refused before training"
            )


class _Loop:
    """The step loop and what happens between steps: logging, validation, checkpoints.

    The loop never waits for the devices except at log, eval and save points: each step's
    finiteness flag stays on the device until the next of those (the NaN guard is free).
    """

    def __init__(self, config, source, steps, ckpt, writer, steps_per_epoch, total_steps, primary):
        self.config, self.source, self.steps, self.ckpt, self.writer = (
            config,
            source,
            steps,
            ckpt,
            writer,
        )
        self.steps_per_epoch, self.total_steps = steps_per_epoch, total_steps
        self.progress = Progress(total_steps, enabled=primary)
        self.timer = Throughput(config.batch_size)
        self.train_metrics: dict[str, Any] = {}
        self.val_metrics: dict[str, Any] = {}
        self._unchecked: list[tuple[int, Array]] = []  # (step, finite flag) not yet looked at
        self._last_saved: int | None = None
        self._val_step: int | None = None
        self.trace = _Trace("", 0)  # off unless train_and_evaluate sets one

    def run(self, pstate: TrainState, start: int) -> tuple[TrainState, int]:
        config = self.config
        self.progress.update(start)
        self._last_saved = start or None
        plan = self.steps.plan
        rng = plan.put_state(dropout_base_key(config.seed))
        per_process = plan.per_process_batch(config.batch_size)
        batches = self.source.train_batches(per_process, seed=config.seed, start_step=start)
        step = start
        self.input = InputWait(plan.prefetch(batches), config.batch_size)
        with checkpoint.sigterm_requested() as sigterm, self.trace:
            for batch in _take(self.input, self.total_steps - start):
                pstate, metrics = self.steps.train(pstate, batch, rng)
                step += 1
                self._unchecked.append((step, metrics["finite"]))
                if step == start + 1:
                    jax.block_until_ready(metrics)
                    self.timer.reset(step)  # the first step compiled; img/s counts from here
                    self.input.take()  # nor does the wait for the first batch count
                self.trace.after_step(step - start, metrics)
                last = step == self.total_steps
                preempted = sigterm(step)  # once per step: multi-process, it is a sync point
                paused = False
                if _every(step, config.log_every_steps) or last:
                    self._log(step, metrics)
                if _every(step, config.eval_every_steps) or last:
                    pstate = self._validate(step, pstate)
                    paused = True
                if _every(step, config.checkpoint_every_steps) or last or preempted:
                    self._save(step, pstate)
                    paused = True
                if preempted:
                    self.ckpt.wait()
                    raise Preempted(
                        f"SIGTERM at step {step}: checkpoint saved; run the same command to resume"
                    )
                if paused:
                    self.timer.reset(step)
                    self.input.take()
        if step < self.total_steps:
            raise RuntimeError(f"the training data ran out at step {step} of {self.total_steps}")
        return pstate, step

    def _check_finite(self) -> None:
        """Raises NonFiniteError naming the first step whose loss or gradient was not finite."""
        if not self._unchecked:
            return
        # Read as the plan reads metrics: a model-parallel flag spans every process's devices.
        flags = [self.steps.plan.get_metrics(flag) for _, flag in self._unchecked]
        bad = [s for (s, _), ok in zip(self._unchecked, flags, strict=True) if not np.all(ok)]
        self._unchecked = []
        if bad:
            self.ckpt.wait()
            kept = f"step {self._last_saved}" if self._last_saved else "none yet"
            raise NonFiniteError(
                f"non-finite loss or gradient at step {bad[0]}; training stopped. "
                f"Last good checkpoint: {kept} (in {self.ckpt.directory})."
            )

    def _log(self, step: int, metrics: dict[str, Array]) -> None:
        self._check_finite()
        m = {k: float(v) for k, v in self.steps.plan.get_metrics(metrics).items()}
        del m["finite"]
        ips = self.timer.images_per_sec(step)
        if ips is not None:
            m["images_per_sec"] = ips
        m["epoch"] = step / self.steps_per_epoch
        wait, rate = self.input.take()
        m["input_wait_fraction"], m["input_images_per_sec"] = wait, rate
        self.train_metrics = m
        self.writer.write(step, "train", m)
        self.progress.update(step, loss=m["loss"], lr=m["lr"], img_s=ips or 0.0, input_wait=wait)

    def _validate(self, step: int, pstate: TrainState) -> TrainState:
        self._check_finite()
        self.val_metrics = evaluate(self.steps, pstate.params, self.source, "val", self.config)
        self._val_step = step
        self.writer.write(step, "val", self.val_metrics)
        self.progress.write(records.describe(step, "val", self.val_metrics))
        host = self.steps.plan.get_state(pstate)
        update = optim.last_update(host.opt_state, self.config.optim.update_rule)
        table = layer_norms(host.params, update)
        self.writer.write_scalars(step, "layers", flatten_table(table))
        self.progress.write(format_layer_table(table))
        return self._update_plateau(pstate, host)

    def _update_plateau(self, pstate: TrainState, host: TrainState) -> TrainState:
        """The paper's schedule decides on the validation error; the new lr scale goes back."""
        o = self.config.optim
        if o.schedule != "plateau":
            return pstate
        new = optim.plateau_update(
            host.plateau,
            self.val_metrics["top1_error"],
            patience=o.plateau_patience,
            factor=o.plateau_factor,
            max_drops=o.plateau_max_drops,
            min_delta=o.plateau_min_delta,
        )
        return pstate.replace(plateau=self.steps.plan.put_state(new))

    def _save(self, step: int, pstate: TrainState) -> None:
        self._check_finite()  # never write a checkpoint with NaNs in it
        val = self.val_metrics["top1_error"] if self._val_step == step else None
        host_state = self.steps.plan.get_state(pstate)
        meta = checkpoint.make_meta(self.config, step, self.total_steps)
        self.ckpt.save(step, host_state, meta, val)
        self._last_saved = step


class _Trace:
    """`--config.profile_steps=N`: a jax.profiler trace of the N steps after the first one.

    The first step compiles (seconds to minutes): tracing it would bury the steady-state steps
    that one profiles for. Steps are asynchronous, so the trace ends only after the last traced
    step's result is ready. A context manager, so that an error or the end of the data closes it.
    """

    def __init__(self, directory: str, num_steps: int):
        self.directory, self.num_steps = directory, num_steps
        self.active = False

    def after_step(self, done: int, outputs: Any) -> None:
        """Called after each step with the number of steps this session has run."""
        if self.num_steps <= 0:
            return
        if done == 1:  # the compiled step just finished (the loop waited for it)
            # Perfetto's JSON next to the .xplane.pb: ui.perfetto.dev opens it without TensorBoard.
            jax.profiler.start_trace(self.directory, create_perfetto_trace=True)
            self.active = True
        elif done == 1 + self.num_steps and self.active:
            jax.block_until_ready(outputs)
            self._stop()

    def _stop(self) -> None:
        self.active = False
        jax.profiler.stop_trace()

    def __enter__(self) -> _Trace:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.active:
            self._stop()


def _take(it: Iterable, n: int):
    for i, item in enumerate(it):
        if i >= n:
            return
        yield item

"""Classification metrics, the metric writers (metrics.jsonl + TensorBoard), the per-layer table
and the progress bar."""

from __future__ import annotations

import json
import math
import os
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
import optax

from alexnet_jax import workdir

Array = jax.Array


def cross_entropy(logits: Array, labels: Array) -> Array:
    """Per-example softmax cross-entropy with integer labels."""
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels)


def top_k_error(scores: Array, labels: Array, k: int) -> Array:
    """Per-example 1.0 where the label is not among the k highest scores (ties count as hits)."""
    k = min(k, scores.shape[-1])
    label_score = jnp.take_along_axis(scores, labels[:, None], axis=-1)
    rank = jnp.sum(scores > label_score, axis=-1)  # how many classes beat the label
    return (rank >= k).astype(jnp.float32)


class MetricWriter:
    """Appends to `metrics.jsonl` and TensorBoard; only the primary process writes anything.

    One JSON object per line with at least `step` and `split` (DESIGN.md), so scripts and the
    sweep tables read runs without TensorBoard. Lines are flushed at once: a killed run keeps
    everything it logged.
    """

    def __init__(self, path: str, *, enabled: bool = True, resume_step: int | None = None):
        self.enabled = enabled
        self.path = workdir.path(path, workdir.METRICS)
        self._tb: dict[str, Any] = {}
        self._workdir = path
        if enabled:
            os.makedirs(path, exist_ok=True)
            if resume_step is not None:  # a training run (re)starting at `resume_step`
                self._drop_lines_after(resume_step)

    def _drop_lines_after(self, step: int) -> None:
        """On resume, forget train/val lines of steps that the run is about to redo.

        A run killed after its last checkpoint logged steps that the resumed run repeats
        (identically); dropping them keeps metrics.jsonl the log of one uninterrupted run.
        """
        lines = workdir.read_metrics(self._workdir)
        keep = [m for m in lines if m["split"] not in ("train", "val") or m["step"] <= step]
        if len(keep) != len(lines):
            text = "".join(json.dumps(m) + "\n" for m in keep)
            workdir.write_atomic(self.path, text)  # a SIGKILL here keeps the old log whole

    def write(self, step: int, split: str, metrics: dict[str, Any]) -> None:
        if not self.enabled:
            return
        clean = {k: _to_python(v) for k, v in metrics.items()}
        workdir.append_jsonl(self.path, {"step": int(step), "split": split, **clean})
        self._tensorboard(step, split, clean)

    def write_scalars(self, step: int, split: str, scalars: dict[str, float]) -> None:
        """TensorBoard only: per-layer diagnostics that would crowd metrics.jsonl."""
        if self.enabled:
            self._tensorboard(step, split, scalars)

    def _tensorboard(self, step: int, split: str, metrics: dict[str, Any]) -> None:
        # tensorboardX writes the same event files as tf.summary without importing TensorFlow,
        # which would add seconds to the start of every digits run.
        if split not in self._tb:
            from tensorboardX import SummaryWriter

            self._tb[split] = SummaryWriter(os.path.join(self._workdir, workdir.TENSORBOARD, split))
        for key, value in metrics.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                self._tb[split].add_scalar(key, value, int(step))
        self._tb[split].flush()

    def close(self) -> None:
        for writer in self._tb.values():
            writer.close()


def write_hparams(directory: str, hparams: dict[str, Any], metrics: dict[str, Any]) -> None:
    """One TensorBoard HParams session in `directory`: the run's settings and final metrics.

    TensorBoard's HParams view (`tensorboard --logdir SWEEP_WORKDIR`) lists every directory that
    holds such a session as one row, so a sweep compares there point by point. Values it cannot
    show (tuples, None) go in as their text; metrics that are not numbers are left out.
    """
    from tensorboardX import SummaryWriter
    from tensorboardX.summary import hparams as hparams_summary

    shown = {k: v if isinstance(v, (bool, int, float, str)) else str(v) for k, v in hparams.items()}
    numbers = {
        k: float(v)
        for k, v in metrics.items()
        if isinstance(v, (int, float)) and not isinstance(v, bool)
    }
    # What SummaryWriter.add_hparams writes, without the parent writer's extra empty event file.
    with SummaryWriter(directory) as writer:
        for summary in hparams_summary(shown, numbers):
            writer.file_writer.add_summary(summary)
        for key, value in numbers.items():
            writer.add_scalar(key, value)


def _to_python(value: Any) -> Any:
    if hasattr(value, "item") and getattr(value, "ndim", 0) == 0:
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # JSON has no NaN/inf; keep the line parseable
    return value


def layer_norms(params: Any, update: Any) -> dict[str, dict[str, float]]:
    """Per layer: the weight norm and |last update| / |weight|, as cuda-convnet2 printed them.

    A healthy ratio is around 1e-3 (Karpathy's rule of thumb); far above, the lr is too high
    for that layer; far below, it is not learning. `update` is read from the momentum buffer
    (`optim.last_update`), so this costs no extra work in the step.
    """
    table = {}
    for layer, leaves in params.items():
        w = float(optax.tree.norm(leaves["kernel"]))
        u = float(optax.tree.norm(update[layer]["kernel"]))
        table[layer] = {"weight_norm": w, "update_ratio": u / max(w, 1e-12)}
    return table


def format_layer_table(table: dict[str, dict[str, float]]) -> str:
    lines = [f"{'layer':<8}{'|w|':>12}{'|dw|/|w|':>12}"]
    for layer, row in table.items():
        lines.append(f"{layer:<8}{row['weight_norm']:>12.4g}{row['update_ratio']:>12.3g}")
    return "\n".join(lines)


def flatten_table(table: dict[str, dict[str, float]]) -> dict[str, float]:
    return {f"{layer}/{k}": v for layer, row in table.items() for k, v in row.items()}


class Progress:
    """A one-line terminal progress bar: step, loss, lr, img/s and the ETA."""

    def __init__(self, total: int, initial: int = 0, *, enabled: bool = True):
        self.enabled = enabled
        self._bar = None
        if enabled:
            from tqdm import tqdm

            self._bar = tqdm(
                total=total,
                initial=initial,
                unit="step",
                dynamic_ncols=True,
                file=sys.stderr,
                mininterval=1.0 if sys.stderr.isatty() else 30.0,
            )

    def update(self, step: int, **postfix: float) -> None:
        if self._bar is None:
            return
        wait = postfix.pop("input_wait", None)
        if wait is not None:  # a visible mark when the input, not the devices, sets the pace
            self._bar.set_description("INPUT-BOUND" if wait > INPUT_BOUND else "", refresh=False)
        if postfix:
            self._bar.set_postfix({k: f"{v:.4g}" for k, v in postfix.items()}, refresh=False)
        self._bar.update(step - self._bar.n)  # redraws at most every `mininterval` seconds

    def write(self, message: str) -> None:
        if self._bar is not None:
            self._bar.write(message, file=sys.stderr)
        elif self.enabled:
            print(message, file=sys.stderr)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


INPUT_BOUND = 0.10  # waits above this fraction of wall time mark the progress bar and summary


class InputWait:
    """Time the step loop spends waiting for its next batch, per logging interval.

    Wraps the loop's batch iterator: the time inside `next()` is time the devices had no new
    step queued because the input was late (the host pipeline, the copy to the devices).
    `take()` returns (fraction of wall time waited, images/s the input delivered over the time
    it was waited for: the host's rate when input-bound, an upper bound on what it delivered
    otherwise) since the previous call, and starts a new interval.
    """

    def __init__(self, batches, global_batch: int):
        self._it = iter(batches)
        self._batch = global_batch
        self._waited = 0.0
        self._count = 0
        self._t0 = time.perf_counter()

    def __iter__(self):
        return self

    def __next__(self):
        t = time.perf_counter()
        try:
            return next(self._it)
        finally:
            self._waited += time.perf_counter() - t
            self._count += 1

    def take(self) -> tuple[float, float]:
        now = time.perf_counter()
        wall = max(now - self._t0, 1e-9)
        fraction = min(self._waited / wall, 1.0)
        rate = self._count * self._batch / max(self._waited, 1e-9)
        self._waited, self._count, self._t0 = 0.0, 0, now
        return fraction, rate


class Throughput:
    """Images/s over the steps since the last `reset`, excluding compilation.

    The clock starts at the first `reset`, which the loop calls after the first step has
    finished (it includes compiling) and again after every evaluation or checkpoint.
    """

    def __init__(self, global_batch: int):
        self.global_batch = global_batch
        self._t0: float | None = None
        self._step0 = 0

    def reset(self, step: int) -> None:
        self._t0, self._step0 = time.perf_counter(), step

    def images_per_sec(self, step: int) -> float | None:
        if self._t0 is None or step <= self._step0:
            return None
        return (step - self._step0) * self.global_batch / (time.perf_counter() - self._t0)

"""TrainState, the pure per-device train and eval steps, and the training loop.

The steps are pure functions of their arguments that take `axis_name`; `jax.pmap` is applied in
`make_steps`, not here, so the same functions run under any device count and in tests.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import time
from collections.abc import Callable, Iterable
from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from jax import lax

from alexnet_jax import checkpoint, optim, parallel
from alexnet_jax import evaluate as evaluation
from alexnet_jax.data import DatasetInfo, Source, make_source
from alexnet_jax.errors import NonFiniteError, Preempted, UsageError
from alexnet_jax.metrics import MetricWriter, Progress, Throughput, cross_entropy, top_k_error
from alexnet_jax.model import AlexNet, from_config

Array = jax.Array


@flax.struct.dataclass
class TrainState:
    """Everything that changes during training; with the config it determines the run."""

    step: Array
    params: Any
    opt_state: Any
    plateau: optim.PlateauState


def dropout_key(rng: Array, step: Array, axis_name: str) -> Array:
    """fold_in(fold_in(rng, step), device): same seed and step -> same masks on each device,
    a different step or device -> different masks (DESIGN.md)."""
    return jax.random.fold_in(jax.random.fold_in(rng, step), lax.axis_index(axis_name))


def train_step(
    state: TrainState,
    batch: dict[str, Array],
    rng: Array,
    *,
    model: AlexNet,
    tx: optax.GradientTransformation,
    schedule: optax.Schedule,
    axis_name: str,
) -> tuple[TrainState, dict[str, Array]]:
    """One SGD step on this device's part of the global batch; gradients are `pmean`ed."""
    key = dropout_key(rng, state.step, axis_name)

    def loss_fn(params):
        logits = model.apply({"params": params}, batch["image"], train=True, rngs={"dropout": key})
        return cross_entropy(logits, batch["label"]).mean(), logits

    (loss, logits), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    grads = lax.pmean(grads, axis_name)
    lr = schedule(state.step) * state.plateau.scale
    opt_state = optim.set_learning_rate(state.opt_state, lr)
    updates, opt_state = tx.update(grads, opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = {
        "loss": loss,
        "top1_error": top_k_error(logits, batch["label"], 1).mean(),
        "top5_error": top_k_error(logits, batch["label"], 5).mean(),
    }
    metrics = lax.pmean(metrics, axis_name)
    metrics |= {
        "finite": jnp.isfinite(metrics["loss"]) & jnp.isfinite(optax.global_norm(grads)),
        "lr": lr,
        "grad_norm": optax.global_norm(grads),
        "param_norm": optax.global_norm(params),
    }
    new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state)
    return new_state, metrics


def eval_step(
    params: Any, batch: dict[str, Array], *, model: AlexNet, axis_name: str
) -> dict[str, Array]:
    """Sums of loss and errors over the unmasked examples of the global batch.

    With a crop axis (`image` of shape [B, crops, H, W, C]) the softmax is averaged over the
    crops, as the paper's 10-patch evaluation does (section 4.1).
    """
    images = batch["image"]
    crops = images.shape[1] if images.ndim == 5 else 1
    logits = model.apply({"params": params}, images.reshape((-1, *images.shape[-3:])), train=False)
    probs = jax.nn.softmax(logits).reshape((-1, crops, logits.shape[-1])).mean(axis=1)
    labels, mask = batch["label"], batch["mask"].astype(jnp.float32)
    nll = -jnp.log(jnp.take_along_axis(probs, labels[:, None], axis=-1)[:, 0] + 1e-12)
    sums = {
        "loss": nll * mask,
        "top1_error": top_k_error(probs, labels, 1) * mask,
        "top5_error": top_k_error(probs, labels, 5) * mask,
        "count": mask,
    }
    return lax.psum(jax.tree_util.tree_map(jnp.sum, sums), axis_name)


@dataclasses.dataclass(frozen=True)
class Steps:
    """The pmapped steps of one run."""

    train: Callable[..., tuple[TrainState, dict[str, Array]]]
    eval: Callable[..., dict[str, Array]]


def make_steps(model: AlexNet, tx: optax.GradientTransformation, schedule: optax.Schedule) -> Steps:
    axis = parallel.AXIS
    train = functools.partial(train_step, model=model, tx=tx, schedule=schedule, axis_name=axis)
    evaluate_ = functools.partial(eval_step, model=model, axis_name=axis)
    # The state is donated: its buffers are reused for the new state (one copy of the weights).
    return Steps(
        train=jax.pmap(train, axis_name=axis, donate_argnums=(0,)),
        eval=jax.pmap(evaluate_, axis_name=axis),
    )


def create_state(
    config: ml_collections.ConfigDict, model: AlexNet, image_shape: tuple[int, int, int]
) -> tuple[TrainState, optax.GradientTransformation]:
    """Initial host-side state; parameters come from `seed` alone."""
    init_key = jax.random.fold_in(jax.random.PRNGKey(config.seed), 0)
    x = jnp.zeros((1, *image_shape), jnp.float32)
    params = jax.jit(lambda k: model.init(k, x, train=False)["params"])(init_key)
    tx = optim.make_optimizer(config.optim, params)
    state = TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        opt_state=tx.init(params),
        plateau=optim.plateau_init(),
    )
    return state, tx


def dropout_base_key(seed: int) -> Array:
    """The key every dropout mask is folded from; kept apart from the init key."""
    return jax.random.fold_in(jax.random.PRNGKey(seed), 1)


def evaluate(
    steps: Steps, params: Any, source: Source, split: str, config: ml_collections.ConfigDict
) -> dict[str, float]:
    """Loss, top-1 and top-5 error over every example of `split` exactly once."""
    batch = config.eval.batch_size
    per_process = parallel.per_device_batch(batch) * jax.local_device_count()
    device_totals = None
    for host_batch in parallel.prefetch(
        source.eval_batches(split, per_process, crops=config.eval.crops)
    ):
        sums = steps.eval(params, host_batch)
        # Summed on the devices: no host round trip per batch, one transfer at the end.
        device_totals = sums if device_totals is None else _tree_add(device_totals, sums)
    totals = {k: float(v) for k, v in jax.device_get(parallel.unreplicate(device_totals)).items()}
    count = totals.pop("count", 0.0)
    if count == 0:
        raise UsageError(f"the {split} split is empty")
    return {k: v / count for k, v in totals.items()} | {
        "num_examples": int(count),
        "crops": config.eval.crops,
    }


_tree_add = jax.jit(lambda a, b: jax.tree_util.tree_map(jnp.add, a, b))


def num_train_steps(config: ml_collections.ConfigDict, num_train_examples: int) -> tuple[int, int]:
    """(steps_per_epoch, total steps); `num_train_steps > 0` overrides `num_epochs`."""
    steps_per_epoch = max(num_train_examples // config.batch_size, 1)
    if config.num_train_steps > 0:
        return steps_per_epoch, int(config.num_train_steps)
    return steps_per_epoch, round(config.num_epochs * steps_per_epoch)


def _every(step: int, interval: int) -> bool:
    return interval > 0 and step % interval == 0


def build(
    config: ml_collections.ConfigDict, info: DatasetInfo
) -> tuple[TrainState, Steps, int, int]:
    """The initial host state, the pmapped steps, steps per epoch and total steps of a run."""
    model = from_config(config.model)
    steps_per_epoch, total_steps = num_train_steps(config, info.num_examples["train"])
    schedule = optim.make_schedule(
        config.optim, steps_per_epoch=steps_per_epoch, total_steps=total_steps
    )
    state, tx = create_state(config, model, info.image_shape)
    return state, make_steps(model, tx, schedule), steps_per_epoch, total_steps


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
    """Trains, validates periodically, checkpoints, and evaluates the test split once at the end.

    Running it again on the same workdir resumes from the latest checkpoint and continues
    exactly as an uninterrupted run would. Returns the final train, validation, test metrics.
    """
    primary = jax.process_index() == 0
    source = make_source(config)
    info = source.info
    state, steps, steps_per_epoch, total_steps = build(config, info)

    os.makedirs(workdir, exist_ok=True)
    ckpt = checkpoint.Checkpointer(workdir, keep=config.keep_checkpoints)
    start, state = checkpoint.resume(ckpt, state, config, workdir)
    if start and primary:
        print(f"Resuming {workdir} from step {start} of {total_steps}.", flush=True)
    if primary:
        with open(os.path.join(workdir, "config.json"), "w") as f:
            f.write(config.to_json_best_effort(indent=2, sort_keys=True) + "\n")
    writer = MetricWriter(workdir, enabled=primary, resume_step=start)
    loop = _Loop(config, source, steps, ckpt, writer, steps_per_epoch, total_steps, primary)
    t_start = time.time()
    try:
        pstate, step = loop.run(parallel.replicate(state), start)
    finally:
        loop.progress.close()
        ckpt.close()

    result: dict[str, Any] = {"train": loop.train_metrics, "val": loop.val_metrics}
    val_metrics = loop.val_metrics
    if not val_metrics:  # resumed after the end: evaluate the restored state again
        val_metrics = evaluate(steps, pstate.params, source, "val", config)
        result["val"] = val_metrics
    # The seed notes' discipline: the test split is evaluated once, after everything is fixed;
    # evaluation.final_test records it in the test ledger (and a rerun does not look again).
    test_metrics = evaluation.final_test(
        lambda: evaluate(steps, pstate.params, source, "test", config),
        workdir,
        step,
        config,
        writer,
    )
    writer.close()
    result["test"] = test_metrics
    wall = time.time() - t_start
    if primary:
        print(_format(step, "val", val_metrics), flush=True)
        print(_format(step, "test", test_metrics), flush=True)
        print(f"Trained {step - start} steps in {wall:.1f} s.", flush=True)
    evaluation.write_summary(
        workdir, last_step=step, first_step=start, wall_s=wall, test=test_metrics
    )
    return result


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

    def run(self, pstate: TrainState, start: int) -> tuple[TrainState, int]:
        config = self.config
        self.progress.update(start)
        self._last_saved = start or None
        rng = parallel.replicate(dropout_base_key(config.seed))
        per_process = parallel.per_device_batch(config.batch_size) * jax.local_device_count()
        batches = self.source.train_batches(per_process, seed=config.seed, start_step=start)
        step = start
        with checkpoint.sigterm_requested() as sigterm:
            for batch in _take(parallel.prefetch(batches), self.total_steps - start):
                pstate, metrics = self.steps.train(pstate, batch, rng)
                step += 1
                self._unchecked.append((step, metrics["finite"]))
                if step == start + 1:
                    jax.block_until_ready(metrics)
                    self.timer.reset(step)  # the first step compiled; img/s counts from here
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
        if step < self.total_steps:
            raise RuntimeError(f"the training data ran out at step {step} of {self.total_steps}")
        return pstate, step

    def _check_finite(self) -> None:
        """Raises NonFiniteError naming the first step whose loss or gradient was not finite."""
        if not self._unchecked:
            return
        flags = jax.device_get([flag for _, flag in self._unchecked])
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
        m = {k: float(v) for k, v in jax.device_get(parallel.unreplicate(metrics)).items()}
        del m["finite"]
        ips = self.timer.images_per_sec(step)
        if ips is not None:
            m["images_per_sec"] = ips
        m["epoch"] = step / self.steps_per_epoch
        self.train_metrics = m
        self.writer.write(step, "train", m)
        self.progress.update(step, loss=m["loss"], lr=m["lr"], img_s=ips or 0.0)

    def _validate(self, step: int, pstate: TrainState) -> TrainState:
        self._check_finite()
        self.val_metrics = evaluate(self.steps, pstate.params, self.source, "val", self.config)
        self._val_step = step
        self.writer.write(step, "val", self.val_metrics)
        self.progress.write(_format(step, "val", self.val_metrics))
        table = layer_norms(parallel.unreplicate(pstate), self.config.optim.update_rule)
        self.writer.write_scalars(step, "layers", _flatten_table(table))
        self.progress.write(format_layer_table(table))
        return _update_plateau(pstate, self.val_metrics["top1_error"], self.config.optim)

    def _save(self, step: int, pstate: TrainState) -> None:
        self._check_finite()  # never write a checkpoint with NaNs in it
        val = self.val_metrics["top1_error"] if self._val_step == step else None
        host_state = jax.device_get(parallel.unreplicate(pstate))
        self.ckpt.save(step, host_state, checkpoint.make_meta(self.config, step), val)
        self._last_saved = step


def layer_norms(state: TrainState, update_rule: str) -> dict[str, dict[str, float]]:
    """Per layer: the weight norm and |last update| / |weight|, as cuda-convnet2 printed them.

    A healthy ratio is around 1e-3 (Karpathy's rule of thumb); far above, the lr is too high
    for that layer; far below, it is not learning. The last update is read from the momentum
    buffer, so this costs no extra work in the step.
    """
    update = optim.last_update(state.opt_state, update_rule)
    table = {}
    for layer, leaves in state.params.items():
        w = float(optax.global_norm(leaves["kernel"]))
        u = float(optax.global_norm(update[layer]["kernel"]))
        table[layer] = {"weight_norm": w, "update_ratio": u / max(w, 1e-12)}
    return table


def format_layer_table(table: dict[str, dict[str, float]]) -> str:
    lines = [f"{'layer':<8}{'|w|':>12}{'|dw|/|w|':>12}"]
    for layer, row in table.items():
        lines.append(f"{layer:<8}{row['weight_norm']:>12.4g}{row['update_ratio']:>12.3g}")
    return "\n".join(lines)


def _flatten_table(table: dict[str, dict[str, float]]) -> dict[str, float]:
    return {f"{layer}/{k}": v for layer, row in table.items() for k, v in row.items()}


def _take(it: Iterable, n: int):
    for i, item in enumerate(it):
        if i >= n:
            return
        yield item


def _update_plateau(pstate: TrainState, val_error: float, optim_config) -> TrainState:
    if optim_config.schedule != "plateau":
        return pstate
    plateau = jax.device_get(parallel.unreplicate(pstate.plateau))
    new = optim.plateau_update(
        plateau,
        val_error,
        patience=optim_config.plateau_patience,
        factor=optim_config.plateau_factor,
        max_drops=optim_config.plateau_max_drops,
        min_delta=optim_config.plateau_min_delta,
    )
    return pstate.replace(plateau=parallel.replicate(new))


def _format(step: int, split: str, m: dict[str, Any]) -> str:
    return (
        f"step {step} {split}: loss {m['loss']:.4f}  top-1 error {100 * m['top1_error']:.2f} %  "
        f"top-5 error {100 * m['top5_error']:.2f} %  ({m['num_examples']} examples, "
        f"{m['crops']} crop{'s' if m['crops'] > 1 else ''})"
    )

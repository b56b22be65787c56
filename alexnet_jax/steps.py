"""The training state, the pure steps, the evaluation pass, and where steps meet devices.

`train_step` and `eval_step` are pure functions of their arguments that take `axis_name`; they
run unchanged on one device, under `jax.vmap` in tests, or wrapped for the devices of a parallel
plan. `make_steps` is the one place where that wrapping happens (`WRAPPERS`, by
`parallel.mode`): 'data' wraps them in `jax.pmap`; the model-parallel 'columns' and 'owt' in a
`jax.shard_map` over the plan's mesh, with the model's `Layout` (model_parallel.py) telling the
model where to split and gather. The training loop, the evaluation modes and the checkpoints
see only the plan.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any, cast

import chex
import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from jax import lax
from jax.sharding import PartitionSpec as P

from alexnet_jax import classification, model_parallel, optim
from alexnet_jax.data import DatasetInfo, Source
from alexnet_jax.data.device_augment import (
    EvalPreprocess,
    Preprocess,
    TrainPreprocess,
    make_preprocess,
)
from alexnet_jax.errors import UsageError
from alexnet_jax.metrics import cross_entropy, top_k_error
from alexnet_jax.model import AlexNet, from_config
from alexnet_jax.model_parallel import Layout
from alexnet_jax.parallel import AXIS, MeshPlan, Plan, make_plan

Array = jax.Array


class TrainState(flax.struct.PyTreeNode):
    """Everything that changes during training; with the config it determines the run.

    A PyTreeNode is the same frozen dataclass pytree as `@flax.struct.dataclass`, with a typed
    `replace` that type checkers see.
    """

    step: Array
    params: Any
    opt_state: Any
    plateau: optim.PlateauState


def dropout_base_key(seed: int) -> Array:
    """The key every dropout mask is folded from; kept apart from the init key."""
    return jax.random.fold_in(jax.random.PRNGKey(seed), 1)


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
    preprocess: TrainPreprocess | None = None,
    layout: Layout | None = None,
) -> tuple[TrainState, dict[str, Array]]:
    """One SGD step on this device's part of the global batch.

    `preprocess` (data/device_augment.py) turns the host batch (uint8 images and their global
    slots) into the model's input first, keyed by the step: augmentation is part of the step.

    Without a `layout` (pmap data parallelism) the gradients are `pmean`ed (on more than one
    device). With one (a shard_map step; `model` carries the same layout) each device's loss is
    its examples' mean over the number of devices: the gradient shard_map's autodiff returns for
    a parameter is then the sum over the devices that share it, i.e. already the one-device
    gradient.
    """
    if preprocess is not None:
        batch = preprocess(batch, state.step)
    chex.assert_rank(batch["image"], 4)
    local = batch["image"].shape[0]
    chex.assert_shape(batch["label"], (local,))
    ids = lax.axis_index(axis_name) * local + jnp.arange(local)
    if model.dropout_masks == "device":
        key = dropout_key(rng, state.step, axis_name)
    else:  # masks keyed by global example (model.dropout_masks='example')
        key = jax.random.fold_in(rng, state.step)
    share = 1.0 if layout is None else 1.0 / _device_count(layout)

    def loss_fn(params):
        logits = model.apply(
            {"params": params},
            batch["image"],
            train=True,
            rngs={"dropout": key},
            example_ids=ids,
        )
        if layout is not None:
            logits = layout.own_examples(logits, local)
        loss = cross_entropy(logits, batch["label"]).mean()
        return loss * share, (loss, logits)

    (_, (loss, logits)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    # psum(1) is the axis size, known while tracing. On one device the all-reduce is an identity
    # that XLA still runs as a copy of every gradient (45 ms of a 3.7 s CPU step).
    if layout is None and lax.psum(1, axis_name) > 1:
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
    grad_norm, param_norm = _norm(grads, layout), _norm(params, layout)
    metrics |= {
        "finite": jnp.isfinite(metrics["loss"]) & jnp.isfinite(grad_norm),
        "lr": lr,
        "grad_norm": grad_norm,
        "param_norm": param_norm,
    }
    new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state)
    return new_state, metrics


def _device_count(layout: Layout) -> Array:
    axes = (layout.data_axis, layout.model_axis)
    return lax.psum(1, tuple(dict.fromkeys(axes)))  # the devices of the mesh


def _norm(tree: Any, layout: Layout | None) -> Array:
    """The global norm; a layout's split leaves are summed over their shards."""
    return optax.tree.norm(tree) if layout is None else jnp.sqrt(layout.sq_norm(tree))


def eval_step(
    params: Any,
    batch: dict[str, Array],
    *,
    model: AlexNet,
    axis_name: str,
    preprocess: EvalPreprocess | None = None,
    layout: Layout | None = None,
) -> dict[str, Array]:
    """Sums of loss and errors over the unmasked examples of the global batch.

    With a crop axis (`image` of shape [B, crops, H, W, C]) the softmax is averaged over the
    crops, as the paper's 10-patch evaluation does (section 4.1). The average is taken in log
    space (log-mean-exp of the log-softmax) and the classes are ranked there: float32
    probabilities of a confident or diverged model underflow to 0, and tied zeros would count
    as top-5 hits. `preprocess` cuts the views on the device (see `train_step`).
    """
    if preprocess is not None:
        batch = preprocess(batch)
    images = batch["image"]
    chex.assert_rank(batch["label"], 1)
    chex.assert_equal_shape([batch["label"], batch["mask"]])
    crops = images.shape[1] if images.ndim == 5 else 1
    rows = images.reshape((-1, *images.shape[-3:]))
    logits = cast(Array, model.apply({"params": params}, rows, train=False))  # output alone
    if layout is not None:  # owt: the dense layers saw every device's rows
        logits = layout.own_examples(logits, rows.shape[0])
    log_probs = jax.nn.log_softmax(logits).reshape((-1, crops, logits.shape[-1]))
    scores = jax.nn.logsumexp(log_probs, axis=1) - jnp.log(crops)
    labels, mask = batch["label"], batch["mask"].astype(jnp.float32)
    nll = -jnp.take_along_axis(scores, labels[:, None], axis=-1)[:, 0]
    sums = {
        "loss": nll * mask,
        "top1_error": top_k_error(scores, labels, 1) * mask,
        "top5_error": top_k_error(scores, labels, 5) * mask,
        "count": mask,
    }
    out = jax.tree_util.tree_map(jnp.sum, sums)
    # The final report's precision, recall and F1 come from this matrix: exact masked counts,
    # summed on the devices like the errors (no gathering of predictions on the host).
    out["confusion"] = classification.confusion_counts(scores, labels, mask, scores.shape[-1])
    return lax.psum(out, axis_name)


@dataclasses.dataclass(frozen=True)
class Steps:
    """The steps of one run, wrapped for the devices of `plan` (no train step for evaluation)."""

    plan: Plan
    eval: Callable[..., dict[str, Array]]
    train: Callable[..., tuple[TrainState, dict[str, Array]]] | None = None


def _pmap_steps(plan: Plan, train: Callable | None, evaluate_: Callable) -> tuple[Any, Any]:
    axis = plan.axis_name
    # The state is donated: its buffers are reused for the new state (one copy of the weights).
    wrapped = None if train is None else jax.pmap(train, axis_name=axis, donate_argnums=(0,))
    return wrapped, jax.pmap(evaluate_, axis_name=axis)


def _shard_map_steps(plan: Plan, train: Callable | None, evaluate_: Callable) -> tuple[Any, Any]:
    """Steps over a `MeshPlan`'s mesh: the state split as the layout's specs say (worked out
    from the tree at trace time), the batch over the data axis.

    The metrics and eval sums come back with one copy per model shard (out_specs over the model
    axis) and the plan reads the first: the columns compute them from the same gathered logits,
    and reducing equal numbers over `column` would be traffic that figure 2 does not have.
    """
    assert isinstance(plan, MeshPlan) and plan.layout is not None
    copies = P(plan.layout.model_axis)

    def per_copy(tree: Any) -> Any:
        return jax.tree_util.tree_map(lambda x: x[None], tree)

    def run_train(state: TrainState, batch: dict[str, Array], rng: Array) -> Any:
        assert train is not None
        spec = plan.specs(state)

        def step(*args: Any) -> Any:
            new_state, metrics = train(*args)
            return new_state, per_copy(metrics)

        mapped = jax.shard_map(
            step,
            mesh=plan.mesh,
            in_specs=(spec, P(AXIS), P()),
            out_specs=(spec, copies),
        )
        return mapped(state, batch, rng)

    def run_eval(params: Any, batch: dict[str, Array]) -> Any:
        mapped = jax.shard_map(
            lambda *a: per_copy(evaluate_(*a)),
            mesh=plan.mesh,
            in_specs=(plan.specs(params), P(AXIS)),
            out_specs=copies,
        )
        return mapped(params, batch)

    wrapped = None if train is None else jax.jit(run_train, donate_argnums=(0,))
    return wrapped, jax.jit(run_eval)


# parallel.mode -> (plan, train step or None, eval step) -> the wrapped (train, eval).
WRAPPERS: dict[str, Callable[..., tuple[Any, Any]]] = {
    "data": _pmap_steps,
    "columns": _shard_map_steps,
    "owt": _shard_map_steps,
}


def plan_for(mode: str, model: AlexNet) -> Plan:
    """The plan of `parallel.mode` for this model (a model-parallel one carries its layout)."""
    return make_plan(mode, model_parallel.layout_for(mode, model, jax.device_count()))


def make_steps(
    model: AlexNet,
    plan: Plan,
    tx: optax.GradientTransformation | None = None,
    schedule: optax.Schedule | None = None,
    preprocess: Preprocess | None = None,
) -> Steps:
    """The steps wrapped for `plan`; without an optimiser, only the eval step. `preprocess`
    (device augmentation) runs inside both, so it composes with any wrapper."""
    axis = plan.axis_name
    layout = plan.layout
    model = model.clone(layout=layout)
    train = None
    p_train = p_eval = None
    if preprocess is not None:
        p_train, p_eval = preprocess.train, preprocess.eval
    if tx is not None:
        train = functools.partial(
            train_step,
            model=model,
            tx=tx,
            schedule=schedule,
            axis_name=axis,
            preprocess=p_train,
            layout=layout,
        )
    evaluate_ = functools.partial(
        eval_step, model=model, axis_name=axis, preprocess=p_eval, layout=layout
    )
    wrapped_train, wrapped_eval = WRAPPERS[plan.mode](plan, train, evaluate_)
    return Steps(plan=plan, eval=wrapped_eval, train=wrapped_train)


@functools.cache
def eval_steps(model: AlexNet, mode: str = "data", preprocess: Preprocess | None = None) -> Steps:
    """The eval step alone, for the evaluation modes (compiled once per model, mode and
    device preprocessing)."""
    return make_steps(model, plan_for(mode, model), preprocess=preprocess)


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


def abstract_state(config: ml_collections.ConfigDict, image_shape: tuple[int, int, int]) -> Any:
    """The TrainState's structure, shapes and dtypes, with nothing computed (for restores)."""
    model = from_config(config.model)
    return jax.eval_shape(lambda: create_state(config, model, image_shape)[0])


def evaluate(
    steps: Steps,
    params: Any,
    source: Source,
    split: str,
    config: ml_collections.ConfigDict,
    *,
    return_confusion: bool = False,
) -> Any:
    """Loss, top-1 and top-5 error, accuracy and macro precision, recall and F1 over every
    example of `split` exactly once; with `return_confusion`, (those, the confusion matrix).

    `params` are on the devices (placed by `steps.plan`).
    """
    plan = steps.plan
    per_process = plan.per_process_batch(config.eval.batch_size)
    device_totals = None
    batches = source.eval_batches(split, per_process, crops=config.eval.crops)
    for batch in plan.prefetch(batches):
        sums = steps.eval(params, batch)
        # Summed on the devices: no host round trip per batch, one transfer at the end.
        device_totals = sums if device_totals is None else _tree_add(device_totals, sums)
    if device_totals is None:
        raise UsageError(f"the {split} split is empty")
    totals = plan.get_metrics(device_totals)
    confusion = np.asarray(totals.pop("confusion"))
    totals = {k: float(v) for k, v in totals.items()}
    count = totals.pop("count", 0.0)
    if count == 0:
        raise UsageError(f"the {split} split is empty")
    metrics = {k: v / count for k, v in totals.items()} | {
        "num_examples": int(count),
        "crops": config.eval.crops,
    }
    metrics |= classification.scalars(classification.report(confusion))
    return (metrics, confusion) if return_confusion else metrics


_tree_add = jax.jit(lambda a, b: jax.tree_util.tree_map(jnp.add, a, b))


def num_train_steps(config: ml_collections.ConfigDict, num_train_examples: int) -> tuple[int, int]:
    """(steps_per_epoch, total steps); `num_train_steps > 0` overrides `num_epochs`."""
    steps_per_epoch = max(num_train_examples // config.batch_size, 1)
    if config.num_train_steps > 0:
        return steps_per_epoch, int(config.num_train_steps)
    return steps_per_epoch, round(config.num_epochs * steps_per_epoch)


def build(
    config: ml_collections.ConfigDict, info: DatasetInfo
) -> tuple[TrainState, Steps, int, int]:
    """The initial host state, the wrapped steps, steps per epoch and total steps of a run."""
    model = from_config(config.model)
    steps_per_epoch, total_steps = num_train_steps(config, info.num_examples["train"])
    schedule = optim.make_schedule(
        config.optim, steps_per_epoch=steps_per_epoch, total_steps=total_steps
    )
    state, tx = create_state(config, model, info.image_shape)
    plan = plan_for(model_parallel.mode_of(config), model)
    preprocess = make_preprocess(info.device_augment, config.seed, config.eval.crops)
    return state, make_steps(model, plan, tx, schedule, preprocess), steps_per_epoch, total_steps

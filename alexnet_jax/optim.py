"""The optimiser: the paper's update rule, the weight-decay mask and the learning-rate schedules.

Paper, section 5:  v <- 0.9 v - 0.0005 * lr * w - lr * grad;   w <- w + v.
The learning rate sits *inside* the velocity. `optax.sgd` and `torch.optim.SGD` keep it outside
(v <- m v + g; w <- w - lr v), which differs from the paper right after every lr drop: the old
velocity keeps the old learning rate in the paper's rule. `update_rule='optax_sgd'` gives that.

The learning rate is an injected hyper-parameter, so it lives in the optimiser state (it is
checkpointed with it) and the train step sets it each step to `schedule(step) * plateau.scale`.
The plateau state is a small pytree of arrays updated by a pure function after each validation
evaluation: the whole schedule is reproducible from the checkpointed TrainState.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import optax


def decay_mask(params: Any, *, decay_biases: bool) -> Any:
    """True for the leaves that take weight decay: kernels always, biases only if asked."""
    return jax.tree_util.tree_map(lambda p: decay_biases or p.ndim > 1, params)


def paper_sgd(
    learning_rate: float, momentum: float, weight_decay: float, mask: Any = None
) -> optax.GradientTransformation:
    """v <- momentum * v - lr * (grad + weight_decay * w); the update is v (section 5)."""
    return optax.chain(
        optax.add_decayed_weights(weight_decay, mask),
        optax.scale_by_learning_rate(learning_rate),
        optax.trace(decay=momentum),
    )


def optax_sgd(
    learning_rate: float, momentum: float, weight_decay: float, mask: Any = None
) -> optax.GradientTransformation:
    """The common rule, lr outside the velocity: v <- m v + g + wd w;  w <- w - lr v."""
    return optax.chain(
        optax.add_decayed_weights(weight_decay, mask),
        optax.trace(decay=momentum),
        optax.scale_by_learning_rate(learning_rate),
    )


UPDATE_RULES = {"paper": paper_sgd, "optax_sgd": optax_sgd}


def make_optimizer(
    optim_config: ml_collections.ConfigDict, params: Any
) -> optax.GradientTransformation:
    """The update rule with an injectable `learning_rate` (set by the train step every step)."""
    rule = UPDATE_RULES[optim_config.update_rule]
    mask = decay_mask(params, decay_biases=optim_config.decay_biases)
    return optax.inject_hyperparams(rule, static_args=("momentum", "weight_decay", "mask"))(
        learning_rate=optim_config.learning_rate,
        momentum=optim_config.momentum,
        weight_decay=optim_config.weight_decay,
        mask=mask,
    )


def set_learning_rate(opt_state: Any, lr: jax.Array) -> Any:
    """Returns `opt_state` with its injected learning rate replaced (a pure update)."""
    hyper = dict(opt_state.hyperparams, learning_rate=jnp.asarray(lr, jnp.float32))
    return opt_state._replace(hyperparams=hyper)


def _flat(optim_config: ml_collections.ConfigDict, steps_per_epoch: int, warmup: int, total: int):
    """'plateau' and 'constant': flat here (the plateau drops come from `plateau_update`)."""
    return optax.constant_schedule(optim_config.learning_rate)


def _step(optim_config: ml_collections.ConfigDict, steps_per_epoch: int, warmup: int, total: int):
    """Multiplies by `step_factor` at each of `step_epochs`."""
    boundaries = {
        round(e * steps_per_epoch) - warmup: optim_config.step_factor
        for e in optim_config.step_epochs
    }
    return optax.piecewise_constant_schedule(optim_config.learning_rate, boundaries)


def _cosine(optim_config: ml_collections.ConfigDict, steps_per_epoch: int, warmup: int, total: int):
    """Decays to 0 at the last step (so it depends on the run's length)."""
    return optax.cosine_decay_schedule(optim_config.learning_rate, max(total - warmup, 1))


# optim.schedule -> builder of the schedule after the warmup.
SCHEDULES = {"plateau": _flat, "constant": _flat, "step": _step, "cosine": _cosine}


def make_schedule(
    optim_config: ml_collections.ConfigDict, *, steps_per_epoch: int, total_steps: int
) -> optax.Schedule:
    """The step-dependent part of the learning rate (`SCHEDULES`); the plateau factor multiplies
    it. Each can start with a linear warmup of `warmup_epochs`."""
    lr = optim_config.learning_rate
    warmup = round(optim_config.warmup_epochs * steps_per_epoch)
    main = SCHEDULES[optim_config.schedule](optim_config, steps_per_epoch, warmup, total_steps)
    if warmup == 0:
        return main
    return optax.join_schedules([optax.linear_schedule(0.0, lr, warmup), main], [warmup])


class PlateauState(NamedTuple):
    """Host-decided lr drops, kept as arrays so that they are checkpointed with the TrainState."""

    scale: jax.Array  # multiplies the schedule's lr
    best: jax.Array  # best validation error seen
    num_bad: jax.Array  # evaluations since `best` improved
    num_drops: jax.Array


def plateau_init() -> PlateauState:
    return PlateauState(
        scale=jnp.ones((), jnp.float32),
        best=jnp.full((), jnp.inf, jnp.float32),
        num_bad=jnp.zeros((), jnp.int32),
        num_drops=jnp.zeros((), jnp.int32),
    )


def plateau_update(
    state: PlateauState,
    val_error: float | jax.Array,
    *,
    patience: int,
    factor: float,
    max_drops: int,
    min_delta: float = 0.0,
) -> PlateauState:
    """The paper's schedule: divide lr by 10 when the validation error stops improving.

    "The heuristic which we followed was to divide the learning rate by 10 when the validation
    error rate stopped improving with the current learning rate" (section 5). A drop happens after
    `patience` evaluations without an improvement of more than `min_delta`, at most `max_drops`
    times; the count restarts after each drop so that the new lr gets `patience` evaluations too.
    """
    val_error = jnp.asarray(val_error, jnp.float32)
    improved = val_error < state.best - min_delta
    best = jnp.minimum(state.best, val_error)
    num_bad = jnp.where(improved, 0, state.num_bad + 1)
    drop = (num_bad >= patience) & (state.num_drops < max_drops)
    return PlateauState(
        scale=jnp.where(drop, state.scale * factor, state.scale),
        best=best,
        num_bad=jnp.where(drop, 0, num_bad),
        num_drops=state.num_drops + drop.astype(jnp.int32),
    )


def last_update(opt_state: Any, update_rule: str) -> Any:
    """The update applied at the last step, read from the momentum buffer (no extra work).

    Paper rule: the update is the velocity itself (w <- w + v). optax_sgd: -lr * velocity.
    """
    traces = [
        s.trace
        for s in jax.tree_util.tree_leaves(
            opt_state, is_leaf=lambda x: isinstance(x, optax.TraceState)
        )
        if isinstance(s, optax.TraceState)
    ]
    if len(traces) != 1:
        raise ValueError("expected exactly one momentum buffer in the optimiser state")
    if update_rule == "paper":
        return traces[0]
    lr = opt_state.hyperparams["learning_rate"]
    return jax.tree_util.tree_map(lambda v: -lr * v, traces[0])

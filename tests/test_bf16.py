"""Mixed precision: `model.dtype=bfloat16` computes in bfloat16, keeps float32 parameters and
optimiser state, and trains the quickstart like float32 does."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from alexnet_jax import optim, parallel, steps
from alexnet_jax.data import make_source
from alexnet_jax.model import from_config
from experiments import digits

STEPS = 30


def _config(dtype: str):
    config = digits.get_config()
    config.model.dtype = dtype
    config.data.augment = False
    config.optim.warmup_epochs = 0.0  # learn from the first step: a short run shows the curves
    return config


def _train(dtype: str, source):
    """The quickstart's first STEPS steps through the real pmapped step on the real digits data."""
    config = _config(dtype)
    state, run, _, _ = steps.build(config, source.info)
    per_process = parallel.per_device_batch(config.batch_size) * jax.local_device_count()
    batches = source.train_batches(per_process, seed=config.seed)
    pstate = parallel.replicate(state)
    rng = parallel.replicate(steps.dropout_base_key(config.seed))
    losses = []
    for _, batch in zip(range(STEPS), parallel.prefetch(batches), strict=False):
        pstate, metrics = run.train(pstate, batch, rng)
        losses.append(float(parallel.unreplicate(metrics)["loss"]))
    return np.array(losses), jax.device_get(parallel.unreplicate(pstate))


@pytest.fixture(scope="module")
def runs():  # two compilations and 2 x STEPS steps: 20-35 s on 2 cores
    source = make_source(_config("float32"))  # the data do not depend on the dtype
    return {dtype: _train(dtype, source) for dtype in ("float32", "bfloat16")}


@pytest.mark.slow
def test_bfloat16_training_tracks_float32(runs):
    f32, bf16 = runs["float32"][0], runs["bfloat16"][0]
    # Same initial parameters, batches and dropout masks: the curves start together, both fall,
    # and stay within a few per cent (about 2 % here; bf16 keeps 8 bits of mantissa).
    assert abs(bf16[0] - f32[0]) < 0.01 * f32[0]
    for losses in (f32, bf16):
        assert losses[-5:].mean() < 0.95 * losses[:5].mean()
    np.testing.assert_allclose(bf16, f32, rtol=0.06)


def _float_dtypes(tree) -> set:
    return {
        x.dtype for x in jax.tree_util.tree_leaves(tree) if jnp.issubdtype(x.dtype, jnp.floating)
    }


def test_bfloat16_step_keeps_float32_parameters_and_optimiser_state():
    """The real train_step, traced (not compiled) under a named axis: what it returns."""
    config = _config("bfloat16")
    model = from_config(config.model)
    state, tx = steps.create_state(config, model, (64, 64, 3))
    schedule = optim.make_schedule(config.optim, steps_per_epoch=10, total_steps=100)
    step = functools.partial(
        steps.train_step, model=model, tx=tx, schedule=schedule, axis_name=parallel.AXIS
    )
    one = lambda tree: jax.tree_util.tree_map(lambda x: jnp.asarray(x)[None], tree)  # noqa: E731
    batch = {
        "image": jax.ShapeDtypeStruct((1, 8, 64, 64, 3), jnp.float32),
        "label": jax.ShapeDtypeStruct((1, 8), jnp.int32),
    }
    new_state, metrics = jax.eval_shape(
        jax.vmap(step, axis_name=parallel.AXIS),
        one(state),
        batch,
        one(steps.dropout_base_key(config.seed)),
    )
    assert _float_dtypes((new_state.params, new_state.opt_state)) == {jnp.dtype("float32")}
    assert metrics["loss"].dtype == jnp.float32


@pytest.mark.slow
def test_bfloat16_run_keeps_finite_float32_parameters(runs):
    state = runs["bfloat16"][1]
    assert _float_dtypes((state.params, state.opt_state)) == {jnp.dtype("float32")}
    assert all(np.all(np.isfinite(x)) for x in jax.tree_util.tree_leaves(state.params))


_HEAVY = ("conv_general_dilated", "dot_general")


def _equations(jaxpr):
    """(equation, producers) for every equation of a jaxpr, including those inside custom_vjp and
    jit calls; producers maps each variable of the equation's jaxpr to the equation making it."""
    producers = {v: eqn for eqn in jaxpr.eqns for v in eqn.outvars}
    for eqn in jaxpr.eqns:
        yield eqn, producers
        for value in eqn.params.values():
            inner = getattr(value, "jaxpr", value)  # a ClosedJaxpr holds a Jaxpr
            if hasattr(inner, "eqns"):
                yield from _equations(inner)


def _bfloat16_valued(var, producers) -> bool:
    """A bf16 array, or a float32 one that holds bf16 values (`precision.Upcast` on XLA:CPU: the
    rounding of `precision.round_to_bfloat16`, or a widening convert)."""
    while True:
        if var.aval.dtype == jnp.bfloat16:
            return True
        eqn = producers.get(var)
        if eqn is None:
            return False
        name = eqn.primitive.name
        if name == "custom_vjp_call":  # `precision._bf16_operand`: look inside
            inner = eqn.params["call_jaxpr"].jaxpr
            var = inner.outvars[eqn.outvars.index(var)]
            producers = {v: e for e in inner.eqns for v in e.outvars}
        elif name in ("split", "slice", "reshape", "rev", "transpose"):
            # The columns of a grouped convolution; the kernel's flip and transposes backward.
            var = eqn.invars[0]
        elif name == "reduce_precision":
            return (eqn.params["exponent_bits"], eqn.params["mantissa_bits"]) == (8, 7)
        else:
            return name == "convert_element_type" and eqn.invars[0].aval.dtype == jnp.bfloat16


@pytest.mark.parametrize("kernels", ["cpu", "portable"])
def test_bfloat16_computes_in_bfloat16(kernels):
    """The convolutions and matmuls of the bf16 model take bf16 operands, forward and backward
    (the CPU forms: float32 operands rounded to bf16, the arithmetic XLA:CPU does anyway); the
    logits are f32."""
    config = _config("bfloat16")
    config.model.kernels = kernels
    model = from_config(config.model)
    x = jnp.zeros((2, 64, 64, 3), jnp.float32)
    params = jax.jit(lambda k: model.init(k, x, train=False)["params"])(jax.random.key(0))
    forward = lambda p, x: model.apply({"params": p}, x, train=False)  # noqa: E731
    loss = lambda p, x: jnp.sum(forward(p, x))  # noqa: E731
    # 5 convolutions and 3 dense layers, then their weight and input gradients (not conv1's
    # input's): 8 and 8 + 8 + 7 ops; the CPU form splits the 3 grouped convolutions (11 and 32).
    for fn, least in ((forward, 8), (jax.grad(loss), 23)):
        jaxpr = jax.make_jaxpr(fn)(params, x)
        heavy = [(e, p) for e, p in _equations(jaxpr.jaxpr) if e.primitive.name in _HEAVY]
        assert len(heavy) >= least
        bad = [
            str(e.primitive) for e, p in heavy if not all(_bfloat16_valued(v, p) for v in e.invars)
        ]
        assert not bad, bad
        widened = any(v.aval.dtype == jnp.float32 for eqn, _ in heavy for v in eqn.invars)
        assert widened == (kernels == "cpu")
    assert jax.eval_shape(lambda: model.apply({"params": params}, x, train=False)).dtype == (
        jnp.float32
    )

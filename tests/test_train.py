"""The pmapped steps: 4 devices equal 1 device; the dropout keys; exact evaluation."""

import functools

import chex
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from alexnet_jax import optim, parallel, steps
from alexnet_jax.model import AlexNet
from experiments import digits


def _setup(dropout_rate=0.0):
    config = digits.get_config()
    config.model.dropout_rate = dropout_rate
    model = AlexNet(
        num_classes=10,
        conv_features=(8, 16, 16, 16, 16),
        dense_features=32,
        dropout_rate=dropout_rate,
        init_scheme="he",
    )
    state, tx = steps.create_state(config, model, (64, 64, 3))
    schedule = optim.make_schedule(config.optim, steps_per_epoch=10, total_steps=100)
    step = functools.partial(
        steps.train_step, model=model, tx=tx, schedule=schedule, axis_name=parallel.AXIS
    )
    rng = np.random.default_rng(0)
    batch = {
        "image": rng.normal(size=(16, 64, 64, 3)).astype(np.float32),
        "label": rng.integers(0, 10, 16).astype(np.int32),
    }
    return state, step, batch, model


def _run_on(devices, state, step, batch, n_steps=3):
    n = len(devices)
    p_step = jax.pmap(step, axis_name=parallel.AXIS, devices=devices)
    put = lambda t: jax.tree_util.tree_map(  # noqa: E731
        lambda x: np.broadcast_to(np.asarray(x), (n, *np.shape(x))), t
    )
    pstate, rng = put(state), put(steps.dropout_base_key(0))
    sharded = {k: v.reshape(n, -1, *v.shape[1:]) for k, v in batch.items()}
    for _ in range(n_steps):
        pstate, metrics = p_step(pstate, sharded, rng)
    return jax.device_get(parallel.unreplicate(pstate)), jax.device_get(metrics)


def test_four_devices_equal_one_device_on_the_same_global_batch():
    assert jax.device_count() == 4
    state, step, batch, _ = _setup()
    s4, m4 = _run_on(jax.devices(), state, step, batch)
    s1, m1 = _run_on(jax.devices()[:1], state, step, batch)
    chex.assert_trees_all_close(s4.params, s1.params, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(m4["loss"], m4["loss"][0])  # pmean'd: identical on all devices
    np.testing.assert_allclose(m4["loss"][0], m1["loss"][0], rtol=1e-5)
    assert int(s4.step) == 3


def test_dropout_keys_differ_per_device_and_step_and_repeat_per_seed():
    keys = jax.pmap(
        lambda rng, step: jax.random.key_data(steps.dropout_key(rng, step, "d")), axis_name="d"
    )
    rng = jnp.stack([steps.dropout_base_key(0)] * 4)
    k0 = np.asarray(keys(rng, jnp.zeros(4, jnp.int32)))
    k1 = np.asarray(keys(rng, jnp.ones(4, jnp.int32)))
    assert len({tuple(k) for k in k0}) == 4  # one key per device
    assert not {tuple(k) for k in k0} & {tuple(k) for k in k1}  # new keys every step
    np.testing.assert_array_equal(k0, np.asarray(keys(rng, jnp.zeros(4, jnp.int32))))
    other_seed = np.asarray(
        keys(jnp.stack([steps.dropout_base_key(1)] * 4), jnp.zeros(4, jnp.int32))
    )
    assert not np.array_equal(k0, other_seed)


def test_eval_step_counts_every_example_once():
    state, _, _, model = _setup()
    p_eval = jax.pmap(
        functools.partial(steps.eval_step, model=model, axis_name=parallel.AXIS),
        axis_name=parallel.AXIS,
    )
    params = parallel.replicate(state.params)
    rng = np.random.default_rng(1)
    images = rng.normal(size=(10, 64, 64, 3)).astype(np.float32)
    labels = rng.integers(0, 10, 10).astype(np.int32)
    from alexnet_jax.data import pad_batch

    batch = pad_batch({"image": images, "label": labels}, 16)  # 10 real, 6 padding
    sums = jax.device_get(parallel.unreplicate(p_eval(params, parallel.shard(batch))))
    assert sums["count"] == 10
    logits = model.apply({"params": state.params}, images, train=False)
    expected = float(np.sum(np.argmax(logits, -1) != labels))
    assert sums["top1_error"] == pytest.approx(expected)


def test_ten_crop_axis_averages_softmax():
    state, _, _, model = _setup()
    rng = np.random.default_rng(2)
    views = rng.normal(size=(2, 10, 64, 64, 3)).astype(np.float32)
    labels = np.array([3, 7], np.int32)
    batch = {"image": views, "label": labels, "mask": np.ones(2, bool)}
    sums = jax.pmap(
        functools.partial(steps.eval_step, model=model, axis_name="i"),
        axis_name="i",
        devices=jax.devices()[:1],
    )(*jax.tree_util.tree_map(lambda x: x[None], (state.params, batch)))
    probs = (
        jax.nn.softmax(
            model.apply({"params": state.params}, views.reshape(20, 64, 64, 3), train=False)
        )
        .reshape(2, 10, 10)
        .mean(1)
    )
    nll = -np.log(np.asarray(probs)[np.arange(2), labels]).sum()
    assert float(sums["loss"][0]) == pytest.approx(nll, rel=1e-5)


def test_num_train_steps_overrides_epochs():
    c = ml_collections.ConfigDict(dict(batch_size=100, num_epochs=3, num_train_steps=0))
    assert steps.num_train_steps(c, 1000) == (10, 30)
    c.num_train_steps = 7
    assert steps.num_train_steps(c, 1000) == (10, 7)


def test_top5_is_ranked_in_log_space_where_float32_probabilities_underflow():
    """Five classes beat the label, but all six have probabilities below float32's smallest
    (exp(-110) ~ 1e-48): ranked on the softmax they tie at 0.0 and the label would count as a
    top-5 hit; ranked on log-probabilities it is sixth, a miss (a diverged run logged 0 %)."""

    class Fixed:  # the real eval_step on fixed logits
        def apply(self, variables, x, train):
            logits = jnp.full((x.shape[0], 10), -200.0).at[:, 0].set(0.0)
            return logits.at[:, 1:6].set(-110.0).at[:, 6].set(-120.0)

    assert float(jax.nn.softmax(Fixed().apply(None, jnp.zeros((1,)), False))[0, 6]) == 0.0
    batch = {
        "image": jnp.zeros((1, 2, 8, 8, 3)),
        "label": jnp.full((1, 2), 6, jnp.int32),
        "mask": jnp.ones((1, 2), bool),
    }
    step = functools.partial(steps.eval_step, model=Fixed(), axis_name="i")
    sums = jax.vmap(step, in_axes=(None, 0), axis_name="i")({}, batch)
    assert float(sums["top5_error"][0]) == 2.0 and float(sums["top1_error"][0]) == 2.0
    assert np.isfinite(float(sums["loss"][0]))  # -log p of the label, not -log(0)

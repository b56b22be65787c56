"""The optimiser equals the paper's update rule, across a learning-rate drop; the schedules."""

import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from alexnet_jax import config as config_lib
from alexnet_jax import optim
from alexnet_jax.errors import UsageError
from experiments import digits


def _config(**kw) -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict(
        dict(
            update_rule="paper",
            learning_rate=0.01,
            momentum=0.9,
            weight_decay=5e-4,
            decay_biases=False,
            schedule="plateau",
            step_epochs=(2, 4),
            step_factor=0.1,
            warmup_epochs=0.0,
        )
    )
    c.update(kw)
    return c


def _run(rule: str, lrs, grads, w0, b0):
    params = {"kernel": jnp.asarray(w0), "bias": jnp.asarray(b0)}
    tx = optim.make_optimizer(_config(update_rule=rule), params)
    state = tx.init(params)
    for lr, (gw, gb) in zip(lrs, grads, strict=True):
        state = optim.set_learning_rate(state, lr)
        updates, state = tx.update({"kernel": gw, "bias": gb}, state, params)
        params = optax.apply_updates(params, updates)
    return params


def test_paper_rule_across_an_lr_drop():
    rng = np.random.default_rng(0)
    w0, b0 = rng.normal(size=(3, 2)), rng.normal(size=(2,))
    grads = [(rng.normal(size=(3, 2)), rng.normal(size=(2,))) for _ in range(6)]
    lrs = [0.01, 0.01, 0.01, 0.001, 0.001, 0.001]  # divided by 10 after step 3
    got = _run("paper", lrs, grads, w0, b0)
    # Section 5: v <- 0.9 v - 0.0005 lr w - lr g;  w <- w + v. Biases take no decay (cc2, Caffe).
    w, b, vw, vb = w0.copy(), b0.copy(), np.zeros_like(w0), np.zeros_like(b0)
    for lr, (gw, gb) in zip(lrs, grads, strict=True):
        vw = 0.9 * vw - 0.0005 * lr * w - lr * gw
        vb = 0.9 * vb - lr * gb
        w, b = w + vw, b + vb
    np.testing.assert_allclose(got["kernel"], w, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(got["bias"], b, rtol=1e-5, atol=1e-7)
    # The common rule (lr outside the velocity) gives a different trajectory after the drop.
    other = _run("optax_sgd", lrs, grads, w0, b0)
    assert not np.allclose(other["kernel"], w, rtol=1e-4)


def test_decay_biases_option():
    params = {"kernel": jnp.ones((2, 2)), "bias": jnp.ones((2,))}
    assert optim.decay_mask(params, decay_biases=False) == {"kernel": True, "bias": False}
    assert optim.decay_mask(params, decay_biases=True) == {"kernel": True, "bias": True}


def _plateau(errors, **kw):
    kw = dict(patience=2, factor=0.1, max_drops=2) | kw
    state = optim.plateau_init()
    scales = []
    for e in errors:
        state = optim.plateau_update(state, e, **kw)
        scales.append(float(state.scale))
    return scales, state


def test_plateau_divides_by_ten_when_validation_stops_improving():
    scales, state = _plateau([0.9, 0.8, 0.8, 0.8, 0.7, 0.7, 0.7, 0.7, 0.7, 0.7])
    np.testing.assert_allclose(scales, [1, 1, 1, 0.1, 0.1, 0.1, 0.01, 0.01, 0.01, 0.01], rtol=1e-6)
    assert int(state.num_drops) == 2  # max_drops caps it
    assert float(state.best) == pytest.approx(0.7)


def test_plateau_min_delta():
    scales, _ = _plateau([0.5, 0.499, 0.498], patience=2, min_delta=0.01)
    assert scales[-1] == pytest.approx(0.1)


def test_step_schedule_drops_at_epochs():
    s = optim.make_schedule(_config(schedule="step"), steps_per_epoch=10, total_steps=60)
    np.testing.assert_allclose(
        [s(0), s(19), s(20), s(39), s(40)], [0.01, 0.01, 0.001, 0.001, 0.0001], rtol=1e-5
    )


def test_cosine_with_warmup():
    s = optim.make_schedule(
        _config(schedule="cosine", warmup_epochs=1.0), steps_per_epoch=10, total_steps=50
    )
    np.testing.assert_allclose([s(0), s(5), s(10)], [0.0, 0.005, 0.01], rtol=1e-5, atol=1e-8)
    assert float(s(50)) == pytest.approx(0.0, abs=1e-8)
    assert 0.0 < float(s(30)) < 0.01


def test_every_registered_schedule_builds_and_an_unknown_one_is_refused_up_front():
    for name in optim.SCHEDULES:
        schedule = optim.make_schedule(_config(schedule=name), steps_per_epoch=2, total_steps=8)
        assert float(schedule(0)) > 0
    config = digits.get_config()
    config.optim.schedule = "linear"
    with pytest.raises(UsageError, match=r"optim\.schedule must be one of"):
        config_lib.validate(config, num_devices=1)

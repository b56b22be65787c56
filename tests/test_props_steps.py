"""The model's forward pass, the train step and the eval step: one law each, checked jitted, not
jitted and pmapped (chex variants) on the quickstart network (experiments/digits.py).

The steps need a named axis. Under pmap it is the device axis of 4 CPU devices, each given the
same arguments, so the law must account for psum counting every example 4 times, and for the
dropout masks: keyed by global example (model.dropout_masks='example'), device d's 4 examples are
examples 4d..4d+3 of the global batch, so each device draws other masks. Jitted and plain calls
get a vmap of one "device".

Compiling the network dominates the time: the laws share one jitted reference, and the forward
pass and the eval step share one program per variant.
"""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

# The library, imported in one place (train.py is being split into steps.py and others).
from alexnet_jax import optim
from alexnet_jax.model import abstract_params, from_config
from alexnet_jax.parallel import AXIS
from alexnet_jax.steps import TrainState, dropout_base_key, eval_step, train_step
from experiments import digits

IMAGE = (64, 64, 3)


@functools.cache
def _setup():
    """The quickstart model with random parameters and a mid-warmup, mid-momentum state.

    The parameters come from numpy, not `create_state`: compiling `model.init` costs more than
    every step test together, and the laws hold for any parameters.
    """
    config = digits.get_config()
    model = from_config(config.model)
    rng = np.random.default_rng(0)

    def draw(leaf, scale):
        fan_in = max(int(np.prod(leaf.shape[:-1])), 1)
        std = np.sqrt(2.0 / fan_in) if len(leaf.shape) > 1 else 0.1
        return jnp.asarray(rng.normal(0.0, std * scale, leaf.shape), jnp.float32)

    shapes = abstract_params(model, IMAGE)
    params = jax.tree_util.tree_map(lambda s: draw(s, 1.0), shapes)
    velocity = jax.tree_util.tree_map(lambda s: draw(s, 1e-3), shapes)
    tx = optim.make_optimizer(config.optim, params)
    opt_state = jax.tree_util.tree_map(
        lambda s: s._replace(trace=velocity) if isinstance(s, optax.TraceState) else s,
        tx.init(params),
        is_leaf=lambda s: isinstance(s, optax.TraceState),
    )
    # Step 3 of a 10-step warmup, and a plateau drop: the lr is schedule(3) * 0.5.
    plateau = optim.plateau_init()._replace(scale=jnp.asarray(0.5, jnp.float32))
    state = TrainState(jnp.asarray(3, jnp.int32), params, opt_state, plateau)
    schedule = optim.make_schedule(config.optim, steps_per_epoch=10, total_steps=100)
    batch = {
        "image": rng.normal(size=(4, *IMAGE)).astype(np.float32),
        "label": rng.integers(0, 10, 4).astype(np.int32),
    }
    return config, model, tx, schedule, state, batch


def _on_devices(variant, fn):
    """(variant of fn, number of devices); fn may use the named axis AXIS."""
    if variant.type == chex.ChexVariantType.WITH_PMAP:
        n = jax.device_count()
        # Broadcast on the host: chex's own broadcast slices and stacks every leaf on the
        # devices, which compiles a few ops per parameter shape.
        pmapped = variant(fn, axis_name=AXIS, broadcast_args_to_devices=False)
        copies = lambda x: np.broadcast_to(np.asarray(x), (n, *np.shape(x)))  # noqa: E731
        return lambda *args: pmapped(*jax.tree_util.tree_map(copies, args)), n

    def one_device(*args):
        args = jax.tree_util.tree_map(lambda x: jnp.asarray(x)[None], args)
        return jax.tree_util.tree_map(lambda x: x[0], jax.vmap(fn, axis_name=AXIS)(*args))

    return variant(one_device), 1


@functools.cache
def _reference():
    """jit((params, batch, key, first) -> (eval logits, train logits, loss, grads)), the
    training half under dropout key `key` with the batch as global examples first, first+1, ...;
    one compilation serves every test of the module."""
    _, model, *_ = _setup()

    def loss(params, batch, key, first):
        ids = first + jnp.arange(batch["label"].shape[0])
        z = model.apply(
            {"params": params}, batch["image"], train=True, rngs={"dropout": key}, example_ids=ids
        )
        nll = -jnp.take_along_axis(jax.nn.log_softmax(z), batch["label"][:, None], -1)
        return nll.mean(), z

    def reference(params, batch, key, first=0):
        (value, train_logits), grads = jax.value_and_grad(loss, has_aux=True)(
            params, batch, key, first
        )
        eval_logits = model.apply({"params": params}, batch["image"], train=False)
        return eval_logits, train_logits, value, grads

    return jax.jit(reference)


def _softmax(z):
    z = np.asarray(z, np.float64)
    e = np.exp(z - z.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def test_dropout_acts_only_in_training():
    _, _, _, _, state, batch = _setup()
    ref_eval, ref_train, *_ = _reference()(state.params, batch, jax.random.PRNGKey(1))
    _, ref_again, *_ = _reference()(state.params, batch, jax.random.PRNGKey(1))
    _, ref_other, *_ = _reference()(state.params, batch, jax.random.PRNGKey(2))
    np.testing.assert_array_equal(ref_train, ref_again)
    assert not np.allclose(ref_train, ref_eval, rtol=1e-4, atol=1e-5)
    assert not np.allclose(ref_train, ref_other, rtol=1e-4, atol=1e-5)


def _check_train_step(variant):
    config, model, tx, schedule, state, batch = _setup()
    step = functools.partial(train_step, model=model, tx=tx, schedule=schedule, axis_name=AXIS)
    fn, n = _on_devices(variant, step)
    rng = dropout_base_key(config.seed)
    new, metrics = jax.device_get(fn(state, batch, rng))

    # The law: the key is fold_in(rng, step) and device d's examples are the global batch's
    # 4d..4d+3; the gradients are averaged over the devices; then one step of the paper's rule
    # with lr = schedule * plateau.
    key, local = jax.random.fold_in(rng, state.step), len(batch["label"])
    runs = [_reference()(state.params, batch, key, d * local) for d in range(n)]
    _, _, losses, grads = zip(*runs, strict=True)
    grad = jax.tree_util.tree_map(lambda *g: np.mean(np.asarray(g, np.float64), 0), *grads)
    lr = float(schedule(int(state.step))) * 0.5
    m, wd = config.optim.momentum, config.optim.weight_decay
    w = jax.tree_util.tree_map(lambda a: np.asarray(a, np.float64), state.params)
    v = jax.tree_util.tree_map(np.asarray, optim.last_update(state.opt_state, "paper"))
    decay = optim.decay_mask(w, decay_biases=config.optim.decay_biases)
    v_new = jax.tree_util.tree_map(
        lambda v, w, g, d: m * v - wd * lr * w * d - lr * g, v, w, grad, decay
    )
    w_new = jax.tree_util.tree_map(np.add, w, v_new)

    assert int(new.step) == int(state.step) + 1
    chex.assert_trees_all_close(new.params, w_new, rtol=1e-5, atol=1e-7)
    chex.assert_trees_all_close(
        optim.last_update(new.opt_state, "paper"), v_new, rtol=1e-4, atol=1e-8
    )
    np.testing.assert_allclose(metrics["loss"], np.mean(losses), rtol=1e-5)
    np.testing.assert_allclose(metrics["lr"], lr, rtol=1e-6)
    assert bool(metrics["finite"])


class TrainStepTest(chex.TestCase):
    @chex.variants(with_jit=True, with_pmap=True)
    def test_train_step_is_the_paper_rule_on_the_device_mean_gradient(self):
        _check_train_step(self.variant)


@pytest.mark.slow  # eager: every primitive of the backward pass compiles on its own (~30 s)
class TrainStepEagerTest(chex.TestCase):
    @chex.variants(without_jit=True)
    def test_train_step_is_the_paper_rule_on_the_device_mean_gradient(self):
        _check_train_step(self.variant)


class ForwardAndEvalStepTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True, with_pmap=True)
    def test_forward_pass_and_eval_step(self):
        """Two laws from one program per variant (compiling the network is most of the time):
        the forward pass is the reference's, and the eval step averages the softmax over the
        views and sums over the unmasked examples."""
        _, model, _, _, state, batch = _setup()
        examples, views = 2, 2
        eval_batch = {
            "image": batch["image"].reshape(examples, views, *IMAGE),
            "label": batch["label"][:examples],
            "mask": np.array([True, False]),  # the last example is padding
        }

        def forward_and_eval(params, eval_batch):
            # The images as eval_step flattens them: XLA computes the network once for both.
            images = eval_batch["image"].reshape((-1, *IMAGE))
            logits = model.apply({"params": params}, images, train=False)
            return logits, eval_step(params, eval_batch, model=model, axis_name=AXIS)

        fn, n = _on_devices(self.variant, forward_and_eval)
        logits, sums = jax.device_get(fn(state.params, eval_batch))
        ref_eval, *_ = _reference()(state.params, batch, jax.random.PRNGKey(0))

        assert logits.shape == (4, 10) and logits.dtype == np.float32
        np.testing.assert_allclose(logits, ref_eval, rtol=1e-4, atol=1e-5)

        # psum adds the n devices' (identical) sums.
        probs = _softmax(ref_eval).reshape(examples, views, 10).mean(1)
        label_p = probs[np.arange(examples), eval_batch["label"]]
        rank = (probs > label_p[:, None]).sum(-1)  # classes that beat the label
        weight = eval_batch["mask"].astype(np.float64)
        expected = {
            "loss": -np.log(label_p) @ weight,
            "top1_error": (rank >= 1) @ weight,
            "top5_error": (rank >= 5) @ weight,
            "count": weight.sum(),
        }
        # The confusion matrix of the final report: true class x predicted, unmasked only.
        confusion = np.zeros((10, 10))
        for y, p, w in zip(eval_batch["label"], probs.argmax(-1), weight, strict=True):
            confusion[y, p] += w
        np.testing.assert_array_equal(sums.pop("confusion"), n * confusion)
        assert set(sums) == set(expected)
        for key, value in expected.items():
            np.testing.assert_allclose(sums[key], n * value, rtol=1e-4, err_msg=key)

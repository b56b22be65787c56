"""The update rules are the equations they claim, for random parameter trees, learning rates that
change between steps, and weight-decay masks (numpy in float64 on the right-hand side):

    paper (section 5):   v <- m v - wd lr w - lr g;   w <- w + v
    optax_sgd (torch):   v <- m v + g + wd w;         w <- w - lr v
"""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
from hypothesis import given, settings
from hypothesis import strategies as st

# The library, imported in one place.
from alexnet_jax.optim import decay_mask, make_optimizer, optax_sgd, paper_sgd, set_learning_rate
from experiments import digits

SCALE = 10 if settings.get_current_profile_name() == "slow" else 1

tree_map = jax.tree_util.tree_map


def paper_rule(w, v, g, lr, m, wd, decays):
    v = m * v - wd * lr * w * decays - lr * g
    return w + v, v


def torch_rule(w, v, g, lr, m, wd, decays):
    v = m * v + g + wd * w * decays
    return w - lr * v, v


RULES = {"paper": paper_rule, "optax_sgd": torch_rule}


# Few distinct shapes: each compiles its eager ops once, not once per example.
KERNEL_SHAPES = st.sampled_from([(1, 1), (3, 2), (2, 2, 1, 3), (3, 3, 2, 1)])


@st.composite
def trees(draw):
    """A dict of layers, each a kernel (2-d or 4-d) and a bias, with a numpy-drawn value."""
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    tree = {}
    for i in range(draw(st.integers(1, 3))):
        shape = draw(KERNEL_SHAPES)
        tree[f"layer{i}"] = {
            "kernel": rng.normal(size=shape).astype(np.float32),
            "bias": rng.normal(size=shape[-1:]).astype(np.float32),
        }
    return tree, rng


def _run(tx, params, grads, lrs, set_lr=True):
    """The library's way to step: set the injected lr, update, apply."""
    state = tx.init(params)
    for g, lr in zip(grads, lrs, strict=True):
        if set_lr:
            state = set_learning_rate(state, lr)
        updates, state = tx.update(g, state, params)
        params = optax.apply_updates(params, updates)
    return params


def _expected(rule, params, grads, lrs, m, wd, decays):
    f64 = lambda t: tree_map(lambda x: np.asarray(x, np.float64), t)  # noqa: E731
    w = f64(params)
    v = tree_map(np.zeros_like, w)
    for g, lr in zip(grads, lrs, strict=True):
        step = lambda w, v, g, d, lr=lr: rule(w, v, g, lr, m, wd, d)  # noqa: E731
        out = tree_map(step, w, v, f64(g), decays)
        w = tree_map(lambda _, o: o[0], w, out)
        v = tree_map(lambda _, o: o[1], w, out)
    return w


lrs = st.lists(st.floats(1e-4, 1.0), min_size=1, max_size=4)
momenta = st.floats(0.0, 0.99)
decays = st.floats(0.0, 1e-2)


@settings(max_examples=20 * SCALE, deadline=None)
@given(
    case=trees(),
    lrs=lrs,
    rule=st.sampled_from(sorted(RULES)),
    momentum=momenta,
    weight_decay=decays,
    decay_biases=st.booleans(),
)
def test_make_optimizer_follows_its_rule_across_lr_changes(
    case, lrs, rule, momentum, weight_decay, decay_biases
):
    params, rng = case
    optim = digits.get_config().optim
    optim.update_rule, optim.momentum, optim.weight_decay = rule, momentum, weight_decay
    optim.decay_biases = decay_biases
    grads = [tree_map(lambda p: rng.normal(size=p.shape).astype(np.float32), params) for _ in lrs]
    got = _run(make_optimizer(optim, params), params, grads, lrs)
    # Kernels always decay, biases only with decay_biases.
    mask = tree_map(lambda p: float(p.ndim > 1 or decay_biases), params)
    want = _expected(RULES[rule], params, grads, lrs, momentum, weight_decay, mask)
    chex.assert_trees_all_close(got, want, rtol=2e-5, atol=1e-6)


@settings(max_examples=20 * SCALE, deadline=None)
@given(
    case=trees(),
    steps=st.integers(1, 4),
    lr=st.floats(1e-4, 1.0),
    rule=st.sampled_from(sorted(RULES)),
    momentum=momenta,
    weight_decay=st.floats(0.0, 0.5),
    data=st.data(),
)
def test_rules_decay_exactly_the_masked_leaves(case, steps, lr, rule, momentum, weight_decay, data):
    params, rng = case
    mask = tree_map(lambda _: data.draw(st.booleans()), params)
    grads = [
        tree_map(lambda p: rng.normal(size=p.shape).astype(np.float32), params)
        for _ in range(steps)
    ]
    tx = {"paper": paper_sgd, "optax_sgd": optax_sgd}[rule](lr, momentum, weight_decay, mask)
    got = _run(tx, params, grads, [lr] * steps, set_lr=False)
    decays = tree_map(float, mask)
    want = _expected(RULES[rule], params, grads, [lr] * steps, momentum, weight_decay, decays)
    chex.assert_trees_all_close(got, want, rtol=2e-5, atol=1e-6)


def test_decay_mask_is_kernels_and_optionally_biases():
    params = {"conv": {"kernel": np.zeros((3, 3, 2, 4)), "bias": np.zeros(4)}, "s": np.zeros(())}
    assert decay_mask(params, decay_biases=False) == {
        "conv": {"kernel": True, "bias": False},
        "s": False,
    }
    assert all(jax.tree_util.tree_leaves(decay_mask(params, decay_biases=True)))


class UpdateVariantsTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True, with_pmap=True)
    def test_one_update_with_a_new_lr_is_the_paper_rule(self):
        rng = np.random.default_rng(0)
        params = {
            "fc": {"kernel": rng.normal(size=(3, 2)), "bias": rng.normal(size=2)},
        }
        params = tree_map(lambda x: x.astype(np.float32), params)
        grads = [tree_map(lambda p: rng.normal(size=p.shape).astype(np.float32), params)] * 2
        optim = digits.get_config().optim  # paper rule, momentum 0.9, wd 5e-4, no bias decay
        tx = make_optimizer(optim, params)
        state = tx.init(params)
        params1 = optax.apply_updates(params, tx.update(grads[0], state, params)[0])
        state = tx.update(grads[0], state, params)[1]

        @self.variant
        def step(grads, state, params, lr):
            updates, state = tx.update(grads, set_learning_rate(state, lr), params)
            return optax.apply_updates(params, updates)

        got = step(grads[1], state, params1, jnp.asarray(0.003, jnp.float32))
        mask = tree_map(lambda p: float(p.ndim > 1), params)
        want = _expected(paper_rule, params, grads, [optim.learning_rate, 0.003], 0.9, 5e-4, mask)
        chex.assert_trees_all_close(got, want, rtol=2e-5, atol=1e-6)

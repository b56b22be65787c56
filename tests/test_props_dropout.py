"""Dropout as the model draws it, in both of `model.dropout_masks`' schemes.

'device' (runs before model parallelism): the key from (seed, step, device), the mask from
nn.Dropout. One (seed, step, device) always gives the same mask and any other one another mask;
rate 0 is the identity; any rate in [0, 1) keeps the expectation (inverted dropout).

'example' (the default): `layers.ExampleDropout`, each example's mask from its place in the
global batch. An example's mask does not depend on which other examples share its device, and
a slice of the neurons (a model-parallel layer's shard) gets the slice of the whole mask.
"""

import chex
import flax.linen as nn
import hypothesis.extra.numpy as hnp
import jax
import jax.numpy as jnp
import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

# The library, imported in one place (train.py is being split into steps.py and others).
from alexnet_jax.layers import ExampleDropout
from alexnet_jax.steps import dropout_base_key, dropout_key

SCALE = 10 if settings.get_current_profile_name() == "slow" else 1
AXIS = "devices"
DEVICES = 8


@jax.jit
def _device_keys(base, step):
    return jax.vmap(lambda _: dropout_key(base, step, AXIS), axis_name=AXIS)(jnp.arange(DEVICES))


def device_keys(seed: int, step: int) -> jax.Array:
    """The dropout key of each of DEVICES devices; vmap's axis index stands for the device."""
    return _device_keys(dropout_base_key(seed), jnp.asarray(step, jnp.int32))


def dropout(x, rate, key):
    # As AlexNet uses it: deterministic fixed at construction, the key from the 'dropout' rngs.
    return nn.Dropout(rate, deterministic=False).apply({}, x, rngs={"dropout": key})


def mask(rate, key, size=4096):
    return np.asarray(dropout(jnp.ones((size,)), rate, key)) != 0


seeds = st.integers(0, 2**31 - 1)
steps = st.integers(0, 2**31 - 1)
devices = st.integers(0, DEVICES - 1)


@settings(max_examples=15 * SCALE, deadline=None)
@given(seed=seeds, step=steps, device=devices, rate=st.floats(0.05, 0.95))
def test_same_seed_step_and_device_give_the_same_mask(seed, step, device, rate):
    first = mask(rate, device_keys(seed, step)[device])
    again = mask(rate, device_keys(seed, step)[device])
    np.testing.assert_array_equal(first, again)


@st.composite
def two_different_places(draw):
    """Two (seed, step, device) triples that differ in one named component."""
    place = [draw(seeds), draw(steps), draw(devices)]
    which = draw(st.sampled_from([0, 1, 2]))
    other = list(place)
    strategy = [seeds, steps, devices][which]
    other[which] = draw(strategy.filter(lambda v: v != place[which]))
    return tuple(place), tuple(other)


@settings(max_examples=25 * SCALE, deadline=None)
@given(places=two_different_places(), rate=st.floats(0.1, 0.9))
def test_another_seed_step_or_device_gives_another_mask(places, rate):
    # P(two independent masks of 4096 units agree) <= 0.82**4096: equality means the same key.
    masks = [mask(rate, device_keys(seed, step)[d]) for seed, step, d in places]
    assert not np.array_equal(*masks), places


@settings(max_examples=15 * SCALE, deadline=None)
@given(
    x=hnp.arrays(np.float32, hnp.array_shapes(max_dims=3, max_side=8)),
    seed=seeds,
    step=steps,
)
def test_rate_zero_is_the_identity(x, seed, step):
    key = device_keys(seed, step)[0]
    out = np.asarray(dropout(jnp.asarray(x), 0.0, key))
    assert out.dtype == x.dtype and out.tobytes() == x.tobytes()  # bit for bit, NaN and -0.0
    # Large enough that dropping even one unit in 10**4 would show.
    big = np.random.default_rng(seed).normal(size=2**16).astype(np.float32)
    np.testing.assert_array_equal(np.asarray(dropout(jnp.asarray(big), 0.0, key)), big)


@settings(max_examples=15 * SCALE, deadline=None)
@given(rate=st.floats(0.0, 1.0, exclude_max=True), seed=seeds, step=steps)
def test_any_rate_keeps_the_expectation(rate, seed, step):
    n = 2**18
    keep = 1.0 - rate
    out = np.asarray(dropout(jnp.ones((n,)), rate, device_keys(seed, step)[0]), np.float64)
    # Every unit is dropped or scaled by 1 / keep...
    kept = out != 0
    np.testing.assert_allclose(out[kept], 1.0 / keep, rtol=1e-6)
    # ...and the kept count is binomial(n, keep): 5 sigma, plus a few units for the Poisson
    # tail when n * keep is small (a keep probability under 1e-6 keeps a unit or two).
    sigma = np.sqrt(n * keep * rate)
    assert abs(kept.sum() - n * keep) <= 5 * sigma + 5, (rate, kept.sum())
    tolerance = (5 * sigma + 5) / (n * keep) + 1e-6
    assert abs(out.mean() - 1.0) <= tolerance, (rate, out.mean())


class DeviceMasksTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True, with_pmap=True)
    def test_each_device_draws_its_own_mask_from_its_index(self):
        """Under pmap the axis index is the device's: 4 devices, 4 different masks, each the
        mask of fold_in(fold_in(rng, step), device)."""
        n, rate = jax.device_count(), 0.5
        base, step = dropout_base_key(3), jnp.asarray(11, jnp.int32)
        x = jnp.ones((n, 4096))

        def per_device(x, base, step):
            return dropout(x, rate, dropout_key(base, step, AXIS))

        if self.variant.type == chex.ChexVariantType.WITH_PMAP:
            fn = self.variant(
                per_device, axis_name=AXIS, broadcast_args_to_devices=False, reduce_fn=None
            )
            out = fn(x, jnp.stack([base] * n), jnp.stack([step] * n))
        else:
            fn = self.variant(jax.vmap(per_device, (0, None, None), axis_name=AXIS))
            out = fn(x, base, step)
        masks = np.asarray(out) != 0
        assert len({m.tobytes() for m in masks}) == n
        for d in range(n):
            key = jax.random.fold_in(jax.random.fold_in(base, step), d)
            np.testing.assert_array_equal(masks[d], mask(rate, key))


def example_masks(key, ids, width=64, rate=0.5, offset=0, local=None):
    x = jnp.ones((len(ids), width if local is None else local))
    out = ExampleDropout(rate).apply(
        {}, x, jnp.asarray(ids), width, offset, deterministic=False, rngs={"dropout": key}
    )
    return np.asarray(out) != 0


@settings(max_examples=10 * SCALE, deadline=None)
@given(
    seed=seeds,
    ids=st.lists(st.integers(0, 10_000), min_size=2, max_size=8, unique=True),
    offset=st.integers(0, 48),
)
def test_an_examples_mask_is_its_own_whatever_the_batch_and_the_shard(seed, ids, offset):
    key = jax.random.PRNGKey(seed)
    whole = example_masks(key, ids)
    # Another batch with the same examples in another order, split differently over devices.
    order = list(reversed(ids))
    again = np.concatenate([example_masks(key, order[:1]), example_masks(key, order[1:])])
    np.testing.assert_array_equal(again[::-1], whole)
    # A shard of 16 neurons from `offset` on is the slice of the whole mask.
    shard = example_masks(key, ids, offset=offset, local=16)
    np.testing.assert_array_equal(shard, whole[:, offset : offset + 16])
    # Different examples get different masks (64 coins each: equal by chance 2**-64).
    assert len({row.tobytes() for row in whole}) == len(ids)

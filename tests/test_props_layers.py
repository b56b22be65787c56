"""Laws of the two hand-written layers, LRN and max pooling, for every generated input.

LRN is checked against a numpy transcription of torch.nn.functional.local_response_norm (even
sizes included), max pooling's custom gradient against JAX's own gradient of a plain
`reduce_window` max and of `nn.max_pool`, on integer inputs where ties are the rule. The chex
variants check that the same laws hold jitted, not jitted and pmapped.
"""

import chex
import flax.linen as nn
import hypothesis.extra.numpy as hnp
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl.testing import parameterized
from hypothesis import given, settings
from hypothesis import strategies as st
from jax import lax

# The library's layers, imported in one place (they are moving to alexnet_jax/layers.py).
from alexnet_jax.layers import local_response_norm, max_pool

SCALE = 10 if settings.get_current_profile_name() == "slow" else 1


# --- references -------------------------------------------------------------------------------


def lrn_reference(x, size, k, alpha, beta, scale_alpha_by_size):
    """torch's definition in float64: pad size//2 channels before and (size-1)//2 after, sum
    `size` squares, so channel i sees i - size//2 .. i + (size-1)//2, clipped at the edges."""
    sq = np.asarray(x, np.float64) ** 2
    pad = [(0, 0)] * (x.ndim - 1) + [(size // 2, (size - 1) // 2)]
    padded = np.pad(sq, pad)
    window_sum = np.stack([padded[..., i : i + size].sum(-1) for i in range(x.shape[-1])], axis=-1)
    a = alpha / size if scale_alpha_by_size else alpha
    return np.asarray(x, np.float64) / (k + a * window_sum) ** beta


def plain_max_pool(x, window, stride):
    # No custom_vjp: JAX differentiates reduce_window max itself (select_and_scatter).
    return lax.reduce_window(
        x, -jnp.inf, lax.max, (1, window, window, 1), (1, stride, stride, 1), "VALID"
    )


def flax_max_pool(x, window, stride):
    return nn.max_pool(x, (window, window), strides=(stride, stride))


def _vjp(pool, x, g, window, stride):
    y, pullback = jax.vjp(lambda x: pool(x, window, stride), x)
    return y, pullback(g)[0]


# One compilation per (shape, window, stride) for both pools together.
_both_vjps = jax.jit(
    lambda x, g, window, stride: [
        _vjp(pool, x, g, window, stride) for pool in (max_pool, plain_max_pool)
    ],
    static_argnums=(2, 3),
)
# k, alpha and beta traced: one compilation per shape and size, not per example.
_lrn_jit = jax.jit(local_response_norm, static_argnames=("size", "scale_alpha_by_size"))


# --- hypothesis: LRN ---------------------------------------------------------------------------


@st.composite
def lrn_cases(draw):
    channels = draw(st.integers(1, 16))
    # LRN acts on each pixel alone: a few batch and image shapes are enough.
    lead = draw(st.sampled_from([(1, 1, 1), (2, 3, 1), (1, 2, 3)]))
    x = draw(
        hnp.arrays(
            np.float32,
            (*lead, channels),
            elements=st.floats(-40, 40, width=32, allow_subnormal=False),
            fill=st.nothing(),  # every element drawn: not a constant array with a few changes
        )
    )
    params = dict(
        size=draw(st.integers(1, 9)),  # odd and even
        k=draw(st.floats(0.5, 3.0)),
        alpha=draw(st.floats(1e-5, 1e-1)),
        beta=draw(st.floats(0.25, 1.0)),
        scale_alpha_by_size=draw(st.booleans()),
    )
    return x, params


def _check_lrn(x, params):
    got = np.asarray(_lrn_jit(jnp.asarray(x), **params))
    np.testing.assert_allclose(got, lrn_reference(x, **params), rtol=2e-5, atol=1e-6)


@settings(max_examples=15 * SCALE, deadline=None)
@given(lrn_cases())
def test_lrn_equals_the_formula(case):
    _check_lrn(*case)


@settings(max_examples=10 * SCALE, deadline=None)
@given(size=st.integers(1, 9), channels=st.integers(1, 12), at=st.data())
def test_lrn_window_is_size_channels_wide(size, channels, at):
    """A single non-zero channel c is seen exactly by the channels whose window holds c: the
    outputs that change are i with c - (size-1)//2 <= i <= c + size//2."""
    c = at.draw(st.integers(0, channels - 1))
    x = np.ones((1, 1, 1, channels), np.float32)
    x[..., c] = 100.0
    base = np.asarray(_lrn_jit(jnp.ones_like(x), size=size, alpha=1.0))
    got = np.asarray(_lrn_jit(jnp.asarray(x), size=size, alpha=1.0))
    changed = {i for i in range(channels) if i != c and got[..., i] != base[..., i]}
    expected = set(range(max(0, c - (size - 1) // 2), min(channels, c + size // 2 + 1))) - {c}
    assert changed == expected


# --- hypothesis: max pooling ---------------------------------------------------------------------


@st.composite
def pool_cases(draw):
    window = draw(st.integers(1, 4))
    stride = draw(st.integers(1, 4))
    h = draw(st.integers(window, window + 3 * stride))
    w = draw(st.integers(window, window + 3 * stride))
    shape = (draw(st.integers(1, 2)), h, w, draw(st.integers(1, 3)))
    # Values from {-1, 0, 1} (and sometimes one value only): most windows hold a tie.
    values = draw(st.sampled_from([[-1.0, 0.0, 1.0], [0.0, 1.0], [2.0]]))
    x = draw(hnp.arrays(np.float32, shape, elements=st.sampled_from(values), fill=st.nothing()))
    out_shape = (shape[0], (h - window) // stride + 1, (w - window) // stride + 1, shape[3])
    cotangents = st.integers(-3, 3).map(float)
    g = draw(hnp.arrays(np.float32, out_shape, elements=cotangents, fill=st.nothing()))
    return x, g, window, stride


@settings(max_examples=12 * SCALE, deadline=None)
@given(pool_cases())
def test_max_pool_value_and_gradient_equal_jax_reduce_window_with_ties(case):
    """JAX's gradient of reduce_window max is select_and_scatter, nn.max_pool's (checked with
    the variants below)."""
    x, g, window, stride = case
    (y, dx), (y_plain, dx_plain) = _both_vjps(x, g, window, stride)
    np.testing.assert_array_equal(y, y_plain)
    # Exact: each input gets the sum of the (integer) cotangents of the windows it wins.
    np.testing.assert_array_equal(dx, dx_plain)

    # What the references do, spelled out: a cotangent of 1 for one output sends 1 to the
    # first (row-major) position of that window's maximum and 0 everywhere else.
    _, ho, wo, _ = g.shape
    oi, oj = ho // 2, wo // 2
    one = np.zeros_like(g)
    one[:, oi, oj, :] = 1.0
    (_, dx), _ = _both_vjps(x, one, window, stride)  # same shapes: no new compilation
    patch = x[:, oi * stride : oi * stride + window, oj * stride : oj * stride + window]
    for b in range(x.shape[0]):
        for c in range(x.shape[3]):
            i, j = divmod(int(np.argmax(patch[b, :, :, c])), window)  # the first maximum
            expected = np.zeros(x.shape[1:3], np.float32)
            expected[oi * stride + i, oj * stride + j] = 1.0
            np.testing.assert_array_equal(dx[b, :, :, c], expected)


@pytest.mark.slow
@settings(max_examples=5 * SCALE, deadline=None)
@given(
    size=st.sampled_from([55, 27, 13]),  # the paper's three pooled maps (224 input)
    channels=st.integers(1, 8),
    seed=st.integers(0, 2**32 - 1),
)
def test_max_pool_gradient_on_the_papers_map_sizes(size, channels, seed):
    rng = np.random.default_rng(seed)
    x = rng.integers(-1, 2, (2, size, size, channels)).astype(np.float32)
    g = rng.integers(-3, 4, (2, (size - 3) // 2 + 1, (size - 3) // 2 + 1, channels))
    (y, dx), (y_plain, dx_plain) = _both_vjps(x, g.astype(np.float32), 3, 2)
    np.testing.assert_array_equal(y, y_plain)
    np.testing.assert_array_equal(dx, dx_plain)


# --- chex variants: the same laws jitted, not jitted and pmapped ------------------------------


class LayerVariantsTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True, with_pmap=True)
    @parameterized.named_parameters(("paper_size5", 5, False), ("torch_size4", 4, True))
    def test_lrn(self, size, scale_alpha_by_size):
        x = np.random.default_rng(size).normal(0, 20, (2, 3, 3, 10)).astype(np.float32)
        params = dict(size=size, k=2.0, alpha=1e-3, beta=0.75)

        @self.variant
        def lrn(x):
            return local_response_norm(x, scale_alpha_by_size=scale_alpha_by_size, **params)

        expected = lrn_reference(x, scale_alpha_by_size=scale_alpha_by_size, **params)
        np.testing.assert_allclose(lrn(x), expected, rtol=2e-5, atol=1e-6)

    @chex.variants(with_jit=True, without_jit=True, with_pmap=True)
    @parameterized.named_parameters(("w3s2", 3, 2))  # other windows: the hypothesis tests
    def test_max_pool_and_its_gradient(self, window, stride):
        rng = np.random.default_rng(window * 10 + stride)
        x = rng.integers(-1, 2, (2, 9, 8, 3)).astype(np.float32)  # ties in most windows
        g = rng.integers(-3, 4, plain_max_pool(x, window, stride).shape).astype(np.float32)
        y_ref, dx_ref = _vjp(plain_max_pool, x, g, window, stride)

        @self.variant
        def pool_vjp(x, g):
            return _vjp(max_pool, x, g, window, stride)

        y, dx = pool_vjp(x, g)
        np.testing.assert_array_equal(y, y_ref)
        np.testing.assert_array_equal(dx, dx_ref)
        y_flax, dx_flax = _vjp(flax_max_pool, x, g, window, stride)
        np.testing.assert_array_equal(y, y_flax)
        np.testing.assert_array_equal(dx, dx_flax)

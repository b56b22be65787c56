"""The layers AlexNet is made of that linen does not have, or has in a slow form on XLA:CPU.

- `local_response_norm`: section 3.3, with both alpha conventions of the anchors.
- `max_pool`: overlapping pooling (section 3.4) with its gradient written for XLA:CPU.
- `GroupedConv`: the two GPU columns of figure 2 as one layer with `groups` kernel blocks, its
  convolutions on XLA or on oneDNN (`onednn.py`, model.kernels='onednn').
- `adaptive_avg_pool`: torchvision's 6x6 pool before fc6 (its preset only).

Each fast form has a test that it equals the plain form (tests/test_model_speedforms.py).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from alexnet_jax import onednn
from alexnet_jax.precision import Upcast

Array = jax.Array
Initializer = Callable[..., Array]


def local_response_norm(
    x: Array,
    *,
    size: int = 5,
    k: float = 2.0,
    alpha: float = 1e-4,
    beta: float = 0.75,
    scale_alpha_by_size: bool = False,
    groups: int = 1,
) -> Array:
    """Local response normalisation over the channel (last) axis of an NHWC array (section 3.3).

    b_i = a_i / (k + alpha' * sum_{i - size//2 <= j <= i + (size-1)//2} a_j^2) ** beta, the
    window clipped at the edges, with alpha' = alpha (the paper as printed, TF's convention) or
    alpha / size (the author's cuda-convnet2, Caffe and PyTorch). For odd sizes (the paper's 5)
    the window is |j - i| <= size//2; an even size takes PyTorch's window (one channel fewer
    after i than before it), so `size` channels are summed, as `nn.LocalResponseNorm` sums them.

    With `groups` > 1 the windows stay inside each of `groups` equal blocks of channels: the
    paper's two GPUs each normalised their own column's maps (model.lrn_per_column).

    The windowed sum is `size` shifted slices of the zero-padded squares, added (`_window_sum`):
    one fused elementwise pass, where XLA:CPU's `reduce_window` over 5 channels is several times
    slower and a matmul with a banded 0/1 matrix (this layer's earlier form) spends 95 % of its
    multiplies on zeros (README, "Performance"). The gradient is written out (`_lrn_dx`) so
    that it reuses the forward's t ** -beta instead of autodiff's second `pow`, and beta = 0.75
    (the paper's) is rsqrt(t) * sqrt(rsqrt(t)): XLA:CPU's `pow` is exp(log) per element, and the
    two `pow`s were most of LRN's time.
    """
    scale = alpha / size if scale_alpha_by_size else alpha
    if all(isinstance(v, (int, float)) for v in (k, scale, beta)):  # the model's case
        return _lrn_fixed(x, size, groups, float(k), float(scale), float(beta))
    # Traced hyper-parameters (the property tests jit them) get their cotangents too.
    return _lrn(x, k, scale, beta, size, groups)


def _power(t: Array, beta: Any) -> Array:
    """t ** -beta; the paper's 0.75 (and 0.5) without `pow`, which XLA:CPU computes as exp(log).
    A traced beta (the property tests) takes `pow`."""
    if isinstance(beta, float) and beta == 0.75:
        r = lax.rsqrt(t)
        return r * jnp.sqrt(r)
    if isinstance(beta, float) and beta == 0.5:
        return lax.rsqrt(t)
    return lax.pow(t, -jnp.asarray(beta, dtype=t.dtype))


def _lrn_forward(x, k, scale, beta, size, groups):
    window = _window_sum(jnp.square(x), size, groups)
    t = k + scale * window
    s = _power(t, beta)
    return x * s, (x, window, t, s)


def _lrn_dx(x, t, s, g, scale, beta, size, groups):
    # y_i = x_i t_i^-b with t_i = k + scale * sum_{j in w(i)} x_j^2, so
    # dx_j = g_j t_j^-b - 2 b scale x_j sum_{i: j in w(i)} g_i x_i t_i^(-b-1).
    q = g * x * s / t  # g_i x_i t_i^(-b-1)
    summed = _window_sum(q, size, groups, transpose=True)
    return (g * s - (2 * beta * scale) * x * summed).astype(x.dtype), q


# Numbers for k, scale and beta (nondiff): inside shard_map a cotangent for them would be
# device-varying while they are not, so the model's LRN has none.
@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2, 3, 4, 5))
def _lrn_fixed(x: Array, size: int, groups: int, k: float, scale: float, beta: float) -> Array:
    return _lrn_forward(x, k, scale, beta, size, groups)[0]


def _lrn_fixed_fwd(x, size, groups, k, scale, beta):
    return _lrn_forward(x, k, scale, beta, size, groups)


def _lrn_fixed_bwd(size, groups, k, scale, beta, residuals, g):
    x, _, t, s = residuals
    return (_lrn_dx(x, t, s, g, scale, beta, size, groups)[0],)


_lrn_fixed.defvjp(_lrn_fixed_fwd, _lrn_fixed_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _lrn(x: Array, k: Any, scale: Any, beta: Any, size: int, groups: int) -> Array:
    return _lrn_forward(x, k, scale, beta, size, groups)[0]


def _lrn_fwd(x, k, scale, beta, size, groups):
    y, residuals = _lrn_forward(x, k, scale, beta, size, groups)
    return y, (*residuals, k, scale, beta)


def _lrn_bwd(size, groups, residuals, g):
    x, window, t, s, k, scale, beta = residuals
    dx, q = _lrn_dx(x, t, s, g, scale, beta, size, groups)
    dk = -beta * jnp.sum(q)
    dscale = -beta * jnp.sum(q * window)
    dbeta = -jnp.sum(g * x * s * jnp.log(t))

    def like(value, ct):
        return jnp.asarray(ct, jnp.result_type(value)).reshape(jnp.shape(value))

    return dx, like(k, dk), like(scale, dscale), like(beta, dbeta)


_lrn.defvjp(_lrn_fwd, _lrn_bwd)


def _window_sum(a: Array, size: int, groups: int, transpose: bool = False) -> Array:
    """out_i = sum of a_j over i - size//2 <= j <= i + (size-1)//2 within each of `groups` equal
    blocks of channels (the last axis), the window clipped at the edges; with `transpose`, the
    sum over the i whose window holds j (the window mirrored: the gradient's sum).

    torch pads size//2 channels before and (size-1)//2 after and averages `size` of them; the
    same bounds here keep even sizes (not symmetric) equal to PyTorch's.
    """
    channels = a.shape[-1]
    if channels % groups:
        raise ValueError(f"{channels} channels do not split into {groups} LRN groups")
    per = channels // groups
    before, after = size // 2, (size - 1) // 2
    if transpose:
        before, after = after, before
    blocks = a.reshape(*a.shape[:-1], groups, per)
    pad = [(0, 0, 0)] * (blocks.ndim - 1) + [(before, after, 0)]
    padded = lax.pad(blocks, jnp.zeros((), a.dtype), pad)
    out = padded[..., 0:per]
    for i in range(1, size):
        out = out + padded[..., i : i + per]
    return out.reshape(a.shape)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2))
def max_pool(x: Array, window: int, stride: int) -> Array:
    """Max pooling over `window` x `window` patches of an NHWC array, no padding (section 3.4).

    The same function and gradient as `nn.max_pool` (the gradient goes to the first maximum of each
    window, like XLA's select_and_scatter), with the gradient written as elementwise ops on the
    pooled grid (`_max_pool_bwd`): XLA:CPU lowers select_and_scatter to a variadic argmax
    reduce_window and a scatter, several times slower.
    """
    return lax.reduce_window(
        x, -jnp.inf, lax.max, (1, window, window, 1), (1, stride, stride, 1), "VALID"
    )


def _max_pool_fwd(x: Array, window: int, stride: int) -> tuple[Array, tuple[Array, Array]]:
    y = max_pool(x, window, stride)
    return y, (x, y)


def _max_pool_bwd(window: int, stride: int, residuals: tuple[Array, Array], g: Array):
    x, y = residuals
    (n, h, w, c), (ho, wo) = x.shape, y.shape[1:3]
    dtype = g.dtype
    if x.dtype != jnp.float32:
        # bfloat16: XLA:CPU would convert inside each of the window's views and each term (most
        # of a bf16 step's time in them). Widening once is exact, and the up to 4 overlapping
        # windows' gradients are summed in float32, rounded once. The first barrier pins the
        # stored bfloat16 values: without it XLA may widen the unrounded values it computed them
        # from (excess precision), and no view would equal y any more (a zero gradient).
        x, y = lax.optimization_barrier((x, y))
        x, y, g = lax.optimization_barrier(
            (x.astype(jnp.float32), y.astype(jnp.float32), g.astype(jnp.float32))
        )

    def view(i: int, j: int) -> Array:  # the inputs at window position (i, j) of every window
        return x[:, i : i + stride * (ho - 1) + 1 : stride, j : j + stride * (wo - 1) + 1 : stride]

    # The first window position (row-major) that holds the maximum, as select_and_scatter picks.
    first = jnp.full(y.shape, window * window, jnp.int32)
    for i, j in reversed([(i, j) for i in range(window) for j in range(window)]):
        first = jnp.where(view(i, j) == y, i * window + j, first)
    first = lax.optimization_barrier(first)  # computed once, not once per use below
    zero = jnp.zeros((), g.dtype)

    # Input row stride * m + r gets the gradient of window row i = stride * q + r of output row
    # m - q. So each phase (r_h, r_w) of the input is a sum of shifted maps on the pooled grid,
    # and interleaving the stride x stride phases gives dx: a few passes over the pooled grid
    # instead of window**2 passes over the input.
    mh, mw = -(-h // stride), -(-w // stride)  # rows and columns per phase
    phases = []
    for rh in range(stride):
        row = []
        for rw in range(stride):
            acc = jnp.zeros((n, mh, mw, c), g.dtype)
            for qh in range(-(-(window - rh) // stride)):
                for qw in range(-(-(window - rw) // stride)):
                    term = jnp.where(
                        first == (stride * qh + rh) * window + stride * qw + rw, g, zero
                    )
                    shift = [(0, 0, 0), (qh, mh - ho - qh, 0), (qw, mw - wo - qw, 0), (0, 0, 0)]
                    acc = acc + lax.pad(term, zero, shift)
            row.append(acc)
        phases.append(jnp.stack(row, axis=3))  # (n, mh, mw, r_w, c)
    dx = jnp.stack(phases, axis=2).reshape(n, mh * stride, mw * stride, c)  # interleave (r_h, r_w)
    return (dx[:, :h, :w].astype(dtype),)


max_pool.defvjp(_max_pool_fwd, _max_pool_bwd)

# model.kernels: 'cpu' = the formulations above (split groups, the pooled-grid max-pool gradient),
# fast on XLA:CPU; 'onednn' = the same with the convolutions on oneDNN (onednn.py; CPU only,
# another 1.16x); 'portable' = XLA's native forms (feature_group_count, select_and_scatter), which
# GPU and TPU backends lower to their own kernels; 'auto' = 'onednn' on a CPU where it builds,
# else 'cpu'; 'portable' on GPUs and TPUs.
KERNELS = ("auto", "portable", "cpu", "onednn")
CPU_FORMS = ("cpu", "onednn")  # the resolved choices that use the CPU formulations above


def resolve_kernels(choice: str) -> str:
    """'cpu', 'onednn' or 'portable' for `model.kernels` (auto: 'onednn' on a CPU backend where
    oneDNN's convolutions build, else 'cpu'; 'portable' on other backends)."""
    if choice == "auto":
        if jax.default_backend() != "cpu":
            return "portable"
        return "onednn" if onednn.usable() else "cpu"
    return choice


def check_kernels(choice: str) -> str | None:
    """Why `model.kernels=choice` cannot run in this process, in one line; None if it can."""
    if choice != "onednn":
        return None
    if jax.default_backend() != "cpu":
        return (
            f"model.kernels=onednn runs on CPUs only; the backend here is {jax.default_backend()}"
        )
    return onednn.missing()


def max_pool_portable(x: Array, window: int, stride: int) -> Array:
    """`max_pool` with the gradient autodiff gives `reduce_window` (select_and_scatter)."""
    return lax.reduce_window(
        x, -jnp.inf, lax.max, (1, window, window, 1), (1, stride, stride, 1), "VALID"
    )


class Dense(nn.Module):
    """`nn.Dense` (same parameters, same names) with the `Upcast` option for bfloat16."""

    features: int
    kernel_init: Initializer = nn.initializers.lecun_normal()
    bias_init: Initializer = nn.initializers.zeros
    dtype: Any = jnp.float32
    upcast: bool = False

    @nn.compact
    def __call__(self, x: Array) -> Array:
        kernel = self.param("kernel", self.kernel_init, (x.shape[-1], self.features), jnp.float32)
        bias = self.param("bias", self.bias_init, (self.features,), jnp.float32)
        op = Upcast(self.dtype, self.upcast)
        y = jnp.matmul(op.operand(x), op.operand(kernel))
        return op.result(y + bias.astype(y.dtype))


class GroupedConv(nn.Module):
    """A convolution whose input and output channels are split into `groups` columns.

    The kernel has the same shape and parameter count as `nn.Conv(feature_group_count=groups)`.
    The columns are computed as separate convolutions and concatenated: XLA's CPU backend runs a
    `feature_group_count` convolution several times slower than the same work split up.
    """

    features: int
    kernel_size: int
    strides: int = 1
    padding: int = 0
    groups: int = 1
    kernel_init: Initializer = nn.initializers.lecun_normal()
    bias_init: Initializer = nn.initializers.zeros
    dtype: Any = jnp.float32
    split: bool = True  # False: one `feature_group_count` convolution (model.kernels='portable')
    upcast: bool = False  # bfloat16 computed in float32 from its rounded operands (`Upcast`)
    onednn: bool = False  # the convolutions on oneDNN (model.kernels='onednn')

    @nn.compact
    def __call__(self, x: Array) -> Array:
        in_features = x.shape[-1]
        if in_features % self.groups or self.features % self.groups:
            raise ValueError(
                f"{self.name}: {in_features} -> {self.features} channels do not split into "
                f"{self.groups} groups"
            )
        kshape = (self.kernel_size, self.kernel_size, in_features // self.groups, self.features)
        kernel = self.param("kernel", self.kernel_init, kshape, jnp.float32)
        bias = self.param("bias", self.bias_init, (self.features,), jnp.float32)
        op = Upcast(self.dtype, self.upcast)
        # bf16 on a CPU with bf16 units: oneDNN's bf16 convolutions round the operands themselves.
        native = self.onednn and op.on and onednn.native_bf16()
        x, kernel = (
            (x.astype(jnp.float32), kernel) if native else (op.operand(x), op.operand(kernel))
        )
        pad = [(self.padding, self.padding)] * 2
        dims = ("NHWC", "HWIO", "NHWC")
        strides = (self.strides, self.strides)
        if not self.split:
            y = lax.conv_general_dilated(
                x, kernel, strides, pad, dimension_numbers=dims, feature_group_count=self.groups
            )
            return op.result(y + bias.astype(y.dtype))

        def conv(x: Array, kernel: Array) -> Array:
            if self.onednn:
                return onednn.conv(x, kernel, self.strides, self.padding, native)
            return lax.conv_general_dilated(x, kernel, strides, pad, dimension_numbers=dims)

        outs = [
            conv(xg, kg)
            for xg, kg in zip(
                jnp.split(x, self.groups, axis=-1),
                jnp.split(kernel, self.groups, axis=-1),
                strict=True,
            )
        ]
        y = outs[0] if self.groups == 1 else jnp.concatenate(outs, axis=-1)
        y = y + bias.astype(y.dtype)
        return y if native else op.result(y)


def adaptive_avg_pool(x: Array, size: int) -> Array:
    """torchvision's AdaptiveAvgPool2d((size, size)); parameter-free."""
    h, w = x.shape[1:3]
    if (h, w) == (size, size):
        return x
    rows = [slice((i * h) // size, -(-((i + 1) * h) // size)) for i in range(size)]
    cols = [slice((j * w) // size, -(-((j + 1) * w) // size)) for j in range(size)]
    return jnp.stack(
        [jnp.stack([x[:, r, c].mean(axis=(1, 2)) for c in cols], axis=1) for r in rows], axis=1
    )


class ExampleDropout(nn.Module):
    """Dropout whose mask for each example is drawn from (the layer's key, the example's place in
    the global batch): a function of (seed, step, global example), whatever the devices.

    `width` neurons get a mask; this device's `x` holds `x.shape[-1]` of them from `offset` on
    (a model-parallel layer's slice), so every layout draws the one-device masks.
    """

    rate: float

    @nn.compact
    def __call__(
        self, x: Array, example_ids: Array, width: int, offset: Any, *, deterministic: bool
    ) -> Array:
        if deterministic or self.rate == 0.0:
            return x
        keep = 1.0 - self.rate
        key = self.make_rng("dropout")

        def row(example: Array) -> Array:
            return jax.random.bernoulli(jax.random.fold_in(key, example), keep, (width,))

        mask = jax.vmap(row)(example_ids)
        if width != x.shape[-1]:
            mask = lax.dynamic_slice_in_dim(mask, offset, x.shape[-1], axis=1)
        return lax.select(mask, x / keep, jnp.zeros_like(x))

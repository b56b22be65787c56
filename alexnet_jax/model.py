"""AlexNet (Krizhevsky, Sutskever & Hinton, NIPS 2012, section 3, figure 2) as a pure linen module.

Everything on which reference implementations disagree (LRN alpha convention and position,
initialisation, conv1 padding for 224 vs 227 inputs, dropout placement) is a field whose default is
the paper's. `from_config` builds the module from the `model` block of an experiment config.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax import lax

Array = jax.Array
Initializer = Callable[..., Array]

# Layers whose biases the paper initialises to 1 "to accelerate the early stages of learning by
# providing the ReLUs with positive inputs" (section 5).
_BIAS_ONE_LAYERS = ("conv2", "conv4", "conv5", "fc6", "fc7")


def local_response_norm(
    x: Array,
    *,
    size: int = 5,
    k: float = 2.0,
    alpha: float = 1e-4,
    beta: float = 0.75,
    scale_alpha_by_size: bool = False,
) -> Array:
    """Local response normalisation over the channel (last) axis of an NHWC array (section 3.3).

    b_i = a_i / (k + alpha' * sum_{i - size//2 <= j <= i + (size-1)//2} a_j^2) ** beta, the
    window clipped at the edges, with alpha' = alpha (the paper as printed, TF's convention) or
    alpha / size (the author's cuda-convnet2, Caffe and PyTorch). For odd sizes (the paper's 5)
    the window is |j - i| <= size//2; an even size takes PyTorch's window (one channel fewer
    after i than before it), so `size` channels are summed, as `nn.LocalResponseNorm` sums them.

    The windowed sum is a matmul with a banded 0/1 matrix: on CPUs and GPUs a small dense matmul
    over channels is much faster than a `reduce_window` over a window of 5 channels.
    """
    scale = alpha / size if scale_alpha_by_size else alpha
    t = k + scale * jnp.matmul(jnp.square(x), _channel_band(x.shape[-1], size, x.dtype))
    return x * lax.pow(t, jnp.asarray(-beta, dtype=x.dtype))


def _channel_band(channels: int, size: int, dtype: Any) -> Array:
    """B[j, i] = 1 where i - size//2 <= j <= i + (size-1)//2: (a ** 2) @ B sums each window.

    torch pads size//2 channels before and (size-1)//2 after and averages `size` of them; the
    same bounds here keep even sizes (not symmetric) equal to PyTorch's.
    """
    idx = np.arange(channels)
    offset = idx[:, None] - idx[None, :]  # j - i
    band = (offset >= -(size // 2)) & (offset <= (size - 1) // 2)
    return jnp.asarray(band, dtype=dtype)


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
    return (dx[:, :h, :w],)


max_pool.defvjp(_max_pool_fwd, _max_pool_bwd)


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
        x = x.astype(self.dtype)
        kernel = kernel.astype(self.dtype)
        pad = [(self.padding, self.padding)] * 2
        dims = ("NHWC", "HWIO", "NHWC")
        outs = [
            lax.conv_general_dilated(
                xg, kg, (self.strides, self.strides), pad, dimension_numbers=dims
            )
            for xg, kg in zip(
                jnp.split(x, self.groups, axis=-1),
                jnp.split(kernel, self.groups, axis=-1),
                strict=True,
            )
        ]
        y = outs[0] if self.groups == 1 else jnp.concatenate(outs, axis=-1)
        return y + bias.astype(self.dtype)


def _inits(scheme: str, layer: str) -> tuple[Initializer, Initializer]:
    """(kernel_init, bias_init) for `layer` under an initialisation scheme (REFERENCE.md).

    paper: N(0, 0.01) everywhere; bias 1 in conv2, conv4, conv5, fc6, fc7 (section 5).
    cc2:   the author's released config: std 0.03 in conv3-5, bias -7 on fc8.
    caffe: bvlc_alexnet: std 0.005 in fc6/fc7, the non-zero biases 0.1.
    he:    fan-in variance scaling, zero biases; not AlexNet's, but it trains narrow, scaled-down
           networks (the quickstart) from the first step.
    """
    one = 1.0 if layer in _BIAS_ONE_LAYERS else 0.0
    if scheme == "paper":
        std, bias = 0.01, one
    elif scheme == "cc2":
        std = 0.03 if layer in ("conv3", "conv4", "conv5") else 0.01
        bias = -7.0 if layer == "fc8" else one
    elif scheme == "caffe":
        std = 0.005 if layer in ("fc6", "fc7") else 0.01
        bias = 0.1 * one
    elif scheme == "he":
        return nn.initializers.he_normal(), nn.initializers.zeros
    else:
        raise ValueError(f"unknown init scheme {scheme!r}; use paper, cc2, caffe or he")
    return nn.initializers.normal(std), nn.initializers.constant(bias)


class AlexNet(nn.Module):
    """AlexNet on NHWC images; `model.apply(v, x, train=True, rngs={'dropout': key})` to train."""

    num_classes: int = 1000
    dropout_rate: float = 0.5
    use_lrn: bool = True
    groups: int = 2  # the two GPU columns: conv2, conv4 and conv5 see only their own column
    conv_features: Sequence[int] = (96, 256, 384, 384, 256)
    dense_features: int = 4096
    conv1_padding: int = 2  # 224 + 2*2 -> 55x55; use 0 with Caffe's 227 input
    lrn_size: int = 5
    lrn_k: float = 2.0
    lrn_alpha: float = 1e-4
    lrn_beta: float = 0.75
    lrn_scale_alpha_by_size: bool = False
    lrn_before_relu: bool = False  # conv1 only: cc2 normalises before the ReLU
    dropout_before_dense: bool = False  # torchvision: dropout on the *inputs* of fc6 and fc7
    pool_to_6x6: bool = False  # torchvision: adaptive average pool to 6x6 before fc6
    init_scheme: str = "paper"  # config key model.init; `init` would shadow Module.init
    dtype: Any = jnp.float32

    def _lrn(self, x: Array) -> Array:
        if not self.use_lrn:
            return x
        return local_response_norm(
            x,
            size=self.lrn_size,
            k=self.lrn_k,
            alpha=self.lrn_alpha,
            beta=self.lrn_beta,
            scale_alpha_by_size=self.lrn_scale_alpha_by_size,
        )

    def _conv(self, name: str, features: int, kernel: int, stride: int, pad: int, groups: int):
        kinit, binit = _inits(self.init_scheme, name)
        return GroupedConv(
            features, kernel, stride, pad, groups, kinit, binit, self.dtype, name=name
        )

    def _dense(self, name: str, features: int) -> nn.Dense:
        kinit, binit = _inits(self.init_scheme, name)
        return nn.Dense(features, dtype=self.dtype, kernel_init=kinit, bias_init=binit, name=name)

    @nn.compact
    def __call__(self, x: Array, *, train: bool) -> Array:
        c1, c2, c3, c4, c5 = self.conv_features
        g = self.groups

        def pool(y: Array) -> Array:  # overlapping pooling, z=3, s=2 (section 3.4)
            return max_pool(y, 3, 2)

        x = self._conv("conv1", c1, 11, 4, self.conv1_padding, 1)(x)
        x = nn.relu(self._lrn(x)) if self.lrn_before_relu else self._lrn(nn.relu(x))
        x = pool(x)
        x = pool(self._lrn(nn.relu(self._conv("conv2", c2, 5, 1, 2, g)(x))))
        x = nn.relu(self._conv("conv3", c3, 3, 1, 1, 1)(x))  # conv3 connects across columns
        x = nn.relu(self._conv("conv4", c4, 3, 1, 1, g)(x))
        x = pool(nn.relu(self._conv("conv5", c5, 3, 1, 1, g)(x)))
        if self.pool_to_6x6:
            x = _adaptive_avg_pool(x, 6)
        x = x.reshape((x.shape[0], -1))

        drop = nn.Dropout(self.dropout_rate, deterministic=not train)
        for name in ("fc6", "fc7"):
            if self.dropout_before_dense:
                x = drop(x)
            x = nn.relu(self._dense(name, self.dense_features)(x))
            if not self.dropout_before_dense:
                x = drop(x)  # section 4.2: dropout on the outputs of the two hidden fc layers
        x = self._dense("fc8", self.num_classes)(x)
        return x.astype(jnp.float32)  # logits in float32 so the softmax is stable under bf16


def _adaptive_avg_pool(x: Array, size: int) -> Array:
    """torchvision's AdaptiveAvgPool2d((size, size)); parameter-free."""
    h, w = x.shape[1:3]
    if (h, w) == (size, size):
        return x
    rows = [slice((i * h) // size, -(-((i + 1) * h) // size)) for i in range(size)]
    cols = [slice((j * w) // size, -(-((j + 1) * w) // size)) for j in range(size)]
    return jnp.stack(
        [jnp.stack([x[:, r, c].mean(axis=(1, 2)) for c in cols], axis=1) for r in rows], axis=1
    )


# Field overrides for the presets; the config can still override any field after the preset.
PRESETS: dict[str, dict[str, Any]] = {
    "paper": {},
    # torchvision.models.alexnet ("one weird trick", Krizhevsky 2014): one tower, no LRN,
    # dropout before fc6/fc7, adaptive 6x6 average pool. 61,100,840 parameters.
    "torchvision": dict(
        groups=1,
        use_lrn=False,
        conv_features=(64, 192, 384, 256, 256),
        dropout_before_dense=True,
        pool_to_6x6=True,
    ),
}

_CONFIG_FIELDS = (
    "num_classes",
    "dropout_rate",
    "use_lrn",
    "groups",
    "conv_features",
    "dense_features",
    "conv1_padding",
    "lrn_size",
    "lrn_k",
    "lrn_alpha",
    "lrn_beta",
    "lrn_scale_alpha_by_size",
    "lrn_before_relu",
)


def from_config(model_config: ml_collections.ConfigDict) -> AlexNet:
    """Builds AlexNet from the `model` block of an experiment config, preset first."""
    preset = model_config.get("preset", "paper")
    if preset not in PRESETS:
        raise ValueError(f"unknown model preset {preset!r}; choose one of {sorted(PRESETS)}")
    fields = {name: model_config[name] for name in _CONFIG_FIELDS if name in model_config}
    fields["conv_features"] = tuple(fields.get("conv_features", AlexNet.conv_features))
    fields["init_scheme"] = model_config.get("init", "paper")
    if preset != "paper":
        # A preset fixes the architecture; only the task-level fields still come from the config.
        keep = {"num_classes", "dropout_rate", "init_scheme"}
        fields = {k: v for k, v in fields.items() if k in keep} | PRESETS[preset]
    return AlexNet(**fields, dtype=jnp.dtype(model_config.get("dtype", "float32")))


def param_table(params: Any) -> list[tuple[str, tuple[int, ...], int]]:
    """(path, shape, size) for every parameter, in definition order."""
    rows = []
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        name = "/".join(str(getattr(p, "key", p)) for p in path)
        rows.append((name, tuple(leaf.shape), int(np.prod(leaf.shape))))
    return rows


def abstract_params(model: AlexNet, image_shape: tuple[int, int, int]) -> Any:
    """The parameter shapes, without allocating or computing anything (`jax.eval_shape`)."""
    x = jax.ShapeDtypeStruct((1, *image_shape), jnp.float32)
    variables = jax.eval_shape(
        lambda: model.init(jax.random.key(0), jnp.zeros(x.shape, x.dtype), train=False)
    )
    return variables["params"]

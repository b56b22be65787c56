"""AlexNet (Krizhevsky, Sutskever & Hinton, NIPS 2012, section 3, figure 2) as a pure linen module.

Everything on which reference implementations disagree (LRN alpha convention and position,
initialisation, conv1 padding for 224 vs 227 inputs, dropout placement) is a field whose default is
the paper's. `from_config` builds the module from the `model` block of an experiment config; the
registries here (`INIT_SCHEMES`, `PRESETS`, `DTYPES`) and `check_geometry` are what
`config.validate` checks a config against before anything runs.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from alexnet_jax.layers import (
    CPU_FORMS,
    Dense,
    ExampleDropout,
    GroupedConv,
    Initializer,
    adaptive_avg_pool,
    local_response_norm,
    max_pool_portable,
    resolve_kernels,
)
from alexnet_jax.layers import max_pool as _max_pool
from alexnet_jax.model_parallel import Layout

Array = jax.Array

# Layers whose biases the paper initialises to 1 "to accelerate the early stages of learning by
# providing the ReLUs with positive inputs" (section 5).
_BIAS_ONE_LAYERS = ("conv2", "conv4", "conv5", "fc6", "fc7")


def _paper_init(layer: str) -> tuple[Initializer, Initializer]:
    """N(0, 0.01) everywhere; bias 1 in conv2, conv4, conv5, fc6, fc7 (section 5)."""
    return nn.initializers.normal(0.01), nn.initializers.constant(_bias_one(layer))


def _cc2_init(layer: str) -> tuple[Initializer, Initializer]:
    """The author's released config: std 0.03 in conv3-5, bias -7 on fc8."""
    std = 0.03 if layer in ("conv3", "conv4", "conv5") else 0.01
    bias = -7.0 if layer == "fc8" else _bias_one(layer)
    return nn.initializers.normal(std), nn.initializers.constant(bias)


def _caffe_init(layer: str) -> tuple[Initializer, Initializer]:
    """bvlc_alexnet: std 0.005 in fc6/fc7, the non-zero biases 0.1."""
    std = 0.005 if layer in ("fc6", "fc7") else 0.01
    return nn.initializers.normal(std), nn.initializers.constant(0.1 * _bias_one(layer))


def _he_init(layer: str) -> tuple[Initializer, Initializer]:
    """Fan-in variance scaling, zero biases; not AlexNet's, but it trains narrow, scaled-down
    networks (the quickstart) from the first step."""
    del layer
    return nn.initializers.he_normal(), nn.initializers.zeros


def _bias_one(layer: str) -> float:
    return 1.0 if layer in _BIAS_ONE_LAYERS else 0.0


# model.init -> (layer name -> (kernel_init, bias_init)); REFERENCE.md compares them.
INIT_SCHEMES: dict[str, Callable[[str], tuple[Initializer, Initializer]]] = {
    "paper": _paper_init,
    "cc2": _cc2_init,
    "caffe": _caffe_init,
    "he": _he_init,
}
# model.dtype: the compute dtype; parameters and optimiser state stay float32.
DTYPES = ("float32", "bfloat16")
# model.dropout_masks: 'example' keys each example's masks by its place in the global batch, so
# that the device count and the parallel mode do not change them; 'device' is linen's Dropout
# keyed by (step, device), what runs started before parallel modes existed used.
DROPOUT_MASKS = ("example", "device")


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
    # The paper's GPUs normalised their own column's maps: the LRN windows of conv1 and conv2
    # stop at the column boundary. Caffe's and torch's one-tower LRN runs across it (False).
    lrn_per_column: bool = True
    dropout_masks: str = "example"  # DROPOUT_MASKS
    init_scheme: str = "paper"  # config key model.init; `init` would shadow Module.init
    dtype: Any = jnp.float32
    kernels: str = "cpu"  # resolved model.kernels: 'cpu', 'onednn' or 'portable' (layers.KERNELS)
    layout: Layout | None = None  # model parallelism inside a shard_map step (model_parallel.py)

    def _width(self, layer: str, full: int) -> int:
        return self.layout.width(layer, full) if self.layout else full

    def _local_groups(self, layer: str, groups: int) -> int:
        """A split grouped layer holds groups / shards of its groups (conv1 and conv3, one
        group reading whole inputs, keep it)."""
        if self.layout is None or layer not in self.layout.split or groups == 1:
            return groups
        return groups // self.layout.shards

    def _gather(self, x: Array, producer: str) -> Array:
        return self.layout.gather_features(x, producer) if self.layout else x

    def _lrn(self, x: Array, layer: str) -> Array:
        if not self.use_lrn:
            return x
        groups = self._local_groups(layer, self.groups) if self.lrn_per_column else 1
        return local_response_norm(
            x,
            size=self.lrn_size,
            k=self.lrn_k,
            alpha=self.lrn_alpha,
            beta=self.lrn_beta,
            scale_alpha_by_size=self.lrn_scale_alpha_by_size,
            groups=groups,
        )

    def _conv(self, name: str, features: int, kernel: int, stride: int, pad: int, groups: int):
        kinit, binit = INIT_SCHEMES[self.init_scheme](name)
        return GroupedConv(
            self._width(name, features),
            kernel,
            stride,
            pad,
            self._local_groups(name, groups),
            kinit,
            binit,
            self.dtype,
            split=self.kernels in CPU_FORMS,
            upcast=self.kernels in CPU_FORMS,
            # Not inside the model-parallel shard_map steps: FFI results there carry no
            # varying-axes type, which the custom VJP must return (XLA's convolutions there).
            onednn=self.kernels == "onednn" and self.layout is None,
            name=name,
        )

    def _dense(self, name: str, features: int) -> Dense:
        kinit, binit = INIT_SCHEMES[self.init_scheme](name)
        width = self._width(name, features)
        upcast = self.kernels in CPU_FORMS
        return Dense(width, kinit, binit, self.dtype, upcast, name=name)

    @nn.compact
    def __call__(self, x: Array, *, train: bool, example_ids: Array | None = None) -> Array:
        """Logits for `x`. `example_ids` are the examples' places in the global batch, which
        key their dropout masks (default: 0..B-1, one device)."""
        # Checked while tracing, free at run time: a wrong batch names the array, not XLA's op.
        chex.assert_rank(x, 4)
        chex.assert_axis_dimension(x, 3, 3)
        c1, c2, c3, c4, c5 = self.conv_features
        g = self.groups

        def pool(y: Array) -> Array:  # overlapping pooling, z=3, s=2 (section 3.4)
            return (_max_pool if self.kernels in CPU_FORMS else max_pool_portable)(y, 3, 2)

        x = self._conv("conv1", c1, 11, 4, self.conv1_padding, 1)(x)
        x = (
            nn.relu(self._lrn(x, "conv1"))
            if self.lrn_before_relu
            else self._lrn(nn.relu(x), "conv1")
        )
        x = pool(x)
        x = pool(self._lrn(nn.relu(self._conv("conv2", c2, 5, 1, 2, g)(x)), "conv2"))
        x = self._gather(x, "conv2")  # conv3 connects across columns
        x = nn.relu(self._conv("conv3", c3, 3, 1, 1, 1)(x))
        x = nn.relu(self._conv("conv4", c4, 3, 1, 1, g)(x))
        x = pool(nn.relu(self._conv("conv5", c5, 3, 1, 1, g)(x)))
        if self.pool_to_6x6:
            x = adaptive_avg_pool(x, 6)
        x = self._gather(x, "conv5")  # before the flatten: the one-device order of fc6's inputs
        x = x.reshape((x.shape[0], -1))
        if example_ids is None:
            example_ids = jnp.arange(x.shape[0])
        if self.layout is not None and self.layout.gather_batch:
            x = self.layout.gather_examples(x)
            # Tiled in device order, so the gathered rows are the global batch's 0..B-1.
            example_ids = jnp.arange(x.shape[0])

        legacy_drop = nn.Dropout(self.dropout_rate, deterministic=not train)

        def drop(y: Array, layer: str) -> Array:
            if self.dropout_masks == "device":
                return legacy_drop(y)
            # On the outputs of a split layer this device holds a slice of the neurons: the mask
            # is drawn for all of them and sliced, so it is the one-device mask.
            full, offset = y.shape[-1], jnp.zeros((), jnp.int32)
            if not self.dropout_before_dense and self.layout is not None:
                full = self.dense_features
                offset = jnp.asarray(self.layout.offset(layer, y.shape[-1]), jnp.int32)
            return ExampleDropout(self.dropout_rate, name=f"dropout_{layer}")(
                y, example_ids, full, offset, deterministic=not train
            )

        for name, previous in (("fc6", None), ("fc7", "fc6")):
            if previous is not None:
                x = self._gather(x, previous)
            if self.dropout_before_dense:
                x = drop(x, name)
            x = nn.relu(self._dense(name, self.dense_features)(x))
            if not self.dropout_before_dense:
                x = drop(x, name)  # section 4.2: dropout on the outputs of the two hidden fc layers
        x = self._dense("fc8", self.num_classes)(self._gather(x, "fc7"))
        x = self._gather(x, "fc8")  # the softmax is over all classes
        chex.assert_shape(x, (None, self.num_classes))
        return x.astype(jnp.float32)  # logits in float32 so the softmax is stable under bf16


# A preset is a base: setting `model.preset` writes these fields into the config (`apply_preset`),
# and any field set after it wins. 'paper' is AlexNet's defaults.
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
ARCHITECTURE_FIELDS = tuple(sorted({k for p in PRESETS.values() for k in p}))

# The module's fields that the `model` config block sets, by the same name.
CONFIG_FIELDS = (
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
    "dropout_before_dense",
    "pool_to_6x6",
    "lrn_per_column",
    "dropout_masks",
)


def apply_preset(model_config: ml_collections.ConfigDict, preset: str) -> None:
    """Sets `model.preset` and writes the preset's fields over the paper's, in place."""
    if preset not in PRESETS:
        raise KeyError(preset)
    paper = {k: getattr(AlexNet, k) for k in ARCHITECTURE_FIELDS}
    for key, value in (paper | PRESETS[preset]).items():
        model_config[key] = tuple(value) if isinstance(value, (list, tuple)) else value
    model_config.preset = preset


def preset_applied(model_config: ml_collections.ConfigDict) -> bool:
    """False when `model.preset` names a preset whose fields were never written (a config that
    set the name alone, which would silently train the paper's architecture under its name)."""
    fields = PRESETS.get(model_config.get("preset", "paper"), {})
    paper = {k: getattr(AlexNet, k) for k in fields}
    return not fields or any(not _same(model_config.get(k), paper[k]) for k in fields)


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return tuple(a) == tuple(b)
    return a == b


def from_config(model_config: ml_collections.ConfigDict) -> AlexNet:
    """Builds AlexNet from the `model` block of an experiment config (validated by config.py)."""
    fields = {name: model_config[name] for name in CONFIG_FIELDS if name in model_config}
    fields["conv_features"] = tuple(fields.get("conv_features", AlexNet.conv_features))
    fields["init_scheme"] = model_config.get("init", "paper")
    fields["kernels"] = resolve_kernels(model_config.get("kernels", "auto"))
    return AlexNet(**fields, dtype=jnp.dtype(model_config.get("dtype", "float32")))


def feature_sizes(image_size: int, conv1_padding: int) -> list[tuple[str, int]]:
    """The spatial size after each layer that changes it: conv1 (11x11, stride 4), then the three
    3x3 stride-2 pools; the other convolutions keep the size ('same' padding)."""
    size = (image_size + 2 * conv1_padding - 11) // 4 + 1
    sizes = [("conv1", size)]
    for name in ("pool1", "pool2", "pool5"):
        size = (size - 3) // 2 + 1
        sizes.append((name, size))
    return sizes


def check_geometry(model_config: ml_collections.ConfigDict, image_size: int) -> str | None:
    """A one-line reason why this architecture cannot run on `image_size` inputs, or None."""
    feats = tuple(model_config.get("conv_features", AlexNet.conv_features))
    if len(feats) != 5:
        return f"model.conv_features must list the 5 conv layers' widths; got {feats}"
    if any(not isinstance(f, int) or f < 1 for f in feats):
        return f"model.conv_features must be positive integers; got {feats}"
    groups = model_config.get("groups", AlexNet.groups)
    # conv2, conv4 and conv5 are grouped: their inputs (conv1, conv3, conv4) and outputs split.
    bad = [f"conv{i + 1}={w}" for i, w in enumerate(feats) if w % groups]
    if bad:
        return (
            f"model.groups={groups} does not divide the widths of {', '.join(bad)} "
            f"(model.conv_features={feats}): conv2, conv4 and conv5 split into {groups} columns"
        )
    pad = model_config.get("conv1_padding", AlexNet.conv1_padding)
    for name, size in feature_sizes(image_size, pad):
        if size < 1:
            smallest = next(s for s in range(1, 10_000) if feature_sizes(s, pad)[-1][1] >= 1)
            return (
                f"data.image_size={image_size} is too small: the {name} output would be "
                f"{size}x{size} (with model.conv1_padding={pad} the smallest input is {smallest})"
            )
    return None


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

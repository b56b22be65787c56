"""Model parallelism: which layers' neurons are split over which mesh axis, and where they meet.

Two layouts, both inside a `jax.shard_map` step (steps.py) on a mesh that parallel.py builds:

- `columns` (the paper, section 3.2 and figure 2): a `('batch', 'column')` mesh with 2 on
  `column`. Column c holds and computes half of the kernels of *every* layer. The columns meet
  only where figure 2 connects them: conv3 reads both columns' conv2 maps, fc6 both columns'
  conv5 output, fc7 both columns' fc6, and the softmax all of fc8's logits (all-gathers over
  `column`; their transposes, in the backward pass, are the only other column traffic). conv2,
  conv4 and conv5 read their own column, as `model.groups=2` does on one device.
- `owt` (Krizhevsky 2014, "One weird trick", arXiv 1404.5997): the convolutions data-parallel
  over every device, fc6-fc8 model-parallel over the same devices. Each device's conv features
  are all-gathered over the batch before fc6; each device then computes 1/N of fc6, fc7 and fc8
  for the whole batch. A layer whose width N does not divide is kept whole on every device
  (the quickstart's 10 classes on 4 devices): correct, only less parallel.

`AlexNet` takes a `Layout` and asks it for each layer's local width and for the gathers; with no
layout it is the one-device network, so the three modes compute one function. Parameters keep
the one-device names and shapes globally (a checkpoint is the same in every mode); `spec` says
how each is split.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
from jax import lax
from jax.sharding import PartitionSpec as P

Array = jax.Array

CONV_LAYERS = ("conv1", "conv2", "conv3", "conv4", "conv5")
DENSE_LAYERS = ("fc6", "fc7", "fc8")
BATCH_AXIS = "batch"  # as parallel.AXIS: the data-parallel axis in every mode
COLUMN_AXIS = "column"
COLUMNS = 2  # the paper's two GPUs


@dataclasses.dataclass(frozen=True)
class Layout:
    """How a model-parallel mode splits the network (hashable: it is a field of the module)."""

    mode: str
    model_axis: str  # the mesh axis the split layers' neurons are spread over
    shards: int  # its size
    split: frozenset[str]  # the layers whose output neurons are split
    gather_batch: bool = False  # owt: all-gather the batch before fc6
    data_axis: str = BATCH_AXIS

    def width(self, layer: str, full: int) -> int:
        """This device's number of `layer`'s output neurons."""
        return full // self.shards if layer in self.split else full

    def offset(self, layer: str, local: int) -> Array | int:
        """The index of this device's first neuron of `layer` (for dropout's masks)."""
        return lax.axis_index(self.model_axis) * local if layer in self.split else 0

    def gather_features(self, x: Array, producer: str) -> Array:
        """The whole output of `producer` (last axis), for a layer connected to all of it."""
        if producer not in self.split:
            return x
        return lax.all_gather(x, self.model_axis, axis=x.ndim - 1, tiled=True)

    def gather_examples(self, x: Array) -> Array:
        """owt: every device's examples, in device order, before the dense layers."""
        if not self.gather_batch:
            return x
        return lax.all_gather(x, self.data_axis, axis=0, tiled=True)

    def own_examples(self, x: Array, local: int) -> Array:
        """The rows of a batch-gathered output that are this device's own examples."""
        if not self.gather_batch:
            return x
        start = lax.axis_index(self.data_axis) * local
        return lax.dynamic_slice_in_dim(x, start, local, axis=0)

    def is_split(self, path: tuple[Any, ...], leaf: Any) -> bool:
        """Whether a parameter (or its optimiser slot: same path suffix) is split: the kernel
        and bias of a split layer, along their last (output) axis."""
        names = [str(getattr(p, "key", getattr(p, "name", p))) for p in path]
        return (
            len(names) >= 2
            and names[-1] in ("kernel", "bias")
            and names[-2] in self.split
            and getattr(leaf, "ndim", 0) >= 1
        )

    def spec(self, path: tuple[Any, ...], leaf: Any) -> P:
        """The PartitionSpec of one leaf of the train state: split layers along their last
        axis over `model_axis`, everything else replicated."""
        if self.is_split(path, leaf):
            return P(*([None] * (leaf.ndim - 1)), self.model_axis)
        return P()

    def sq_norm(self, tree: Any) -> Array:
        """The squared global norm of a params-like tree whose split leaves are local shards."""
        split, whole = jnp.zeros(()), jnp.zeros(())
        for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
            sq = jnp.sum(jnp.square(leaf.astype(jnp.float32)))
            if self.is_split(path, leaf):
                split = split + sq
            else:
                whole = whole + sq
        return lax.psum(split, self.model_axis) + whole


def mode_of(config: ml_collections.ConfigDict) -> str:
    """`parallel.mode` ('data' where a config has no parallel block)."""
    return config.get("parallel", {}).get("mode", "data")


def columns_layout() -> Layout:
    return Layout("columns", COLUMN_AXIS, COLUMNS, frozenset(CONV_LAYERS + DENSE_LAYERS))


def owt_layout(dense_features: int, num_classes: int, devices: int) -> Layout:
    """fc6-fc8 over all `devices`; a layer they do not divide stays whole."""
    widths = {"fc6": dense_features, "fc7": dense_features, "fc8": num_classes}
    split = frozenset(k for k, w in widths.items() if w % devices == 0)
    return Layout("owt", BATCH_AXIS, devices, split, gather_batch=True)


def layout_for(mode: str, model: Any, devices: int) -> Layout | None:
    """The layout of `parallel.mode` for an AlexNet (None: 'data', the whole net everywhere)."""
    if mode == "columns":
        return columns_layout()
    if mode == "owt":
        return owt_layout(model.dense_features, model.num_classes, devices)
    return None


def check(config: ml_collections.ConfigDict, num_devices: int) -> str | None:
    """A one-line reason why `parallel.mode` cannot run this model, or None."""
    mode = mode_of(config)
    if mode == "data":
        return None
    m = config.model
    if m.get("dropout_masks", "example") != "example":
        return (
            f"parallel.mode={mode!r} needs model.dropout_masks='example' (masks keyed by "
            "example, the same in every mode); 'device' masks depend on the device layout"
        )
    if mode != "columns":
        return None
    if num_devices % COLUMNS:
        return (
            f"parallel.mode='columns' needs an even number of devices (2 per column pair); "
            f"there are {num_devices}"
        )
    groups = m.get("groups", 2)
    if groups % COLUMNS:
        return (
            f"parallel.mode='columns' splits the grouped layers into the 2 columns; "
            f"model.groups={groups} does not (use 2, the paper's, or parallel.mode='owt')"
        )
    widths = dict(zip(CONV_LAYERS, m.conv_features, strict=True))
    widths |= {"fc6": m.dense_features, "fc7": m.dense_features, "fc8": m.num_classes}
    odd = [f"{k}={w}" for k, w in widths.items() if w % COLUMNS]
    if odd:
        return f"parallel.mode='columns' splits every layer in two; odd widths: {', '.join(odd)}"
    if m.get("use_lrn", True) and not m.get("lrn_per_column", True):
        return (
            "parallel.mode='columns' normalises each column's own channels (as the paper's "
            "GPUs did); set model.lrn_per_column=true or model.use_lrn=false"
        )
    return None

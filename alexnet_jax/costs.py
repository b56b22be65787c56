"""What a training step costs: its model FLOPs, the measured matmul peak, and what it sends
between devices (read from the compiled program, and what the mode's design implies).

`forward_flops` counts 2 x the multiply-adds of the convolutions and dense layers from the
parameter and activation shapes (nothing is compiled); `matmul_peak_gflops` is the best of
several large matmuls on the device, what this machine's kernels reach, not a datasheet number.

`collectives` parses XLA's optimised HLO (what actually runs, after XLA has fused or split the
collectives JAX emitted) and `traffic` sums, per kind, the bytes of the buffers and the bytes
each device sends with a ring algorithm: (n-1)/n of the gathered or scattered buffer for an
all-gather or reduce-scatter, 2(n-1)/n of the buffer for an all-reduce (NCCL's accounting).

`implied` is the same sum worked out by hand from the paper's design: which activations cross
between the columns (figure 2) or between the model-parallel devices (Krizhevsky 2014), and the
gradients the data-parallel axis averages. The benchmark prints the two side by side, so a
collective that the design does not call for shows up as a difference.
"""

from __future__ import annotations

import dataclasses
import re
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from alexnet_jax.model import AlexNet, feature_sizes
from alexnet_jax.model_parallel import owt_layout

_BYTES = {"f32": 4, "bf16": 2, "f16": 2, "s32": 4, "u32": 4, "pred": 1, "s8": 1, "u8": 1}
_KINDS = ("all-gather", "reduce-scatter", "all-reduce", "all-to-all", "collective-permute")
# `%name = f32[8,128]{1,0} all-gather(...)`, or a tuple result `(f32[..], f32[..]) all-reduce(`;
# the async forms (`all-gather-start`) carry the same shapes.
_LINE = re.compile(
    r"=\s*(?P<shape>\(.*?\)|\w+\[[\d,]*\][^ ]*)\s+(?P<kind>" + "|".join(_KINDS) + r")(-start)?\("
)
_ARRAY = re.compile(r"(\w+)\[([\d,]*)\]")
_GROUPS = re.compile(r"replica_groups=\{(\{[\d,]*\}(?:,\{[\d,]*\})*)\}")


def forward_flops(model: AlexNet, image_shape: tuple[int, int, int]) -> float:
    """2 x multiply-adds of the convolutions and dense layers for one image (no compilation)."""
    x = jnp.zeros((1, *image_shape), jnp.float32)

    def run():
        variables = model.init(jax.random.key(0), x, train=False)
        _, state = model.apply(
            variables, x, train=False, capture_intermediates=True, mutable=["intermediates"]
        )
        return variables["params"], state["intermediates"]

    params, inter = jax.eval_shape(run)
    macs = 0
    for name, layer in params.items():
        kernel = int(np.prod(layer["kernel"].shape))
        out = inter[name]["__call__"][0].shape  # (1, H, W, C) for a conv, (1, C) for a dense
        macs += kernel * int(np.prod(out[1:-1]))  # times the output positions
    return 2.0 * macs


def matmul_peak_gflops(dtype: Any = jnp.float32, n: int = 2048, reps: int = 8) -> float:
    """The best GFLOP/s of an n x n matmul on the default device: the measured peak."""
    ka, kb = jax.random.split(jax.random.key(0))
    a = jax.random.normal(ka, (n, n), dtype)
    b = jax.random.normal(kb, (n, n), dtype)
    f = jax.jit(jnp.matmul)
    f(a, b).block_until_ready()
    best = min(seconds(lambda: f(a, b).block_until_ready()) for _ in range(reps))
    return 2.0 * n**3 / best / 1e9


def seconds(fn: Callable[[], Any]) -> float:
    """Wall-clock seconds of one call of `fn`."""
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


@dataclasses.dataclass(frozen=True)
class Collective:
    kind: str
    result_bytes: int  # the result buffer(s), on each device
    group_size: int  # devices in each replica group


def collectives(hlo_text: str) -> list[Collective]:
    """Every collective of a compiled module's HLO text."""
    found = []
    for line in hlo_text.splitlines():
        m = _LINE.search(line)
        if not m or "-done" in line.split("=")[1].split("(")[0]:
            continue
        size = sum(
            _BYTES.get(dtype, 4) * int(np.prod([int(d) for d in dims.split(",") if d] or [1]))
            for dtype, dims in _ARRAY.findall(m.group("shape"))
        )
        groups = _GROUPS.search(line)
        group_size = len(groups.group(1).split("}")[0].strip("{").split(",")) if groups else 1
        found.append(Collective(m.group("kind"), size, group_size))
    return found


def ring_bytes(c: Collective) -> float:
    """Bytes one device sends for `c` with a ring algorithm."""
    n = c.group_size
    if n <= 1:
        return 0.0
    if c.kind == "all-gather":
        return c.result_bytes * (n - 1) / n
    if c.kind == "reduce-scatter":
        return c.result_bytes * (n - 1)  # the result is 1/n of the scattered buffer
    if c.kind == "all-reduce":
        return 2 * c.result_bytes * (n - 1) / n
    return float(c.result_bytes)


def traffic(hlo_text: str) -> dict[str, dict[str, float]]:
    """{kind: {"count", "buffer_bytes", "ring_bytes_per_device"}} of a compiled step."""
    out: dict[str, dict[str, float]] = {}
    for c in collectives(hlo_text):
        row = out.setdefault(c.kind, {"count": 0, "buffer_bytes": 0, "ring_bytes_per_device": 0})
        row["count"] += 1
        row["buffer_bytes"] += c.result_bytes
        row["ring_bytes_per_device"] += ring_bytes(c)
    return out


def implied(model: Any, params: Any, image_size: int, batch: int, mode: str, devices: int):
    """Ring bytes per device per training step that the mode's design calls for (float32).

    data: the gradients, all-reduced over every device. columns: per data row of 2 devices, the
    activations figure 2 sends across (conv2 and conv5 maps, fc6 and fc7 outputs, fc8 logits)
    gathered forward and reduce-scattered backward, plus the column's half of the gradients
    all-reduced over the data rows. owt: the conv features gathered over the batch and the
    split dense layers' outputs gathered over the devices, each with its backward transpose,
    plus the gradients of the replicated layers all-reduced: the convolutions, and a dense
    layer the device count does not divide, kept whole (a split layer's stay where they are).
    """
    f = 4  # float32 bytes

    def gather(local_elems: float, n: int) -> float:  # forward gather + backward scatter
        return 2 * local_elems * f * (n - 1)

    def allreduce(elems: float, n: int) -> float:
        return 2 * elems * f * (n - 1) / n if n > 1 else 0.0

    sizes = dict(feature_sizes(image_size, model.conv1_padding))
    layer_size = {k: int(np.prod(v["kernel"].shape)) + v["bias"].size for k, v in params.items()}
    total = sum(layer_size.values())
    c = model.conv_features
    if mode == "data":
        return allreduce(total, devices)
    if mode == "columns":
        rows, local = devices // 2, batch // (devices // 2)
        crossing = (
            sizes["pool2"] ** 2 * c[1] / 2
            + sizes["pool5"] ** 2 * c[4] / 2
            + 2 * model.dense_features / 2
            + model.num_classes / 2
        )
        return gather(local * crossing, 2) + allreduce(total / 2, rows)
    if mode == "owt":
        local = batch // devices
        features = sizes["pool5"] ** 2 * c[4]
        out = gather(local * features, devices)  # the conv features, over the batch
        split = owt_layout(model.dense_features, model.num_classes, devices).split
        widths = {"fc6": model.dense_features, "fc7": model.dense_features}
        widths["fc8"] = model.num_classes
        for layer in split:
            out += gather(batch * widths[layer] / devices, devices)
        replicated = sum(v for k, v in layer_size.items() if k not in split)
        return out + allreduce(replicated, devices)
    raise ValueError(mode)

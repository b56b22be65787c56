"""The paper network's convolutions alone: XLA:CPU against PyTorch's oneDNN, pass by pass.

    python scripts/bench_convs.py [--batch 64] [--reps 5] [--no_torch] [--json PATH]

Times each of the five convolutions of a training step (float32, NHWC, each column of a grouped
layer as its own convolution, as `model.kernels=cpu` runs them): the forward pass, the weight
gradient and the input gradient (none for conv1: a training step never needs it), with XLA's
compiled `lax.conv_general_dilated` and its VJPs under the library's XLA:CPU flags, and, when
PyTorch is installed, with `aten.convolution` / `aten.convolution_backward` on channels-last
tensors, the two alternating rep by rep. The medians, summed over the columns and layers, say how
much of the step's gap to `torch.compile` is convolution kernels that XLA:CPU brings (README,
"Performance").
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import sys
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

import alexnet_jax  # noqa: F401  (sets the XLA:CPU flags before JAX starts its backend)
from alexnet_jax.bench import interleave

# name, input (h, w, c) of one column, output channels of one column, kernel, stride, pad,
# columns: the paper's network at 224 px with conv1_padding=2 (`model.py`).
LAYERS = (
    ("conv1", (224, 224, 3), 96, 11, 4, 2, 1),
    ("conv2", (27, 27, 48), 128, 5, 1, 2, 2),
    ("conv3", (13, 13, 256), 384, 3, 1, 1, 1),
    ("conv4", (13, 13, 192), 192, 3, 1, 1, 2),
    ("conv5", (13, 13, 192), 128, 3, 1, 1, 2),
)
PASSES = ("forward", "weight_grad", "input_grad")


def jax_passes(x: np.ndarray, w: np.ndarray, stride: int, pad: int) -> dict[str, Callable]:
    """Blocking calls of the compiled forward and the two VJPs (NHWC, HWIO)."""

    def conv(x, w):
        dims = ("NHWC", "HWIO", "NHWC")
        return lax.conv_general_dilated(x, w, (stride, stride), [(pad, pad)] * 2, None, None, dims)

    xd, wd = jnp.asarray(x), jnp.asarray(w)
    g = jnp.ones(jax.eval_shape(conv, xd, wd).shape, jnp.float32)
    fwd = jax.jit(conv)
    dw = jax.jit(lambda x, w, g: jax.vjp(lambda w: conv(x, w), w)[1](g)[0])
    dx = jax.jit(lambda x, w, g: jax.vjp(lambda x: conv(x, w), x)[1](g)[0])
    return {
        "forward": lambda: fwd(xd, wd).block_until_ready(),
        "weight_grad": lambda: dw(xd, wd, g).block_until_ready(),
        "input_grad": lambda: dx(xd, wd, g).block_until_ready(),
    }


def torch_passes(x: np.ndarray, w: np.ndarray, stride: int, pad: int) -> dict[str, Callable]:
    import torch

    aten = torch.ops.aten
    xt = torch.from_numpy(x).permute(0, 3, 1, 2).contiguous(memory_format=torch.channels_last)
    wt = torch.from_numpy(w).permute(3, 2, 0, 1).contiguous(memory_format=torch.channels_last)
    args = ([stride] * 2, [pad] * 2, [1, 1], False, [0, 0], 1)
    g = torch.ones_like(aten.convolution(xt, wt, None, *args))

    def backward(mask: list[bool]) -> Callable:
        return lambda: aten.convolution_backward(g, xt, wt, None, *args, mask)

    with torch.no_grad():
        return {
            "forward": lambda: aten.convolution(xt, wt, None, *args),
            "weight_grad": backward([False, True, False]),
            "input_grad": backward([True, False, False]),
        }


def measure(batch: int, reps: int, with_torch: bool) -> list[dict]:
    """One row per layer and pass: median ms for all its columns, per library."""
    rng = np.random.default_rng(0)
    rows = []
    for name, (h, w, c), cout, k, stride, pad, columns in LAYERS:
        x = rng.standard_normal((batch, h, w, c), np.float32)
        kernel = rng.standard_normal((k, k, c, cout), np.float32) * 0.01
        libs = {"jax": jax_passes(x, kernel, stride, pad)}
        if with_torch:
            libs["torch"] = torch_passes(x, kernel, stride, pad)
        for p in PASSES if name != "conv1" else PASSES[:2]:
            # One warm-up call each (compilation), then the libraries alternate rep by rep.
            times = interleave({lib: f[p] for lib, f in libs.items()}, reps, warmup=1)
            row = {"layer": name, "pass": p, "columns": columns}
            for lib, t in times.items():
                row[f"{lib}_ms"] = 1000 * columns * statistics.median(t)
            rows.append(row)
            print(_format(row), flush=True)
    return rows


def _format(row: dict) -> str:
    text = f"{row['layer']:6s} {row['pass']:12s} x{row['columns']}  jax {row['jax_ms']:8.1f} ms"
    if "torch_ms" in row:
        ratio = row["jax_ms"] / row["torch_ms"]
        text += f"  torch {row['torch_ms']:8.1f} ms  jax/torch time {ratio:5.2f}x"
    return text


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--reps", type=int, default=5, help="timed reps per pass (median)")
    parser.add_argument("--no_torch", action="store_true", help="skip PyTorch even if installed")
    parser.add_argument("--json", help="append one JSON object per layer and pass to this file")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    if args.batch < 1 or args.reps < 1:
        parser.error("--batch and --reps must be >= 1")
    with_torch = not args.no_torch and importlib.util.find_spec("torch") is not None
    print(f"batch {args.batch}, float32, jax {jax.__version__}; PyTorch: {with_torch}", flush=True)
    rows = measure(args.batch, args.reps, with_torch)
    total = {
        lib: sum(r[f"{lib}_ms"] for r in rows)
        for lib in ("jax", "torch")
        if with_torch or lib == "jax"
    }
    line = "all convolutions of a training step: " + ", ".join(
        f"{k} {v:.0f} ms" for k, v in total.items()
    )
    if with_torch:
        line += f" (jax/torch time {total['jax'] / total['torch']:.2f}x)"
    print(line, flush=True)
    if args.json:
        with open(args.json, "a") as f:
            for r in rows:
                f.write(json.dumps(r) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

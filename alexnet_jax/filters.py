"""`--mode filters`: the learned conv1 kernels as a PNG, one grid per column (paper Figure 3).

In the paper the 96 conv1 kernels were split over the two GPUs: the first 48 fed the first
column, the last 48 the second (conv2's groups split its inputs the same way here), and Figure 3
shows the columns specialising, one in colour-agnostic edges, the other in colour blobs. Each
kernel is normalised to [0, 1] on its own (over its three channels together, so hues survive),
as cuda-convnet's filter display does.
"""

from __future__ import annotations

import math
from typing import Any

import ml_collections
import numpy as np

from alexnet_jax import workdir
from alexnet_jax.evaluate import load_params

GAP = 2  # pixels between kernels, in display pixels after upscaling
BACKGROUND = (40, 40, 40)


def normalise(kernel: np.ndarray) -> np.ndarray:
    """[h, w, c] -> [h, w, c] in [0, 1]; a constant kernel becomes mid-grey."""
    lo, hi = float(kernel.min()), float(kernel.max())
    if hi - lo < 1e-12:
        return np.full_like(kernel, 0.5, dtype=np.float32)
    return ((kernel - lo) / (hi - lo)).astype(np.float32)


def grid_shape(n: int) -> tuple[int, int]:
    """(rows, cols) for n kernels: the divisor of n nearest above sqrt(n) when there is one
    (48 -> 6 x 8), else a near-square grid."""
    root = math.sqrt(n)
    for cols in range(math.ceil(root), math.floor(2 * root) + 1):
        if n % cols == 0:
            return n // cols, cols
    cols = math.ceil(root)
    return math.ceil(n / cols), cols


def kernel_grid(kernels: np.ndarray, scale: int) -> np.ndarray:
    """[kh, kw, c, n] kernels -> one uint8 RGB grid image, each kernel upscaled `scale` times."""
    kh, kw, c, n = kernels.shape
    rows, cols = grid_shape(n)
    ch, cw = kh * scale, kw * scale
    out = np.empty((rows * (ch + GAP) + GAP, cols * (cw + GAP) + GAP, 3), np.uint8)
    out[:] = BACKGROUND
    for i in range(n):
        k = normalise(kernels[..., i])
        k = k if c == 3 else np.repeat(k.mean(-1, keepdims=True), 3, -1)
        k = np.kron(k, np.ones((scale, scale, 1), np.float32))  # nearest-neighbour upscaling
        r, q = divmod(i, cols)
        y, x = GAP + r * (ch + GAP), GAP + q * (cw + GAP)
        out[y : y + ch, x : x + cw] = np.round(255 * k).astype(np.uint8)
    return out


def filter_image(kernel: np.ndarray, groups: int, scale: int = 5) -> Any:
    """A PIL image: one labelled grid per column (group) of the conv1 `kernel` [kh, kw, c, n]."""
    from PIL import Image, ImageDraw

    n = kernel.shape[-1]
    if n % groups:
        raise ValueError(f"{n} conv1 kernels do not split into {groups} columns")
    per = n // groups
    grids = [kernel_grid(kernel[..., g * per : (g + 1) * per], scale) for g in range(groups)]
    label_h, margin = 16, 12
    width = sum(g.shape[1] for g in grids) + margin * (groups + 1)
    height = max(g.shape[0] for g in grids) + label_h + 2 * margin
    canvas = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    x = margin
    for g, grid in enumerate(grids):
        label = f"column {g + 1}: kernels {g * per + 1}-{(g + 1) * per}"
        draw.text((x, margin // 2), label, fill=(0, 0, 0))
        canvas.paste(Image.fromarray(grid), (x, margin + label_h))
        x += grid.shape[1] + margin
    return canvas


def run_filters(config: ml_collections.ConfigDict, path: str, *, checkpoint: str = "latest") -> str:
    """Writes `<workdir>/filters.png` from a checkpoint's conv1 kernels; prints the path."""
    step, params, label = load_params(config, path, checkpoint)
    kernel = np.asarray(params["conv1"]["kernel"], np.float32)  # [11, 11, 3, 96] (HWIO)
    image = filter_image(kernel, config.model.groups)
    out = workdir.path(path, workdir.FILTERS)
    if workdir.is_primary():
        image.save(out)
        print(
            f"{out}: {kernel.shape[-1]} conv1 kernels of the {label} checkpoint (step {step}), "
            f"{config.model.groups} column(s)",
            flush=True,
        )
    return out

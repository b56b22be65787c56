"""Per-class results of a classifier: the confusion matrix and what follows from it.

`confusion_counts` runs on the devices, inside the eval step: it returns a [C, C] count matrix per
batch that is summed over devices with `psum` and over batches like the other masked sums. All
else is numpy on the host, on the final matrix: accuracy, macro precision / recall / F1, the
per-class table (`per_class_<split>.csv`), the worst classes and the confusion plot.

Conventions (those of scikit-learn's `precision_recall_fscore_support(average='macro',
zero_division=0)`): rows are the true class, columns the predicted one; precision is 0 for a
class never predicted, recall 0 for a class with no examples, F1 = 2 TP / (2 TP + FP + FN). The
one departure is which classes are averaged: a class that neither occurs nor is predicted says
nothing about the model (ImageNet's test split holds all 1,000 classes, a 50-image smoke test
only a few), so it is left out of the macro average instead of counting as a 0.
"""

from __future__ import annotations

import csv
import os
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from alexnet_jax import workdir
from alexnet_jax.workdir import atomic_open

MAX_PLOT_CLASSES = 50  # beyond this a confusion plot is unreadable; the .npy holds the matrix
SCALARS = ("accuracy", "precision_macro", "recall_macro", "f1_macro")


def confusion_counts(
    scores: jax.Array, labels: jax.Array, mask: jax.Array, num_classes: int
) -> jax.Array:
    """float32 [num_classes, num_classes]: entry (t, p) counts the unmasked examples of true
    class t whose highest score is class p.

    scores: [B, num_classes] (logits or probabilities); labels: int [B]; mask: bool or 0/1 [B].
    A one-hot product rather than a scatter: one small matmul (B x C x C; 256 M multiply-adds
    at C = 1,000), fast on every backend, and exact even with bf16/TF32 matmul passes because
    every input is 0 or 1 and the products accumulate in float32 (exact up to 2^24 per entry).
    Labels outside [0, num_classes) contribute nothing (their one-hot row is zero).
    """
    weight = mask.astype(jnp.float32)[:, None]
    true = jax.nn.one_hot(labels, num_classes, dtype=jnp.float32) * weight
    pred = jax.nn.one_hot(jnp.argmax(scores, axis=-1), num_classes, dtype=jnp.float32)
    return jnp.matmul(true.T, pred, preferred_element_type=jnp.float32)


def _safe_ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    """num / den, and 0 where den is 0 (scikit-learn's zero_division=0), with no warning."""
    out = np.zeros(np.broadcast(num, den).shape, np.float64)
    np.divide(num, den, out=out, where=den > 0)
    return out


def report(confusion: np.ndarray) -> dict[str, Any]:
    """Accuracy, macro precision / recall / F1 and the per-class arrays of a confusion matrix.

    Returns floats `accuracy`, `precision_macro`, `recall_macro`, `f1_macro`, ints
    `num_examples`, `num_classes_averaged`, and per-class arrays (length C) `support`,
    `predicted` (how often the class was predicted), `precision`, `recall`, `f1` and
    `in_average` (bool: the class occurs or is predicted; see the module docstring). Metrics of
    classes outside the average are 0 in the arrays, never NaN.

    Raises ValueError for a matrix that is not square or holds no example.
    """
    m = np.asarray(confusion, np.float64)
    if m.ndim != 2 or m.shape[0] != m.shape[1] or m.shape[0] == 0:
        raise ValueError(f"a confusion matrix is square [C, C], not of shape {m.shape}")
    if not np.isfinite(m).all() or (m < 0).any():
        raise ValueError("a confusion matrix holds finite non-negative counts")
    total = m.sum()
    if total == 0:
        raise ValueError(
            "the confusion matrix is empty: no example was evaluated, so there is no accuracy, "
            "precision or recall to report"
        )
    tp = np.diag(m)
    support = m.sum(axis=1)
    predicted = m.sum(axis=0)
    in_average = (support > 0) | (predicted > 0)
    precision = _safe_ratio(tp, predicted)
    recall = _safe_ratio(tp, support)
    # F1 from the counts, as scikit-learn computes it: also 0 (not NaN) when P = R = 0.
    f1 = _safe_ratio(2 * tp, 2 * tp + (predicted - tp) + (support - tp))
    kept = np.flatnonzero(in_average)  # never empty: total > 0 means some class occurs
    return {
        "accuracy": float(tp.sum() / total),
        "precision_macro": float(precision[kept].mean()),
        "recall_macro": float(recall[kept].mean()),
        "f1_macro": float(f1[kept].mean()),
        "num_examples": round(float(total)),
        "num_classes_averaged": len(kept),
        "support": np.rint(support).astype(np.int64),
        "predicted": np.rint(predicted).astype(np.int64),
        "precision": precision,
        "recall": recall,
        "f1": f1,
        "in_average": in_average,
    }


def _names(num_classes: int, class_names: Sequence[str] | None) -> list[str]:
    if class_names is None:
        return [str(i) for i in range(num_classes)]
    if len(class_names) != num_classes:
        raise ValueError(f"{len(class_names)} class names for {num_classes} classes")
    return [str(n) for n in class_names]


def write_per_class_csv(
    path: str | os.PathLike, report: dict[str, Any], class_names: Sequence[str] | None
) -> str:
    """Writes `class_id,name,support,precision,recall,f1`, one row per class, atomically.

    A class outside the macro average (no example, never predicted) has empty metric cells:
    its 0s would read as a measured failure. So the mean of the f1 column is `f1_macro`.
    """
    support = report["support"]
    names = _names(len(support), class_names)
    with atomic_open(path, "w", newline="") as f:
        out = csv.writer(f)  # quotes names with commas ("tench, Tinca tinca")
        out.writerow(["class_id", "name", "support", "precision", "recall", "f1"])
        for i, name in enumerate(names):
            if report["in_average"][i]:
                metrics = [f"{report[k][i]:.6f}" for k in ("precision", "recall", "f1")]
            else:
                metrics = ["", "", ""]
            out.writerow([i, name, int(support[i]), *metrics])
    return os.fspath(path)


def worst_classes(report: dict[str, Any], k: int = 5) -> list[int]:
    """The ids of the `k` classes with the lowest F1 among those with examples (ties: lower id)."""
    ids = np.flatnonzero(report["support"] > 0)
    order = np.lexsort((ids, report["f1"][ids]))  # last key is primary: F1, then id
    return [int(i) for i in ids[order][:k]]


def format_classes(
    report: dict[str, Any], class_ids: Sequence[int], class_names: Sequence[str] | None = None
) -> str:
    """One line per class: `  7 (name): F1 0.412  precision 0.500  recall 0.350  (20 examples)`."""
    names = _names(len(report["support"]), class_names)
    lines = []
    for i in class_ids:
        label = f"{i}" if names[i] == str(i) else f"{i} ({names[i]})"
        lines.append(
            f"  {label}: F1 {report['f1'][i]:.3f}  precision {report['precision'][i]:.3f}  "
            f"recall {report['recall'][i]:.3f}  ({report['support'][i]} examples)"
        )
    return "\n".join(lines)


def save_confusion_npy(path: str | os.PathLike, confusion: np.ndarray) -> str:
    """Saves the counts as int64 [C, C] (rows true, columns predicted), atomically."""
    counts = np.rint(np.asarray(confusion, np.float64)).astype(np.int64)
    with atomic_open(path, "wb") as f:
        np.save(f, counts)
    return os.fspath(path)


def plot_confusion(
    path: str | os.PathLike, confusion: np.ndarray, class_names: Sequence[str] | None
) -> str:
    """Draws the row-normalised confusion matrix (row t: where class t's examples went) as a PNG.

    Refuses more than MAX_PLOT_CLASSES classes (ValueError): use `save_confusion_npy` there.
    A row without examples stays white.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    m = np.asarray(confusion, np.float64)
    c = m.shape[0]
    if c > MAX_PLOT_CLASSES:
        raise ValueError(f"{c} classes are too many to plot (at most {MAX_PLOT_CLASSES})")
    names = _names(c, class_names)
    rows = _safe_ratio(m, m.sum(axis=1, keepdims=True))
    side = min(max(4.0, 0.32 * c + 2.5), 18.0)
    # A Figure of its own with the Agg canvas: no pyplot state, no display, thread-safe.
    fig = Figure(figsize=(side + 1.2, side))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    image = ax.imshow(rows, cmap="Blues", vmin=0.0, vmax=1.0, interpolation="nearest")
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="fraction of the true class")
    ticks = np.arange(c)
    fontsize = 8 if c <= 20 else 6
    ax.set_xticks(ticks, names, rotation=90, fontsize=fontsize)
    ax.set_yticks(ticks, names, fontsize=fontsize)
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    accuracy = np.trace(m) / m.sum() if m.sum() > 0 else 0.0
    ax.set_title(f"confusion, row-normalised ({int(m.sum())} examples, accuracy {accuracy:.1%})")
    if c <= 20:  # cells big enough to print the fraction in
        for t, p in zip(*np.nonzero(rows), strict=True):
            ax.text(
                p,
                t,
                f"{rows[t, p]:.2f}",
                ha="center",
                va="center",
                fontsize=fontsize,
                color="white" if rows[t, p] > 0.5 else "black",
            )
    fig.tight_layout()
    with atomic_open(path, "wb") as f:
        fig.savefig(f, format="png", dpi=100)
    return os.fspath(path)


def scalars(report: dict[str, Any]) -> dict[str, float]:
    """The report's four headline numbers, for metrics.jsonl and the test ledger."""
    return {k: report[k] for k in SCALARS}


def save_report(
    path: str | os.PathLike,
    split: str,
    confusion: np.ndarray,
    class_names: Sequence[str] | None,
) -> dict[str, Any]:
    """`report(confusion)`, with its files in the workdir `path`: per_class_<split>.csv,
    confusion_<split>.npy, and confusion_<split>.png when there are at most MAX_PLOT_CLASSES
    classes. Returns the report. Raises ValueError for an empty matrix (nothing is written).
    """
    result = report(confusion)
    base = os.fspath(path)
    confusion_file = os.path.join(base, workdir.CONFUSION.format(split=split))
    write_per_class_csv(
        os.path.join(base, workdir.PER_CLASS.format(split=split)), result, class_names
    )
    save_confusion_npy(confusion_file + ".npy", confusion)
    if np.shape(confusion)[0] <= MAX_PLOT_CLASSES:
        plot_confusion(confusion_file + ".png", confusion, class_names)
    return result

"""A sweep's results: `sweep.csv` (one row per run), the markdown table (mean ± std over seeds)
and `sweep.png` (final validation error against the first numeric key, and learning curves)."""

from __future__ import annotations

import csv
import io
import json
import os
import statistics
from collections.abc import Sequence
from typing import Any

from alexnet_jax import workdir as wd
from alexnet_jax.classification import SCALARS
from alexnet_jax.sweep.grid import SEED_KEY, Point, override_text, point_name, swept_keys

RESULT_COLUMNS = (
    "run",
    "steps",
    "val_top1_error",
    "val_top5_error",
    "best_val_top1_error",
    "best_val_top5_error",
    "best_val_step",
    "test_top1_error",
    "test_top5_error",
    *(f"test_{k}" for k in SCALARS),  # accuracy and macro precision, recall, F1
    "crops",
    "wall_s",
)


def summarize(workdir: str, point: Point) -> dict[str, Any] | None:
    """The csv row of a finished point (None if it is not finished), from its metrics.jsonl."""
    run_dir = os.path.join(workdir, point_name(point))
    lines = wd.read_metrics(run_dir)
    # The end-of-training test line (records tags it mode 'train'), never a later --mode test.
    tests = [m for m in lines if m.get("split") == "test" and m.get("mode", "train") == "train"]
    if not tests:
        return None
    test = tests[-1]
    val = _by_step(lines, "val")
    row: dict[str, Any] = {"run": point_name(point), "steps": test["step"]}
    if val:
        last = val[-1]
        best1 = min(val, key=lambda m: (m["top1_error"], m["step"]))
        row |= {
            "val_top1_error": last["top1_error"],
            "val_top5_error": last["top5_error"],
            "best_val_top1_error": best1["top1_error"],
            "best_val_top5_error": min(m["top5_error"] for m in val),
            "best_val_step": best1["step"],
        }
    row |= {
        "test_top1_error": test["top1_error"],
        "test_top5_error": test["top5_error"],
        **{f"test_{k}": test[k] for k in SCALARS if k in test},
        "crops": test.get("crops"),
    }
    run_json = wd.path(run_dir, wd.RUN)
    if os.path.exists(run_json):
        with open(run_json) as f:
            row["wall_s"] = round(json.load(f)["wall_s"], 1)
    return row


def _by_step(lines: Sequence[dict[str, Any]], split: str) -> list[dict[str, Any]]:
    """The `split` lines sorted by step; a step logged twice (a resumed run) keeps the last."""
    latest = {m["step"]: m for m in lines if m.get("split") == split}
    return [latest[s] for s in sorted(latest)]


def write_csv(path: str, points: Sequence[Point], rows: Sequence[dict[str, Any] | None]) -> None:
    """One row per finished run: its overrides (one column per swept key), then its results."""
    keys = swept_keys(points)
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow([*keys, *RESULT_COLUMNS])
    for p, row in zip(points, rows, strict=True):
        if row is None:
            continue
        writer.writerow(
            [override_text(p[k]) if k in p else "" for k in keys]
            + [_cell(row.get(c)) for c in RESULT_COLUMNS]
        )
    wd.write_atomic(path, out.getvalue())


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)


def _groups(
    points: Sequence[Point], rows: Sequence[dict[str, Any] | None]
) -> list[tuple[Point, list[dict[str, Any]], int]]:
    """Points without their seed, each with its finished runs and its number of runs (seeds),
    in sweep order."""
    groups: dict[str, tuple[Point, list[dict[str, Any]], list[None]]] = {}
    for p, row in zip(points, rows, strict=True):
        key = {k: v for k, v in p.items() if k != SEED_KEY}
        _, finished, runs = groups.setdefault(point_name(key), (key, [], []))
        runs.append(None)
        if row is not None:
            finished.append(row)
    return [(point, finished, len(runs)) for point, finished, runs in groups.values()]


def _mean_std(values: Sequence[float]) -> tuple[float, float | None]:
    mean = statistics.fmean(values)
    return mean, (statistics.stdev(values) if len(values) > 1 else None)


def markdown_table(points: Sequence[Point], rows: Sequence[dict[str, Any] | None]) -> str:
    """Errors in %, mean ± std over seeds, one line per point; unfinished points say so."""
    keys = [k for k in swept_keys(points) if k != SEED_KEY]
    errors = {
        "val top-1 %": "val_top1_error",
        "val top-5 %": "val_top5_error",
        "best val top-1 %": "best_val_top1_error",
        "test top-1 %": "test_top1_error",
        "test top-5 %": "test_top5_error",
        "test macro F1 %": "test_f1_macro",
    }
    header = [*keys, "runs", *errors, "steps", "wall s"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for point, runs, total in _groups(points, rows):
        cells = [override_text(point[k]) if k in point else "" for k in keys]
        cells.append(str(total) if len(runs) == total else f"{len(runs)} of {total}")
        for column in errors.values():
            values = [100 * r[column] for r in runs if r.get(column) is not None]
            cells.append(_format_mean_std(values, decimals=2))
        cells.append("/".join(str(n) for n in dict.fromkeys(r["steps"] for r in runs)))
        walls = [r["wall_s"] for r in runs if r.get("wall_s") is not None]
        cells.append(_format_mean_std(walls, decimals=0))
        lines.append("| " + " | ".join(cells) + " |")
    crops = {r["crops"] for r in rows if r is not None and r.get("crops") is not None}
    done = sum(r is not None for r in rows)
    note = f"{done} of {len(rows)} runs finished"
    if crops:
        note += f"; validation and test errors with {'/'.join(map(str, sorted(crops)))} crop(s)"
    return "\n".join([*lines, "", note])


def _format_mean_std(values: Sequence[float], *, decimals: int) -> str:
    if not values:
        return ""
    mean, std = _mean_std(values)
    text = f"{mean:.{decimals}f}"
    return text if std is None else f"{text} ± {std:.{decimals}f}"


def _x_key(points: Sequence[Point]) -> str | None:
    """The first swept key whose values are all numbers (bools are categories)."""
    for k in swept_keys(points):
        if k == SEED_KEY:
            continue
        values = [p[k] for p in points if k in p]
        if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
            return k
    return None


def _value(point: Point, key: str | None) -> Any:
    """The point's value of `key`; None where the point does not set it or there is no key (a
    sweep over seeds alone: one x position)."""
    return None if key is None else point.get(key)


_COLOUR_MAPS = ("Blues", "Oranges", "Greens", "Reds", "Purples", "Greys")


def plot(path: str, workdir: str, points: Sequence[Point], rows: Sequence[dict[str, Any] | None]):
    """Two panels: the final val top-1 error against the first numeric swept key, one line per
    value of the other swept keys (error bars: std over seeds); the val top-1 learning curve of
    every run, coloured like its line, darker for larger x."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [k for k in swept_keys(points) if k != SEED_KEY]
    x_key = _x_key(points)
    numeric = x_key is not None
    x_key = x_key or (keys[0] if keys else None)
    other = [k for k in keys if k != x_key]
    groups = _groups(points, rows)
    x_values = list(dict.fromkeys(_value(p, x_key) for p, *_ in groups))
    lines: dict[str, list[Point]] = {}
    for point, *_ in groups:
        label = ", ".join(f"{k}={override_text(point[k])}" for k in other if k in point)
        lines.setdefault(label or "all runs", []).append(point)
    colour: dict[str, Any] = {}  # point name (without seed) -> its colour
    for n, members in enumerate(lines.values()):
        cmap = plt.get_cmap(_COLOUR_MAPS[n % len(_COLOUR_MAPS)])
        for i, point in enumerate(members):
            colour[point_name(point)] = cmap(0.45 + 0.5 * i / max(len(members) - 1, 1))

    fig, (ax, ax_curves) = plt.subplots(1, 2, figsize=(13, 5))
    for label, members in lines.items():
        xs, ys, errs = [], [], []
        for point, runs, _ in groups:
            values = [100 * r["val_top1_error"] for r in runs if "val_top1_error" in r]
            if point not in members or not values:
                continue
            mean, std = _mean_std(values)
            x = _value(point, x_key)
            xs.append(x if numeric else x_values.index(x))
            ys.append(mean)
            errs.append(std or 0.0)
        if xs:
            ax.errorbar(
                xs,
                ys,
                yerr=errs if any(errs) else None,
                marker="o",
                capsize=4,
                color=colour[point_name(members[-1])],
                label=label,
            )
    labelled: set[str] = set()
    for p, row in zip(points, rows, strict=True):
        curve = _by_step(wd.read_metrics(os.path.join(workdir, point_name(p))), "val")
        if not curve:
            continue
        key = point_name({k: v for k, v in p.items() if k != SEED_KEY})
        ax_curves.plot(
            [m["step"] for m in curve],
            [100 * m["top1_error"] for m in curve],
            marker="o",
            markersize=3,
            color=colour[key],
            linestyle="-" if row is not None else ":",
            label=None if key in labelled else ", ".join(override_text(p[k]) for k in keys),
        )
        labelled.add(key)
    ax.set_xlabel(x_key or "point")
    if not numeric:
        ax.set_xticks(range(len(x_values)), [override_text(v) for v in x_values])
    ax.set_ylabel("final validation top-1 error (%)")
    ax.set_title("validation error at the end of training (mean ± std over seeds)")
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)
    ax_curves.set_xlabel("step")
    ax_curves.set_ylabel("validation top-1 error (%)")
    ax_curves.set_title("learning curves (dotted: unfinished)")
    ax_curves.grid(alpha=0.3)
    if labelled:
        ax_curves.legend(fontsize=7, title=", ".join(keys), title_fontsize=7)
    fig.tight_layout()
    tmp = f"{path}.tmp{os.getpid()}.png"
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, path)


def report(workdir: str, points: Sequence[Point], *, verbose: bool = True) -> list[dict | None]:
    """Rewrites sweep.csv and sweep.png from the sub-workdirs; prints the table if `verbose`."""
    os.makedirs(workdir, exist_ok=True)
    rows = [summarize(workdir, p) for p in points]
    write_csv(os.path.join(workdir, "sweep.csv"), points, rows)
    plot(os.path.join(workdir, "sweep.png"), workdir, points, rows)
    if verbose:
        print(markdown_table(points, rows), flush=True)
        print(f"Wrote {os.path.join(workdir, 'sweep.csv')} and sweep.png", flush=True)
    return rows

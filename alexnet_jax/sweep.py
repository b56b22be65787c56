"""Sweeps: expand a grid of config overrides, run each point in its own sub-workdir, tabulate, plot.

An experiment file becomes a sweep by defining `sweep(arg=None)`, which returns a list of override
dicts (dotted config keys -> Python values); `axis`, `product` and `zipped` build the usual grids.
`python launch.py SWEEP.py[:ARG] [--config.KEY=VALUE ...]` then runs every point in turn in
`WORKDIR/<key=value,...>/`, skipping finished points (a `test` line in metrics.jsonl) and resuming
interrupted ones, and rewrites `sweep.csv`, `sweep.png` and a markdown table as points finish.
"""

from __future__ import annotations

import argparse
import csv
import io
import itertools
import json
import os
import re
import shlex
import statistics
import time
from collections.abc import Sequence
from typing import Any

import ml_collections

from alexnet_jax import checkpoint
from alexnet_jax import config as config_lib
from alexnet_jax.errors import UsageError

Point = dict[str, Any]

SEED_KEY = "seed"  # repeats of a point, not a point of its own: averaged over in the table
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
    "crops",
    "wall_s",
)


# ---------------------------------------------------------------------------------------------
# Defining a grid


def axis(key: str, values: Sequence[Any]) -> list[Point]:
    """One swept key: [{key: v} for v in values]."""
    return [{key: v} for v in values]


def product(*axes: Sequence[Point]) -> list[Point]:
    """Every combination of the axes' points, the first axis varying slowest."""
    return [_merge(combo) for combo in itertools.product(*axes)]


def zipped(*axes: Sequence[Point]) -> list[Point]:
    """The axes' points side by side (all axes must have the same length)."""
    lengths = {len(a) for a in axes}
    if len(lengths) > 1:
        raise UsageError(f"zipped() needs axes of one length; got lengths {sorted(lengths)}")
    return [_merge(combo) for combo in zip(*axes, strict=True)]


def _merge(points: Sequence[Point]) -> Point:
    merged: Point = {}
    for p in points:
        clash = set(merged) & set(p)
        if clash:
            raise UsageError(f"a sweep sets {sorted(clash)[0]!r} twice in one point")
        merged |= p
    return merged


# ---------------------------------------------------------------------------------------------
# Expanding a sweep into named points


def override_text(value: Any) -> str:
    """The `--config.KEY=TEXT` form of a value, which `config.apply_overrides` parses back."""
    return value if isinstance(value, str) else repr(value)


def _name_text(value: Any) -> str:
    if isinstance(value, (tuple, list)):
        return "x".join(_name_text(v) for v in value)
    return re.sub(r"[^A-Za-z0-9._+-]", "_", override_text(value))


def point_name(point: Point) -> str:
    """The sub-workdir of a point: 'model.dropout_rate=0.25,model.use_lrn=False'.

    Keys keep the sweep's order; characters other than letters, digits and `._+-` in values
    become `_`, so the name is safe on every filesystem and in a shell.
    """
    if not point:
        return "base"
    return ",".join(f"{k}={_name_text(v)}" for k, v in point.items())


def swept_keys(points: Sequence[Point]) -> list[str]:
    """The keys the points set, in order of first appearance."""
    keys: dict[str, None] = {}
    for p in points:
        keys.update(dict.fromkeys(p))
    return list(keys)


def expand(
    sweep_points: Any,
    base: ml_collections.ConfigDict,
    cli_overrides: dict[str, str],
    *,
    num_seeds: int = 1,
) -> list[Point]:
    """The points to run, in order: the sweep's points, narrowed and repeated over seeds.

    `base` is the experiment's config with the command-line overrides applied. An override of a
    swept key cannot apply to every point (it would collapse them into one), so it narrows the
    grid to the points with that value instead. With `num_seeds` > 1 every point runs with
    `seed` = base.seed, base.seed + 1, ... (the `seed=K` override comes last in its name).
    """
    points = _check_points(sweep_points)
    keys = swept_keys(points)
    pinned = [k for k in cli_overrides if k in keys]
    for key in pinned:
        wanted = _get(base, key)
        kept = [p for p in points if key not in p or _parsed(base, key, p[key]) == wanted]
        if not kept:
            values = ", ".join(dict.fromkeys(override_text(p[key]) for p in points if key in p))
            raise UsageError(
                f"no point of the sweep has {key}={cli_overrides[key]}; its values: {values}"
            )
        points = kept
    if num_seeds < 1:
        raise UsageError(f"--sweep_seeds must be >= 1; got {num_seeds}")
    if num_seeds > 1:
        if SEED_KEY in keys:
            raise UsageError("the sweep sets 'seed' itself; drop --sweep_seeds")
        seeds = [base[SEED_KEY] + k for k in range(num_seeds)]
        points = [p | {SEED_KEY: s} for p in points for s in seeds]
    names: dict[str, Point] = {}
    for p in points:
        name = point_name(p)
        if name in names:
            raise UsageError(f"two points of the sweep share the sub-workdir {name!r}")
        names[name] = p
    return points


def _check_points(points: Any) -> list[Point]:
    if not isinstance(points, (list, tuple)) or not points:
        raise UsageError("sweep(arg) must return a non-empty list of override dicts")
    for p in points:
        if not isinstance(p, dict) or not all(isinstance(k, str) for k in p):
            raise UsageError(f"sweep(arg) returned {p!r}; each point must be a dict of config keys")
    return [dict(p) for p in points]


def _get(config: ml_collections.ConfigDict, key: str) -> Any:
    node = config
    for part in key.split("."):
        node = node[part]
    return node


def _parsed(base: ml_collections.ConfigDict, key: str, value: Any) -> Any:
    """`value` as the config would hold it (0 -> 0.0 for a float field, ...)."""
    probe = ml_collections.ConfigDict(base.to_dict())
    config_lib.apply_overrides(probe, {key: override_text(value)})
    return _get(probe, key)


def point_config(
    spec: str, cli_overrides: dict[str, str], point: Point
) -> ml_collections.ConfigDict:
    """get_config(arg), then the command-line overrides, then the point's overrides."""
    config = config_lib.load_config(spec)
    config_lib.apply_overrides(config, cli_overrides)
    config_lib.apply_overrides(config, {k: override_text(v) for k, v in point.items()})
    return config


# ---------------------------------------------------------------------------------------------
# Running


def is_finished(workdir: str) -> bool:
    """A run is finished once its test split has been evaluated (train.py does that last)."""
    from alexnet_jax.metrics import read_metrics

    return any(line.get("split") == "test" for line in read_metrics(workdir))


def _status(workdir: str) -> str:
    if is_finished(workdir):
        return "finished"
    return "partial" if os.path.exists(os.path.join(workdir, "metrics.jsonl")) else "pending"


def check_same_config(workdir: str, config: ml_collections.ConfigDict) -> None:
    """Refuses to skip or resume a sub-workdir that was run with another config.

    Its name only records the point's overrides; a changed command-line override (say another
    learning rate) would otherwise silently reuse or extend runs of the old recipe. Unlike a
    single run's resume, a longer run is refused too: a finished point would be skipped and the
    table would mix lengths.
    """
    path = os.path.join(workdir, "config.json")
    if not os.path.exists(path):
        return
    with open(path) as f:
        changes = checkpoint.config_changes(
            json.load(f), config, allowed=checkpoint.HARMLESS_CHANGES
        )
    if changes:
        raise UsageError(
            f"{workdir} was run with another config ({'; '.join(changes)}); "
            "pass another --workdir or delete it"
        )


def run_point(
    config: ml_collections.ConfigDict, workdir: str, point: Point, *, primary: bool = True
) -> None:
    """Trains one point; `run.json` accumulates its wall time over interrupted sessions."""
    from alexnet_jax.train import train_and_evaluate

    path = os.path.join(workdir, "run.json")
    record = {"overrides": point, "wall_s": 0.0, "sessions": 0, "finished": False}
    if os.path.exists(path):
        with open(path) as f:
            record |= json.load(f)
    t0 = time.time()
    try:
        train_and_evaluate(config, workdir)
        record["finished"] = True
    finally:
        if primary:
            record["wall_s"] += time.time() - t0
            record["sessions"] += 1
            os.makedirs(workdir, exist_ok=True)
            _write_atomic(path, json.dumps(record, indent=2) + "\n")


def list_commands(
    spec: str,
    points: Sequence[Point],
    workdir: str,
    cli_overrides: dict[str, str],
    num_seeds: int,
) -> list[str]:
    """One shell command per point (for job arrays or a job list), commented with its name."""
    common = [f"--config.{k}={v}" for k, v in cli_overrides.items()]
    if num_seeds > 1:
        common = ["--sweep_seeds", str(num_seeds), *common]
    lines = []
    for i, p in enumerate(points):
        argv = ["python", "launch.py", spec, "--workdir", workdir, "--sweep_index", str(i)]
        lines.append(f"{shlex.join(argv + common)}  # {point_name(p)}")
    return lines


def run_from_args(
    args: argparse.Namespace, overrides: dict[str, str], module: Any, default_workdir: str
) -> int:
    """`cli.run`'s hand-over for an experiment file that defines `sweep(arg=None)`."""
    if args.mode != "train":
        raise UsageError(f"--mode {args.mode} is not available for sweeps; run a sub-workdir")
    if args.sweep_list and args.sweep_index is not None:
        raise UsageError("--sweep_list lists every point; drop --sweep_index")
    return run_sweep(
        args.experiment,
        module,
        overrides,
        args.workdir or default_workdir,
        index=args.sweep_index,
        list_only=args.sweep_list,
        num_seeds=args.sweep_seeds,
        dry_run=args.dry_run,
        distributed={
            "coordinator_address": args.coordinator_address,
            "num_processes": args.num_processes,
            "process_id": args.process_id,
            "heartbeat_timeout": args.heartbeat_timeout,
            "init_timeout": args.init_timeout,
        },
    )


def run_sweep(
    spec: str,
    module: Any,
    cli_overrides: dict[str, str],
    workdir: str,
    *,
    index: int | None = None,
    list_only: bool = False,
    num_seeds: int | None = None,
    dry_run: bool = False,
    distributed: dict[str, Any] | None = None,
) -> int:
    """What `launch.py SWEEP.py[:ARG]` does; returns the exit status."""
    num_seeds = 1 if num_seeds is None else num_seeds
    _, arg = config_lib.split_spec(spec)
    base = config_lib.load_config(spec)
    config_lib.apply_overrides(base, cli_overrides)
    points = expand(module.sweep(arg), base, cli_overrides, num_seeds=num_seeds)
    if index is not None and not 0 <= index < len(points):
        raise UsageError(
            f"--sweep_index {index} is out of range: the sweep has {len(points)} points"
        )
    if list_only:
        print("\n".join(list_commands(spec, points, workdir, cli_overrides, num_seeds)))
        return 0
    configs = [point_config(spec, cli_overrides, p) for p in points]

    from alexnet_jax import parallel  # imports JAX; after the cheap checks above

    parallel.initialize_distributed(**(distributed or {}))
    import jax

    for config in configs:
        config_lib.validate(config, num_devices=jax.device_count())
    dirs = [os.path.join(workdir, point_name(p)) for p in points]
    selected = range(len(points)) if index is None else [index]
    for i in selected:
        check_same_config(dirs[i], configs[i])
    if dry_run:
        for i, (p, d) in enumerate(zip(points, dirs, strict=True)):
            print(f"[{i}] {_status(d):8s} {point_name(p)}")
        print(f"{len(points)} points under {workdir}")
        return 0

    primary = jax.process_index() == 0
    for i in selected:
        name = point_name(points[i])
        if is_finished(dirs[i]):
            print(f"[{i + 1}/{len(points)}] {name}: finished, skipped", flush=True)
            continue
        print(f"[{i + 1}/{len(points)}] {name} -> {dirs[i]}", flush=True)
        run_point(configs[i], dirs[i], points[i], primary=primary)
        if primary:
            report(workdir, points, verbose=False)
    if primary:
        report(workdir, points, verbose=True)
    return 0


# ---------------------------------------------------------------------------------------------
# Results: sweep.csv, sweep.png and the markdown table


def summarize(workdir: str, point: Point) -> dict[str, Any] | None:
    """The csv row of a finished point (None if it is not finished), from its metrics.jsonl."""
    from alexnet_jax.metrics import read_metrics

    run_dir = os.path.join(workdir, point_name(point))
    lines = read_metrics(run_dir)
    tests = [m for m in lines if m.get("split") == "test"]
    if not tests:
        return None
    # The end-of-training test line (evaluate.py tags it mode 'train'), not a later --mode test.
    test = ([m for m in tests if m.get("mode", "train") == "train"] or tests)[-1]
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
        "crops": test.get("crops"),
    }
    run_json = os.path.join(run_dir, "run.json")
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
    _write_atomic(path, out.getvalue())


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)


def _write_atomic(path: str, text: str) -> None:
    # Job-array points finish concurrently: readers never see a half-written file.
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


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


_COLOUR_MAPS = ("Blues", "Oranges", "Greens", "Reds", "Purples", "Greys")


def plot(path: str, workdir: str, points: Sequence[Point], rows: Sequence[dict[str, Any] | None]):
    """Two panels: the final val top-1 error against the first numeric swept key, one line per
    value of the other swept keys (error bars: std over seeds); the val top-1 learning curve of
    every run, coloured like its line, darker for larger x."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from alexnet_jax.metrics import read_metrics

    keys = [k for k in swept_keys(points) if k != SEED_KEY]
    x_key = _x_key(points)
    numeric = x_key is not None
    x_key = x_key or (keys[0] if keys else None)
    other = [k for k in keys if k != x_key]
    groups = _groups(points, rows)
    x_values = list(dict.fromkeys(p.get(x_key) for p, *_ in groups))
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
            xs.append(point.get(x_key) if numeric else x_values.index(point.get(x_key)))
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
        curve = _by_step(read_metrics(os.path.join(workdir, point_name(p))), "val")
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

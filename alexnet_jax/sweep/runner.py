"""Running a sweep: expand the grid against the base config, run each point in its own
sub-workdir, skip finished points and resume interrupted ones, and rewrite the report as points
finish. `python launch.py SWEEP.py[:ARG] [--config.KEY=VALUE ...]` comes here through `cli`.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import time
from collections.abc import Sequence
from typing import Any

import ml_collections

from alexnet_jax import compat, keys, records
from alexnet_jax import config as config_lib
from alexnet_jax import workdir as wd
from alexnet_jax.errors import UsageError
from alexnet_jax.metrics import write_hparams
from alexnet_jax.sweep.grid import SEED_KEY, Point, override_text, point_name, swept_keys
from alexnet_jax.sweep.report import report, summarize
from alexnet_jax.train import train_and_evaluate


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
    swept = swept_keys(points)
    pinned = [k for k in cli_overrides if k in swept]
    for key in pinned:
        wanted = keys.get(base, key)
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
        if SEED_KEY in swept:
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


def _parsed(base: ml_collections.ConfigDict, key: str, value: Any) -> Any:
    """`value` as the config would hold it (0 -> 0.0 for a float field, ...)."""
    probe = ml_collections.ConfigDict(base.to_dict())
    config_lib.apply_overrides(probe, {key: override_text(value)})
    return keys.get(probe, key)


def point_config(
    spec: str, cli_overrides: dict[str, str], point: Point
) -> ml_collections.ConfigDict:
    """get_config(arg), then the command-line overrides, then the point's overrides."""
    config = config_lib.resolve(spec, cli_overrides)
    config_lib.apply_overrides(config, {k: override_text(v) for k, v in point.items()})
    return config


def is_finished(workdir: str) -> bool:
    """A point is finished when its training ran to the end (not when any test line exists:
    a partly trained point looked at with --mode test still has training to do)."""
    return records.is_finished(workdir)


def _status(workdir: str) -> str:
    if is_finished(workdir):
        return "finished"
    return "partial" if os.path.exists(wd.path(workdir, wd.METRICS)) else "pending"


def check_same_config(workdir: str, config: ml_collections.ConfigDict) -> None:
    """Refuses to skip or resume a sub-workdir that was run with another config.

    Its name only records the point's overrides; a changed command-line override (say another
    learning rate) would otherwise silently reuse or extend runs of the old recipe. Unlike a
    single run's resume, a longer run is refused too: a finished point would be skipped and the
    table would mix lengths.
    """
    path = wd.path(workdir, wd.CONFIG)
    if not os.path.exists(path):
        return
    with open(path) as f:
        saved = json.load(f)
    compat.require_same(
        saved,
        config,
        "sweep",
        f"{workdir} was run with another config",
        "pass another --workdir or delete it",
    )


def run_point(
    config: ml_collections.ConfigDict, workdir: str, point: Point, *, primary: bool = True
) -> None:
    """Trains one point; `run.json` accumulates its wall time over interrupted sessions."""
    path = wd.path(workdir, wd.RUN)
    record: dict[str, Any] = {"overrides": point, "wall_s": 0.0, "sessions": 0, "finished": False}
    if os.path.exists(path):
        with open(path) as f:
            record |= json.load(f)
    t0 = time.time()
    try:
        with wd.locked(workdir):
            train_and_evaluate(config, workdir)
        record["finished"] = True
    finally:
        if primary:
            record["wall_s"] += time.time() - t0
            record["sessions"] += 1
            os.makedirs(workdir, exist_ok=True)
            wd.write_atomic(path, json.dumps(record, indent=2) + "\n")


def log_hparams(workdir: str, point: Point) -> bool:
    """A finished point's overrides and final metrics as a TensorBoard HParams session in
    `<point>/tb/hparams` (once: it is not rewritten); True if the session exists now."""
    directory = wd.path(os.path.join(workdir, point_name(point)), wd.HPARAMS)
    if os.path.isdir(directory):
        return True
    row = summarize(workdir, point)
    if row is None:
        return False
    # The protocol (crops) is the same for every point of a sweep: not a metric to compare.
    write_hparams(directory, point, {k: v for k, v in row.items() if k not in ("run", "crops")})
    return True


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
    base = config_lib.resolve(spec, cli_overrides)
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

    primary = wd.is_primary()
    for i in selected:
        name = point_name(points[i])
        if is_finished(dirs[i]):
            print(f"[{i + 1}/{len(points)}] {name}: finished, skipped", flush=True)
        else:
            print(f"[{i + 1}/{len(points)}] {name} -> {dirs[i]}", flush=True)
            run_point(configs[i], dirs[i], points[i], primary=primary)
            if primary:
                report(workdir, points, verbose=False)
        if primary:  # a skipped point too, should a stop have come between training and this
            log_hparams(workdir, points[i])
    if primary:
        report(workdir, points, verbose=True)
    return 0

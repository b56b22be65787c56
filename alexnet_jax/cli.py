"""The command line behind `launch.py`: parse, set up JAX, dispatch to a mode.

python launch.py EXPERIMENT.py[:ARG] [--workdir DIR] [--config.KEY=VALUE ...]
                 [--mode MODE] [--dry_run]
python launch.py --config=EXPERIMENT.py[:ARG] [...]   (ml_collections' config_flags spelling)
python launch.py SWEEP.py[:ARG] [...] [--sweep_index I | --sweep_list] [--sweep_seeds N]
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import traceback
from collections.abc import Sequence

import ml_collections

from alexnet_jax import config as config_lib
from alexnet_jax.errors import NonFiniteError, Preempted, SaveError, UsageError

MODES = ("train", "eval", "test", "predict", "filters")


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # argparse exits 2 already; make it one line, no usage dump
        raise UsageError(message)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="launch.py", description="Train and evaluate AlexNet from an experiment file.")
    p.add_argument("experiment", nargs="?", help="EXPERIMENT.py[:ARG]")
    # ml_collections' config_flags convention, which JAX researchers type by habit. Only the
    # exact `--config` reaches argparse: `--config.KEY` overrides are split off before it.
    p.add_argument(
        "--config",
        dest="config_file",
        metavar="EXPERIMENT.py[:ARG]",
        help="the experiment, as config_flags spells it (instead of the positional argument)",
    )
    p.add_argument("--workdir", help="default: runs/<experiment>[_<arg>]; an existing one resumes")
    p.add_argument("--mode", default="train", choices=MODES)
    p.add_argument("--dry_run", action="store_true", help="print the config and parameters, exit")
    p.add_argument("--coordinator_address", help="HOST:PORT of process 0 (multi-host)")
    p.add_argument("--num_processes", type=int, help="how many processes (multi-host)")
    p.add_argument("--process_id", type=int, help="this process's index in [0, N) (multi-host)")
    p.add_argument(
        "--heartbeat_timeout",
        type=float,
        default=30.0,
        metavar="SECONDS",
        help="multi-host: when a process is silent this long, all exit (default 30)",
    )
    p.add_argument(
        "--init_timeout",
        type=float,
        default=300.0,
        metavar="SECONDS",
        help="multi-host: how long to wait for every process to join (default 300)",
    )
    # Evaluation modes (alexnet_jax/evaluate.py, predict.py, filters.py).
    p.add_argument("--force_test", action="store_true", help="--mode test on a tested workdir")
    p.add_argument("--image", nargs="+", default=[], metavar="PATH", help="for --mode predict")
    p.add_argument(
        "--checkpoint",
        default="latest",
        help="for eval/test/predict/filters: 'latest', 'best' (validation) or a step",
    )
    # Sweeps (an experiment file that defines sweep(arg=None); see alexnet_jax/sweep/).
    p.add_argument("--sweep_index", type=int, help="run only point I (e.g. $SLURM_ARRAY_TASK_ID)")
    p.add_argument("--sweep_list", action="store_true", help="print one command per point, exit")
    p.add_argument("--sweep_seeds", type=int, help="run each point with N seeds: seed, seed+1, ...")
    return p


def parse_args(argv: Sequence[str]) -> tuple[argparse.Namespace, dict[str, str]]:
    """Splits `--config.KEY=VALUE` (or `--config.KEY VALUE`) overrides from the other flags."""
    rest, overrides = config_lib.split_overrides(argv)
    args = build_parser().parse_args(rest)
    if args.experiment is not None and args.config_file is not None:
        raise UsageError(
            f"two experiments: {args.experiment} and --config={args.config_file}; give one"
        )
    if args.experiment is None:
        args.experiment = args.config_file
    if args.experiment is None:
        raise UsageError("no experiment: give EXPERIMENT.py[:ARG] or --config=EXPERIMENT.py[:ARG]")
    return args, overrides


def default_workdir(spec: str) -> str:
    path, arg = config_lib.split_spec(spec)
    name = os.path.splitext(os.path.basename(path))[0]
    return os.path.join("runs", f"{name}_{arg}" if arg else name)


def dry_run(config: ml_collections.ConfigDict) -> None:
    """Prints the resolved config and the per-layer parameter table; touches no data."""
    from alexnet_jax.model import abstract_params, from_config, param_table

    size = config.data.image_size
    print(config.to_json_best_effort(indent=2, sort_keys=True))
    rows = param_table(abstract_params(from_config(config.model), (size, size, 3)))
    width = max(len(r[0]) for r in rows)
    print(f"\n{'parameter':<{width}}  {'shape':>20}  {'count':>12}")
    for name, shape, count in rows:
        print(f"{name:<{width}}  {shape!s:>20}  {count:>12,}")
    print(f"Total parameters: {sum(r[2] for r in rows):,}")


def run(argv: Sequence[str]) -> int:
    args, overrides = parse_args(argv)
    module = config_lib.load_module(config_lib.split_spec(args.experiment)[0])
    if hasattr(module, "sweep"):
        from alexnet_jax.sweep import runner

        return runner.run_from_args(args, overrides, module, default_workdir(args.experiment))
    if args.sweep_index is not None or args.sweep_list or args.sweep_seeds is not None:
        raise UsageError("--sweep_* flags need an experiment that defines sweep(arg=None)")
    config = config_lib.resolve(args.experiment, overrides)

    from alexnet_jax import parallel  # imports JAX; after the cheap checks above

    parallel.initialize_distributed(
        args.coordinator_address,
        args.num_processes,
        args.process_id,
        heartbeat_timeout=args.heartbeat_timeout,
        init_timeout=args.init_timeout,
    )
    import jax

    config_lib.validate(config, num_devices=jax.device_count())
    if args.dry_run:
        dry_run(config)
        return 0
    workdir = args.workdir or default_workdir(args.experiment)
    from alexnet_jax.workdir import locked

    if args.mode == "train":
        from alexnet_jax.train import train_and_evaluate

        with locked(workdir):
            train_and_evaluate(config, workdir)
        return 0
    if args.mode in ("eval", "test") and not os.path.isdir(workdir):
        raise UsageError(f"no workdir {workdir}: train first")
    # eval and predict only read: a read-only copy of a finished run can still be scored (eval
    # prints its result even where it cannot log it). test must record its one look at the test
    # split, and filters writes its PNG, so they need the workdir writable, like training.
    with locked(workdir, required=args.mode in ("test", "filters")):
        return run_mode(args, config, workdir)


def run_mode(args: argparse.Namespace, config: ml_collections.ConfigDict, workdir: str) -> int:
    """The modes that read a trained workdir: eval, test, predict, filters."""
    from alexnet_jax import evaluate, filters, predict

    if args.mode == "eval":
        evaluate.run_eval(config, workdir, checkpoint=args.checkpoint)
    elif args.mode == "test":
        evaluate.run_test(config, workdir, force=args.force_test, checkpoint=args.checkpoint)
    elif args.mode == "predict":
        predict.run_predict(config, workdir, args.image, checkpoint=args.checkpoint)
    elif args.mode == "filters":
        filters.run_filters(config, workdir, checkpoint=args.checkpoint)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the command line; returns the exit status.

    In a multi-process run, a process that fails tells the others, which then exit with the same
    status instead of waiting in a collective for it (alexnet_jax/distributed.py).
    """
    from alexnet_jax import distributed  # imports no JAX

    try:
        status = _main(argv)
    except Exception:  # a bug or an unforeseen error: the usual traceback, then leave
        if distributed.is_running():
            traceback.print_exc()
            distributed.leave(1)  # does not return
        raise
    distributed.leave(status)  # returns only when single-process or when status is 0
    return status


def _main(argv: Sequence[str] | None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    # TensorFlow's C++ logs (oneDNN, rendezvous, ...) and Orbax's and TFDS's absl chatter must
    # not surround our one error line; set before TensorFlow is first imported (by a source).
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    # On Intel CPUs TensorFlow 2.21 prints a oneDNN notice before its logging starts, whatever
    # the level. Its oneDNN rewrites are for TF's own convolutions and matmuls, which tf.data and
    # TFDS never run here, so turning them off costs nothing.
    os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")
    # Orbax logs the errors of its writer threads itself; we report them in one line.
    logging.getLogger("absl").setLevel(logging.CRITICAL)
    try:
        return run(argv)
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except (NonFiniteError, SaveError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except Preempted as e:
        # 128 + SIGTERM, what a killed process reports, so that wrappers see an unfinished run.
        print(str(e), file=sys.stderr)
        return 143
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130

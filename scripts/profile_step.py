"""Where the training step's time goes, op by op: a `jax.profiler` trace of the real step, summed.

    python scripts/profile_step.py [--experiment experiments/imagenet.py] [--batch 64] [--dtype D]
                                   [--steps 2] [--top 25] [--trace_dir DIR] [--config.KEY=VALUE]

Builds the benchmark's step (`alexnet_jax.bench.jax_runner`: the pmapped `train_step` on one
synthetic batch), runs it twice to compile and warm up, traces `--steps` steps and prints, per
step, the time of the XLA ops the trace names (fusions, matmuls on YNNPACK, copies, collectives),
grouped by kind and then the `--top` single ops with the shape each produces (from the compiled
HLO). On XLA:CPU a convolution is an asynchronous Eigen call whose trace event covers only its
launch: the line "not named (convolutions on CPU)" is the step's wall time minus the named ops.
The README's "Performance" table came from this script. Open the trace itself in TensorBoard's
profile plugin or Perfetto (README, "Profiling").
"""

from __future__ import annotations

import argparse
import collections
import glob
import re
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax

from alexnet_jax import bench  # sets the XLA:CPU flags before JAX starts its backend
from alexnet_jax import config as config_lib
from alexnet_jax.errors import UsageError
from alexnet_jax.model import DTYPES


def op_times(trace_dir: str, steps: int) -> collections.Counter:
    """ms per step of each op named on XLA's compute threads."""
    files = sorted(glob.glob(f"{trace_dir}/**/*.xplane.pb", recursive=True))
    if not files:
        raise SystemExit(f"error: no trace was written under {trace_dir}")
    times: collections.Counter = collections.Counter()
    for plane in jax.profiler.ProfileData.from_file(files[-1]).planes:
        for line in plane.lines:
            if not line.name.startswith("tf_XLAEigen"):
                continue
            for event in line.events:
                if not event.name.startswith(("ThunkExecutor", "end: ")):
                    times[event.name] += event.duration_ns / 1e6 / steps
    return times


def shapes(hlo: str) -> dict[str, str]:
    """op name -> the shape it produces, from the compiled HLO text."""
    out = {}
    for line in hlo.splitlines():
        m = re.match(r"\s*(?:ROOT )?%?([\w.\-]+) = (\S+)", line)
        if m:
            out.setdefault(m.group(1), m.group(2))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--experiment", default="experiments/imagenet.py")
    # Defaults: batch 64 (the README's table) unless --config.batch_size says otherwise; the
    # experiment's model.dtype (so that --config.model.dtype=bfloat16 is not silently undone).
    parser.add_argument("--batch", type=int, default=None)
    parser.add_argument("--dtype", default=None)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--trace_dir", default="")
    try:
        rest, overrides = config_lib.split_overrides(sys.argv[1:] if argv is None else argv)
        args = parser.parse_args(rest)
        base = config_lib.resolve(args.experiment, overrides)
        if args.batch is None:
            args.batch = base.batch_size if "batch_size" in overrides else 64
        if args.batch < 1:
            raise UsageError(f"--batch must be >= 1, got {args.batch}")
        args.dtype = args.dtype or base.model.dtype
        config_lib.check_choice("--dtype", args.dtype, DTYPES)
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    step = bench.jax_runner(bench.bench_config(base, args.batch, args.dtype))
    step()
    step()
    trace_dir = args.trace_dir or tempfile.mkdtemp(prefix="profile_step_")
    jax.profiler.start_trace(trace_dir)
    start = time.perf_counter()
    for _ in range(args.steps):
        step()
    wall = (time.perf_counter() - start) * 1000 / args.steps
    jax.profiler.stop_trace()
    times = op_times(trace_dir, args.steps)
    named = sum(times.values())
    kinds: collections.Counter = collections.Counter()
    for name, ms in times.items():
        kinds[re.sub(r"[._]?\d+$", "", name)] += ms
    print(f"step {wall:.0f} ms (traced, batch {args.batch}, {args.dtype}); trace in {trace_dir}")
    unnamed = wall - named
    print(f"{unnamed:9.1f} ms  {100 * unnamed / wall:5.1f} %  not named (convolutions on CPU)")
    for kind, ms in kinds.most_common(args.top):
        print(f"{ms:9.1f} ms  {100 * ms / wall:5.1f} %  {kind}")
    print(f"\nthe {args.top} longest ops:")
    produced = shapes(step.hlo())  # type: ignore[attr-defined]
    for name, ms in times.most_common(args.top):
        print(f"{ms:9.1f} ms  {name:34s} {produced.get(name, '')[:60]}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Training-step benchmark: the real pmapped `train_step` on synthetic data, against PyTorch.

    python -m alexnet_jax.bench [--batch_sizes 64,128] [--steps 10] [--dtypes float32,bfloat16]
                                [--torch_modes eager,compile,bf16,compile_bf16] [--no_torch]
                                [--out results.jsonl] [--config.KEY=VALUE ...]
    python -m alexnet_jax.bench --parallel_modes data,columns,owt [--batch_sizes 32] ...

What is timed: `alexnet_jax.steps.build(...)[1].train`, the same `jax.pmap`ped step (over all
local devices, state donated) that `launch.py` runs, on one synthetic batch made on the devices.
The first steps compile and are not timed; each timed step waits for its result, and the report
is the median over `--steps` steps. When PyTorch is installed, the same network (grouped convs,
LRN, dropout, SGD with momentum; `alexnet_jax.torch_reference`) is timed in the same process in
each of `--torch_modes` (PyTorch at its best: eager, `torch.compile`, bf16 autocast, compiled bf16
autocast). Every JAX dtype and every PyTorch mode of a batch size take turns step by step in one
interleaved run, so that all see the same machine load, and the ratio JAX/PyTorch is printed
against each mode (> 1: JAX is faster).

With `--parallel_modes`, the same step in each `parallel.mode` takes turns instead (float32, no
PyTorch), and each row adds what the compiled step sends between devices (`alexnet_jax.costs`:
the collectives of the optimised HLO, in bytes per device with a ring algorithm) next to what
the mode's design implies.

XLA:CPU settings: `alexnet_jax.cpu_flags` (convolutions on Eigen, matmuls and reductions on
YNNPACK) is applied before JAX starts, as in `launch.py`. Optional, for both frameworks alike: on
Linux, glibc's malloc tunables
    GLIBC_TUNABLES=glibc.malloc.arena_max=1:glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=4294967296
keep the step's large temporary buffers in the heap instead of mapping fresh zeroed pages every
step (another ~15 % for JAX and ~20 % for PyTorch on 2 cores; README, "Performance").

Model FLOPs: 2 x the multiply-adds of the convolutions and dense layers (0.724 GMAC per 224 px
image for the paper's network, section 3), times 3 for a training step (forward, and a backward
pass that costs twice the forward). Peak: the best of several large float32 (or bfloat16) matmuls
on the same device, i.e. what this machine's matmul kernels reach, not a datasheet number.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

from alexnet_jax import config as config_lib
from alexnet_jax import costs, cpu_flags, onednn, steps
from alexnet_jax.data import make_source
from alexnet_jax.errors import UsageError
from alexnet_jax.layers import resolve_kernels
from alexnet_jax.model import DTYPES, abstract_params, from_config
from alexnet_jax.parallel import PLANS

# torch_reference.MODES, without importing PyTorch (optional) to check a command line.
TORCH_MODES = ("eager", "compile", "bf16", "compile_bf16")


def jax_runner(config: ml_collections.ConfigDict) -> Callable[[], None]:
    """One blocking call of the real pmapped train step per call, on a fixed synthetic batch."""
    source = make_source(config)
    state, run, _, _ = steps.build(config, source.info)
    plan = run.plan
    per_process = plan.per_process_batch(config.batch_size)
    batch = next(plan.prefetch(source.train_batches(per_process, seed=config.seed)))
    rng = plan.put_state(steps.dropout_base_key(config.seed))
    box = {"state": plan.put_state(state)}
    train = run.train
    assert train is not None

    def step() -> None:
        box["state"], metrics = train(box["state"], batch, rng)
        jax.block_until_ready((box["state"], metrics))

    def hlo() -> str:  # the optimised program that `step` runs
        return train.lower(box["state"], batch, rng).compile().as_text()  # type: ignore[attr-defined]

    step.hlo = hlo  # type: ignore[attr-defined]
    return step


def torch_available() -> bool:
    try:
        import torch  # noqa: F401
    except ImportError:
        return False
    return True


def torch_runner(
    config: ml_collections.ConfigDict, mode: str = "eager", channels_last: bool = False
) -> Callable[[], object]:
    """The same step in PyTorch in one of `torch_reference.MODES` (PyTorch must be installed)."""
    import torch

    from alexnet_jax import torch_reference

    torch.manual_seed(config.seed)
    model = from_config(config.model)
    net = torch_reference.TorchAlexNet(model)
    o = config.optim
    opt = torch_reference.make_sgd(
        net,
        learning_rate=o.learning_rate,
        momentum=o.momentum,
        weight_decay=o.weight_decay,
        decay_biases=o.decay_biases,
    )
    size = config.data.image_size
    images = torch.randn(config.batch_size, 3, size, size)
    labels = torch.randint(0, model.num_classes, (config.batch_size,))
    if channels_last:
        # Module.to(memory_format=...) is documented; torch's type stubs lack that overload.
        net = net.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
        images = images.contiguous(memory_format=torch.channels_last)
    return torch_reference.make_step(net, opt, images, labels, mode)


def interleave(
    runners: Mapping[str, Callable[[], object]], steps: int, warmup: int
) -> dict[str, list[float]]:
    """Per-step seconds of each runner, the runners taking turns step by step."""
    for run in runners.values():
        for _ in range(warmup):
            run()  # compilation, allocator and thread-pool warm-up
    times: dict[str, list[float]] = {name: [] for name in runners}
    for _ in range(steps):
        for name, run in runners.items():
            times[name].append(costs.seconds(run))
    return times


def bench_config(
    base: ml_collections.ConfigDict, batch_size: int, dtype: str
) -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict(base.to_dict())
    config.dataset = "synthetic"
    config.batch_size = batch_size
    config.model.dtype = dtype
    return config


def run(args: argparse.Namespace, overrides: dict[str, str]) -> list[dict[str, Any]]:
    base = config_lib.resolve(args.experiment, overrides)
    devices = jax.local_devices()
    wrapping = "parallel.mode " + ",".join(args.parallel_modes) if args.parallel_modes else "pmap"
    print(
        f"devices: {len(devices)} x {devices[0].device_kind} ({devices[0].platform}); "
        f"jax {jax.__version__}; host {platform.processor() or platform.machine()}; "
        f"step: {wrapping} over {len(devices)} local device(s); "
        f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}",
        flush=True,
    )
    image_shape = (base.data.image_size, base.data.image_size, 3)
    flops_fwd = costs.forward_flops(from_config(base.model), image_shape)
    print(f"model: {flops_fwd / 2e9:.3f} GMAC forward per image", flush=True)
    peaks = {}
    for dtype in dict.fromkeys(args.dtypes):
        n = args.matmul_size or (2048 if devices[0].platform == "cpu" else 8192)
        peaks[dtype] = costs.matmul_peak_gflops(jnp.dtype(dtype), n)
        print(f"matmul peak ({dtype}, {n}^3, best of 8): {peaks[dtype]:.1f} GFLOP/s", flush=True)
    upcast = "bfloat16" in args.dtypes and cpu_flags.bf16_upcast()
    kernels = resolve_kernels(base.model.kernels)
    if upcast and kernels == "onednn" and onednn.native_bf16():
        print(
            "note: XLA:CPU computes bfloat16 matmuls in float32; with model.kernels=onednn the "
            "convolutions run on oneDNN's bf16 kernels (this CPU has bf16 units), so the bf16 "
            "step can pass the bf16 matmul peak above, which is XLA's.",
            flush=True,
        )
    elif upcast:
        print(
            "note: this backend computes bfloat16 convolutions and matmuls in float32 (XLA:CPU "
            "converts around each one; no AMX-BF16 kernels): bfloat16 saves no arithmetic here "
            "and costs the converts. On CPUs, train in float32, or in bfloat16 with "
            "model.kernels=onednn on a CPU with bf16 units (AVX512-BF16, AMX).",
            flush=True,
        )
    if args.parallel_modes:
        return run_modes(args, base, image_shape, flops_fwd, peaks[args.dtypes[0]], devices)
    torch_modes = [] if args.no_torch or not torch_available() else args.torch_modes
    results = []
    for batch_size in args.batch_sizes:
        # One interleaved run per batch size: every JAX dtype and every PyTorch mode.
        configs = {dtype: bench_config(base, batch_size, dtype) for dtype in args.dtypes}
        runners: dict[str, Callable[[], object]] = {
            f"jax_{dtype}": jax_runner(config) for dtype, config in configs.items()
        }
        for mode in torch_modes:
            torch_config = configs[args.dtypes[0]]  # PyTorch's dtype is its mode's
            runners[f"torch_{mode}"] = torch_runner(torch_config, mode, args.torch_channels_last)
        times = interleave(runners, args.steps, args.warmup)
        for dtype, config in configs.items():
            row = _row(times, dtype, config, flops_fwd, peaks[dtype], devices)
            if dtype == "bfloat16":
                row["bf16_computed_in_float32"] = upcast
            results.append(row)
            print(_format(row), flush=True)
        del runners
    _append(args.out, results)
    return results


def run_modes(
    args: argparse.Namespace,
    base: ml_collections.ConfigDict,
    image_shape: tuple[int, int, int],
    flops_fwd: float,
    peak: float,
    devices: Sequence[Any],
) -> list[dict[str, Any]]:
    """Each `parallel.mode` in one interleaved run per batch size, with its traffic."""
    model = from_config(base.model)
    params = abstract_params(model, image_shape)
    results = []
    for batch_size in args.batch_sizes:
        configs = {}
        for mode in args.parallel_modes:
            configs[mode] = bench_config(base, batch_size, args.dtypes[0])
            configs[mode].parallel.mode = mode
            config_lib.validate(configs[mode], num_devices=jax.device_count())
        runners = {f"jax_{mode}": jax_runner(c) for mode, c in configs.items()}
        times = interleave(runners, args.steps, args.warmup)
        for mode, config in configs.items():
            runner = runners[f"jax_{mode}"]
            row = _row({"jax_" + config.model.dtype: times[f"jax_{mode}"]}, config.model.dtype,
                       config, flops_fwd, peak, devices)  # fmt: skip
            row["parallel_mode"] = mode
            row["traffic"] = costs.traffic(runner.hlo())  # type: ignore[attr-defined]
            sent = sum(t["ring_bytes_per_device"] for t in row["traffic"].values())
            row["ring_bytes_per_device"] = sent
            row["implied_ring_bytes_per_device"] = costs.implied(
                model, params, image_shape[0], batch_size, mode, len(devices)
            )
            results.append(row)
            print(f"{mode:>8} " + _format(row), flush=True)
            kinds = ", ".join(
                f"{k} x{int(t['count'])} {t['buffer_bytes'] / 1e6:.2f} MB"
                for k, t in row["traffic"].items()
            )
            print(
                f"         sends {sent / 1e6:.2f} MB/device/step (ring; design implies "
                f"{row['implied_ring_bytes_per_device'] / 1e6:.2f} MB): {kinds or 'nothing'}",
                flush=True,
            )
    _append(args.out, results)
    return results


def _append(path: str | None, rows: list[dict[str, Any]]) -> None:
    if path:
        with open(path, "a") as f:
            for row in rows:
                f.write(json.dumps(row) + "\n")


def _row(
    times: dict[str, list[float]],
    dtype: str,
    config: ml_collections.ConfigDict,
    flops_fwd: float,
    peak: float,
    devices: Sequence[Any],
) -> dict[str, Any]:
    batch = config.batch_size
    jax_times = times[f"jax_{dtype}"]
    jax_s = statistics.median(jax_times)
    gflops = 3 * flops_fwd * batch / jax_s / 1e9
    row = {
        "batch_size": batch,
        "dtype": config.model.dtype,
        "device": devices[0].device_kind,
        "platform": devices[0].platform,
        "cpu_ynn_convolutions_off": cpu_flags.active(),
        "num_devices": len(devices),
        "steps": len(jax_times),
        "step_s": jax_s,
        "step_s_min": min(jax_times),
        "step_s_max": max(jax_times),
        "images_per_sec": batch / jax_s,
        "gflops": gflops,
        "peak_gflops": peak,
        "fraction_of_peak": gflops / peak,
    }
    modes = {
        name.removeprefix("torch_"): t for name, t in times.items() if name.startswith("torch")
    }
    if modes:
        row["torch"] = {
            mode: {
                "step_s": statistics.median(t),
                "images_per_sec": batch / statistics.median(t),
                "jax_over_torch": statistics.median(t) / jax_s,
            }
            for mode, t in modes.items()
        }
    return row


def _format(r: dict[str, Any]) -> str:
    line = (
        f"batch {r['batch_size']:>4} {r['dtype']:>8}: step {1e3 * r['step_s']:8.1f} ms "
        f"(median of {r['steps']}, min {1e3 * r['step_s_min']:.1f}, "
        f"max {1e3 * r['step_s_max']:.1f})"
        f"  {r['images_per_sec']:8.1f} img/s  {r['gflops']:7.1f} GFLOP/s"
        f"  {100 * r['fraction_of_peak']:5.1f} % of matmul peak"
    )
    if "torch" in r:
        line += "\n    PyTorch " + " | ".join(
            f"{mode} {t['images_per_sec']:.1f} img/s: JAX/PyTorch {t['jax_over_torch']:.2f}x"
            for mode, t in r["torch"].items()
        )
    return line


def _ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v]


# Config keys that every benchmark setting sets itself (`bench_config`), and what to do instead.
_SET_BY_FLAGS = {
    "model.dtype": "use --dtypes",
    "batch_size": "use --batch_sizes",
    "dataset": "its batches are synthetic",
}


def parse_args(argv: Sequence[str]) -> tuple[argparse.Namespace, dict[str, str]]:
    p = argparse.ArgumentParser(
        prog="python -m alexnet_jax.bench", description=__doc__.split("\n")[0]
    )
    p.add_argument("--experiment", default="experiments/imagenet.py", help="EXPERIMENT.py[:ARG]")
    p.add_argument("--batch_sizes", type=_ints, default=[64], help="comma-separated global sizes")
    p.add_argument("--dtypes", type=lambda s: s.split(","), default=["float32"])
    p.add_argument("--steps", type=int, default=10, help="timed steps per setting (median)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first (compilation)")
    p.add_argument(
        "--torch_modes",
        type=lambda s: s.split(","),
        default=["eager", "compile", "bf16", "compile_bf16"],
        help="PyTorch variants to time (alexnet_jax.torch_reference.MODES)",
    )
    p.add_argument("--no_torch", action="store_true", help="skip PyTorch even if installed")
    p.add_argument("--torch_channels_last", action="store_true", help="NHWC PyTorch tensors")
    p.add_argument("--matmul_size", type=int, help="n of the peak matmul (CPU 2048, else 8192)")
    p.add_argument("--out", help="append one JSON line per setting to this file")
    p.add_argument(
        "--parallel_modes",
        type=lambda s: s.split(","),
        default=[],
        help="time these parallel.mode values against each other instead (data,columns,owt)",
    )
    rest, overrides = config_lib.split_overrides(argv)
    args = p.parse_args(rest)
    for key, hint in _SET_BY_FLAGS.items():
        if key in overrides:  # bench_config would overwrite it: say so rather than ignore it
            raise UsageError(f"--config.{key} is set by the benchmark: {hint}")
    for dtype in args.dtypes:
        config_lib.check_choice("--dtypes", dtype, DTYPES)
    for mode in args.torch_modes:  # the names only: PyTorch need not be installed to check them
        config_lib.check_choice("--torch_modes", mode, TORCH_MODES)
    for mode in args.parallel_modes:
        config_lib.check_choice("--parallel_modes", mode, list(PLANS))
    return args, overrides


def main(argv: Sequence[str] | None = None) -> int:
    cpu_flags.configure()  # before JAX starts its backend; a no-op if `import alexnet_jax` did it
    try:
        run(*parse_args(sys.argv[1:] if argv is None else argv))
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

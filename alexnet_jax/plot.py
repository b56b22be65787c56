"""Learning curves of one or several workdirs, side by side, as a PNG.

    python -m alexnet_jax.plot runs/digits [runs/other ...] [--out curves.png]

Three panels against the step: training loss, validation top-1 error, validation top-5 error;
one line per workdir. Reads only `metrics.jsonl`, so it works on a run that is still going.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from alexnet_jax.workdir import read_metrics

PANELS = (
    ("train", "loss", "training loss"),
    ("val", "top1_error", "validation top-1 error (%)"),
    ("val", "top5_error", "validation top-5 error (%)"),
)


def plot_curves(workdirs: Sequence[str], out: str) -> str:
    """Draws the three panels for `workdirs` into `out` (PNG) and returns its path."""
    import matplotlib

    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(PANELS), figsize=(5 * len(PANELS), 3.8))
    for workdir in workdirs:
        lines = read_metrics(workdir)
        if not lines:
            raise FileNotFoundError(f"no metrics.jsonl in {workdir}")
        label = os.path.basename(os.path.normpath(workdir))
        for ax, (split, key, _) in zip(axes, PANELS, strict=True):
            points = [(m["step"], m[key]) for m in lines if m["split"] == split and key in m]
            scale = 100.0 if key.endswith("error") else 1.0
            ax.plot([p[0] for p in points], [scale * p[1] for p in points], marker=".", label=label)
    for ax, (_, key, title) in zip(axes, PANELS, strict=True):
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if key == "loss":
            ax.set_yscale("log")
    axes[0].legend(fontsize="small")
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m alexnet_jax.plot", description=__doc__)
    parser.add_argument("workdirs", nargs="+")
    parser.add_argument("--out", help="default: <first workdir>/curves.png")
    args = parser.parse_args(argv)
    out = args.out or os.path.join(args.workdirs[0], "curves.png")
    try:
        print(plot_curves(args.workdirs, out))
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Sweeps: grid expansion and naming, --sweep_list, skipping and tabulating finished points, and a
real two-point digits sweep run through the launcher (--sweep_index, then all, then again)."""

import csv
import glob
import os
import shlex
import statistics

import matplotlib.image
import pytest

from alexnet_jax import cli, config
from alexnet_jax.errors import UsageError
from alexnet_jax.metrics import MetricWriter
from alexnet_jax.sweep import grid, report, runner
from alexnet_jax.workdir import HPARAMS, read_metrics

ABLATION = "experiments/ablate_dropout_lrn.py"


def _expand(spec, overrides=None, num_seeds=1):
    path, arg = config.split_spec(spec)
    base = config.load_config(spec)
    config.apply_overrides(base, overrides or {})
    return runner.expand(
        config.load_module(path).sweep(arg), base, overrides or {}, num_seeds=num_seeds
    )


def test_grid_helpers():
    points = grid.product(grid.axis("a", [1, 2]), grid.axis("b", [True, False]))
    assert points == [
        {"a": 1, "b": True},
        {"a": 1, "b": False},
        {"a": 2, "b": True},
        {"a": 2, "b": False},
    ]
    assert grid.zipped(grid.axis("a", [1, 2]), grid.axis("b", ["x", "y"])) == [
        {"a": 1, "b": "x"},
        {"a": 2, "b": "y"},
    ]
    with pytest.raises(UsageError, match="one length"):
        grid.zipped(grid.axis("a", [1, 2]), grid.axis("b", [1]))
    with pytest.raises(UsageError, match="twice"):
        grid.product(grid.axis("a", [1]), grid.axis("a", [2]))


def test_point_names_are_filesystem_safe_and_round_trip():
    assert grid.point_name({"model.dropout_rate": 0.25, "model.use_lrn": False}) == (
        "model.dropout_rate=0.25,model.use_lrn=False"
    )
    name = grid.point_name({"data.train_split": "train[:1%]", "model.conv_features": (8, 16)})
    assert name == "data.train_split=train__1__,model.conv_features=8x16"
    # The override text parses back to the same typed value through the config functions.
    c = config.load_config("experiments/digits.py")
    point = {"model.conv_features": (8, 8, 8, 8, 8), "model.dropout_rate": 0, "seed": 3}
    config.apply_overrides(c, {k: grid.override_text(v) for k, v in point.items()})
    assert (c.model.conv_features, c.model.dropout_rate, c.seed) == ((8, 8, 8, 8, 8), 0.0, 3)


def test_ablation_grid_bases_seeds_and_pinning():
    points = _expand(ABLATION + ":digits")
    names = [grid.point_name(p) for p in points]
    assert len(points) == 8 and len(set(names)) == 8
    assert "model.dropout_rate=0.25,model.use_lrn=False" in names
    assert {p["model.dropout_rate"] for p in points} == {0.0, 0.25, 0.5, 0.75}
    module = config.load_module(ABLATION)
    assert module.get_config().dataset == "imagenet2012"
    assert module.get_config("digits").dataset == "digits"
    with pytest.raises(UsageError, match="unknown argument"):
        module.get_config("cifar")

    seeded = _expand(ABLATION + ":digits", {"seed": "5"}, num_seeds=3)
    assert len(seeded) == 24
    assert [p["seed"] for p in seeded[:3]] == [5, 6, 7]
    assert list(seeded[0])[-1] == "seed"  # the seed comes last in the sub-workdir name

    # Overriding a swept key narrows the grid to its points; the names do not change.
    pinned = _expand(ABLATION + ":digits", {"model.use_lrn": "false"})
    assert [grid.point_name(p) for p in pinned] == [n for n in names if n.endswith("=False")]
    with pytest.raises(UsageError, match=r"no point of the sweep has model\.dropout_rate=0\.3"):
        _expand(ABLATION + ":digits", {"model.dropout_rate": "0.3"})


def test_sweep_list_prints_one_runnable_command_per_point(capsys, tmp_path):
    argv = [ABLATION + ":digits", "--workdir", str(tmp_path), "--config.num_train_steps=7"]
    assert cli.main([*argv, "--sweep_list"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 8
    for i, line in enumerate(lines):
        command, _, comment = line.partition("  # ")
        words = shlex.split(command)
        assert words[:2] == ["python", "launch.py"]
        args, overrides = cli.parse_args(words[2:])
        assert args.sweep_index == i and args.workdir == str(tmp_path)
        assert overrides == {"num_train_steps": "7"}
        assert comment == grid.point_name(_expand(ABLATION + ":digits")[i])
    assert not os.listdir(tmp_path)  # listing runs nothing


def test_sweep_flags_need_a_sweep_and_a_valid_index(capsys):
    assert cli.main(["experiments/digits.py", "--sweep_index", "0"]) == 2
    assert "defines sweep" in capsys.readouterr().err
    assert cli.main([ABLATION + ":digits", "--sweep_index", "8", "--sweep_list"]) == 2
    assert cli.main([ABLATION + ":digits", "--sweep_index", "8"]) == 2
    assert "out of range" in capsys.readouterr().err


def _fake_run(workdir, val_errors, test_error, *, finish=True):
    """A sub-workdir as train.py leaves it, written through the real MetricWriter."""
    writer = MetricWriter(workdir)
    for step, err in enumerate(val_errors, start=1):
        writer.write(step * 10, "val", {"top1_error": err, "top5_error": err / 2, "crops": 1})
    if finish:
        test = {"top1_error": test_error, "top5_error": 0.0, "crops": 1}
        writer.write(10 * len(val_errors), "test", test)
    writer.close()


def test_report_tabulates_finished_runs_with_mean_and_std_over_seeds(tmp_path):
    base = grid.product(grid.axis("model.dropout_rate", [0.0, 0.5]), grid.axis("x", ["a"]))
    points = [p | {"seed": s} for p in base for s in (0, 1)]
    vals = {0: [0.5, 0.3, 0.35], 1: [0.6, 0.25, 0.3], 2: [0.4, 0.2, 0.22], 3: [0.45, 0.2, 0.24]}
    for i, p in enumerate(points):
        _fake_run(tmp_path / grid.point_name(p), vals[i], test_error=0.1 * (i + 1), finish=i < 3)
    assert [runner.is_finished(tmp_path / grid.point_name(p)) for p in points] == [True] * 3 + [
        False
    ]

    rows = report.report(str(tmp_path), points, verbose=False)
    with open(tmp_path / "sweep.csv") as f:
        table = list(csv.DictReader(f))
    assert len(table) == 3  # the unfinished run has no row yet
    assert table[0]["model.dropout_rate"] == "0.0" and table[0]["seed"] == "0"
    assert float(table[1]["val_top1_error"]) == pytest.approx(vals[1][-1])
    assert float(table[1]["best_val_top1_error"]) == pytest.approx(min(vals[1]))
    assert int(table[1]["best_val_step"]) == 20
    assert float(table[2]["test_top1_error"]) == pytest.approx(0.3)
    image = matplotlib.image.imread(tmp_path / "sweep.png")
    assert image.ndim == 3 and image.shape[1] > image.shape[0]

    md = report.markdown_table(points, rows)
    mean = statistics.fmean([100 * vals[0][-1], 100 * vals[1][-1]])
    std = statistics.stdev([100 * vals[0][-1], 100 * vals[1][-1]])
    assert f"| 0.0 | a | 2 | {mean:.2f} ± {std:.2f} |" in md
    assert f"| 0.5 | a | 1 of 2 | {100 * vals[2][-1]:.2f} |" in md
    assert "3 of 4 runs finished" in md


NAMES = ["model.dropout_rate=0.5,model.use_lrn=True", "model.dropout_rate=0.5,model.use_lrn=False"]


@pytest.fixture
def tiny(tmp_path):
    """The ablation on digits, pinned to dropout 0.5 (two points: LRN on and off), with a tiny
    network and 2 steps so that each point compiles and runs in seconds."""
    return [
        ABLATION + ":digits",
        "--workdir",
        str(tmp_path),
        "--config.model.dropout_rate=0.5",
        "--config.model.conv_features=(8, 8, 8, 8, 8)",
        "--config.model.dense_features=16",
        "--config.batch_size=16",
        "--config.eval.batch_size=64",
        "--config.num_train_steps=2",
        "--config.eval_every_steps=1",
        "--config.log_every_steps=1",
    ]


def _rows(workdir):
    with open(workdir / "sweep.csv") as f:
        return list(csv.DictReader(f))


def test_sweep_index_runs_one_point_and_a_rerun_skips_it(tiny, tmp_path, capsys):
    first, second = (tmp_path / n for n in NAMES)
    assert cli.main([*tiny, "--sweep_index", "1"]) == 0
    assert runner.is_finished(second) and not first.exists()
    (row,) = _rows(tmp_path)
    assert row["run"] == NAMES[1] and row["model.use_lrn"] == "False"
    metrics = read_metrics(second)
    test = next(m for m in metrics if m["split"] == "test")
    val = [m for m in metrics if m["split"] == "val"]
    assert [m["step"] for m in val] == [1, 2] and int(row["steps"]) == 2
    assert float(row["test_top1_error"]) == pytest.approx(test["top1_error"], abs=1e-6)
    assert float(row["val_top5_error"]) == pytest.approx(val[-1]["top5_error"], abs=1e-6)
    assert float(row["best_val_top1_error"]) == pytest.approx(
        min(m["top1_error"] for m in val), abs=1e-6
    )
    assert float(row["wall_s"]) > 0
    assert glob.glob(str(second / HPARAMS / "events.out.tfevents.*"))  # TensorBoard's HParams
    assert matplotlib.image.imread(tmp_path / "sweep.png").ndim == 3
    assert "| model.dropout_rate | model.use_lrn | runs |" in capsys.readouterr().out

    before = {p: (tmp_path / p).read_bytes() for p in ("sweep.csv", f"{NAMES[1]}/metrics.jsonl")}
    assert cli.main([*tiny, "--sweep_index", "1"]) == 0
    out = capsys.readouterr().out
    assert f"{NAMES[1]}: finished, skipped" in out and "Trained" not in out
    assert {p: (tmp_path / p).read_bytes() for p in before} == before

    # A finished point run with another recipe is neither skipped nor extended.
    assert cli.main([*tiny, "--sweep_index", "1", "--config.num_train_steps=3"]) == 2
    assert "was run with another config (num_train_steps: 2 -> 3)" in capsys.readouterr().err


@pytest.mark.slow
def test_sweep_runs_every_point_in_turn_then_nothing(tiny, tmp_path, capsys):
    assert cli.main([*tiny, "--sweep_index", "1"]) == 0
    second_metrics = (tmp_path / NAMES[1] / "metrics.jsonl").read_bytes()
    assert cli.main(tiny) == 0
    assert f"{NAMES[1]}: finished, skipped" in capsys.readouterr().out
    assert (tmp_path / NAMES[1] / "metrics.jsonl").read_bytes() == second_metrics
    assert [r["run"] for r in _rows(tmp_path)] == NAMES
    csv_before = (tmp_path / "sweep.csv").read_bytes()
    assert cli.main(tiny) == 0
    out = capsys.readouterr().out
    assert out.count("finished, skipped") == 2 and "Trained" not in out
    assert (tmp_path / "sweep.csv").read_bytes() == csv_before


def test_a_point_looked_at_with_mode_test_before_its_end_is_resumed_not_skipped(tmp_path):
    """A stray `--mode test` line (written before training ended) does not finish a point, and
    its row never uses that line."""
    points = grid.axis("model.dropout_rate", [0.0])
    run = tmp_path / grid.point_name(points[0])
    _fake_run(run, [0.5, 0.4], test_error=0.9, finish=False)
    writer = MetricWriter(run)
    writer.write(20, "test", {"top1_error": 0.9, "top5_error": 0.5, "crops": 1, "mode": "test"})
    writer.close()
    assert not runner.is_finished(run)
    assert report.summarize(str(tmp_path), points[0]) is None
    _fake_run(run, [0.5, 0.4, 0.3], test_error=0.2)  # training then ran to its end
    assert runner.is_finished(run)
    assert report.summarize(str(tmp_path), points[0])["test_top1_error"] == 0.2

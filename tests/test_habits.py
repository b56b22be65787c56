"""The habits a JAX researcher expects: a profiler switch, `--config=FILE`, sweeps in
TensorBoard's HParams view, an installable package."""

from __future__ import annotations

import glob
import io
import json
import os
import struct
from contextlib import redirect_stdout

import pytest

from alexnet_jax import cli
from alexnet_jax import workdir as wd
from alexnet_jax.metrics import MetricWriter
from alexnet_jax.sweep import grid, runner

TINY_FLAGS = [
    "--config.model.conv_features=(8, 16, 16, 16, 16)",
    "--config.model.dense_features=32",
]
SHORT_FLAGS = [
    "--config.num_train_steps=3",
    "--config.eval_every_steps=0",
    "--config.checkpoint_every_steps=0",
    "--config.log_every_steps=1",
]


def _launch(capsys, *argv: str) -> tuple[int, str, str]:
    out = io.StringIO()
    with redirect_stdout(out):
        rc = cli.main(list(argv))
    return rc, out.getvalue(), capsys.readouterr().err


def test_profile_steps_writes_a_trace_after_the_compiled_step(tmp_path, capsys):
    path = str(tmp_path / "run")
    rc, _, err = _launch(
        capsys,
        "experiments/digits.py",
        "--workdir",
        path,
        *TINY_FLAGS,
        *SHORT_FLAGS,
        "--config.profile_steps=1",
    )
    assert rc == 0, err
    traces = glob.glob(os.path.join(path, wd.PROFILE, "**", "*.xplane.pb"), recursive=True)
    assert traces and os.path.getsize(traces[0]) > 0
    assert glob.glob(os.path.join(path, wd.PROFILE, "**", "*.json.gz"), recursive=True)


def test_profile_steps_is_checked_up_front(capsys):
    rc, _, err = _launch(capsys, "experiments/digits.py", "--config.profile_steps=-1", "--dry_run")
    assert rc == 2 and "profile_steps must be >= 0" in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize(
    "argv",
    [
        ["--config=experiments/imagenet.py"],
        ["--config", "experiments/imagenet.py"],
        ["--config=experiments/imagenet.py:folder", "--config.data.folder_root=/x"],
    ],
)
def test_config_flag_names_the_experiment_as_config_flags_does(capsys, argv):
    rc, out, err = _launch(capsys, *argv, "--config.model.groups=1", "--dry_run")
    assert rc == 0, err
    assert out.strip().splitlines()[-1] == "Total parameters: 62,378,344"  # the override applied


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--config=experiments/nope.py"], "experiment file not found: experiments/nope.py"),
        (["--config=experiments/imagenet.py:bogus"], "unknown arg 'bogus'"),
        (["experiments/digits.py", "--config=experiments/imagenet.py"], "two experiments"),
        (["--config"], "expected one argument"),
        ([], "no experiment"),
    ],
)
def test_config_flag_errors_exit_2_with_one_line(capsys, argv, message):
    rc, _, err = _launch(capsys, *argv, "--dry_run")
    assert rc == 2 and message in err and len(err.strip().splitlines()) == 1, err


def read_events(directory: str) -> list:
    """Every Event in the directory's event files (TFRecord framing: length, crc, data, crc);
    tensorboardX's own protos parse them, so the test needs neither TensorBoard nor TF."""
    from tensorboardX.proto import event_pb2

    events = []
    for file in sorted(glob.glob(os.path.join(directory, "events.out.tfevents.*"))):
        with open(file, "rb") as f:
            data = f.read()
        i = 0
        while i < len(data):
            (length,) = struct.unpack("<Q", data[i : i + 8])
            events.append(event_pb2.Event.FromString(data[i + 12 : i + 12 + length]))
            i += 12 + length + 4
    return events


def test_a_finished_sweep_point_is_an_hparams_session_with_its_final_metrics(tmp_path):
    point = {"model.dropout_rate": 0.5, "model.use_lrn": False, "model.conv_features": (8, 8)}
    run_dir = tmp_path / grid.point_name(point)
    writer = MetricWriter(str(run_dir))
    writer.write(10, "val", {"top1_error": 0.25, "top5_error": 0.05, "crops": 1})
    writer.write(10, "test", {"top1_error": 0.2, "top5_error": 0.04, "crops": 1})
    writer.close()
    (run_dir / wd.RUN).write_text(json.dumps({"wall_s": 12.5}))
    unfinished = {"model.dropout_rate": 0.0}
    assert not runner.log_hparams(str(tmp_path), unfinished)

    assert runner.log_hparams(str(tmp_path), point)
    from tensorboardX.proto import plugin_hparams_pb2

    events = read_events(str(run_dir / wd.HPARAMS))
    values = [v for e in events if e.HasField("summary") for v in e.summary.value]
    plugin = [v for v in values if v.metadata.plugin_data.plugin_name == "hparams"]
    start = [
        plugin_hparams_pb2.HParamsPluginData.FromString(v.metadata.plugin_data.content)
        for v in plugin
        if v.tag == "_hparams_/session_start_info"
    ]
    (info,) = [d.session_start_info for d in start]
    assert info.hparams["model.dropout_rate"].number_value == 0.5
    assert info.hparams["model.use_lrn"].bool_value is False
    assert info.hparams["model.conv_features"].string_value == "(8, 8)"
    scalars = {v.tag: v.simple_value for v in values if v.HasField("simple_value")}
    assert scalars["val_top1_error"] == pytest.approx(0.25)
    assert scalars["test_top1_error"] == pytest.approx(0.2)
    assert scalars["wall_s"] == pytest.approx(12.5) and "crops" not in scalars
    # Written once: a rerun of the sweep that skips the point leaves the session as it is.
    before = sorted(os.listdir(run_dir / wd.HPARAMS))
    assert runner.log_hparams(str(tmp_path), point)
    assert sorted(os.listdir(run_dir / wd.HPARAMS)) == before


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _pins() -> dict[str, tuple[str, str]]:
    """requirements.txt as {normalised name: (section, version)}; its comments name sections."""
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    pins, section = {}, "runtime"
    with open(os.path.join(ROOT, "requirements.txt")) as f:
        for line in f:
            line = line.strip()
            if line.startswith("# Tests and lint"):
                section = "test"
            if not line or line.startswith("#"):
                continue
            req = Requirement(line)
            (spec,) = req.specifier
            assert spec.operator == "==", f"requirements.txt pins exact versions: {line}"
            pins[canonicalize_name(req.name)] = (section, spec.version)
    return pins


def test_pyproject_dependencies_agree_with_the_pinned_requirements():
    import tomllib

    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        project = tomllib.load(f)["project"]
    declared = {"runtime": project["dependencies"], **project["optional-dependencies"]}
    seen = {}
    for section, lines in declared.items():
        for line in lines:
            req = Requirement(line)
            seen[canonicalize_name(req.name)] = (section, req.specifier)
    pins = _pins()
    assert sorted(seen) == sorted(pins), "the same packages in both files"
    for name, (section, version) in pins.items():
        declared_section, specifier = seen[name]
        assert declared_section == section, name
        assert specifier.contains(version), f"{name}=={version} does not satisfy {specifier}"


def test_the_console_command_is_what_launch_py_runs():
    import tomllib

    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        pyproject = tomllib.load(f)
    module, _, attr = pyproject["project"]["scripts"]["alexnet-jax"].partition(":")
    assert (module, attr) == ("alexnet_jax.cli", "main")  # launch.py: sys.exit(main())
    assert pyproject["tool"]["setuptools"]["packages"]["find"]["include"] == ["alexnet_jax*"]


def test_an_experiment_loads_by_path_from_anywhere(tmp_path, monkeypatch):
    """The installed command runs from any folder, without the checkout on sys.path: the
    experiment's own `from experiments import imagenet` must still resolve."""
    import sys

    from alexnet_jax import config as config_lib

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if os.path.abspath(p or ".") != ROOT])
    for name in [m for m in sys.modules if m == "experiments" or m.startswith("experiments.")]:
        monkeypatch.delitem(sys.modules, name)
    config = config_lib.load_config(os.path.join(ROOT, "experiments", "digits.py"))
    assert config.dataset == "digits"


def test_profile_step_script_sums_the_traced_step_op_by_op(tmp_path, capsys):
    """scripts/profile_step.py on the quickstart network: a trace on disk, ops grouped by kind."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "scripts" / "profile_step.py"
    spec = importlib.util.spec_from_file_location("profile_step", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    argv = ["--experiment", "experiments/digits.py", "--batch", "8", "--steps", "1", "--top", "3"]
    # The config's dtype is the step's (the script's --dtype defaults to it, not to float32).
    assert module.main([*argv, "--trace_dir", str(tmp_path), "--config.model.dtype=bfloat16"]) == 0
    out = capsys.readouterr().out
    assert "(traced, batch 8, bfloat16)" in out
    assert glob.glob(f"{tmp_path}/**/*.xplane.pb", recursive=True)
    assert "not named (convolutions on CPU)" in out and "the 3 longest ops:" in out
    kinds = out.split("not named")[1].split("the 3 longest")[0].strip().splitlines()[1:]
    assert len(kinds) == 3 and all(" ms " in line for line in kinds)
    assert module.main(["--experiment", "experiments/digits.py", "--config.nope=1"]) == 2
    assert "unknown config key 'nope'" in capsys.readouterr().err
    assert module.main(["--experiment", "experiments/digits.py", "--dtype", "float16"]) == 2
    assert "--dtype must be one of" in capsys.readouterr().err
    assert module.main(["--experiment", "experiments/digits.py", "--batch", "0"]) == 2
    assert "--batch must be >= 1" in capsys.readouterr().err

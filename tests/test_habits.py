"""The habits a JAX researcher expects: a profiler switch, `--config=FILE`, sweeps in
TensorBoard's HParams view, an installable package."""

from __future__ import annotations

import glob
import io
import os
from contextlib import redirect_stdout

import pytest

from alexnet_jax import cli
from alexnet_jax import workdir as wd

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

"""Runs that survive: resume after SIGKILL or SIGTERM is bit-exact, partial saves are ignored,
changed configs are refused, NaNs stop the run with the last good checkpoint intact."""

import glob
import os
import shutil
import signal
import subprocess
import sys
import time

import chex
import jax
import numpy as np
import pytest

from alexnet_jax import checkpoint, cli, steps
from alexnet_jax import config as config_lib
from alexnet_jax.model import from_config
from alexnet_jax.workdir import read_metrics

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Measured times, which differ between any two runs.
TIMINGS = {"images_per_sec", "input_wait_fraction", "input_images_per_sec"}
RUN = [
    "experiments/digits.py",
    "--config.num_train_steps=40",
    "--config.checkpoint_every_steps=10",
    "--config.eval_every_steps=20",
    "--config.log_every_steps=5",
]


def _launch(workdir, *extra):
    return subprocess.Popen(
        [sys.executable, "launch.py", *RUN, "--workdir", str(workdir), *extra],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _wait_for(path_glob, proc, timeout=300):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if glob.glob(path_glob):
            return
        if proc.poll() is not None:
            raise AssertionError(f"run ended before {path_glob}: {proc.stderr.read()[-2000:]}")
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {path_glob}")


def _final(workdir):
    lines = read_metrics(str(workdir))
    train_ = [m for m in lines if m["split"] == "train"]
    val = [m for m in lines if m["split"] == "val"]
    return train_, val


def _params(workdir, step=None):
    config = config_lib.load_config("experiments/digits.py")
    model = from_config(config.model)
    state, _ = steps.create_state(config, model, (64, 64, 3))
    ckpt = checkpoint.Checkpointer(str(workdir))
    try:
        return ckpt.restore(state, step).params
    finally:
        ckpt.close()


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("whole")
    assert cli.main([*RUN, "--workdir", str(workdir)]) == 0
    return workdir


def _assert_same_run(workdir, reference):
    got_train, got_val = _final(workdir)
    ref_train, ref_val = _final(reference)
    # Exactly the numbers of the uninterrupted run, and the log of one run (no repeated steps).
    strip = lambda ms: [{k: v for k, v in m.items() if k not in TIMINGS} for m in ms]  # noqa: E731
    assert strip(got_train) == strip(ref_train)
    assert got_val == ref_val
    chex.assert_trees_all_equal(_params(workdir), _params(reference))


def test_sigkill_after_a_checkpoint_then_resume_is_bit_exact(tmp_path, uninterrupted):
    proc = _launch(tmp_path)
    _wait_for(str(tmp_path / "checkpoints" / "10"), proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    resumed = subprocess.run(
        [sys.executable, "launch.py", *RUN, "--workdir", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "Resuming" in resumed.stdout and "from step" in resumed.stdout
    _assert_same_run(tmp_path, uninterrupted)


def test_sigterm_saves_and_exits_cleanly_then_resumes_exactly(tmp_path, uninterrupted):
    proc = _launch(tmp_path)
    _wait_for(str(tmp_path / "checkpoints" / "10"), proc)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 143, err[-2000:]
    assert "SIGTERM at step" in err and "Traceback" not in err
    stopped_at = int(err.split("SIGTERM at step ")[1].split(":")[0])
    assert checkpoint.Checkpointer(str(tmp_path)).latest_step() == stopped_at
    assert cli.main([*RUN, "--workdir", str(tmp_path)]) == 0
    _assert_same_run(tmp_path, uninterrupted)


def test_a_half_written_checkpoint_is_never_loaded(tmp_path, uninterrupted):
    # What a kill during a save leaves behind: Orbax's temporary directory, never renamed to
    # its step. Make one from a real checkpoint and corrupt it.
    shutil.copytree(uninterrupted, tmp_path, dirs_exist_ok=True)
    ckdir = tmp_path / "checkpoints"
    shutil.rmtree(ckdir / "40")
    partial = ckdir / "40.orbax-checkpoint-tmp-1234567890"
    shutil.copytree(ckdir / "30", partial)
    for f in glob.glob(str(partial / "state" / "**" / "*"), recursive=True):
        if os.path.isfile(f):
            with open(f, "wb") as fh:
                fh.write(b"\0")
    assert checkpoint.Checkpointer(str(tmp_path)).latest_step() == 30
    chex.assert_trees_all_equal(_params(tmp_path), _params(uninterrupted, 30))


def test_resume_with_a_changed_config_is_refused(uninterrupted, capsys):
    code = cli.main([*RUN, "--workdir", str(uninterrupted), "--config.model.dropout_rate=0.25"])
    err = capsys.readouterr().err
    assert code == 2
    assert "refusing to resume" in err and "model.dropout_rate: 0.5 -> 0.25" in err
    assert err.count("\n") == 1


def test_logging_may_change_but_a_run_is_not_restretched_or_shrunk(tmp_path, uninterrupted, capsys):
    shutil.copytree(uninterrupted, tmp_path, dirs_exist_ok=True)
    argv = [*RUN, "--workdir", str(tmp_path), "--config.log_every_steps=7"]
    argv[1] = "--config.num_train_steps=45"  # the quickstart's cosine depends on the length
    assert cli.main(argv) == 2
    assert "planned for 40 steps with optim.schedule='cosine'" in capsys.readouterr().err
    argv[1] = "--config.num_train_steps=30"
    assert cli.main(argv) == 2 and "cannot be shortened" in capsys.readouterr().err
    argv[1] = "--config.num_train_steps=40"
    assert cli.main(argv) == 0  # another logging interval: resumes at the end
    assert _final(tmp_path)[0][-1]["step"] == 40


def test_a_run_whose_schedule_ignores_the_length_may_be_extended(tmp_path):
    argv = [
        "experiments/digits.py",
        "--workdir",
        str(tmp_path),
        "--config.optim.schedule=constant",
        "--config.num_train_steps=3",
        "--config.eval_every_steps=0",
    ]
    assert cli.main(argv) == 0
    argv[-2] = "--config.num_train_steps=5"
    assert cli.main(argv) == 0
    steps_logged = [m["step"] for m in read_metrics(str(tmp_path)) if m["split"] == "train"]
    assert steps_logged[-1] == 5 and checkpoint.Checkpointer(str(tmp_path)).latest_step() == 5


def test_the_best_checkpoint_is_kept(tmp_path):
    argv = [
        *RUN,
        "--workdir",
        str(tmp_path),
        "--config.keep_checkpoints=1",
        "--config.eval_every_steps=10",
    ]
    assert cli.main(argv) == 0
    val = {m["step"]: m["top1_error"] for m in read_metrics(str(tmp_path)) if m["split"] == "val"}
    best = min(val, key=lambda s: (val[s], s))
    ckpt = checkpoint.Checkpointer(str(tmp_path))
    assert ckpt.best_step() == best
    assert set(ckpt.all_steps()) == {best, 40}


def test_nan_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path, capsys):
    argv = [
        "experiments/digits.py",
        "--workdir",
        str(tmp_path),
        "--config.num_train_steps=30",
        "--config.optim.learning_rate=3e3",
        "--config.optim.warmup_epochs=0.5",
        "--config.checkpoint_every_steps=2",
        "--config.log_every_steps=10",
    ]
    code = cli.main(argv)
    err = capsys.readouterr().err
    assert code == 1
    assert "non-finite loss or gradient at step" in err
    bad_step = int(err.split("at step ")[1].split(";")[0])
    last = checkpoint.Checkpointer(str(tmp_path)).latest_step()
    assert last is not None and last < bad_step and f"Last good checkpoint: step {last}" in err
    params = _params(tmp_path)
    assert all(np.isfinite(x).all() for x in jax.tree_util.tree_leaves(params))

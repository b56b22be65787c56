"""Hostile workdirs (issue 12): damaged checkpoints, junk and torn logs. Nothing may cost more
than itself: a damaged checkpoint is skipped for the newest one that restores and verifies, and
a bad log line is skipped, never a reason to stop a run."""

from __future__ import annotations

import glob
import json
import os
import shutil

import chex
import numpy as np
import pytest

from alexnet_jax import checkpoint, cli, records, steps, workdir
from alexnet_jax import config as config_lib
from alexnet_jax.errors import UsageError
from alexnet_jax.metrics import MetricWriter
from alexnet_jax.model import from_config
from experiments import digits

TINY = ["--config.model.conv_features=(8, 16, 16, 16, 16)", "--config.model.dense_features=32"]
RUN = [
    "experiments/digits.py",
    *TINY,
    "--config.num_train_steps=4",
    "--config.checkpoint_every_steps=2",
    "--config.eval_every_steps=0",
]


def _config():
    config = digits.get_config()
    config_lib.apply_overrides(config, dict(a[len("--config.") :].split("=", 1) for a in RUN[1:]))
    return config


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A finished 4-step run with checkpoints at steps 2 and 4."""
    path = tmp_path_factory.mktemp("trained")
    assert cli.main([*RUN, "--workdir", str(path)]) == 0
    return path


def _flip_a_byte(step_dir):
    arrays = max(glob.glob(f"{step_dir}/state/**/d/*", recursive=True), key=os.path.getsize)
    with open(arrays, "r+b") as f:
        f.seek(os.path.getsize(arrays) // 2)
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 0xFF]))


def _garbage(path):
    with open(path, "wb") as f:
        f.write(b"\x00garbage{")


def _truncate(path):
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)


def _delete_half(step_dir):
    files = sorted(glob.glob(f"{step_dir}/state/**/d/*", recursive=True))
    for f in files[::2]:
        os.remove(f)


DAMAGE = {
    "flipped byte in an array": _flip_a_byte,
    "garbage state/_METADATA": lambda d: _garbage(f"{d}/state/_METADATA"),
    "truncated state/_METADATA": lambda d: _truncate(f"{d}/state/_METADATA"),
    "truncated array file": lambda d: _truncate(
        max(glob.glob(f"{d}/state/**/d/*", recursive=True), key=os.path.getsize)
    ),
    "truncated meta/metadata": lambda d: _truncate(f"{d}/meta/metadata"),
    "no state item": lambda d: shutil.rmtree(f"{d}/state"),
    "half the array files deleted": _delete_half,
}


def _resume(path):
    config = _config()
    template, _ = steps.create_state(config, from_config(config.model), (64, 64, 3))
    ckpt = checkpoint.Checkpointer(str(path))
    try:
        return checkpoint.resume(ckpt, template, config, str(path), 4)
    finally:
        ckpt.close()


# These two take the paths of the garbage _METADATA and the flipped byte: slow-only, so that the
# default suite pays for each kind of damage once.
SLOW_DAMAGE = ("truncated state/_METADATA", "truncated array file")


@pytest.mark.parametrize(
    "damage",
    [pytest.param(d, marks=pytest.mark.slow) if d in SLOW_DAMAGE else d for d in DAMAGE],
)
def test_a_damaged_checkpoint_is_skipped_for_the_newest_one_that_verifies(
    trained, tmp_path, capsys, damage
):
    clean = tmp_path / "clean"
    shutil.copytree(trained, clean)
    want_step, _ = _resume(clean)
    assert want_step == 4
    _, at_2 = _resume_at(clean, 2)
    damaged = tmp_path / "damaged"
    shutil.copytree(trained, damaged)
    DAMAGE[damage](damaged / "checkpoints" / "4")
    step, state = _resume(damaged)
    out = capsys.readouterr().out
    assert step == 2 and "checkpoint 4 is damaged" in out and "resuming from step 2" in out
    chex.assert_trees_all_equal(state, at_2)
    assert os.path.isdir(damaged / workdir.DAMAGED / "4")  # kept for a look, out of the way


def _resume_at(path, step):
    """The state of checkpoint `step` of a clean copy (the others removed)."""
    copy = f"{path}_{step}"
    shutil.copytree(path, copy)
    for other in os.listdir(f"{copy}/checkpoints"):
        if other.isdigit() and int(other) != step:
            shutil.rmtree(f"{copy}/checkpoints/{other}")
    return _resume(copy)


def test_no_usable_checkpoint_is_one_line_and_a_named_damaged_one_too(trained, tmp_path, capsys):
    path = tmp_path / "w"
    shutil.copytree(trained, path)
    _flip_a_byte(path / "checkpoints" / "4")
    code = cli.main([*RUN, "--workdir", str(path), "--mode", "eval", "--checkpoint", "4"])
    err = capsys.readouterr().err
    assert code == 2 and "checkpoint 4 is damaged" in err and err.count("\n") == 1
    _flip_a_byte(path / "checkpoints" / "2")
    with pytest.raises(UsageError, match=r"no checkpoint in .* can be restored"):
        _resume(path)


def test_junk_and_torn_lines_in_the_logs_never_block_a_run(trained, tmp_path, capsys):
    path = tmp_path / "w"
    shutil.copytree(trained, path)
    metrics, ledger = path / workdir.METRICS, path / workdir.LEDGER
    good = len(workdir.read_metrics(str(path)))
    with open(metrics, "ab") as f:  # junk, then a torn last line (a killed write)
        f.write(b'not json\n42\n{"step": 5}\n\xff\xfe\n{"step": 9, "split": "tr')
    with open(ledger, "ab") as f:
        f.write(b'{"step": 4, "prot')
    assert len(workdir.read_metrics(str(path))) == good
    assert "skipped 5 unreadable line(s)" in capsys.readouterr().err
    writer = MetricWriter(str(path))
    writer.write(4, "val", {"loss": 1.0})  # appended after the torn tail, not onto it
    writer.close()
    assert workdir.read_metrics(str(path))[-1] == {"step": 4, "split": "val", "loss": 1.0}
    assert len(records.read_ledger(str(path))) == 1
    # The same command again: resumes at the end, reuses the recorded test, rewrites summary.md.
    assert cli.main([*RUN, "--workdir", str(path)]) == 0
    assert "not again" in capsys.readouterr().out
    with open(path / workdir.SUMMARY) as f:
        assert "test error" in f.read()


def test_a_resume_time_rewrite_of_the_log_is_atomic(tmp_path, monkeypatch):
    path = str(tmp_path)
    writer = MetricWriter(path)
    for step in (1, 2, 3):
        writer.write(step, "train", {"loss": float(step)})
    writer.close()
    before = open(os.path.join(path, workdir.METRICS)).read()

    def killed(*args, **kwargs):  # SIGKILL in the middle of the rewrite
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "replace", killed)
    with pytest.raises(KeyboardInterrupt):
        MetricWriter(path, resume_step=1)
    assert open(os.path.join(path, workdir.METRICS)).read() == before
    assert not [f for f in os.listdir(path) if ".tmp" in f]
    json.loads(before.splitlines()[-1])
    np.testing.assert_equal(len(before.splitlines()), 3)


@pytest.fixture
def small_disk(tmp_path):
    """A 700 KB tmpfs: room for three or four checkpoints of the tiny model, not more."""
    import subprocess

    mount = tmp_path / "disk"
    mount.mkdir()
    if subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=700k", "tmpfs", str(mount)], capture_output=True
    ).returncode:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    yield mount
    subprocess.run(["umount", str(mount)], check=False)


@pytest.mark.slow
def test_a_full_disk_stops_at_the_first_failed_save_with_one_line(small_disk, capsys):
    argv = [
        *RUN,
        "--workdir",
        str(small_disk / "w"),
        "--config.checkpoint_every_steps=1",
        "--config.num_train_steps=12",
        "--config.keep_checkpoints=8",
    ]
    assert cli.main(argv) == 1
    stderr = capsys.readouterr().err
    err = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(err) == 1 and "no space left" in err[0] and "is intact" in err[0], err
    assert "Traceback" not in stderr
    assert not glob.glob(str(small_disk / "w" / "checkpoints" / "*tmp*"))
    kept = int(err[0].split("checkpoint ")[-1].split(" ")[0])
    assert kept in checkpoint.Checkpointer(str(small_disk / "w")).all_steps()


def _simulate_read_only(monkeypatch, root):
    """EROFS for every write under `root` (the seam: Python's open and makedirs), for machines
    where a test cannot mount a read-only file system."""
    import builtins
    import errno

    root = os.path.abspath(root)
    real_open, real_makedirs = builtins.open, os.makedirs

    def under(file):
        return isinstance(file, (str, os.PathLike)) and os.path.abspath(file).startswith(root)

    def erofs(file):
        return OSError(errno.EROFS, os.strerror(errno.EROFS), os.fspath(file))

    def open_(file, mode="r", *args, **kwargs):
        if under(file) and any(c in mode for c in "wax+"):
            raise erofs(file)
        return real_open(file, mode, *args, **kwargs)

    def makedirs(name, *args, **kwargs):
        if under(name) and not os.path.isdir(name):
            raise erofs(name)
        return real_makedirs(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", open_)
    monkeypatch.setattr(os, "makedirs", makedirs)


@pytest.fixture(params=["mounted", "simulated"])
def read_only_run(request, trained, tmp_path, monkeypatch):
    """The finished run seen through a read-only file system: a read-only bind mount where the
    test may mount (root, as in CI), else EROFS injected at the seam."""
    import subprocess

    view = tmp_path / "ro"
    if request.param == "simulated":
        shutil.copytree(trained, view)  # a copy: a write the seam misses lands in no shared run
        _simulate_read_only(monkeypatch, view)
        yield view
        return
    view.mkdir()
    if subprocess.run(["mount", "--bind", str(trained), str(view)], capture_output=True).returncode:
        pytest.skip("cannot bind-mount here (needs root); the simulated variant still runs")
    try:
        remount = ["mount", "-o", "remount,ro,bind", str(view)]
        if subprocess.run(remount, capture_output=True).returncode:
            pytest.skip("cannot remount a bind mount read-only here")
        with pytest.raises(OSError, match="Read-only"):
            open(view / "probe", "w")
        yield view
    finally:
        subprocess.run(["umount", str(view)], check=False)


def test_a_read_only_workdir_is_refused_for_writing_and_still_scored(
    read_only_run, monkeypatch, capsys
):
    from alexnet_jax import train

    logged = (read_only_run / workdir.METRICS).read_bytes()
    monkeypatch.setattr(train, "train_and_evaluate", lambda *a: pytest.fail("reached training"))
    for mode in ("train", "test"):  # the test split's one look must be recorded: not here
        argv = [*RUN, "--workdir", str(read_only_run), "--mode", mode, "--force_test"]
        assert cli.main(argv) == 2, mode
        err = capsys.readouterr().err
        assert err.startswith("error: cannot write to the workdir") and err.count("\n") == 1, err
        assert "Read-only file system" in err
    assert cli.main([*RUN, "--workdir", str(read_only_run / "new"), "--mode", "train"]) == 2
    assert "cannot write to the workdir" in capsys.readouterr().err

    assert cli.main([*RUN, "--workdir", str(read_only_run), "--mode", "eval"]) == 0
    out, err = capsys.readouterr()
    assert "step 4 val:" in out and "[latest checkpoint]" in out
    assert err == f"warning: the result was not logged in {read_only_run} (Read-only file system)\n"
    assert (read_only_run / workdir.METRICS).read_bytes() == logged


def test_a_workdir_that_is_a_file_is_one_line(tmp_path, capsys):
    (tmp_path / "w").write_text("")
    for mode, message in (("train", "is a file, not a directory"), ("eval", "no workdir")):
        assert cli.main([*RUN, "--workdir", str(tmp_path / "w"), "--mode", mode]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and message in err, err

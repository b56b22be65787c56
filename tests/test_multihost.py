"""Multi-host training over jax.distributed: two processes of two CPU devices on 127.0.0.1.

The processes form one cluster exactly as hosts do (a coordinator on process 0, collectives over
gloo), so these tests run the real multi-host code paths: the per-process input shards, the
collective checkpoint, evaluation split across processes, the watchdog and preemption.
"""

import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from alexnet_jax import cli, distributed, parallel
from alexnet_jax.errors import UsageError
from alexnet_jax.workdir import read_metrics

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Dropout 0 and no augmentation, as in the 2x2 vs 1x4 comparison.
RUN = [
    "experiments/digits.py",
    "--config.model.dropout_rate=0",
    "--config.data.augment=false",
    "--config.batch_size=32",
    "--config.eval.batch_size=64",
    "--config.log_every_steps=1",
    "--config.eval_every_steps=0",
]
HEARTBEAT = 5  # seconds; short, so that the failure tests are quick


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Cluster:
    """`num_processes` launchers of two CPU devices each, joined over 127.0.0.1."""

    def __init__(self, logdir, workdir, *args, num_processes=2, only=None):
        """`only`: {process_id: [more args]} for some processes alone."""
        port = free_port()
        env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2")
        self.logdir, self.procs = logdir, []
        for i in range(num_processes):
            argv = [
                sys.executable, "launch.py", *RUN, "--workdir", str(workdir), *args,
                "--coordinator_address", f"127.0.0.1:{port}",
                "--num_processes", str(num_processes), "--process_id", str(i),
                "--heartbeat_timeout", str(HEARTBEAT), *(only or {}).get(i, []),
            ]  # fmt: skip
            with open(self._log(i, "out"), "w") as out, open(self._log(i, "err"), "w") as err:
                self.procs.append(subprocess.Popen(argv, cwd=ROOT, env=env, stdout=out, stderr=err))

    def _log(self, i, kind):
        return os.path.join(self.logdir, f"p{i}.{kind}")

    def out(self, i):
        with open(self._log(i, "out")) as f:
            return f.read()

    def err(self, i):
        with open(self._log(i, "err")) as f:
            return f.read()

    def wait(self, i, timeout=600):
        try:
            return self.procs[i].wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"process {i} still running after {timeout} s") from None

    def kill(self):
        for p in self.procs:
            if p.poll() is None:
                p.kill()
                p.wait()

    def report(self):
        return "\n".join(f"--- process {i}:\n{self.err(i)[-3000:]}" for i in range(len(self.procs)))


@pytest.fixture
def cluster(tmp_path):
    made = []

    def make(workdir, *args, **kwargs):
        logdir = tmp_path / f"logs{len(made)}"
        logdir.mkdir()
        made.append(Cluster(logdir, workdir, *args, **kwargs))
        return made[-1]

    yield make
    for c in made:
        c.kill()


def wait_for_train_step(cluster, workdir, step, timeout=600):
    """Until process 0 has logged the train line of `step` (the cluster is training)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if any(m["split"] == "train" and m["step"] >= step for m in read_metrics(str(workdir))):
            return
        if any(p.poll() is not None for p in cluster.procs):
            raise AssertionError(f"a process ended before step {step}:\n{cluster.report()}")
        time.sleep(0.1)
    raise AssertionError(f"no train step {step} after {timeout} s:\n{cluster.report()}")


def last_line(text):
    return [line for line in text.splitlines() if line.strip()][-1]


# --- the command line -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--num_processes", "2"], "need --coordinator_address"),
        (["--coordinator_address", "127.0.0.1:1234"], "needs --num_processes and --process_id"),
        (["--coordinator_address", "127.0.0.1", "--num_processes", "2", "--process_id", "0"],
         "HOST:PORT"),
        (["--coordinator_address", "h:1", "--num_processes", "2", "--process_id", "2"],
         "--process_id must be in [0, --num_processes)"),
    ],
)  # fmt: skip
def test_bad_cluster_flags_exit_2_with_one_line(flags, message, capsys):
    assert cli.main(["experiments/digits.py", "--dry_run", *flags]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err


def test_without_flags_a_cluster_is_joined_only_where_the_environment_has_one(monkeypatch):
    """Without flags, JAX's own detection decides (jax.distributed.initialize() with no
    arguments): no cluster in the environment is a single-process run, joined to nothing."""
    import jax

    for var in ("SLURM_JOB_ID", "OMPI_MCA_orte_hnp_uri", "KUBERNETES_SERVICE_HOST"):
        monkeypatch.delenv(var, raising=False)
    parallel.initialize_distributed()  # returns at once: nothing to join
    assert not jax.distributed.is_initialized()
    calls = []
    monkeypatch.setattr(jax.distributed, "initialize", lambda *a, **k: calls.append(a))
    monkeypatch.setattr(jax.config, "update", lambda *a: None)
    monkeypatch.setattr(distributed, "start_watchdog", lambda *a: None)
    parallel.initialize_distributed()  # a detected cluster: joined with JAX's own arguments
    assert calls == [(None, None, None)]
    with pytest.raises(UsageError, match="positive"):
        parallel.initialize_distributed(heartbeat_timeout=0)


def test_the_cluster_forms_before_any_jax_computation(tmp_path):
    """jax.distributed.initialize refuses to run once a backend exists: a cluster of one process
    catches anything (config loading, a sweep's expansion) that touched JAX before it."""
    for experiment in ("experiments/digits.py", "experiments/ablate_dropout_lrn.py"):
        argv = [sys.executable, "launch.py", experiment, "--dry_run", "--workdir", str(tmp_path)]
        argv += ["--coordinator_address", f"127.0.0.1:{free_port()}"]
        argv += ["--num_processes", "1", "--process_id", "0"]
        proc = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]


def test_a_process_that_cannot_join_exits_with_one_line(tmp_path):
    argv = [sys.executable, "launch.py", "experiments/digits.py", "--dry_run"]
    argv += ["--coordinator_address", f"127.0.0.1:{free_port()}", "--num_processes", "2"]
    argv += ["--process_id", "1", "--init_timeout", "2"]
    start = time.time()
    proc = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert time.time() - start < 60
    assert last_line(proc.stderr).startswith("error: the cluster at 127.0.0.1:")


# --- failures ---------------------------------------------------------------------------------


def test_killing_a_process_ends_the_other_with_one_line(cluster, tmp_path):
    c = cluster(tmp_path / "w", "--config.num_train_steps=2000")
    wait_for_train_step(c, tmp_path / "w", 1)
    c.procs[1].kill()  # SIGKILL: no goodbye, the survivor is blocked in a collective
    killed = time.time()
    status = c.wait(0, timeout=120)
    elapsed = time.time() - killed
    assert status == 1, c.report()
    assert elapsed < 60, f"{elapsed:.0f} s"
    assert last_line(c.err(0)).startswith("error: process 1 of 2 stopped responding"), c.report()


def test_a_process_that_fails_ends_the_others_at_once_with_its_status(cluster, tmp_path):
    """As when one host lacks the data: it exits 2 with its message, the others follow."""
    c = cluster(tmp_path / "w", "--config.num_train_steps=2000", only={1: ["--config.dataset=x"]})
    assert c.wait(1, timeout=300) == 2, c.report()
    failed = time.time()
    assert c.wait(0, timeout=120) == 2, c.report()
    assert time.time() - failed < HEARTBEAT  # told, not timed out
    assert last_line(c.err(1)).startswith("error: dataset must be one of")
    assert last_line(c.err(0)).startswith("error: process 1 of 2 exited with status 2"), c.report()


@pytest.mark.slow
def test_killing_the_coordinator_ends_the_others(cluster, tmp_path):
    """Process 0 hosts JAX's coordination service: when it dies, JAX aborts the others at once
    with its own message (jaxlib 0.10 offers no working hook to replace it with ours)."""
    c = cluster(tmp_path / "w", "--config.num_train_steps=2000")
    wait_for_train_step(c, tmp_path / "w", 1)
    c.procs[0].kill()
    killed = time.time()
    status = c.wait(1, timeout=120)
    assert status != 0, c.report()
    assert time.time() - killed < 60
    err = c.err(1)
    assert "error: lost contact with the coordinator" in err or "another task died" in err, err


# --- two processes train as one ---------------------------------------------------------------


@pytest.mark.slow
def test_two_processes_train_as_four_devices_and_resume_after_sigterm(cluster, tmp_path):
    """2 processes x 2 devices == 1 process x 4 devices, step by step, through a SIGTERM that
    reaches one process only (both stop at one step and save it collectively) and a resume."""
    steps = ["--config.num_train_steps=14"]
    reference = str(tmp_path / "reference")
    assert cli.main([*RUN, *steps, "--workdir", reference]) == 0  # this process: 4 devices

    workdir = tmp_path / "multi"
    c = cluster(workdir, *steps)
    wait_for_train_step(c, workdir, 3)
    c.procs[1].send_signal(signal.SIGTERM)
    assert [c.wait(i, timeout=120) for i in (0, 1)] == [143, 143], c.report()
    saved = sorted(int(s) for s in os.listdir(workdir / "checkpoints") if s.isdigit())
    assert len(saved) == 1 and 3 <= saved[0] < 14, saved
    for i in (0, 1):
        assert f"SIGTERM at step {saved[0]}" in c.err(i)

    c = cluster(workdir, *steps)  # the same command again: resumes
    assert [c.wait(i) for i in (0, 1)] == [0, 0], c.report()
    assert f"Resuming {workdir} from step {saved[0]}" in c.out(0)

    def split(workdir, name):
        return [m for m in read_metrics(str(workdir)) if m["split"] == name]

    multi, ref = split(workdir, "train"), split(reference, "train")
    assert [m["step"] for m in multi] == list(range(1, 15))  # one writer, no repeated lines
    for a, b in zip(multi, ref, strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-3), a["step"]
    for name, count in (("val", 180), ("test", 359)):  # every example once across processes
        (a,) = split(workdir, name)
        (b,) = split(reference, name)
        assert a["num_examples"] == b["num_examples"] == count
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-3)
        assert a["top1_error"] == pytest.approx(b["top1_error"], abs=1e-6)
    assert "| test error |" in c.out(0) and "| test error |" not in c.out(1)
    for name in ("config.json", "summary.md", "test_ledger.jsonl"):
        assert (workdir / name).exists()


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["columns", "owt"])
def test_model_parallel_modes_run_on_two_processes(cluster, tmp_path, mode):
    """2 processes x 2 devices under a model-parallel mode compute the steps of 1 process x 4
    devices under 'data': the column pairs stay inside a process (columns), the dense layers
    are split over all 4 devices across both processes (owt)."""
    steps = ["--config.num_train_steps=6"]
    reference = str(tmp_path / "reference")
    assert cli.main([*RUN, *steps, "--workdir", reference]) == 0
    workdir = tmp_path / "multi"
    c = cluster(workdir, *steps, f"--config.parallel.mode={mode}")
    assert [c.wait(i) for i in (0, 1)] == [0, 0], c.report()
    multi, ref = (read_metrics(str(w)) for w in (workdir, reference))
    assert [m["step"] for m in multi if m["split"] == "train"] == list(range(1, 7))
    for a, b in zip(multi, ref, strict=True):
        assert a["split"] == b["split"] and a["step"] == b["step"]
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-4), (a["split"], a["step"])
    (test,) = [m for m in multi if m["split"] == "test"]
    assert test["num_examples"] == 359


def test_two_processes_skip_a_damaged_checkpoint_together(cluster, tmp_path):
    """Both processes resume from the same older step; process 0 alone moves the damaged one
    aside, after every process has stopped reading it; the run finishes."""
    from tests.test_damage import TINY, _flip_a_byte

    workdir, args = tmp_path / "w", [*TINY, "--config.num_train_steps=2"]
    args.append("--config.checkpoint_every_steps=1")
    c = cluster(workdir, *args)
    assert [c.wait(i) for i in (0, 1)] == [0, 0], c.report()
    _flip_a_byte(workdir / "checkpoints" / "2")

    c = cluster(workdir, *args)  # the same command again
    assert [c.wait(i) for i in (0, 1)] == [0, 0], c.report()
    for i in (0, 1):
        assert "checkpoint 2 is damaged" in c.out(i), c.report()
        assert "resuming from step 1 instead" in c.out(i), c.out(i)
    assert f"Resuming {workdir} from step 1 of 2." in c.out(0)
    assert os.listdir(workdir / "damaged_checkpoints") == ["2"]
    assert sorted(int(s) for s in os.listdir(workdir / "checkpoints") if s.isdigit()) == [1, 2]
    assert [m["step"] for m in read_metrics(str(workdir)) if m["split"] == "train"] == [1, 2]

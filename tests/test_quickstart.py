"""The offline quickstart end to end, through the launcher, as a user runs it (shortened)."""

import json
import os
import subprocess
import sys

import pytest

from alexnet_jax import cli
from alexnet_jax.workdir import read_metrics

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHORT = [
    "--config.num_train_steps=30",
    "--config.log_every_steps=10",
    "--config.eval_every_steps=15",
    "--config.model.dropout_rate=0.0",
    "--config.data.augment=false",
]


@pytest.fixture(scope="module")
def run4(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("digits4"))
    assert cli.main(["experiments/digits.py", "--workdir", workdir, *SHORT]) == 0
    return workdir


def test_workdir_has_the_documented_outputs(run4):
    lines = read_metrics(run4)
    train = [m for m in lines if m["split"] == "train"]
    assert [m["step"] for m in train] == [10, 20, 30]
    for m in train:
        assert {"loss", "top1_error", "top5_error", "lr"} <= set(m)
    assert all(m["images_per_sec"] > 0 for m in train)  # measured after the first (compiling) step
    assert [m["step"] for m in lines if m["split"] == "val"] == [15, 30]
    tests = [m for m in lines if m["split"] == "test"]
    assert len(tests) == 1 and tests[0]["num_examples"] == 359 and tests[0]["crops"] == 1
    assert train[-1]["loss"] < train[0]["loss"]
    with open(os.path.join(run4, "config.json")) as f:
        assert json.load(f)["dataset"] == "digits"
    assert os.listdir(os.path.join(run4, "tb", "train"))  # TensorBoard event files
    assert os.listdir(os.path.join(run4, "checkpoints"))


def test_four_devices_match_one_device_end_to_end(run4, tmp_path):
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1")
    proc = subprocess.run(
        [sys.executable, "launch.py", "experiments/digits.py", "--workdir", str(tmp_path), *SHORT],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    final = lambda w: [m for m in read_metrics(w) if m["split"] == "train"][-1]["loss"]  # noqa: E731
    assert final(str(tmp_path)) == pytest.approx(final(run4), rel=1e-3)

"""scripts/bench_convs.py: the per-layer convolution benchmark times what it says it times."""

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

PATH = Path(__file__).resolve().parents[1] / "scripts" / "bench_convs.py"


@pytest.fixture(scope="module")
def bench_convs():
    spec = importlib.util.spec_from_file_location("bench_convs", PATH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_layer_and_pass_of_a_training_step(bench_convs, tmp_path, capsys):
    out = tmp_path / "convs.jsonl"
    assert bench_convs.main(["--batch", "1", "--reps", "1", "--no_torch", "--json", str(out)]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(r["layer"], r["pass"]) for r in rows][:3] == [
        ("conv1", "forward"),
        ("conv1", "weight_grad"),
        ("conv2", "forward"),
    ]  # conv1's input gradient is never needed in training
    assert len(rows) == 2 + 3 * 4 and all(r["jax_ms"] > 0 for r in rows)
    assert "all convolutions of a training step: jax" in capsys.readouterr().out


def test_bad_arguments_exit_2(bench_convs):
    with pytest.raises(SystemExit) as e:
        bench_convs.main(["--batch", "0"])
    assert e.value.code == 2


def test_jax_and_torch_compute_the_same_convolution_and_gradients(bench_convs):
    """The two sides of each row are the same arithmetic (the layouts are converted right)."""
    pytest.importorskip("torch")
    rng = np.random.default_rng(1)
    x = rng.standard_normal((2, 13, 13, 6), np.float32)
    w = rng.standard_normal((5, 5, 6, 4), np.float32)
    jx, tx = bench_convs.jax_passes(x, w, 2, 2), bench_convs.torch_passes(x, w, 2, 2)
    nchw = lambda t: t.permute(0, 2, 3, 1).numpy()  # noqa: E731  (NCHW -> NHWC)
    np.testing.assert_allclose(jx["forward"](), nchw(tx["forward"]()), rtol=1e-4, atol=1e-4)
    dw = tx["weight_grad"]()[1].permute(2, 3, 1, 0).numpy()  # OIHW -> HWIO
    np.testing.assert_allclose(jx["weight_grad"](), dw, rtol=1e-4, atol=1e-3)
    np.testing.assert_allclose(
        jx["input_grad"](), nchw(tx["input_grad"]()[0]), rtol=1e-4, atol=1e-3
    )

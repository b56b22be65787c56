"""Per-class metrics and the confusion matrix, checked against scikit-learn."""

import csv
import functools
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax
from sklearn.metrics import accuracy_score, confusion_matrix, precision_recall_fscore_support

from alexnet_jax import classification as cl


def confusion_of(labels, preds, num_classes):
    m = np.zeros((num_classes, num_classes))
    np.add.at(m, (labels, preds), 1)
    return m


def quiet_report(m):
    """`cl.report` with every warning an error: no division by zero, no NaN, anywhere."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        r = cl.report(m)
    for key in ("precision", "recall", "f1"):
        assert np.isfinite(r[key]).all()
    return r


def assert_matches_sklearn(labels, preds, num_classes):
    r = quiet_report(confusion_of(labels, preds, num_classes))
    # The classes in the average: those that occur or are predicted (module docstring).
    kept = sorted(set(labels.tolist()) | set(preds.tolist()))
    p, rec, f1, _ = precision_recall_fscore_support(
        labels, preds, labels=kept, average="macro", zero_division=0
    )
    assert r["accuracy"] == pytest.approx(accuracy_score(labels, preds), abs=1e-12)
    assert r["precision_macro"] == pytest.approx(p, abs=1e-12)
    assert r["recall_macro"] == pytest.approx(rec, abs=1e-12)
    assert r["f1_macro"] == pytest.approx(f1, abs=1e-12)
    per = precision_recall_fscore_support(labels, preds, labels=kept, average=None, zero_division=0)
    for key, values in zip(("precision", "recall", "f1", "support"), per, strict=True):
        np.testing.assert_allclose(r[key][kept], values, atol=1e-12)
    assert r["num_classes_averaged"] == len(kept) and r["num_examples"] == len(labels)
    assert list(np.flatnonzero(r["in_average"])) == kept
    return r


@pytest.mark.parametrize("seed", range(6))
def test_macro_metrics_equal_sklearn_on_random_predictions(seed):
    rng = np.random.default_rng(seed)
    k = 12
    # Some classes never occur; predictions are right about half the time.
    present = rng.choice(k, size=8, replace=False)
    labels = rng.choice(present, size=int(rng.integers(5, 80)))
    wrong = rng.integers(0, k, size=len(labels))
    preds = np.where(rng.random(len(labels)) < 0.5, labels, wrong)
    assert_matches_sklearn(labels, preds, k)


def test_absent_class_and_class_predicted_without_support():
    labels = np.array([0, 0, 1, 1, 2, 2, 2])
    preds = np.array([0, 5, 1, 1, 2, 0, 5])  # class 5: no examples, predicted twice
    r = assert_matches_sklearn(labels, preds, 8)
    assert r["precision"][5] == 0 and r["recall"][5] == 0 and r["f1"][5] == 0
    assert r["in_average"][5] and not r["in_average"][[3, 4, 6, 7]].any()
    assert r["num_classes_averaged"] == 4  # 0, 1, 2 and 5; 3, 4, 6, 7 say nothing


def test_class_never_predicted_has_precision_zero():
    labels = np.array([0, 1, 1, 2])
    preds = np.array([0, 0, 0, 2])  # class 1 occurs twice, never predicted
    r = assert_matches_sklearn(labels, preds, 3)
    assert r["precision"][1] == 0 and r["recall"][1] == 0


def test_one_class_only():
    r = quiet_report(np.array([[5.0]]))
    assert r["accuracy"] == r["precision_macro"] == r["recall_macro"] == r["f1_macro"] == 1.0
    many = np.zeros((1000, 1000))
    many[3, 3] = 7
    r = quiet_report(many)
    assert r["f1_macro"] == 1.0 and r["num_classes_averaged"] == 1
    # One true class, sometimes mistaken for another.
    assert_matches_sklearn(np.array([4, 4, 4, 4]), np.array([4, 4, 9, 4]), 10)
    # One true class, always mistaken for one other class: everything is 0, nothing NaN.
    r = assert_matches_sklearn(np.array([2, 2]), np.array([7, 7]), 10)
    assert r["accuracy"] == 0 and r["f1_macro"] == 0


def test_empty_or_malformed_confusion_raises():
    with pytest.raises(ValueError, match="empty"):
        cl.report(np.zeros((10, 10)))
    for bad in (np.zeros((3, 4)), np.zeros((0, 0)), np.ones(3)):
        with pytest.raises(ValueError, match="square"):
            cl.report(bad)
    with pytest.raises(ValueError, match="non-negative"):
        cl.report(np.array([[1.0, np.nan], [0.0, 1.0]]))


def test_confusion_counts_under_pmap_with_padded_batches_and_psum():
    """4 devices x 8 slots = 32; 27 real examples, the last 5 slots padding (masked)."""
    n_dev, per_dev, k, n = jax.local_device_count(), 8, 6, 27
    assert n_dev == 4
    rng = np.random.default_rng(0)
    scores = rng.standard_normal((n_dev * per_dev, k)).astype(np.float32)
    labels = rng.integers(0, k, n_dev * per_dev).astype(np.int32)
    mask = np.arange(n_dev * per_dev) < n
    labels[n:] = 0  # padding looks like pad_batch's: zeros, label 0

    @functools.partial(jax.pmap, axis_name="batch")
    def step(s, y, m):
        return lax.psum(cl.confusion_counts(s, y, m, k), "batch")

    def split(x):
        return x.reshape(n_dev, per_dev, *x.shape[1:])

    out = np.asarray(step(split(scores), split(labels), split(mask)))
    assert out.shape == (n_dev, k, k) and out.dtype == np.float32
    expected = confusion_matrix(labels[:n], scores[:n].argmax(-1), labels=range(k))
    for replica in out:  # psum: every device holds the global matrix
        np.testing.assert_array_equal(replica, expected)
    # Summed over batches as the eval loop does, then reported: the sklearn numbers.
    r = quiet_report(out[0] + out[0])
    assert r["num_examples"] == 2 * n


def test_confusion_counts_jits_for_1000_classes():
    k, b = 1000, 64
    scores = jax.random.normal(jax.random.PRNGKey(0), (b, k))
    labels = jnp.arange(b) * 7 % k
    mask = jnp.arange(b) < 50
    m = jax.jit(cl.confusion_counts, static_argnums=3)(scores, labels, mask, k)
    assert m.shape == (k, k) and float(m.sum()) == 50
    np.testing.assert_array_equal(
        np.asarray(m), confusion_of(labels[:50], np.argmax(scores[:50], -1), k)
    )


def test_per_class_csv(tmp_path):
    labels = np.array([0, 0, 1, 1, 2])
    preds = np.array([0, 1, 1, 1, 3])  # class 3 predicted, no support; class 4 absent
    r = quiet_report(confusion_of(labels, preds, 5))
    path = cl.write_per_class_csv(tmp_path / "per_class_test.csv", r, None)
    rows = list(csv.DictReader(open(path)))
    assert list(rows[0]) == ["class_id", "name", "support", "precision", "recall", "f1"]
    assert [row["name"] for row in rows] == ["0", "1", "2", "3", "4"]
    assert [int(row["support"]) for row in rows] == [2, 2, 1, 0, 0]
    assert float(rows[1]["precision"]) == pytest.approx(2 / 3)
    assert rows[3]["precision"] == "0.000000" and rows[4]["f1"] == ""  # 4: not in the average
    f1s = [float(row["f1"]) for row in rows if row["f1"]]
    assert np.mean(f1s) == pytest.approx(r["f1_macro"], abs=1e-6)
    names = ["tench, Tinca tinca", "b", "c", "d", "e"]  # a comma in a name stays one cell
    cl.write_per_class_csv(path, r, names)
    assert next(csv.DictReader(open(path)))["name"] == names[0]
    assert [p.name for p in tmp_path.iterdir()] == ["per_class_test.csv"]  # no temp file left
    with pytest.raises(ValueError, match="class names"):
        cl.write_per_class_csv(path, r, ["a"])


def test_worst_classes_and_their_lines():
    labels = np.array([0, 0, 1, 1, 2, 2, 3, 3])
    preds = np.array([0, 0, 1, 0, 2, 0, 3, 3])  # 1 and 2 tie; 4 and 5 have no support
    m = confusion_of(labels, np.append(preds[:-1], 5), 6)
    r = quiet_report(m)
    worst = cl.worst_classes(r, k=3)
    assert worst == sorted(worst, key=lambda i: (r["f1"][i], i))
    assert 4 not in cl.worst_classes(r, k=10) and 5 not in cl.worst_classes(r, k=10)
    assert len(cl.worst_classes(r, k=10)) == 4
    tie = quiet_report(confusion_of(np.array([0, 1, 2]), np.array([1, 2, 0]), 3))
    assert cl.worst_classes(tie, k=2) == [0, 1]  # all F1 0: by id
    text = cl.format_classes(r, worst, [f"c{i}" for i in range(6)])
    lines = text.splitlines()
    assert len(lines) == 3 and lines[0].startswith(f"  {worst[0]} (c{worst[0]}): F1 ")
    assert "precision" in lines[0] and "recall" in lines[0] and "examples)" in lines[0]
    assert cl.format_classes(r, [1]).startswith("  1: F1 0.667")


def test_confusion_npy_roundtrip(tmp_path):
    m = confusion_of(np.array([0, 1, 1]), np.array([0, 1, 0]), 3).astype(np.float32)
    path = cl.save_confusion_npy(tmp_path / "confusion_test.npy", m)
    loaded = np.load(path)
    assert loaded.dtype == np.int64
    np.testing.assert_array_equal(loaded, m)


def test_plot_confusion_writes_a_png(tmp_path):
    rng = np.random.default_rng(0)
    k = 10
    labels = rng.integers(0, k, 400)
    # Mostly right; 3 is often taken for 8, and class 9 never occurs (a white row).
    preds = np.where(rng.random(400) < 0.8, labels, rng.integers(0, k, 400))
    preds = np.where((labels == 3) & (rng.random(400) < 0.5), 8, preds)
    labels, preds = labels[labels != 9], preds[labels != 9]
    names = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
    path = cl.plot_confusion(tmp_path / "confusion_test.png", confusion_of(labels, preds, k), names)
    data = open(path, "rb").read()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
    with pytest.raises(ValueError, match="too many"):
        cl.plot_confusion(tmp_path / "big.png", np.eye(51), None)
    assert not (tmp_path / "big.png").exists()


def test_save_report_writes_the_three_files_and_returns_the_report(tmp_path):
    m = confusion_of(np.array([0, 1, 2, 2]), np.array([0, 1, 2, 1]), 3)
    r = cl.save_report(tmp_path, "test", m, ["a", "b", "c"])
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "confusion_test.npy",
        "confusion_test.png",
        "per_class_test.csv",
    ]
    assert cl.scalars(r) == {k: r[k] for k in cl.SCALARS} and r["accuracy"] == 0.75
    big = tmp_path / "big"
    cl.save_report(big, "test", np.eye(60), None)  # too many classes to plot: no PNG
    assert sorted(p.name for p in big.iterdir()) == ["confusion_test.npy", "per_class_test.csv"]
    with pytest.raises(ValueError, match="empty"):
        cl.save_report(tmp_path / "none", "test", np.zeros((3, 3)), None)
    assert not (tmp_path / "none").exists()

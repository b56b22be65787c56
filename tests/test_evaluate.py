"""Evaluation: 10-crop averaging, exact counting, the test ledger, predict and the filter image.

Everything runs the real code on 4 CPU devices: the real sources (digits; a folder of PNGs that
the test writes, through the real tf.data eval pipeline), real Orbax checkpoints and the CLI.
"""

from __future__ import annotations

import functools
import io
import json
import os
from contextlib import redirect_stdout

import jax
import numpy as np
import pytest
from PIL import Image
from sklearn.datasets import load_digits

from alexnet_jax import checkpoint, cli, data, evaluate, filters, imagenet_classes, records, steps
from alexnet_jax import config as config_lib
from alexnet_jax.errors import UsageError
from alexnet_jax.metrics import MetricWriter
from alexnet_jax.model import from_config
from alexnet_jax.workdir import read_metrics
from experiments import digits

TINY = {"model.conv_features": "(8, 16, 16, 16, 16)", "model.dense_features": "32"}
TINY_FLAGS = [f"--config.{k}={v}" for k, v in TINY.items()]


def tiny_config(**data):
    config = digits.get_config()
    config_lib.apply_overrides(config, TINY)
    config.eval.batch_size = 8  # 2 per device: small splits still span several batches
    config.data.augment_on = "host"  # the tests feed the sources' finished inputs to the model
    for key, value in data.items():
        config.data[key] = value
    return config


@functools.cache
def init_state():
    """One initial TrainState of the tiny model (64 x 64 inputs), shared by the tests."""
    config = tiny_config()
    state, _ = steps.create_state(config, from_config(config.model), (64, 64, 3))
    return state


def hand_metrics(probs: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """Loss and errors from per-example class probabilities, the slow obvious way."""
    out = {"loss": 0.0, "top1_error": 0.0, "top5_error": 0.0}
    for p, y in zip(probs, labels, strict=True):
        rank = int(np.sum(p > p[y]))
        out["loss"] += -np.log(p[y] + 1e-12)
        out["top1_error"] += rank >= 1
        out["top5_error"] += rank >= 5
    return {k: v / len(labels) for k, v in out.items()}


# --- exact counting -----------------------------------------------------------------------------


@pytest.mark.parametrize("n", [16, 13, 3])  # divides the 8-example eval batch; does not; < devices
def test_padded_evaluation_counts_each_example_once(n):
    from alexnet_jax.data.digits import DigitsSource

    assert jax.device_count() == 4
    config = tiny_config(val_fraction=n / 1797)
    source = DigitsSource(config)
    assert source.info.num_examples["val"] == n
    params = init_state().params

    got = evaluate.score(config, source, params, "val")

    (whole,) = list(source.eval_batches("val", n))  # every example in one unpadded batch
    assert whole["mask"].all()
    model = from_config(config.model)
    probs = np.asarray(jax.nn.softmax(model.apply({"params": params}, whole["image"], train=False)))
    want = hand_metrics(probs, whole["label"])
    assert got["num_examples"] == n
    assert got["crops"] == 1
    for key, value in want.items():
        assert got[key] == pytest.approx(value, rel=1e-5, abs=1e-6), key


# --- 10 crops ------------------------------------------------------------------------------------


def write_folder(root, rng, size, counts):
    """root/<split>/<class>/i.png with random pixels, already size x size (no resampling)."""
    pixels = {}
    for split, per_class in counts.items():
        for c, count in enumerate(per_class):
            os.makedirs(root / split / f"class{c}", exist_ok=True)
            for i in range(count):
                array = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
                path = root / split / f"class{c}" / f"{i}.png"
                Image.fromarray(array).save(path)
                pixels.setdefault(split, []).append((array, c))
    return pixels


def ten_views(image: np.ndarray, size: int) -> np.ndarray:
    """The paper's ten patches by hand: 4 corners, centre, and the mirror of each."""
    h, w = image.shape[:2]
    top, left = (h - size) // 2, (w - size) // 2
    views = [
        image[:size, :size],
        image[:size, w - size :],
        image[h - size :, :size],
        image[h - size :, w - size :],
        image[top : top + size, left : left + size],
    ]
    return np.stack(views + [v[:, ::-1] for v in views])


def test_ten_crops_equal_the_hand_computed_average_over_the_ten_views(tmp_path):
    from alexnet_jax.data import augment, make_source

    config = tiny_config(folder_root=str(tmp_path), folder_scan="none")
    config.dataset = "folder"
    config.model.num_classes = 3
    size, resize = config.data.image_size, config.data.resize_size
    # 7 validation images: one full batch of 4 devices x 2 would be 8, so padding is exercised.
    pixels = write_folder(
        tmp_path, np.random.default_rng(0), resize, {"train": [1, 1, 1], "val": [3, 2, 2]}
    )
    source = make_source(config)
    # Another class count: fc8 differs, so this model has its own parameters.
    params, _ = steps.create_state(config, from_config(config.model), source.info.image_shape)
    params = params.params
    model = from_config(config.model)
    mean = np.asarray(augment.AugmentConfig.from_config(config.data).mean_rgb, np.float32)

    @jax.jit
    def probs_of(views):
        return jax.nn.softmax(model.apply({"params": params}, views, train=False))

    images = [a.astype(np.float32) - mean for a, _ in pixels["val"]]
    labels = np.array([c for _, c in pixels["val"]])
    for crops in (10, 1):
        config.eval.crops = crops
        got = evaluate.score(config, source, params, "val")
        views = np.stack([ten_views(x, size) for x in images])  # [7, 10, H, W, C]
        all_probs = np.asarray(probs_of(views.reshape(-1, *views.shape[2:]))).reshape(7, 10, -1)
        probs = all_probs.mean(1) if crops == 10 else all_probs[:, 4]  # view 4: the centre
        want = hand_metrics(probs, labels)
        assert got["num_examples"] == 7 and got["crops"] == crops
        for key, value in want.items():
            assert got[key] == pytest.approx(value, rel=1e-4, abs=1e-5), (crops, key)


# --- a checkpointed workdir, the ledger and the CLI modes --------------------------------------


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A digits workdir with an (untrained) checkpoint at step 7, saved as training saves it."""
    path = str(tmp_path_factory.mktemp("run"))
    config = tiny_config()
    config.eval.batch_size = 128  # as on the command line
    ckpt = checkpoint.Checkpointer(path)
    ckpt.save(7, init_state(), checkpoint.make_meta(config, 7))
    ckpt.close()
    return path


def launch(workdir, *flags):
    out = io.StringIO()
    with redirect_stdout(out):
        rc = cli.main(["experiments/digits.py", "--workdir", workdir, *TINY_FLAGS, *flags])
    return rc, out.getvalue()


def test_test_mode_is_recorded_refused_once_tested_and_forced(workdir, capsys):
    rc, out = launch(workdir, "--mode", "test")
    assert rc == 0, capsys.readouterr().err
    (entry,) = records.read_ledger(workdir)
    assert entry["step"] == 7 and entry["mode"] == "test" and not entry["forced"]
    assert entry["protocol"]["crops"] == 1 and entry["protocol"]["num_examples"] == 359
    assert set(entry["result"]) == set(records.RESULT_KEYS) and entry["time"]
    assert "step 7 test" in out and "five worst test classes" in out
    for name in ("per_class_test.csv", "confusion_test.npy", "confusion_test.png"):
        assert os.path.exists(os.path.join(workdir, name))

    rc, _ = launch(workdir, "--mode", "test")
    err = capsys.readouterr().err
    assert rc == 2
    assert err.startswith("error: ") and err.count("\n") == 1
    assert f"already evaluated on {entry['time']}" in err and "--force_test" in err

    rc, _ = launch(workdir, "--mode", "test", "--force_test")
    assert rc == 0
    first, second = records.read_ledger(workdir)
    assert first == entry and second["forced"] and second["result"] == first["result"]
    lines = [m for m in read_metrics(workdir) if m["split"] == "test"]
    assert len(lines) == 2 and lines[1]["forced"] and all(m["crops"] == 1 for m in lines)


def test_eval_mode_scores_validation_and_checks_the_config(workdir, capsys):
    rc, out = launch(workdir, "--mode", "eval")
    assert rc == 0 and "step 7 val" in out and "centre crop" in out
    line = [m for m in read_metrics(workdir) if m["split"] == "val"][-1]
    assert line["mode"] == "eval" and line["crops"] == 1 and line["num_examples"] == 180
    capsys.readouterr()
    rc, _ = launch(workdir, "--mode", "eval", "--config.model.dense_features=64")
    assert rc == 2 and "model.dense_features: 32 -> 64" in capsys.readouterr().err
    # Other splits would score training images as validation ones (the seed's discipline).
    rc, _ = launch(workdir, "--mode", "eval", "--config.data.val_fraction=0.2")
    assert rc == 2 and "data.val_fraction: 0.1 -> 0.2" in capsys.readouterr().err
    assert not [m for m in read_metrics(workdir) if m.get("mode") == "eval"][1:]
    rc, _ = launch(workdir, "--mode", "eval", "--checkpoint", "best")
    assert rc == 2 and "has a validation result" in capsys.readouterr().err


def test_checkpoint_choice_latest_best_or_a_step(tmp_path):
    config, workdir = tiny_config(), str(tmp_path)
    ckpt = checkpoint.Checkpointer(workdir, keep=5)
    for step, err in ((10, 0.5), (20, 0.2), (30, 0.3), (40, None)):
        ckpt.save(step, init_state(), checkpoint.make_meta(config, step), err)
    ckpt.wait()
    assert evaluate.choose_step(ckpt, "best", workdir) == (20, "best")
    assert evaluate.choose_step(ckpt, "latest", workdir) == (40, "latest")
    assert evaluate.choose_step(ckpt, "10", workdir) == (10, "10")
    with pytest.raises(UsageError, match="kept steps"):
        evaluate.choose_step(ckpt, "15", workdir)
    ckpt.close()
    # Without metrics kept with the checkpoints, the training run's val lines decide.
    with open(tmp_path / "metrics.jsonl", "w") as f:
        for step, err in ((10, 0.5), (30, 0.1), (50, 0.0)):  # 50 has no checkpoint
            f.write(json.dumps({"step": step, "split": "val", "top1_error": err}) + "\n")
        f.write(json.dumps({"step": 20, "split": "val", "top1_error": 0.0, "mode": "eval"}) + "\n")
    ckpt = evaluate.open_checkpoints(workdir)  # reopened: are the saved metrics read back?
    want = 30 if ckpt.best_step() is None else 20
    assert evaluate.choose_step(ckpt, "best", workdir) == (want, "best")
    ckpt.close()
    with pytest.raises(UsageError, match="no checkpoint"):
        evaluate.open_checkpoints(str(tmp_path / "elsewhere"))
    assert not os.path.exists(tmp_path / "elsewhere")  # a mistyped workdir is not created


def test_summary_reports_best_validation_and_the_test_protocol(tmp_path):
    config = tiny_config()
    lines = [
        {"step": 10, "split": "train", "images_per_sec": 100.0},
        {"step": 20, "split": "train", "images_per_sec": 300.0},
        {
            "step": 10,
            "split": "val",
            "top1_error": 0.25,
            "top5_error": 0.05,
            "crops": 1,
            "num_examples": 40,
        },
        {
            "step": 20,
            "split": "val",
            "top1_error": 0.5,
            "top5_error": 0.1,
            "crops": 1,
            "num_examples": 40,
        },
        {
            "step": 20,
            "split": "val",
            "top1_error": 0.0,
            "top5_error": 0.0,
            "crops": 10,
            "num_examples": 40,
            "mode": "eval",
        },  # --mode eval lines do not count
    ]
    with open(tmp_path / "metrics.jsonl", "w") as f:
        f.writelines(json.dumps(m) + "\n" for m in lines)
    test = {"loss": 1.0, "top1_error": 0.375, "top5_error": 0.125, "crops": 10, "num_examples": 8}
    writer = MetricWriter(str(tmp_path), resume_step=20)
    records.record_test(
        str(tmp_path),
        20,
        test,
        config,
        mode="train",
        checkpoint="final",
        forced=False,
        writer=writer,
    )
    with redirect_stdout(io.StringIO()) as out:
        text = records.write_summary(
            str(tmp_path), last_step=20, first_step=0, wall_s=12.5, test=test
        )
    assert (tmp_path / "summary.md").read_text() == text and text in out.getvalue()
    assert "top-1 25.00 %, top-5 5.00 % at step 10 (centre crop, 40 images)" in text
    assert "top-1 37.50 %, top-5 12.50 % at step 20 (10 crops" in text
    assert "| steps | 20 |" in text and "12.5 s" in text and "| images/s | 200 " in text


# --- predict ------------------------------------------------------------------------------------


def digit_pixels():
    d = load_digits()
    return np.round(d.images / 16 * 255).astype(np.uint8), d.target


def test_digits_preprocess_matches_the_eval_pipeline():
    from alexnet_jax.data.digits import DigitsSource

    source = DigitsSource(tiny_config())
    batch = next(iter(source.eval_batches("test", 4)))
    pixels, targets = digit_pixels()
    pre = np.stack([source.preprocess(p)[..., 0] for p in pixels])
    for image, label in zip(batch["image"], batch["label"], strict=True):
        dist = np.abs(pre - image[..., 0]).max(axis=(1, 2))
        i = int(np.argmin(dist))
        assert dist[i] < 2 / 255 and targets[i] == label
        np.testing.assert_array_equal(image[..., 0], image[..., 2])
        # Dark ink on light paper is the same digit: it is inverted before the rest.
        inverted = source.preprocess(np.stack([255 - pixels[i]] * 3, -1))
        np.testing.assert_allclose(inverted, source.preprocess(pixels[i]), atol=1e-5)


def test_predict_prints_the_top_five_of_a_jpeg(workdir, tmp_path, capsys):
    from alexnet_jax.data.digits import DigitsSource

    pixels, _ = digit_pixels()
    path = str(tmp_path / "digit.jpg")
    Image.fromarray(pixels[0]).save(path, quality=100)
    rc, out = launch(workdir, "--mode", "predict", "--image", path)
    assert rc == 0, capsys.readouterr().err
    lines = out.strip().splitlines()
    assert lines[0].startswith(path) and "centre crop" in lines[0]
    printed = [(line.split("%")[1].strip(), float(line.split("%")[0])) for line in lines[1:]]
    assert len(printed) == 5
    names = [name for name, _ in printed]
    assert set(names) <= {str(d) for d in range(10)} and len(set(names)) == 5
    ps = [p for _, p in printed]
    assert ps == sorted(ps, reverse=True) and sum(ps) <= 100.05

    config = tiny_config()
    _, params, _ = evaluate.load_params(config, workdir)
    x = DigitsSource(config).preprocess(pixels[0])[None]
    want = np.asarray(
        jax.nn.softmax(from_config(config.model).apply({"params": params}, x, train=False))
    )[0]
    for name, p in printed:
        assert p == pytest.approx(100 * want[int(name)], abs=0.5)

    rc, _ = launch(workdir, "--mode", "predict")
    assert rc == 2 and "--image" in capsys.readouterr().err


def test_imagenet_predict_uses_the_eval_transform_and_synset_names(tmp_path):
    from alexnet_jax.data import augment
    from experiments import imagenet

    config = imagenet.get_config()
    config.eval.crops = 10
    config.data.augment_on = "host"  # compared with the host eval transform below
    path = str(tmp_path / "photo.jpg")
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (300, 400, 3), dtype=np.uint8)).save(path)
    preprocess, names = data.predictor(config)  # no prepared dataset needed
    views = preprocess(path)
    assert views.shape == (10, 224, 224, 3)
    with open(path, "rb") as f:
        cfg = augment.AugmentConfig.from_config(config.data)
        want = augment.eval_image(f.read(), cfg, 10).numpy()
    np.testing.assert_allclose(views, want)
    assert len(names) == 1000 and names[0] == "tench (n01440764)"


def test_imagenet_names_follow_the_tfds_label_order():
    import tensorflow_datasets as tfds

    labels = tfds.core.tfds_path("datasets/imagenet2012/labels.txt").read_text().split()
    rows = imagenet_classes.synsets_and_names()
    assert [s for s, _ in rows] == labels
    assert rows[0] == ("n01440764", "tench")
    assert imagenet_classes.name_of("n04596742") == "wok"
    assert imagenet_classes.class_names()[999] == "toilet tissue (n15075141)"


# --- filters ------------------------------------------------------------------------------------


def test_filter_image_puts_each_column_in_its_own_grid():
    rng = np.random.default_rng(0)
    kernel = np.zeros((11, 11, 3, 96), np.float32)
    kernel[:, :, 0, :48] = rng.random((11, 11, 48))  # column 1: red kernels
    kernel[:, :, 2, 48:] = 5 * rng.random((11, 11, 48))  # column 2: blue, at another scale
    image = np.asarray(filters.filter_image(kernel, groups=2, scale=3))
    grid = filters.kernel_grid(kernel[..., :48], scale=3)
    assert filters.grid_shape(48) == (6, 8)
    assert grid.shape == (6 * 35 + 2, 8 * 35 + 2, 3)
    half = image.shape[1] // 2
    left, right = image[40:-10, 15 : half - 5].astype(float), image[40:-10, half + 5 : -15]
    assert left[..., 0].mean() > 3 * left[..., 2].mean()
    assert right[..., 2].mean() > 3 * right[..., 0].mean()
    # Each kernel is normalised alone (its channels together): each spans the full 0-255 range.
    first = grid[2 : 2 + 33, 2 : 2 + 33]
    assert first.min() == 0 and first.max() == 255


def test_filters_mode_writes_a_png(workdir, capsys):
    rc, out = launch(workdir, "--mode", "filters")
    assert rc == 0, capsys.readouterr().err
    path = os.path.join(workdir, "filters.png")
    assert path in out
    with Image.open(path) as image:
        assert image.format == "PNG" and image.size[0] > 2 * 4 * 11


# --- end to end --------------------------------------------------------------------------------


@pytest.mark.slow
def test_training_tests_once_and_a_rerun_does_not_look_again(tmp_path, capsys):
    flags = ["--config.num_train_steps=4", "--config.eval_every_steps=2", "--config.batch_size=16"]
    workdir = str(tmp_path)
    for _ in range(2):  # the second run resumes at the end
        rc, out = launch(workdir, *flags)
        assert rc == 0, capsys.readouterr().err
    assert "not again" in out
    tests = [m for m in read_metrics(workdir) if m["split"] == "test"]
    (entry,) = records.read_ledger(workdir)
    assert len(tests) == 1 and tests[0]["mode"] == "train" and entry["step"] == 4
    summary = (tmp_path / "summary.md").read_text()
    assert "| test error |" in summary and "at step 4 (centre crop, 359 images)" in summary
    rc, _ = launch(workdir, "--mode", "test", *flags)
    assert rc == 2 and "already evaluated" in capsys.readouterr().err


def test_the_final_report_equals_scikit_learn_on_the_same_predictions(tmp_path):
    """On 4 devices with padded batches (359 test digits, eval batch 8): accuracy is 1 - top-1
    error and the macro precision, recall and F1 are scikit-learn's on the same predictions."""
    from sklearn.metrics import precision_recall_fscore_support

    from alexnet_jax.data.digits import DigitsSource

    config = tiny_config()
    source = DigitsSource(config)
    params = init_state().params
    got, confusion = evaluate.score(config, source, params, "test", return_confusion=True)
    model = from_config(config.model)
    preds, labels = [], []
    for batch in source.eval_batches("test", 64):
        logits = model.apply({"params": params}, batch["image"], train=False)
        preds += list(np.argmax(np.asarray(logits), -1)[batch["mask"]])
        labels += list(batch["label"][batch["mask"]])
    assert got["num_examples"] == len(labels) == 359 == confusion.sum()
    assert got["accuracy"] == pytest.approx(1 - got["top1_error"], abs=1e-6)
    present = sorted(set(labels) | set(preds))
    p, r, f, _ = precision_recall_fscore_support(
        labels, preds, labels=present, average="macro", zero_division=0
    )
    assert (got["precision_macro"], got["recall_macro"], got["f1_macro"]) == pytest.approx(
        (p, r, f), abs=1e-6
    )

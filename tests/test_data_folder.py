"""The `folder` source: root/<split>/<class>/<image>, with broken files among the good ones."""

import io
import logging

import numpy as np
import pytest
from PIL import Image

from alexnet_jax.data import tfds_common
from alexnet_jax.data.folder import FolderSource, find_unreadable
from alexnet_jax.errors import DataNotFoundError
from experiments.imagenet import get_config

COLORS = {"cat": (200, 40, 40), "dog": (40, 200, 40), "emu": (40, 40, 200)}
COUNTS = {"train": 6, "val": 3, "test": 2}  # per class


def encode(color, fmt, rng, size=(30, 40)):
    noise = rng.integers(-10, 11, (*size, 3))
    array = np.clip(np.array(color) + noise, 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, fmt)
    return buf.getvalue()


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    """Good JPEGs and PNGs, plus in train/cat: a truncated JPEG, text saved as .jpg, an empty
    .png; and in val/dog a truncated PNG."""
    root = tmp_path_factory.mktemp("folder")
    rng = np.random.default_rng(0)
    for split, n in COUNTS.items():
        for cls, color in COLORS.items():
            d = root / split / cls
            d.mkdir(parents=True)
            for i in range(n):
                fmt = "PNG" if i % 3 == 2 else "JPEG"
                (d / f"{i}.{'png' if fmt == 'PNG' else 'jpg'}").write_bytes(encode(color, fmt, rng))
    (root / "train" / "cat" / "notes.txt").write_text("not an image, not listed")
    good = encode(COLORS["cat"], "JPEG", rng)
    (root / "train" / "cat" / "truncated.jpg").write_bytes(good[: len(good) // 2])
    (root / "train" / "cat" / "html.jpg").write_text("<html>404</html>")
    (root / "train" / "cat" / "empty.png").write_bytes(b"")
    png = encode(COLORS["dog"], "PNG", rng)
    (root / "val" / "dog" / "cut.png").write_bytes(png[: len(png) // 2])
    return root


def config(root, **data):
    c = get_config()
    c.dataset = "folder"
    c.data.folder_root = str(root)
    c.data.resize_size, c.data.image_size = 32, 24
    c.data.augment_on = "host"  # these tests read the host path's finished crops
    c.data.update(data)
    return c


@pytest.fixture(scope="module")
def source(root):
    return FolderSource(config(root))


def take(it, n):
    return [next(it) for _ in range(n)]


def test_unreadable_images_are_reported_and_skipped(root, caplog):
    with caplog.at_level(logging.WARNING):
        source = FolderSource(config(root))
    bad = {root / "train" / "cat" / f for f in ("truncated.jpg", "html.jpg", "empty.png")}
    assert {str(p) for p in bad} == set(source.skipped["train"])
    assert source.skipped["val"] == [str(root / "val" / "dog" / "cut.png")]
    for path in [*bad, root / "val" / "dog" / "cut.png"]:
        assert str(path) in caplog.text  # logged with its path
    assert "3 of 21 images unreadable" in caplog.text
    assert source.info.num_examples == {"train": 18, "val": 9, "test": 6}
    assert source.info.class_names == ("cat", "dog", "emu") and source.info.num_classes == 3


def test_find_unreadable_decodes_every_file(root):
    paths = sorted(str(p) for p in (root / "train" / "cat").iterdir() if p.suffix != ".txt")
    bad = find_unreadable(paths)
    assert sorted(p.rsplit("/", 1)[1] for p in bad) == ["empty.png", "html.jpg", "truncated.jpg"]


def test_eval_pairs_labels_with_images_and_counts_exactly(root):
    plain = FolderSource(config(root, mean_mode="none"))
    batches = list(plain.eval_batches("val", 4))
    assert [int(b["mask"].sum()) for b in batches] == [4, 4, 1]
    names = plain.info.class_names
    for b in batches:
        assert b["image"].shape == (4, 24, 24, 3) and b["image"].dtype == np.float32
        for image, label in zip(b["image"][b["mask"]], b["label"][b["mask"]], strict=True):
            np.testing.assert_allclose(image.mean((0, 1)), COLORS[names[label]], atol=5)
    ten = list(plain.eval_batches("test", 4, crops=10))
    assert ten[0]["image"].shape == (4, 10, 24, 24, 3)
    assert sum(int(b["mask"].sum()) for b in ten) == 6


def test_train_determinism_and_resume(source):
    first = take(source.train_batches(4, seed=1), 6)  # 18 images: 4 steps per epoch
    for b in first:
        assert b["image"].shape == (4, 24, 24, 3) and b["label"].dtype == np.int32
    resumed = take(source.train_batches(4, seed=1, start_step=3), 3)
    for a, b in zip(first[3:], resumed, strict=True):
        np.testing.assert_array_equal(a["image"], b["image"])
        np.testing.assert_array_equal(a["label"], b["label"])
    other = next(source.train_batches(4, seed=2))
    assert not np.array_equal(other["image"], first[0]["image"])


def test_processes_split_each_epoch(root, monkeypatch):
    c = config(root, augment=False)
    seen = []
    for pid in range(2):
        monkeypatch.setattr(tfds_common, "process_index_count", lambda pid=pid: (pid, 2))
        epoch = take(FolderSource(c).train_batches(3, seed=0), 3)  # 9 images each
        seen.append({image.tobytes() for b in epoch for image in b["image"]})
    assert len(seen[0]) == len(seen[1]) == 9 and not seen[0] & seen[1]


def test_a_file_that_breaks_after_the_scan_never_stops_training(root, tmp_path, caplog):
    """With the scan off, broken files reach tf.data; they are dropped, batches stay full."""
    c = config(root, folder_scan="none")
    source = FolderSource(c)
    assert source.info.num_examples["train"] == 21
    with caplog.at_level(logging.WARNING):
        batches = take(source.train_batches(7, seed=0), 6)  # two epochs of 3 steps
        evals = list(source.eval_batches("val", 4))
    assert all(b["image"].shape == (7, 24, 24, 3) for b in batches)
    assert sum(int(b["mask"].sum()) for b in evals) == 9  # 10 files, 1 unreadable
    assert len(evals) == 3 and "1 of 10 images could not be decoded" in caplog.text


def test_missing_directories(tmp_path, root):
    with pytest.raises(DataNotFoundError, match="folder_root"):
        FolderSource(config(""))
    (tmp_path / "train" / "a").mkdir(parents=True)
    (tmp_path / "train" / "a" / "0.png").write_bytes(
        encode((1, 2, 3), "PNG", np.random.default_rng())
    )
    with pytest.raises(DataNotFoundError, match="val"):
        FolderSource(config(tmp_path))
    (tmp_path / "val" / "zebra").mkdir(parents=True)
    with pytest.raises(DataNotFoundError, match="zebra"):
        FolderSource(config(tmp_path))
    source = FolderSource(config(root, folder_test_split="nope"))
    with pytest.raises(DataNotFoundError, match="nope"):
        next(source.eval_batches("test", 4))

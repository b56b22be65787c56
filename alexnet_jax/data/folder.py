"""Any image-classification set laid out as `root/<split>/<class>/<image>` (ImageFolder style).

Class names are the sub-directories of the training split, sorted; label i is the i-th name.
The validation and test splits may hold a subset of those classes, never others.

Real image folders hold broken files (truncated downloads, HTML saved as .jpg, empty files).
They must not end a run in its third day, so at start-up every image is decoded once by
TensorFlow (JPEGs at 1/8 scale: the whole entropy-coded stream is read, so truncation shows, at a
fraction of the cost), and those that fail are logged with their path, counted in `skipped` and
left out of the split. A file that breaks later is dropped by `tf.data` and logged as well.

Order and augmentation are index-based: epoch e of the training set is
`base.epoch_permutation(n, seed, e)`, dealt out to the processes in equal contiguous parts, so
resuming at any step is exact and free (see `tfds_common`).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator

import ml_collections
import numpy as np

from alexnet_jax.data import augment, tfds_common
from alexnet_jax.data.base import FOLDER_SCANS, Batch, DatasetInfo, Predictor, epoch_permutation
from alexnet_jax.errors import DataNotFoundError, UsageError

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp")


def list_images(split_dir: str, classes: list[str] | None = None) -> tuple[list[str], list[str]]:
    """(paths, class name of each), sorted by class then file name; hidden files skipped."""
    if classes is None:
        classes = sorted(
            c
            for c in os.listdir(split_dir)
            if not c.startswith(".") and os.path.isdir(os.path.join(split_dir, c))
        )
    paths, names = [], []
    for c in classes:
        class_dir = os.path.join(split_dir, c)
        if not os.path.isdir(class_dir):
            continue
        for f in sorted(os.listdir(class_dir)):
            if not f.startswith(".") and f.lower().endswith(IMAGE_EXTENSIONS):
                paths.append(os.path.join(class_dir, f))
                names.append(c)
    return paths, names


def _valid_name(path: str) -> bool:
    """False for a file name that is not valid UTF-8 (Python keeps its bytes as surrogates):
    TensorFlow cannot open it, so it is skipped and reported like an unreadable image."""
    try:
        path.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def empty_classes(split_dir: str) -> list[str]:
    """The class directories of `split_dir` that hold no image (they would vanish silently)."""
    found = set(list_images(split_dir)[1])
    return sorted(
        c
        for c in os.listdir(split_dir)
        if not c.startswith(".") and os.path.isdir(os.path.join(split_dir, c)) and c not in found
    )


def find_unreadable(paths: list[str]) -> list[str]:
    """The paths TensorFlow cannot decode, found by decoding each once, in parallel."""
    bad = [p for p in paths if not _valid_name(p)]
    paths = [p for p in paths if _valid_name(p)]
    if not paths:
        return bad
    tf = tfds_common.import_tf()

    def check(path):
        data = tf.io.read_file(path)
        shape = tf.cond(
            tf.io.is_jpeg(data),
            lambda: tf.shape(tf.io.decode_jpeg(data, channels=3, ratio=8)),
            lambda: tf.shape(tf.io.decode_image(data, channels=3, expand_animations=False)),
        )
        return path, shape

    ds = tf.data.Dataset.from_tensor_slices(paths).map(check, num_parallel_calls=tf.data.AUTOTUNE)
    ok = {p.decode() for p, _ in ds.ignore_errors().as_numpy_iterator()}
    return bad + [p for p in paths if p not in ok]


class FolderSource:
    """An image folder as a `Source` (see the module docstring)."""

    def __init__(self, config: ml_collections.ConfigDict):
        self._tf = tfds_common.import_tf()
        data = config.data
        root = os.path.expanduser(data.get("folder_root", ""))
        dirs = {
            "train": data.get("folder_train_split", "train"),
            "val": data.get("folder_val_split", "val"),
            "test": data.get("folder_test_split", "test"),
        }
        self._dirs = {k: os.path.join(root, v) for k, v in dirs.items()}
        self._root = root
        for split in ("train", "val"):
            if not root or not os.path.isdir(self._dirs[split]):
                raise DataNotFoundError(
                    f"no {split} directory {self._dirs[split]!r}: dataset 'folder' reads "
                    "<data.folder_root>/<split>/<class>/*.jpg|png"
                )
        paths, names = list_images(self._dirs["train"])
        classes = sorted(set(names))
        empty = empty_classes(self._dirs["train"])
        if empty:
            raise DataNotFoundError(
                f"class folder(s) without images in {self._dirs['train']}: "
                f"{', '.join(repr(e) for e in empty[:5])}; add images or remove the folder"
            )
        if not classes:
            raise DataNotFoundError(f"no images in {self._dirs['train']}/<class>/")
        index = {c: i for i, c in enumerate(classes)}
        scan = data.get("folder_scan", "decode")
        if scan not in FOLDER_SCANS:
            raise UsageError(f"data.folder_scan must be 'decode' or 'none', not {scan!r}")

        self.skipped: dict[str, list[str]] = {}
        self._files: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        for split, split_dir in self._dirs.items():
            if split != "train":
                if not os.path.isdir(split_dir):
                    continue
                extra = sorted(set(os.listdir(split_dir)) - set(classes))
                extra = [e for e in extra if os.path.isdir(os.path.join(split_dir, e))]
                if extra:
                    raise DataNotFoundError(
                        f"{split_dir} has classes that {self._dirs['train']} lacks: {extra[:5]}"
                    )
                paths, names = list_images(split_dir, classes)
            bad = (
                set(find_unreadable(paths))
                if scan == "decode"
                else {p for p in paths if not _valid_name(p)}
            )
            for p in sorted(bad):
                log.warning("folder: skipping unreadable image %s", p)
            if bad:
                log.warning(
                    "folder: %s: %d of %d images unreadable, skipped", split, len(bad), len(paths)
                )
            self.skipped[split] = sorted(bad)
            keep = [i for i, p in enumerate(paths) if p not in bad]
            self._files[split] = (
                np.array([paths[i] for i in keep], dtype=object).astype(str),
                np.array([index[names[i]] for i in keep], np.int32),
            )

        self._cfg = augment.AugmentConfig.from_config(data, _mean_image(data))
        self._pid, self._count = tfds_common.process_index_count()
        size = self._cfg.image_size
        self.info = DatasetInfo(
            num_classes=len(classes),
            image_shape=(size, size, 3),
            num_examples={k: len(self._files[k][1]) if k in self._files else 0 for k in dirs},
            class_names=tuple(classes),
            device_augment=tfds_common.device_spec(self._cfg),
        )

    @classmethod
    def file_predictor(cls, config: ml_collections.ConfigDict) -> Predictor:
        """The class names come from the folder listing alone: no image is decoded."""
        listing = ml_collections.ConfigDict(config.to_dict())
        listing.data.folder_scan = "none"
        names = cls(listing).info.label_names()
        return tfds_common.file_preprocessor(config, _mean_image(config.data)), names

    def content_hashes(self) -> dict[str, list[tuple[str, str]]]:
        """split -> [(path relative to folder_root, digest of the file's bytes)], for the leakage
        check; only the images the split reads (unreadable ones were skipped). A missing test
        directory is a missing split, not an empty one."""
        from alexnet_jax.data.leakage import hash_files

        out = {}
        for split, (files, _) in self._files.items():
            paths = [str(p) for p in files]
            out[split] = hash_files(paths, [os.path.relpath(p, self._root) for p in paths])
        return out

    def _slices(self, paths: np.ndarray, labels: np.ndarray):
        return self._tf.data.Dataset.from_tensor_slices((paths, labels))

    def train_batches(self, batch_size: int, *, seed: int, start_step: int = 0) -> Iterator[Batch]:
        paths, labels = self._files["train"]
        per_process = len(labels) // self._count  # equal parts: equal steps per epoch

        def epoch(e: int):
            order = epoch_permutation(len(labels), seed, e)
            mine = order[self._pid * per_process : (self._pid + 1) * per_process]
            return self._slices(paths[mine], labels[mine])

        return tfds_common.train_stream(
            epoch,
            load=self._tf.io.read_file,
            examples_per_epoch=per_process,
            batch_size=batch_size,
            seed=seed,
            start_step=start_step,
            cfg=self._cfg,
            skip_errors=True,
        )

    def eval_batches(self, split: str, batch_size: int, *, crops: int = 1) -> Iterator[Batch]:
        if split not in ("val", "test"):
            raise UsageError(f"eval split must be 'val' or 'test', not {split!r}")
        if split not in self._files:
            raise DataNotFoundError(f"no {split} directory {self._dirs[split]!r}")
        paths, labels = self._files[split]
        # Round-robin, as base.eval_index_batches deals examples; the remainder is not dropped.
        sizes = [len(labels[i :: self._count]) for i in range(self._count)]
        mine = slice(self._pid, None, self._count)
        return tfds_common.eval_stream(
            self._slices(paths[mine], labels[mine]),
            load=self._tf.io.read_file,
            num_examples=sizes[self._pid],
            num_batches=tfds_common.eval_num_batches(max(sizes), batch_size),
            batch_size=batch_size,
            crops=crops,
            cfg=self._cfg,
            skip_errors=True,
            name=f"folder {split}",
        )


def _mean_image(data: ml_collections.ConfigDict) -> np.ndarray | None:
    if data.get("mean_mode", "channel") != "pixel":
        return None
    path = data.get("mean_image_path", "")
    if not path or not os.path.exists(path):
        raise DataNotFoundError(
            f"data.mean_mode='pixel' needs data.mean_image_path (a [resize, resize, 3] .npy); "
            f"{path or 'none'} does not exist (`python -m alexnet_jax.data.prepare "
            "--folder_root ROOT --mean_image` computes one)"
        )
    return np.load(path).astype(np.float32)

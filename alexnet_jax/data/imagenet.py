"""ILSVRC-2012 through the real TFDS `imagenet2012` builder, prepared from the user's own tars.

ImageNet cannot be downloaded by a program: the user fetches `ILSVRC2012_img_train.tar` and
`ILSVRC2012_img_val.tar` from image-net.org into `data.manual_dir`, and the first run (or
`python -m alexnet_jax.data.prepare`) turns them into TFDS records under `data.data_dir`. Nothing
is ever downloaded (TFDS's GCS mirror is off as well).

Splits are TFDS split strings. Following big_vision, the default validation split is "minival",
the last 1 % of the training set, and the official 50,000 validation images are the test split,
used once (REFERENCE.md, "Train / validation / test").

When the 256-pixel prepared copy exists (`alexnet_jax.data.prepare`), it is read instead of the
full-size images: same splits, same example order, several times faster to decode.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Iterator
from pathlib import Path

import ml_collections
import numpy as np

from alexnet_jax.data import augment, random_access, tfds_common
from alexnet_jax.data.base import Batch, DatasetInfo, Predictor
from alexnet_jax.errors import DataNotFoundError, UsageError

log = logging.getLogger(__name__)

NAME = "imagenet2012"
PREPARED_NAME = "imagenet2012_s256"  # the prepared copy's dataset name (prepare.py writes it)
PREPARED_VERSION = "2.0.0"  # 2: central 256x256 square (1: shorter side 256, aspect kept)
MEAN_IMAGE_FILE = "mean_image.npy"  # written by `prepare --mean_image` next to the copy
# Written by `prepare` next to the copy: the leakage check's digests, so a run never rehashes.
HASHES_FILE = "content_hashes.tsv"
# The tar holding each TFDS split of the full-size builder.
TARS = {"train": "ILSVRC2012_img_train.tar", "validation": "ILSVRC2012_img_val.tar"}


def data_dir(data: ml_collections.ConfigDict) -> str:
    """`data.data_dir`, or TFDS's default ($TFDS_DATA_DIR or ~/tensorflow_datasets)."""
    import tensorflow_datasets as tfds

    return os.path.expanduser(data.data_dir or tfds.core.constants.get_default_data_dir())


def manual_dir(data: ml_collections.ConfigDict) -> str:
    """`data.manual_dir`, or TFDS's default manual dir, `<data_dir>/downloads/manual`."""
    default = os.path.join(data_dir(data), "downloads", "manual")
    return os.path.expanduser(data.manual_dir or default)


def prepared_path(data: ml_collections.ConfigDict) -> Path:
    """Where the prepared copy lives: under `data.prepared_dir`, else under the data dir."""
    root = os.path.expanduser(data.get("prepared_dir", "") or data_dir(data))
    return Path(root) / PREPARED_NAME / PREPARED_VERSION


def _is_prepared_copy(path: Path) -> bool:
    return (path / "dataset_info.json").exists()


def _split_names(splits: list[str]) -> set[str]:
    """The TFDS base splits that split strings such as 'train[:99%]+validation' read."""
    return {name for s in splits for name in re.findall(r"([A-Za-z_]\w*)\s*(?:\[|$|\+)", s)}


def full_size_builder(data: ml_collections.ConfigDict, splits: list[str]):
    """The `imagenet2012` builder, prepared from the tars in the manual dir if need be.

    Raises DataNotFoundError naming the tars and the directory when the dataset is not prepared
    and a tar that `splits` need is missing.
    """
    tfds_common.import_tf()
    import tensorflow_datasets as tfds

    builder = tfds.builder(NAME, data_dir=data_dir(data))
    if builder.is_prepared():
        return builder
    manual = manual_dir(data)
    needed = [TARS[s] for s in sorted(_split_names(splits) & TARS.keys())] or list(TARS.values())
    missing = [t for t in needed if not os.path.exists(os.path.join(manual, t))]
    if missing:
        raise DataNotFoundError(
            f"ImageNet is not prepared in {data_dir(data)} and {' and '.join(missing)} "
            f"{'is' if len(missing) == 1 else 'are'} not in {manual}: download "
            f"{' and '.join(TARS.values())} from https://image-net.org into that directory, "
            "or point data.manual_dir (prepare: --manual_dir) at the one holding them"
        )
    log.info("Preparing %s from the tars in %s (hours for the real set)", NAME, manual)
    config = tfds.download.DownloadConfig(manual_dir=manual, try_download_gcs=False)
    builder.download_and_prepare(download_config=config)
    return builder


def open_builder(data: ml_collections.ConfigDict, splits: list[str]):
    """The prepared copy when there is one (and `data.use_prepared`), else the full-size set."""
    tfds_common.import_tf()
    import tensorflow_datasets as tfds

    path = prepared_path(data)
    if data.get("use_prepared", True):
        if _is_prepared_copy(path):
            log.info("Reading the 256-pixel prepared copy in %s", path)
            return tfds.builder_from_directory(str(path))
        if data.get("prepared_dir", ""):
            raise DataNotFoundError(
                f"no prepared copy in {path}: run `python -m alexnet_jax.data.prepare "
                f"--out {data.prepared_dir}` or unset --config.data.prepared_dir"
            )
    builder = full_size_builder(data, splits)
    log.info(
        "Reading full-size JPEGs; `python -m alexnet_jax.data.prepare` writes a 256-pixel "
        "copy that decodes several times faster (scripts/bench_input.py measures it)"
    )
    return builder


def hashes_path(copy_dir: str | os.PathLike) -> Path:
    """The digests sidecar of the prepared copy in `copy_dir` (`.../imagenet2012_s256/1.0.0`)."""
    return Path(copy_dir).parent / HASHES_FILE


def hash_records(builder, split: str) -> list[tuple[str, str]]:
    """[(file name, digest of the encoded image)] of TFDS split `split`, in record order.

    The encoded bytes as stored, never decoded: decoding would cost far more than hashing.
    """
    from alexnet_jax.data.leakage import digest

    tf = tfds_common.import_tf()
    import tensorflow_datasets as tfds

    decoders = None  # a raw copy's pixels are hashed as stored
    if isinstance(builder.info.features["image"], tfds.features.Image):
        decoders = {"image": tfds.decode.SkipDecoding()}
    ds = random_access.as_dataset(builder, split, decoders=decoders)
    ds = ds.map(lambda ex: (ex["file_name"], ex["image"])).prefetch(tf.data.AUTOTUNE)
    return [(name.decode(), digest(image)) for name, image in ds.as_numpy_iterator()]


def write_hashes(path: str | os.PathLike, rows: dict[str, list[tuple[str, str]]]) -> None:
    """Writes `split<TAB>file_name<TAB>digest` lines, each split's rows in record order."""
    from alexnet_jax.workdir import atomic_open

    with atomic_open(path, "w") as f:
        f.write("split\tfile_name\tdigest\n")
        for split, pairs in rows.items():
            f.writelines(f"{split}\t{name}\t{d}\n" for name, d in pairs)


def read_hashes(path: str | os.PathLike) -> dict[str, list[tuple[str, str]]]:
    """The sidecar as {TFDS base split: [(file name, digest)] in record order}."""
    rows: dict[str, list[tuple[str, str]]] = {}
    with open(path) as f:
        next(f, None)  # the header
        for line in f:
            split, name, d = line.rstrip("\n").split("\t")
            rows.setdefault(split, []).append((name, d))
    return rows


def load_mean_image(data: ml_collections.ConfigDict, default: Path | None) -> np.ndarray | None:
    """The per-pixel mean image for `data.mean_mode='pixel'` (the paper's choice), else None."""
    if data.get("mean_mode", "channel") != "pixel":
        return None
    path = data.get("mean_image_path", "") or default
    if not path or not os.path.exists(path):
        raise DataNotFoundError(
            f"data.mean_mode='pixel' needs a mean image, and {path or 'none'} does not exist: "
            "run `python -m alexnet_jax.data.prepare --mean_image` or set data.mean_image_path"
        )
    return np.load(path).astype(np.float32)


class ImageNetSource:
    """ILSVRC-2012 as a `Source` (see the module docstring)."""

    def __init__(self, config: ml_collections.ConfigDict):
        tf = tfds_common.import_tf()
        import tensorflow_datasets as tfds

        self._tf, self._tfds = tf, tfds
        data = config.data
        self._splits = {"train": data.train_split, "val": data.val_split, "test": data.test_split}
        self._builder = open_builder(data, list(self._splits.values()))
        default_mean = prepared_path(data).parent / MEAN_IMAGE_FILE
        self._cfg = augment.AugmentConfig.from_config(data, load_mean_image(data, default_mean))
        self._shuffle_buffer = int(data.get("shuffle_buffer", 10_000))
        self._pid, self._count = tfds_common.process_index_count()
        # Training: equal shards (drop_remainder), so every process runs the same number of
        # steps per epoch.
        self._train_shard = tfds.split_for_jax_process(
            data.train_split,
            process_index=self._pid,
            process_count=self._count,
            drop_remainder=True,
        )
        names = tuple(self._builder.info.features["label"].names)
        size = self._cfg.image_size
        self.info = DatasetInfo(
            num_classes=len(names),
            image_shape=(size, size, 3),
            num_examples={k: self._num_examples(v) for k, v in self._splits.items()},
            class_names=names,
            device_augment=tfds_common.device_spec(self._cfg),
        )
        self._train_local = self._num_examples(self._train_shard)

    @classmethod
    def file_predictor(cls, config: ml_collections.ConfigDict) -> Predictor:
        """Predict needs no prepared dataset: the class names ship with the package."""
        from alexnet_jax import imagenet_classes

        default = prepared_path(config.data).parent / MEAN_IMAGE_FILE
        mean_image = load_mean_image(config.data, default)
        return tfds_common.file_preprocessor(config, mean_image), imagenet_classes.class_names()

    def content_hashes(self) -> dict[str, list[tuple[str, str]]]:
        """'train'/'val'/'test' -> [(file name, digest of the encoded image)], for the leakage
        check: from the prepared copy's sidecar when it has one, else by reading every record
        of the three splits once (the full-size set: about 140 GB, minutes)."""
        stored = self._stored_hashes()
        if stored is None:
            log.info("leakage check: hashing the encoded images of %s", self._builder.name)
            return {k: hash_records(self._builder, v) for k, v in self._splits.items()}
        out: dict[str, list[tuple[str, str]]] = {}
        for key, split in self._splits.items():
            out[key] = []
            for part in self._absolute(split):  # 'train[:99%]' -> train, 0, 1268355
                out[key] += stored[part.splitname][part.from_ : part.to]
        return out

    def _absolute(self, split: str) -> list:
        """A split string as TFDS reads it: [(base split, from_, to)], exactly its rounding."""
        spec = self._tfds.core.ReadInstruction.from_spec(split)
        return spec.to_absolute(self._builder.info.splits)

    def _stored_hashes(self) -> dict[str, list[tuple[str, str]]] | None:
        """The prepared copy's sidecar, if there is one and it matches the copy, else None."""
        if self._builder.name != PREPARED_NAME:
            return None
        path = hashes_path(self._builder.data_dir)
        if not path.exists():
            log.info("leakage check: %s has no %s (older `prepare`)", path.parent, HASHES_FILE)
            return None
        stored = read_hashes(path)
        # The rows are in the copy's record order (prepare writes them as it writes the copy),
        # which slicing relies on. Cheap checks that the file belongs to this copy: the counts,
        # and the file names of the first and last record of each split used.
        bases = {p.splitname for s in self._splits.values() for p in self._absolute(s)}
        for base in sorted(bases):
            rows = stored.get(base, [])
            n = self._builder.info.splits[base].num_examples
            if len(rows) != n or (
                n
                and [rows[0][0], rows[-1][0]]
                != [self._file_name(f"{base}[:1]"), self._file_name(f"{base}[-1:]")]
            ):
                log.warning("leakage check: %s does not match the copy; rehashing", path)
                return None
        return stored

    def _file_name(self, split: str) -> str:
        ds = random_access.as_dataset(self._builder, split, decoders=self._decoders())
        return next(iter(ds.as_numpy_iterator()))["file_name"].decode()

    def _num_examples(self, split) -> int:
        try:
            return self._builder.info.splits[split].num_examples
        except (KeyError, ValueError) as e:
            available = sorted(self._builder.info.splits.keys())
            raise DataNotFoundError(
                f"split {split!r} is not in the prepared {self._builder.name} "
                f"(it has {available}): {e}"
            ) from None

    def _records(self, split, *, read_config, shuffle_files: bool):
        tf = self._tf
        if random_access.is_random_access(self._builder):  # in record order
            ds = random_access.as_dataset(self._builder, split, decoders=self._decoders())
        else:
            ds = self._builder.as_dataset(
                split=split,
                shuffle_files=shuffle_files,
                read_config=read_config,
                decoders=self._decoders(),
            )
        return ds.map(lambda ex: (ex["image"], tf.cast(ex["label"], tf.int32)))

    def _decoders(self) -> dict | None:
        """Encoded images stay encoded (decoded in augment, after any skip); raw pixels are read
        as the uint8 arrays they are."""
        if isinstance(self._builder.info.features["image"], self._tfds.features.Image):
            return {"image": self._tfds.decode.SkipDecoding()}
        return None

    def _epoch(self, seed: int, epoch: int):
        """Epoch `epoch`'s record order: shard files shuffled, then a shuffle buffer, both seeded
        from (seed, epoch); deterministic because the interleave and maps keep their order."""
        tfds = self._tfds
        s = tfds_common.epoch_seed(seed, epoch)
        read_config = tfds.ReadConfig(shuffle_seed=s, try_autocache=False)
        ds = self._records(self._train_shard, read_config=read_config, shuffle_files=True)
        return ds.shuffle(self._shuffle_buffer, seed=s, reshuffle_each_iteration=False)

    def train_batches(self, batch_size: int, *, seed: int, start_step: int = 0) -> Iterator[Batch]:
        if random_access.is_random_access(self._builder):
            records, parse = random_access.raw_source_and_parser(
                self._builder, self._splits["train"]
            )
            return random_access.train_stream(
                records,
                parse=parse,
                batch_size=batch_size,
                seed=seed,
                start_step=start_step,
                cfg=self._cfg,
            )
        return tfds_common.train_stream(
            lambda epoch: self._epoch(seed, epoch),
            load=lambda image: image,
            examples_per_epoch=self._train_local,
            batch_size=batch_size,
            seed=seed,
            start_step=start_step,
            cfg=self._cfg,
        )

    def eval_batches(self, split: str, batch_size: int, *, crops: int = 1) -> Iterator[Batch]:
        if split not in ("val", "test"):
            raise UsageError(f"eval split must be 'val' or 'test', not {split!r}")
        # Contiguous shards; the remainder goes to the first processes (not dropped).
        shards = self._tfds.even_splits(self._splits[split], n=self._count, drop_remainder=False)
        sizes = [self._num_examples(s) for s in shards]
        read_config = self._tfds.ReadConfig(try_autocache=False)
        return tfds_common.eval_stream(
            self._records(shards[self._pid], read_config=read_config, shuffle_files=False),
            load=lambda image: image,
            num_examples=sizes[self._pid],
            num_batches=tfds_common.eval_num_batches(max(sizes), batch_size),
            batch_size=batch_size,
            crops=crops,
            cfg=self._cfg,
            name=f"{NAME} {split}",
        )

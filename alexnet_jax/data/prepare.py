"""The prepared copy: every ImageNet image as the paper made it (central 256x256), as TFDS records.

    python -m alexnet_jax.data.prepare --data_dir D --manual_dir M [--out DIR] [--mean_image]

1. Prepares `imagenet2012` in D from the tars in M, unless it is prepared already.
2. Writes the dataset `imagenet2012_s256` to DIR (default D): the same splits, labels and file
   names, each image's central square resized (antialiased bilinear) to 256x256 -- the paper's
   "shorter side to 256, then the central 256x256 patch" -- and stored as JPEG (`--quality`, 90)
   or as raw uint8 pixels (`--storage raw`: exact, 196,608 bytes an image, ~250 GB for train), in
   ArrayRecord files (`--file_format`; random access: a resumed run reads nothing before its
   step). The records use the same keys (file names) as `imagenet2012`, and TFDS orders
   records by a hash of the key, so the copy lists the examples in the same order: a split string
   such as `train[:99%]` names the same images in both.
3. Writes DIR/imagenet2012_s256/content_hashes.tsv, a digest of every original image, which the
   leakage check between the splits reads instead of hashing the dataset at every run.
4. With `--mean_image`, also writes DIR/imagenet2012_s256/mean_image.npy, the mean 256x256 image
   (the paper subtracts it: `data.mean_mode='pixel'`) over `--mean_examples` training images.

A full-size ImageNet JPEG averages about 400x350 pixels and 110 KB; decoding it dominates the
input pipeline's cost (REFERENCE.md, "Throughput"). The copy keeps what the paper's pipeline uses
(the 256 rescale happens anyway) and decodes several times faster (scripts/bench_input.py).
Training picks the copy up by itself: `ImageNetSource` reads DIR/imagenet2012_s256 when it exists
(`data.prepared_dir`, '' = data dir; `data.use_prepared=False` opts out).

    python -m alexnet_jax.data.prepare --folder_root ROOT --mean_image [--out FILE.npy]

computes the mean image of an image folder's training split instead (for `dataset='folder'`).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path
from typing import ClassVar

import ml_collections
import numpy as np

from alexnet_jax.data import augment, folder, imagenet, leakage, random_access, tfds_common
from alexnet_jax.data.base import PREPARED_FILE_FORMATS, PREPARED_STORAGE

log = logging.getLogger(__name__)


def square_image(image_bytes, size: int, storage: str, quality: int):
    """Encoded image -> the copy's image: the central square, resized to `size` x `size`.

    The paper's "rescale the shorter side to 256, crop the central 256x256 patch" done once, here
    (`augment.decode_and_resize`: antialiased bilinear, as Pillow), so training only decodes.
    'jpeg' re-encodes at `quality` (a second lossy step); 'raw' keeps the uint8 pixels exactly
    (196,608 bytes per image: about 250 GB for ImageNet's train split).
    """
    tf = tfds_common.import_tf()
    image = augment.decode_and_resize(image_bytes, size, antialias=True)
    return tf.io.encode_jpeg(image, quality=quality) if storage == "jpeg" else image


def _copy_builder_class():
    import tensorflow_datasets as tfds

    class Imagenet2012S256(tfds.core.GeneratorBasedBuilder, skip_registration=True):
        """`imagenet2012` with every image resized to a 256 shorter side (see module doc)."""

        name = imagenet.PREPARED_NAME
        VERSION = tfds.core.Version(imagenet.PREPARED_VERSION)
        RELEASE_NOTES: ClassVar = {imagenet.PREPARED_VERSION: "Shorter side 256, re-encoded."}

        def __init__(
            self, *, source, size: int = 256, storage: str = "jpeg", quality: int = 90, **kwargs
        ):
            self._source = source
            # split -> [(file name, digest of the source's encoded image)] in generation order,
            # for the leakage check's sidecar (see prepare_copy); filled as the copy is written.
            self.digests: dict[str, list[tuple[str, str]]] = {}
            self._size, self._storage, self._quality = size, storage, quality
            super().__init__(**kwargs)

        def _info(self):
            names = self._source.info.features["label"].names
            return tfds.core.DatasetInfo(
                builder=self,
                description=(
                    f"{self._source.name}: central square resized to {self._size}x{self._size}, "
                    f"stored as {self._storage}"
                    + (f" (quality {self._quality})." if self._storage == "jpeg" else ".")
                ),
                features=tfds.features.FeaturesDict(
                    {
                        "image": image_feature(self._storage, self._size),
                        "label": tfds.features.ClassLabel(names=names),
                        "file_name": tfds.features.Text(),
                    }
                ),
                supervised_keys=("image", "label"),
            )

        def _split_generators(self, dl_manager):
            del dl_manager
            return {split: self._generate_examples(split) for split in self._source.info.splits}

        def _generate_examples(self, split):
            tf = tfds_common.import_tf()
            ds = self._source.as_dataset(
                split=split,
                shuffle_files=False,
                decoders={"image": tfds.decode.SkipDecoding()},
                read_config=tfds.ReadConfig(try_autocache=False),
            )
            ds = ds.map(
                lambda ex: (
                    ex["file_name"],
                    square_image(ex["image"], self._size, self._storage, self._quality),
                    ex["label"],
                    ex["image"],  # the original bytes, hashed here: they are read anyway
                ),
                num_parallel_calls=tf.data.AUTOTUNE,
            )
            digests = self.digests.setdefault(split, [])
            digests.clear()  # a split generated twice must not list its images twice
            for name, image, label, original in ds.as_numpy_iterator():
                key = name.decode()
                digests.append((key, leakage.digest(original)))
                yield key, {"image": image, "label": int(label), "file_name": key}

    return Imagenet2012S256


def image_feature(storage: str, size: int):
    """The copy's image feature: a JPEG, or the raw uint8 pixels."""
    import tensorflow_datasets as tfds

    if storage == "jpeg":
        return tfds.features.Image(encoding_format="jpeg")
    # Stored as one bytes string, read back with one decode_raw: the default encoding stores a
    # uint8 tensor as 196,608 varints, which parse 2.5x slower than the JPEG copy decodes.
    # (Copies written before keep their own encoding: the loader reads it from the copy.)
    return tfds.features.Tensor(
        shape=(size, size, 3), dtype=np.uint8, encoding=tfds.features.Encoding.BYTES
    )


def prepare_copy(data: ml_collections.ConfigDict, out: str) -> Path:
    """Prepares `imagenet2012` if need be, then writes the copy under `out`; returns its path.

    `data.prepare_storage` ('jpeg' at `data.prepare_quality`, or 'raw'), `data.resize_size`
    and `data.prepared_file_format` ('array_record': random access, so a resumed run reads
    nothing before its step; 'tfrecord') say what is written.
    """
    tfds_common.import_tf()
    import tensorflow_datasets as tfds

    source = imagenet.full_size_builder(data, ["train", "validation"])
    builder = _copy_builder_class()(
        source=source,
        size=int(data.get("resize_size", 256)),
        storage=data.get("prepare_storage", "jpeg"),
        quality=int(data.get("prepare_quality", 90)),
        file_format=data.get("prepared_file_format", "array_record"),
        data_dir=out,
    )
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(try_download_gcs=False)
    )
    write_hashes_sidecar(builder, source)
    return Path(builder.data_dir)


def write_hashes_sidecar(copy, source) -> Path:
    """Writes the leakage check's digests next to the copy (`imagenet.HASHES_FILE`).

    The digests are of the *original* encoded images, so the check finds what it would find on
    the full-size set. Each split's rows are in record order: the generator reads the source in
    its record order and the copy keeps it (same keys, module docstring). For a copy that was
    prepared before (nothing generated now) and has no sidecar, the source is hashed once here.
    """
    path = imagenet.hashes_path(copy.data_dir)
    splits = copy.info.splits
    generated = {s: copy.digests.get(s, []) for s in splits}
    if all(len(generated[s]) == splits[s].num_examples for s in splits):
        imagenet.write_hashes(path, generated)
    elif not path.exists():
        log.info("Hashing the images of %s for the leakage check (one pass)", source.name)
        imagenet.write_hashes(path, {s: imagenet.hash_records(source, s) for s in splits})
    return path


def mean_image(records, size: int, limit: int) -> np.ndarray:
    """The mean of the first `limit` images after the paper's rescale + central crop."""
    tf = tfds_common.import_tf()
    ds = records.take(limit).map(
        lambda b: augment.decode_and_resize(b, size), num_parallel_calls=tf.data.AUTOTUNE
    )
    total, count = np.zeros((size, size, 3)), 0
    for batch in ds.ignore_errors().batch(64).as_numpy_iterator():
        total += batch.sum(0, dtype=np.float64)
        count += len(batch)
    if count == 0:
        raise ValueError("no images to average")
    return (total / count).astype(np.float32)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data_dir", default="", help="TFDS data dir ('' = TFDS's default)")
    parser.add_argument("--manual_dir", default="", help="the ILSVRC2012 tars")
    parser.add_argument("--out", default="", help="where the copy goes ('' = data_dir)")
    parser.add_argument("--quality", type=int, default=90, help="JPEG quality of the copy")
    parser.add_argument("--storage", choices=PREPARED_STORAGE, default="jpeg", help="jpeg or raw")
    parser.add_argument("--file_format", choices=PREPARED_FILE_FORMATS, default="array_record")
    parser.add_argument("--mean_image", action="store_true", help="also write mean_image.npy")
    parser.add_argument("--mean_examples", type=int, default=50_000)
    parser.add_argument("--mean_split", default="train[:99%]", help="TFDS split to average")
    parser.add_argument("--resize_size", type=int, default=256, help="= data.resize_size")
    parser.add_argument("--folder_root", default="", help="mean image of an image folder")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    tf = tfds_common.import_tf()
    from alexnet_jax.errors import UsageError

    try:
        if args.folder_root:
            if not args.mean_image:
                parser.error("--folder_root only computes a mean image: add --mean_image")
            paths, _ = folder.list_images(os.path.join(args.folder_root, "train"))
            records = tf.data.Dataset.from_tensor_slices(paths).map(tf.io.read_file)
            mean = mean_image(records, args.resize_size, args.mean_examples)
            out = args.out or os.path.join(args.folder_root, "mean_image.npy")
            np.save(out, mean)
            print(
                f"mean image: {out}  (use --config.data.mean_mode=pixel "
                f"--config.data.mean_image_path={out})"
            )
            return 0
        data = ml_collections.ConfigDict(
            {
                "data_dir": args.data_dir,
                "manual_dir": args.manual_dir,
                "resize_size": args.resize_size,
                "prepare_storage": args.storage,
                "prepare_quality": args.quality,
                "prepared_file_format": args.file_format,
            }
        )
        if not 1 <= args.quality <= 100:
            raise UsageError(f"--quality must be in [1, 100]; got {args.quality}")
        out = args.out or imagenet.data_dir(data)
        path = prepare_copy(data, out)
        print(f"prepared copy: {path}")
        if args.mean_image:
            import tensorflow_datasets as tfds

            builder = tfds.builder_from_directory(str(path))
            decoders = None
            if isinstance(builder.info.features["image"], tfds.features.Image):
                decoders = {"image": tfds.decode.SkipDecoding()}
            records = random_access.as_dataset(builder, args.mean_split, decoders=decoders)
            records = records.map(lambda ex: ex["image"])
            mean = mean_image(records, args.resize_size, args.mean_examples)
            target = path.parent / imagenet.MEAN_IMAGE_FILE
            np.save(target, mean)
            print(f"mean image: {target}  (used by --config.data.mean_mode=pixel)")
        extra = "" if out == imagenet.data_dir(data) else f" --config.data.prepared_dir={out}"
        print(f"training reads the copy by itself{extra and ' with' + extra}")
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

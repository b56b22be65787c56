"""Time to the first training batch when resuming near the end of an epoch, vs at its start.

    python scripts/bench_resume.py [--images 20000] [--batch 128] [--json PATH]

Writes a prepared copy of `--images` synthetic JPEGs (16x16 random content resized to 256x256,
quality 90: small and fast to make) twice, in TFRecord files (sequential: the stream skips the
epoch's earlier records and refills its shuffle buffer) and in ArrayRecord files (random access,
`alexnet_jax/data/random_access.py`), and times `ImageNetSource(...)` plus the first batch of
`train_batches(start_step=k)` for k = 0 and k = steps_per_epoch - 2. One JSON line per case.
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import ClassVar

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from alexnet_jax.data import imagenet, tfds_common
from experiments.imagenet import get_config


def jpegs(n: int, seed: int = 0) -> list[bytes]:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        small = Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8))
        buf = io.BytesIO()
        small.resize((256, 256), Image.BILINEAR).save(buf, "JPEG", quality=90)
        out.append(buf.getvalue())
    return out


def write_copy(root: Path, photos: list[bytes], file_format: str) -> None:
    """A dataset laid out as `prepare` writes it (name, version, features), from `photos`."""
    import tensorflow_datasets as tfds

    names = _synsets()

    class Copy(tfds.core.GeneratorBasedBuilder, skip_registration=True):
        name = imagenet.PREPARED_NAME
        VERSION = tfds.core.Version(imagenet.PREPARED_VERSION)
        RELEASE_NOTES: ClassVar = {imagenet.PREPARED_VERSION: "synthetic"}

        def _info(self):
            return tfds.core.DatasetInfo(
                builder=self,
                features=tfds.features.FeaturesDict(
                    {
                        "image": tfds.features.Image(encoding_format="jpeg"),
                        "label": tfds.features.ClassLabel(names=names),
                        "file_name": tfds.features.Text(),
                    }
                ),
            )

        def _split_generators(self, dl_manager):
            return {
                "train": self._generate_examples(photos),
                "validation": self._generate_examples(photos[:64]),
            }

        def _generate_examples(self, items):
            for i, photo in enumerate(items):
                yield f"img_{i:06d}", {"image": photo, "label": i % 1000, "file_name": f"{i}"}

    builder = Copy(data_dir=str(root), file_format=file_format)
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(try_download_gcs=False)
    )


def _synsets() -> list[str]:
    import tensorflow_datasets as tfds

    return tfds.core.tfds_path("datasets/imagenet2012/labels.txt").read_text().split()


def time_start(root: Path, batch: int, start_step: int) -> tuple[float, float]:
    """(seconds to build the source, seconds from there to the first batch)."""
    c = get_config()
    c.data.prepared_dir = str(root)
    c.data.train_split, c.data.val_split, c.data.test_split = "train", "train[:1]", "validation"
    t0 = time.perf_counter()
    source = imagenet.ImageNetSource(c)
    t1 = time.perf_counter()
    batches = source.train_batches(batch, seed=0, start_step=start_step)
    next(batches)
    t2 = time.perf_counter()
    batches.close()
    return t1 - t0, t2 - t1


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=20_000)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=2, help="report the best round")
    parser.add_argument("--json", default="", help="append one JSON line per case here")
    parser.add_argument("--write_only", default="", help="only write an ArrayRecord copy here")
    args = parser.parse_args()
    tfds_common.import_tf()
    photos = jpegs(args.images)
    if args.write_only:  # a prepared copy for a real training run (scripts/gpu_check.sh)
        write_copy(Path(args.write_only), photos, "array_record")
        return
    steps_per_epoch = args.images // args.batch
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for fmt in ("tfrecord", "array_record"):
            root = Path(tmp) / fmt
            write_copy(root, photos, fmt)
            for label, step in (("epoch_start", 0), ("near_epoch_end", steps_per_epoch - 2)):
                best = min(
                    (time_start(root, args.batch, step) for _ in range(args.rounds)),
                    key=sum,
                )
                rows.append(
                    {
                        "file_format": fmt,
                        "case": label,
                        "start_step": step,
                        "source_s": round(best[0], 3),
                        "first_batch_s": round(best[1], 3),
                        "total_s": round(sum(best), 3),
                        "images": args.images,
                        "batch": args.batch,
                    }
                )
                print(json.dumps(rows[-1]), flush=True)
    for fmt in ("tfrecord", "array_record"):
        start, end = (r["total_s"] for r in rows if r["file_format"] == fmt)
        print(f"{fmt}: resume near the end / start of an epoch = {end / start:.2f}x")
    if args.json:
        with open(args.json, "a") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)


if __name__ == "__main__":
    main()

"""Input-pipeline throughput, images/s on one CPU core: the training path vs full-size vs PIL.

    python scripts/bench_input.py [--images 512] [--batch 16] [--cores 1] [--rounds 2] [--json P]

There is no ImageNet here, so the script makes its own: `--images` synthetic photographs
(500x375 by default, about ImageNet's average, smooth colour fields plus texture, JPEG quality 90),
written as ILSVRC-2012 tars. Then, the same way a real run does, one pipeline per row:
- `train`: the default training path: `alexnet_jax.data.prepare` writes the 256x256 copy (JPEG q90,
  ArrayRecord) and `ImageNetSource` streams it: records by index, decode, uint8 256x256 batches
  (the device step augments; `data.augment_on='device'`);
- `copy_host_augment`: the same copy, augmented on the host (`data.augment_on='host'`: random crop,
  flip, lighting, mean in tf.data; float32 224x224 batches);
- `full_jpeg`, `full_jpeg_host_augment`, `full_jpeg_no_antialias`: the full-size TFDS records
  (decode, antialiased rescale to 256, crop; host or device augmentation; plain bilinear);
- `pil_copy`, `pil_full`: a PIL/torchvision-style baseline doing the same per-image work in Python
  (PIL decode, shorter side to 256, central crop, random 224 crop, flip, lighting and mean in
  numpy) on the same copy / the full-size JPEGs.
`--json PATH` writes one JSON object per line per pipeline with `pipeline`,
`images_per_sec_per_core` and `bytes_per_example` (the image bytes the host hands the device per
example; `bytes_per_example_all` adds the label and slot).
The timed part runs with every thread pinned to `--cores` cores (default 1), so the numbers read
as images/s per core; the preparation before it uses every core. One pipeline runs at a time, and
each row is the best of `--rounds` rounds, since other load on a shared machine only slows a round
down. Multiply by the cores of a training host to see whether the input keeps up with the
accelerators (REFERENCE.md, "Throughput"); tf.data spreads over the cores by itself, while the PIL
baseline needs one worker process per core (torch's DataLoader does that).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from alexnet_jax.data import augment, imagenet, prepare, random_access, tfds_common
from experiments.imagenet import get_config


def synthetic_photo(rng: np.random.Generator, width: int, height: int) -> bytes:
    """A JPEG with a photograph's statistics, roughly: large smooth regions, edges, fine texture."""
    image = np.zeros((height, width, 3), np.float32)
    for cells, amplitude in ((4, 90.0), (16, 40.0), (64, 20.0)):  # octaves of smooth noise
        coarse = rng.normal(0, amplitude, (cells * height // width + 2, cells + 2, 3))
        for c in range(3):
            layer = Image.fromarray(coarse[..., c].astype(np.float32), mode="F")
            image[..., c] += np.asarray(layer.resize((width, height), Image.BICUBIC))
    image += rng.normal(0, 20, image.shape)  # texture: brings the size to ImageNet's ~110 KB
    image = np.clip(image + rng.uniform(60, 190, 3), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def write_tars(manual: Path, photos: list[bytes], synsets: list[str], val_labels: list[str]):
    """ILSVRC layout: train tar of per-synset tars; val tar of ILSVRC2012_val_%08d.JPEG."""
    manual.mkdir(parents=True)
    with tarfile.open(manual / imagenet.TARS["train"], "w") as outer:
        for k, synset in enumerate(synsets):
            inner = io.BytesIO()
            with tarfile.open(fileobj=inner, mode="w") as tar:
                for i, photo in enumerate(photos[k :: len(synsets)]):
                    _add(tar, f"{synset}_{i}.JPEG", photo)
            _add(outer, f"{synset}.tar", inner.getvalue())
    with tarfile.open(manual / imagenet.TARS["validation"], "w") as tar:
        for i in range(len(val_labels)):
            _add(tar, f"ILSVRC2012_val_{i + 1:08d}.JPEG", photos[i])


WARMUP = 4  # batches before the clock starts


def pin_process(count: int) -> list[int]:
    """Restricts every thread of this process (TF's pools included) to the first `count` cores.

    `sched_setaffinity(0, ...)` alone would pin only the calling thread; threads that TF starts
    later inherit the mask of the (pinned) thread that starts them.
    """
    cores = sorted(os.sched_getaffinity(0))[:count]
    for tid in os.listdir("/proc/self/task"):
        try:
            os.sched_setaffinity(int(tid), cores)
        except ProcessLookupError:  # the thread has ended meanwhile
            pass
    return cores


class Clock:
    """Wall time and this process's CPU time (all threads) of a timed block."""

    def __enter__(self):
        self.wall, self.cpu = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc):
        self.wall = time.perf_counter() - self.wall
        self.cpu = time.process_time() - self.cpu


def time_stream(batches, batch: int, steps: int) -> tuple[float, float, float, float]:
    """(images/s, CPU seconds per wall second, image bytes and all bytes per example) over
    `steps` batches; the bytes are what the host hands the device."""
    with Clock() as clock:
        for _ in range(steps):
            last = next(batches)
    image = last["image"].nbytes / batch
    total = sum(np.asarray(v).nbytes for v in last.values()) / batch
    return steps * batch / clock.wall, clock.cpu / clock.wall, image, total


def pil_baseline(
    photos: list[bytes], cfg: augment.AugmentConfig, count: int
) -> tuple[float, float]:
    """torchvision-style per-image work in Python: the same operations, PIL + numpy."""
    rng = np.random.default_rng(0)
    eigvec = np.array(cfg.pca_eigvec, np.float32)
    sigmas = cfg.lighting_sigmas()
    mean = np.array(cfg.mean_rgb, np.float32)
    r, s = cfg.resize_size, cfg.image_size
    with Clock() as clock:
        for i in range(count):
            image = Image.open(io.BytesIO(photos[i % len(photos)])).convert("RGB")
            w, h = image.size
            scale = r / min(w, h)
            size = (max(r, round(w * scale)), max(r, round(h * scale)))
            image = image.resize(size, Image.BILINEAR)  # antialiased when downscaling
            left, top = (image.width - r) // 2, (image.height - r) // 2
            x, y = rng.integers(0, r - s + 1, 2)
            image = image.crop((left + x, top + y, left + x + s, top + y + s))
            if rng.random() < 0.5:
                image = image.transpose(Image.FLIP_LEFT_RIGHT)
            array = np.asarray(image, np.float32)
            array = array + eigvec @ (rng.normal(0, cfg.pca_std, 3) * sigmas) - mean
    # What it would hand a device: the float32 crop per example.
    nbytes = float(array.astype(np.float32).nbytes)
    return count / clock.wall, clock.cpu / clock.wall, nbytes, nbytes + 4.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=512)
    parser.add_argument("--width", type=int, default=500)
    parser.add_argument("--height", type=int, default=375)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--steps", type=int, default=24, help="timed batches per round")
    parser.add_argument("--rounds", type=int, default=2, help="report the best round")
    parser.add_argument("--cores", type=int, default=1, help="cores the timed part may use")
    parser.add_argument("--json", default="", help="write one JSON line per pipeline here")
    args = parser.parse_args()
    tfds_common.import_tf()

    rng = np.random.default_rng(0)
    photos = [synthetic_photo(rng, args.width, args.height) for _ in range(args.images)]
    synsets = _tfds_lines("labels.txt")[:10]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        write_tars(tmp / "manual", photos, synsets, _tfds_lines("validation_labels.txt")[:10])
        c = get_config()
        c.data.data_dir, c.data.manual_dir = str(tmp / "tfds"), str(tmp / "manual")
        c.data.train_split, c.data.val_split, c.data.test_split = "train", "train[:1]", "validation"
        imagenet.ImageNetSource(c)  # prepares imagenet2012 from the tars
        copy_dir = prepare.prepare_copy(c.data, str(tmp / "copy"))
        c.data.prepared_dir = str(tmp / "copy")
        copy = imagenet.ImageNetSource(c)  # the default training path: device augmentation
        copy_bytes = sum(f.stat().st_size for f in copy_dir.glob("*-train.*"))
        c.data.augment_on = "host"
        copy_host = imagenet.ImageNetSource(c)
        c.data.augment_on = "device"
        c.data.prepare_storage, c.data.prepared_dir = "raw", str(tmp / "raw")
        prepare.prepare_copy(c.data, str(tmp / "raw"))
        copy_raw = imagenet.ImageNetSource(c)  # the raw uint8 copy: no decode at all
        c.data.prepare_storage = "jpeg"
        c.data.prepared_dir, c.data.use_prepared = "", False
        full = imagenet.ImageNetSource(c)
        c.data.augment_on = "host"
        full_host = imagenet.ImageNetSource(c)

        c.data.resize_antialias = False
        plain = imagenet.ImageNetSource(c)
        small = _copy_images(copy_dir)

        cores = pin_process(args.cores)  # from here on: images/s on `cores`
        # Steady state, as in a real epoch of 10,000 steps: the timed batches lie inside the
        # first epoch, and the next epoch's pipeline is not opened during them.
        if (WARMUP + args.steps) * args.batch > args.images:
            parser.error(f"--images must be at least (--steps + {WARMUP}) * --batch")
        tfds_common.LOOKAHEAD_STEPS = 1
        cfg = augment.AugmentConfig.from_config(get_config().data)
        steps = args.steps
        # name -> (what it is, source); `train` is what a default run reads.
        sources = {
            "train": ("prepared copy, ArrayRecord, decode on host, augment on device", copy),
            "train_raw": ("raw uint8 copy (prepare --storage raw), augment on device", copy_raw),
            "copy_host_augment": ("prepared copy, augment on host (augment_on=host)", copy_host),
            "full_jpeg": ("full-size JPEG (TFDS records), augment on device", full),
            "full_jpeg_host_augment": ("full-size JPEG, augment on host", full_host),
            "full_jpeg_no_antialias": ("full-size JPEG, host, resize_antialias=False", plain),
        }
        pil = {
            "pil_full": ("PIL + numpy baseline, full-size JPEG", photos),
            "pil_copy": ("PIL + numpy baseline, the same prepared copy", small),
        }
        # One pipeline alive at a time (a stream that is not being read keeps filling its
        # buffers and would steal the core); best of --rounds against other load on the machine.
        rows: dict[str, tuple[float, float, float, float]] = {}
        for _ in range(args.rounds):
            for name, (_, source) in sources.items():
                batches = source.train_batches(args.batch, seed=0)
                for _ in range(WARMUP):  # functions traced, shuffle buffer full
                    next(batches)
                rate = time_stream(batches, args.batch, steps)
                batches.close()
                rows[name] = max(rows.get(name, (0.0, 0.0)), rate)
            for name, (_, images) in pil.items():
                rate = pil_baseline(images, cfg, steps * args.batch)
                rows[name] = max(rows.get(name, (0.0, 0.0)), rate)

    n = len(cores)
    print(
        f"{args.images} synthetic {args.width}x{args.height} JPEGs, "
        f"{np.mean([len(p) for p in photos]) / 1e3:.0f} KB average full-size, "
        f"{copy_bytes / len(photos) / 1e3:.0f} KB in the copy; batch {args.batch}; "
        f"best of {args.rounds} rounds of {steps} batches; {n} of {os.cpu_count()} cores"
    )
    # cpu/wall: CPU seconds this process used per second (at most the cores it may use; less
    # when other processes take part of them).
    print(f"{'pipeline':24s} {'images/s':>9s} {'per core':>9s} {'cpu/wall':>9s} {'bytes/ex':>9s}")
    what = {k: v[0] for k, v in (sources | pil).items()}
    lines = []
    for name, (rate, busy, image_bytes, all_bytes) in rows.items():
        row = f"{name:24s} {rate:9.0f} {rate / n:9.0f} {busy:9.2f} {image_bytes:9.0f}"
        print(f"{row}  {what[name]}")
        lines.append(
            {
                "pipeline": name,
                "description": what[name],
                "images_per_sec": round(rate, 1),
                "images_per_sec_per_core": round(rate / n, 1),
                "cores": n,
                "cpu_per_wall": round(busy, 3),
                "bytes_per_example": int(image_bytes),  # the image the device receives
                "bytes_per_example_all": int(all_bytes),  # + label (and the slot)
                "batch": args.batch,
                "rounds": args.rounds,
            }
        )
    ratio = rows["train"][0] / rows["pil_copy"][0]
    print(f"train / pil_copy per core: {ratio:.2f}x")
    if args.json:
        with open(args.json, "w") as f:
            f.writelines(json.dumps(line) + "\n" for line in lines)


def _tfds_lines(name: str) -> list[str]:
    import tensorflow_datasets as tfds

    return tfds.core.tfds_path(f"datasets/imagenet2012/{name}").read_text().split()


def _copy_images(path: Path) -> list[bytes]:
    import tensorflow_datasets as tfds

    ds = random_access.as_dataset(
        tfds.builder_from_directory(str(path)),
        "train",
        decoders={"image": tfds.decode.SkipDecoding()},
    )
    return [bytes(ex["image"]) for ex in tfds.as_numpy(ds)]


if __name__ == "__main__":
    main()

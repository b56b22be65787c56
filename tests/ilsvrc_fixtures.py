"""Writes tiny ILSVRC-2012-shaped tar files for the real TFDS `imagenet2012` builder.

The layout is the one image-net.org ships and the builder expects:
- `ILSVRC2012_img_train.tar` holds one tar per synset, `nXXXXXXXX.tar`, each holding
  `nXXXXXXXX_N.JPEG` files (the builder takes the label from the inner tar's name);
- `ILSVRC2012_img_val.tar` holds `ILSVRC2012_val_%08d.JPEG` files. Their labels are not in the
  tar: the builder zips the *sorted* file names with the first lines of the
  `validation_labels.txt` it bundles, so the fixture reads that file to know which class each
  validation image belongs to, and paints it accordingly.

Like the real set, the train tar holds a CMYK JPEG and a PNG saved under a `.JPEG` name, at file
names the builder repairs by name (`CMYK_IMAGES`, `PNG_IMAGES` in the builder module), and a
grayscale JPEG (real ImageNet has many; decoding with `channels=3` handles them).

Every image of a class is its class colour plus noise, so a test can check that an image and its
label travel together through the whole pipeline.
"""

from __future__ import annotations

import colorsys
import dataclasses
import io
import random
import tarfile
from pathlib import Path

import numpy as np
from PIL import Image

TRAIN_TAR = "ILSVRC2012_img_train.tar"
VAL_TAR = "ILSVRC2012_img_val.tar"

# Synsets chosen so that the builder's by-name repairs are exercised.
CMYK_FILE = "n01739381_1309.JPEG"  # in the builder's CMYK_IMAGES list
PNG_FILE = "n02105855_2933.JPEG"  # the builder's PNG_IMAGES entry
GRAY_FILE = "n01440764_1.JPEG"
SYNSETS = ("n01440764", "n01739381", "n02105855", "n04596742")


def _tfds_text(name: str) -> list[str]:
    import tensorflow_datasets as tfds

    path = tfds.core.tfds_path(f"datasets/imagenet2012/{name}")
    return path.read_text().strip().splitlines()


def label_names() -> list[str]:
    """The 1000 synset ids in TFDS's label order (label i is line i)."""
    return _tfds_text("labels.txt")


def validation_labels() -> list[str]:
    """The synset of each official validation image, in sorted-file-name order."""
    return _tfds_text("validation_labels.txt")


def class_color(synset: str) -> tuple[int, int, int]:
    """A distinct, saturated RGB colour per synset (golden-ratio hues)."""
    index = label_names().index(synset)
    r, g, b = colorsys.hsv_to_rgb((index * 0.618034) % 1.0, 0.75, 0.85)
    return round(r * 255), round(g * 255), round(b * 255)


def class_image(synset: str, rng: np.random.Generator, size: tuple[int, int]) -> np.ndarray:
    """An RGB uint8 image (h, w, 3): the class colour plus mild noise."""
    h, w = size
    noise = rng.integers(-12, 13, size=(h, w, 3))
    return np.clip(np.array(class_color(synset)) + noise, 0, 255).astype(np.uint8)


def _encode(array: np.ndarray, mode: str = "RGB", fmt: str = "JPEG") -> bytes:
    image = Image.fromarray(array)
    if mode != "RGB":
        image = image.convert(mode)
    buf = io.BytesIO()
    image.save(buf, fmt, **({"quality": 95} if fmt == "JPEG" else {}))
    return buf.getvalue()


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


@dataclasses.dataclass(frozen=True)
class IlsvrcFixture:
    manual_dir: Path
    train: dict[str, str]  # file name -> synset
    val: dict[str, str]  # file name -> synset, as the builder assigns it
    duplicate: tuple[str, str] | None = None  # (train file, val file) with the same bytes

    def special(self) -> dict[str, str]:
        """The files that the real set has and the builder treats specially."""
        return {"cmyk": CMYK_FILE, "png": PNG_FILE, "gray": GRAY_FILE}


def write_ilsvrc_tars(
    manual_dir: Path,
    *,
    images_per_class: int = 5,
    num_val: int = 10,
    seed: int = 0,
    duplicate: bool = False,
) -> IlsvrcFixture:
    """Writes both tars into `manual_dir`; images are 40..72 px on a side, of mixed aspect.

    With `duplicate`, the first validation image's JPEG bytes are also in the train tar, as one
    more image of the first synset (`IlsvrcFixture.duplicate` names both files): the leakage
    check must find it. Its colour is that of its validation class, not of its training one.
    All other images are the same bytes with and without `duplicate`.
    """
    manual_dir = Path(manual_dir)
    manual_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)

    def size() -> tuple[int, int]:
        return int(rng.integers(40, 73)), int(rng.integers(40, 73))

    labels = validation_labels()
    val = {f"ILSVRC2012_val_{i:08d}.JPEG": labels[i - 1] for i in range(1, num_val + 1)}
    planted, planted_bytes = None, b""
    if duplicate:  # its own rng, so that the other images keep their bytes
        planted = (f"{SYNSETS[0]}_{images_per_class + 100}.JPEG", next(iter(val)))
        image = class_image(val[planted[1]], np.random.default_rng([seed, 1]), (48, 56))
        planted_bytes = _encode(image)

    train: dict[str, str] = {}
    with tarfile.open(manual_dir / TRAIN_TAR, "w") as outer:
        for synset in SYNSETS:
            files: dict[str, bytes] = {}
            for n in range(1, images_per_class + 1):
                files[f"{synset}_{n}.JPEG"] = _encode(class_image(synset, rng, size()))
            if synset == GRAY_FILE.split("_")[0]:
                files[GRAY_FILE] = _encode(class_image(synset, rng, size()), mode="L")
            if synset == CMYK_FILE.split("_")[0]:
                files[CMYK_FILE] = _encode(class_image(synset, rng, size()), mode="CMYK")
            if synset == PNG_FILE.split("_")[0]:
                files[PNG_FILE] = _encode(class_image(synset, rng, size()), fmt="PNG")
            if planted and synset == SYNSETS[0]:
                files[planted[0]] = planted_bytes
            inner = io.BytesIO()
            with tarfile.open(fileobj=inner, mode="w") as tar:
                for name, data in files.items():
                    _add(tar, name, data)
                    train[name] = synset
            _add(outer, f"{synset}.tar", inner.getvalue())

    order = list(val)
    random.Random(seed).shuffle(order)  # the builder must not rely on the order in the tar
    with tarfile.open(manual_dir / VAL_TAR, "w") as tar:
        for name in order:
            data = _encode(class_image(val[name], rng, size()))
            _add(tar, name, planted_bytes if planted and name == planted[1] else data)
    return IlsvrcFixture(manual_dir=manual_dir, train=train, val=val, duplicate=planted)

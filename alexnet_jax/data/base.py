"""The interface every data source implements.

A source yields *host* batches: numpy arrays holding this process's share of the global batch.
`alexnet_jax.parallel` reshapes them to `(local_devices, per_device, ...)` and moves them to
the devices. Sources never see devices, so each can be tested alone.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from typing import Any, Protocol

import chex
import numpy as np

Batch = dict[str, np.ndarray]
# An image file's path -> the model's input ([H, W, 3], or [crops, H, W, 3]); and the class names.
Preprocess = Callable[[str], np.ndarray]
Predictor = tuple[Preprocess, tuple[str, ...]]

# The choices of the `data` block that every TensorFlow source reads (augment.py applies them).
PCA_SCALES = ("eigval", "sqrt_eigval")  # on [0, 1] pixels (paper as printed) / on 0-255 (cc2)
MEAN_MODES = ("channel", "pixel", "none")  # mean RGB / the paper's mean image / nothing
FOLDER_SCANS = ("decode", "none")  # screen out unreadable images at start, or not
# Where crops, flips, lighting and mean run: in the device step (host sends uint8) or on the host.
AUGMENT_ON = ("device", "host")
PREPARED_STORAGE = ("jpeg", "raw")  # how the prepared copy stores its 256x256 images
PREPARED_FILE_FORMATS = ("array_record", "tfrecord")  # random access / sequential only

# The largest image file that --mode predict decodes: 20000x20000 would need 1.2 GB as uint8 RGB
# (a decompression bomb); ImageNet's largest photo has under 20 megapixels.
MAX_PREDICT_PIXELS = 100_000_000


_SIXTEEN_BIT = ("I;16", "I;16B", "I;16L", "I")  # PIL's modes of 16-bit grey PNGs


def read_rgb(path: str) -> np.ndarray:
    """`read_if_16_bit`, with 8-bit images converted by PIL too."""
    pixels = read_if_16_bit(path, convert=True)
    assert pixels is not None
    return pixels


def read_if_16_bit(path: str, *, convert: bool = False) -> np.ndarray | None:
    """An image file as uint8 RGB through PIL, for --mode predict: exit 2 (UsageError) with one
    line for an unreadable file or a decompression bomb (checked from the header, before any
    decoding); 16-bit images are scaled to 0-255, not clipped as `convert('RGB')` does. With
    `convert` False, None for an 8-bit image (the caller decodes those itself)."""
    from PIL import Image, UnidentifiedImageError

    from alexnet_jax.errors import UsageError

    try:
        with Image.open(path) as image:
            w, h = image.size
            if w * h > MAX_PREDICT_PIXELS:
                raise UsageError(
                    f"{path} is {w}x{h} pixels, more than --mode predict decodes "
                    f"({MAX_PREDICT_PIXELS:,}); resize it first"
                )
            if image.mode in _SIXTEEN_BIT:
                grey = np.clip(np.round(np.asarray(image, np.float64) / 257.0), 0, 255)
                return np.repeat(grey.astype(np.uint8)[..., None], 3, axis=-1)
            if not convert:
                return None
            return np.asarray(image.convert("RGB"))
    except (UnidentifiedImageError, OSError, Image.DecompressionBombError) as e:
        raise UsageError(f"cannot decode {path}: {e}") from None


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
    """What the model and the training loop need to know about a dataset."""

    num_classes: int
    image_shape: tuple[int, int, int]  # (height, width, channels) of the model input
    num_examples: dict[str, int]  # keys 'train', 'val', 'test'
    class_names: tuple[str, ...] | None = None
    # data/device_augment.DeviceAugment when the device step augments (the host sends uint8 at
    # resize_size, with each example's global `slot`); None when batches are the model's input.
    device_augment: Any = None

    def label_names(self) -> tuple[str, ...]:
        """The class names, or the labels as text where the dataset has none (synthetic)."""
        if self.class_names is not None:
            return tuple(self.class_names)
        return tuple(str(i) for i in range(self.num_classes))


class Source(Protocol):
    """A dataset with a training stream and finite, exactly-counted evaluation splits."""

    info: DatasetInfo

    def train_batches(self, batch_size: int, *, seed: int, start_step: int = 0) -> Iterator[Batch]:
        """Infinite stream of `{'image': float32 [B,H,W,C], 'label': int32 [B]}`.

        `batch_size` is this process's share of the global batch. Item k of the stream is the
        batch for step `start_step + k`, so a resumed run sees the data an uninterrupted run
        would have seen.
        """
        ...

    def eval_batches(self, split: str, batch_size: int, *, crops: int = 1) -> Iterator[Batch]:
        """One pass over `split` ('val' or 'test'), this process's shard only.

        Adds `'mask'` (bool [B]): the last batch is padded to `batch_size` and its padding is
        masked out, so every example counts exactly once (Flax's ImageNet example drops the
        remainder instead). With `crops=10`, `'image'` is `[B, 10, H, W, C]`.
        """
        ...


def pad_batch(batch: Batch, batch_size: int) -> Batch:
    """Pads every array of `batch` along axis 0 to `batch_size` and adds a `'mask'`."""
    n = len(batch["label"])
    if n > batch_size:
        raise ValueError(f"batch of {n} is larger than {batch_size}")
    chex.assert_equal_shape_prefix(list(batch.values()), 1)  # one example per row, every key
    out = {}
    for key, value in batch.items():
        pad = np.zeros((batch_size - n, *value.shape[1:]), value.dtype)
        out[key] = np.concatenate([value, pad])
    out["mask"] = np.arange(batch_size) < n
    chex.assert_type(out["mask"], bool)
    return out


def eval_index_batches(num_examples: int, batch_size: int) -> list[np.ndarray]:
    """This process's example indices for one pass over a split, in batches of `batch_size`.

    Examples are dealt round-robin to processes. Every process gets the same number of batches
    (the pmapped step is a collective, so all must call it equally often); slots past the end
    hold -1, which sources turn into masked padding.
    """
    import jax  # the sources stay importable without initialising JAX at import time

    pid, count = jax.process_index(), jax.process_count()
    mine = np.arange(pid, num_examples, count)
    per_process = -(-num_examples // count)
    num_batches = max(-(-per_process // batch_size), 1)
    padded = np.full(num_batches * batch_size, -1, np.int64)
    padded[: len(mine)] = mine
    return list(padded.reshape(num_batches, batch_size))


def epoch_permutation(num_examples: int, seed: int, epoch: int) -> np.ndarray:
    """A fixed shuffle per (seed, epoch): the data order is a function of the step alone."""
    return np.random.default_rng([seed, epoch]).permutation(num_examples)

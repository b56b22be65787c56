"""The offline quickstart: scikit-learn's bundled 8x8 handwritten digits (1,797 images).

The 8x8 images are upsampled to `data.resize_size`, turned into RGB and randomly cropped to
`data.image_size`, mirroring the paper's 256 -> 224 crops (no flips: a mirrored 2 is not a 2).
The train/val/test split is a fixed function of `data.split_seed`, independent of the run's seed,
so that every run of a sweep is scored on the same held-out images.
"""

from __future__ import annotations

from collections.abc import Iterator

import ml_collections
import numpy as np

from alexnet_jax.data.base import (
    Batch,
    DatasetInfo,
    Predictor,
    epoch_permutation,
    eval_index_batches,
    read_rgb,
)
from alexnet_jax.data.device_augment import DeviceAugment, global_slots


def _upsample(images: np.ndarray, size: int) -> np.ndarray:
    """Bilinear resize of [N, h, w] to [N, size, size] (pixel centres aligned, like TF/PIL)."""
    h = images.shape[1]
    coords = (np.arange(size) + 0.5) * h / size - 0.5
    lo = np.clip(np.floor(coords).astype(int), 0, h - 1)
    hi = np.clip(lo + 1, 0, h - 1)
    frac = np.clip(coords - lo, 0.0, 1.0).astype(np.float32)
    rows = images[:, lo] * (1 - frac)[None, :, None] + images[:, hi] * frac[None, :, None]
    return rows[:, :, lo] * (1 - frac) + rows[:, :, hi] * frac


class DigitsSource:
    """Digits as a `Source`: whole splits in memory, batches cut by index."""

    def __init__(self, config: ml_collections.ConfigDict):
        from sklearn.datasets import load_digits  # bundled with scikit-learn: no download

        data = config.data
        digits = load_digits()
        images = digits.images.astype(np.float32) / 16.0
        labels = digits.target.astype(np.int32)
        order = np.random.default_rng(data.split_seed).permutation(len(labels))
        n_test = round(data.test_fraction * len(labels))
        n_val = round(data.val_fraction * len(labels))
        parts = {
            "test": order[:n_test],
            "val": order[n_test : n_test + n_val],
            "train": order[n_test + n_val :],
        }
        self._parts = parts  # indices into load_digits(), the example ids of content_hashes
        self._raw = digits.images  # 0..16 per pixel, 8x8: 0.9 MB, kept for content_hashes
        self._images = {k: _upsample(images[v], data.resize_size) for k, v in parts.items()}
        self._labels = {k: labels[v] for k, v in parts.items()}
        self._mean = float(self._images["train"].mean())  # one channel replicated 3 times
        self._size = data.image_size
        self._augment = data.augment
        # On the device (the default), the host sends the upsampled digit (float, 72x72, before
        # the mean) and the step cuts the crop: the same keyed crops as ImageNet's, so resume and
        # device-count tests cover device augmentation on the quickstart data. No flip (digits
        # are not mirror-symmetric) and no lighting (gray).
        self._on_device = data.get("augment_on", "device") == "device"
        spec = None
        if self._on_device:
            spec = DeviceAugment(
                image_size=self._size,
                resize_size=int(data.resize_size),
                augment=bool(data.augment),
                flip=False,
                mean_rgb=(self._mean,) * 3,
            )
        self.info = DatasetInfo(
            num_classes=10,
            image_shape=(self._size, self._size, 3),
            num_examples={k: len(v) for k, v in parts.items()},
            class_names=tuple(str(d) for d in range(10)),
            device_augment=spec,
        )

    @classmethod
    def file_predictor(cls, config: ml_collections.ConfigDict) -> Predictor:
        """An image file through PIL, then the source's own `preprocess`."""
        source = cls(config)

        def preprocess(path: str) -> np.ndarray:
            return source.preprocess(read_rgb(path))

        return preprocess, source.info.label_names()

    def content_hashes(self) -> dict[str, list[tuple[str, str]]]:
        """split -> [(index in load_digits(), digest of its raw 8x8 pixels)], for the leakage
        check. The raw pixels, before any resize: two digits are copies when these are equal."""
        from alexnet_jax.data.leakage import digest

        raw = self._raw.astype(np.uint8)  # exact: the values are the integers 0..16
        return {
            split: [(str(i), digest(raw[i].tobytes())) for i in idx]
            for split, idx in self._parts.items()
        }

    def _rgb(self, gray: np.ndarray) -> np.ndarray:
        return np.repeat((gray - self._mean)[..., None], 3, axis=-1)

    def _centre(self, gray: np.ndarray) -> np.ndarray:
        off = (gray.shape[1] - self._size) // 2
        return gray[:, off : off + self._size, off : off + self._size]

    def preprocess(self, image: np.ndarray) -> np.ndarray:
        """One image file's pixels (uint8 [H, W] or [H, W, C]) -> the eval input [H', W', 3].

        The eval pipeline of the data itself: grayscale in [0, 1], the central square upsampled
        to `data.resize_size`, the centre crop, minus the train mean. The digits are bright
        strokes on a dark ground, so an image with a bright border (ink on paper) is inverted.
        """
        gray = np.asarray(image, np.float32)
        if gray.ndim == 3:
            gray = gray[..., :3].mean(axis=-1)
        gray = gray / 255.0
        h, w = gray.shape
        side = min(h, w)
        gray = gray[(h - side) // 2 : (h + side) // 2, (w - side) // 2 : (w + side) // 2]
        border = np.concatenate([gray[0], gray[-1], gray[:, 0], gray[:, -1]])
        if border.mean() > 0.5:
            gray = 1.0 - gray
        resized = _upsample(gray[None], self._images["train"].shape[1])
        return self._rgb(self._centre(resized))[0]

    def train_batches(self, batch_size: int, *, seed: int, start_step: int = 0) -> Iterator[Batch]:
        import jax

        pid, count = jax.process_index(), jax.process_count()
        images, labels = self._images["train"], self._labels["train"]
        global_batch = batch_size * count
        steps_per_epoch = len(labels) // global_batch
        if steps_per_epoch == 0:
            raise ValueError(
                f"global batch {global_batch} exceeds the {len(labels)} training images"
            )
        step = start_step
        while True:
            epoch, i = divmod(step, steps_per_epoch)
            perm = epoch_permutation(len(labels), seed, epoch)
            idx = perm[i * global_batch : (i + 1) * global_batch][
                pid * batch_size : (pid + 1) * batch_size
            ]
            gray = images[idx]
            if self._on_device:
                slots = global_slots(batch_size, pid)
                image = np.repeat(gray[..., None], 3, axis=-1)
                yield {"image": image, "label": labels[idx], "slot": slots}
                step += 1
                continue
            if self._augment:
                gray = self._random_crop(gray, np.random.default_rng([seed, step, 7]))
            else:
                gray = self._centre(gray)
            yield {"image": self._rgb(gray), "label": labels[idx]}
            step += 1

    def _random_crop(self, gray: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        max_off = gray.shape[1] - self._size
        offs = rng.integers(0, max_off + 1, size=(len(gray), 2))
        return np.stack(
            [
                g[y : y + self._size, x : x + self._size]
                for g, (y, x) in zip(gray, offs, strict=True)
            ]
        )

    def eval_batches(self, split: str, batch_size: int, *, crops: int = 1) -> Iterator[Batch]:
        if split not in ("val", "test"):
            raise ValueError(f"unknown split {split!r}")
        if crops != 1:
            raise ValueError("the digits source evaluates centre crops only (eval.crops=1)")
        images, labels = self._images[split], self._labels[split]
        for idx in eval_index_batches(len(labels), batch_size):
            valid = idx >= 0
            safe = np.where(valid, idx, 0)
            raw = images[safe]
            yield {
                "image": np.repeat(raw[..., None], 3, -1)
                if self._on_device
                else self._rgb(self._centre(raw)),
                "label": labels[safe],
                "mask": valid,
            }

"""Random images and labels made on the devices: benchmarks measure the model, not the input."""

from __future__ import annotations

from collections.abc import Iterator

import ml_collections
import numpy as np

from alexnet_jax.data.base import Batch, DatasetInfo, eval_index_batches


class SyntheticSource:
    """One fixed random batch, generated on the devices once and yielded at every step."""

    def __init__(self, config: ml_collections.ConfigDict):
        size = config.data.image_size
        self._num_classes = config.model.num_classes
        self._eval_examples = config.data.get("synthetic_eval_examples", 256)
        self.info = DatasetInfo(
            num_classes=self._num_classes,
            image_shape=(size, size, 3),
            # An ImageNet-sized epoch, so that epoch-based schedules behave as on ImageNet.
            num_examples={
                "train": 1_281_167,
                "val": self._eval_examples,
                "test": self._eval_examples,
            },
        )

    def content_hashes(self) -> dict[str, list[tuple[str, str]]]:
        """Nothing for the leakage check: the images are random numbers made anew."""
        return {}

    def train_batches(self, batch_size: int, *, seed: int, start_step: int = 0) -> Iterator[Batch]:
        import jax

        from alexnet_jax import parallel

        n = jax.local_device_count()
        shape = (n, batch_size // n, *self.info.image_shape)

        def make(key):
            k1, k2 = jax.random.split(key)
            images = jax.random.normal(k1, shape)
            labels = jax.random.randint(k2, shape[:2], 0, self._num_classes)
            return {"image": images, "label": labels}

        sharding = parallel.batch_sharding()
        batch = jax.jit(make, out_shardings=sharding)(jax.random.PRNGKey(seed))
        while True:
            yield batch

    def eval_batches(self, split: str, batch_size: int, *, crops: int = 1) -> Iterator[Batch]:
        rng = np.random.default_rng(0 if split == "val" else 1)
        shape = (batch_size, *((crops,) if crops > 1 else ()), *self.info.image_shape)
        for idx in eval_index_batches(self._eval_examples, batch_size):
            yield {
                "image": rng.standard_normal(shape, dtype=np.float32),
                "label": rng.integers(0, self._num_classes, batch_size).astype(np.int32),
                "mask": idx >= 0,
            }

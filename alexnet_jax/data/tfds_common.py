"""tf.data machinery shared by the TensorFlow-backed sources (`imagenet2012`, `folder`).

A source supplies, per epoch, a dataset of `(key, label)` records in that epoch's order (a key is
an encoded image or a file path, and `load` turns it into encoded bytes); this module turns it
into the host batches of `alexnet_jax.data.base`:

- Determinism and resume. The record order of epoch e is a fixed function of (seed, e), and the
  augmentation seed of an example is `fold_in([seed, process], slot)`, where slot = step * B + i
  is its position in the stream. So batch k of `train_batches(start_step=s)` is exactly the batch
  of global step s + k: the stream starts at epoch s // steps_per_epoch, skips the records of
  the earlier steps of that epoch (before decoding them) and numbers the rest from s * B.
  Every epoch has steps_per_epoch = records // B full batches; the few records over are left out
  of that epoch (a different few each epoch, since the order changes).
- TensorFlow only does host work: `import_tf` hides every GPU from it before its first op, so it
  never grabs accelerator memory that JAX needs.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

from alexnet_jax.data import augment
from alexnet_jax.data.base import Batch, pad_batch
from alexnet_jax.errors import UsageError

log = logging.getLogger(__name__)

Records = Any  # tf.data.Dataset of (key, label int32)
MakeEpoch = Callable[[int], Records]


def import_tf():
    """Imports TensorFlow with its GPUs hidden; call before any TF op (idempotent)."""
    import tensorflow as tf

    try:
        tf.config.set_visible_devices([], "GPU")
    except RuntimeError:  # the runtime is already initialised; still must hold no GPU
        if tf.config.get_visible_devices("GPU"):
            raise
    return tf


def process_index_count() -> tuple[int, int]:
    import jax

    return jax.process_index(), jax.process_count()


def epoch_seed(seed: int, epoch: int) -> int:
    """A 63-bit seed for epoch `epoch` of run `seed` (for file and buffer shuffles)."""
    return int(np.random.SeedSequence([seed, epoch]).generate_state(1, np.uint64)[0] >> 1)


def _options(tf):
    options = tf.data.Options()
    options.deterministic = True  # parallel map/interleave keep their input order
    return options


def train_stream(
    make_epoch: MakeEpoch,
    *,
    load: Callable[[Any], Any],
    examples_per_epoch: int,
    batch_size: int,
    seed: int,
    start_step: int,
    cfg: augment.AugmentConfig,
    skip_errors: bool = False,
) -> Iterator[Batch]:
    """The infinite training stream from step `start_step` on (see the module docstring).

    With `skip_errors`, an image that fails to decode is dropped (TF logs the error) and the epoch
    is topped up from its own start, so the stream never ends or crashes early; a source that
    screens its files up front (the folder source) makes this a rare last resort.
    """
    tf = import_tf()
    steps_per_epoch = examples_per_epoch // batch_size
    if steps_per_epoch < 1:
        raise UsageError(
            f"batch size {batch_size} per process exceeds the {examples_per_epoch} training "
            "examples of this process"
        )
    pid, _ = process_index_count()
    base_seed = tf.constant([seed, pid], tf.int64)

    def augment_one(slot, key, label):
        example_seed = tf.random.experimental.stateless_fold_in(base_seed, slot)
        return augment.train_image(load(key), example_seed, cfg), label

    step = start_step
    while True:
        epoch, within = divmod(step, steps_per_epoch)
        records = make_epoch(epoch)
        records = records.repeat() if skip_errors else records.take(steps_per_epoch * batch_size)
        records = records.skip(within * batch_size)
        slots = tf.data.Dataset.range(step * batch_size, np.iinfo(np.int64).max)
        ds = tf.data.Dataset.zip(slots, records).map(
            lambda slot, rec: augment_one(slot, *rec), num_parallel_calls=tf.data.AUTOTUNE
        )
        if skip_errors:
            ds = ds.ignore_errors(log_warning=True)
        ds = ds.take((steps_per_epoch - within) * batch_size)
        ds = ds.batch(batch_size, drop_remainder=True).prefetch(tf.data.AUTOTUNE)
        for image, label in ds.with_options(_options(tf)).as_numpy_iterator():
            yield {"image": image, "label": label.astype(np.int32)}
            step += 1


def eval_stream(
    records: Records,
    *,
    load: Callable[[Any], Any],
    num_examples: int,
    num_batches: int,
    batch_size: int,
    crops: int,
    cfg: augment.AugmentConfig,
    skip_errors: bool = False,
    name: str = "eval",
) -> Iterator[Batch]:
    """One pass over this process's `num_examples` records, as exactly `num_batches` batches.

    The last real batch is padded and masked (`base.pad_batch`), and processes with fewer
    examples add fully masked batches, so that every process calls the collective eval step
    equally often and every example counts exactly once.
    """
    tf = import_tf()
    ds = records.map(
        lambda key, label: (augment.eval_image(load(key), cfg, crops), label),
        num_parallel_calls=tf.data.AUTOTUNE,
    )
    if skip_errors:
        ds = ds.ignore_errors(log_warning=True)
    ds = ds.batch(batch_size).prefetch(tf.data.AUTOTUNE).with_options(_options(tf))
    view = (crops,) if crops > 1 else ()
    shape = (*view, cfg.image_size, cfg.image_size, 3)
    seen = yielded = 0
    for image, label in ds.as_numpy_iterator():
        seen += len(label)
        yielded += 1
        yield pad_batch({"image": image, "label": label.astype(np.int32)}, batch_size)
    if seen != num_examples:
        log.warning("%s: %d of %d images could not be decoded and were left out",
                    name, num_examples - seen, num_examples)
    empty = {
        "image": np.zeros((batch_size, *shape), np.float32),
        "label": np.zeros((batch_size,), np.int32),
        "mask": np.zeros((batch_size,), bool),
    }
    for _ in range(num_batches - yielded):
        yield {k: v.copy() for k, v in empty.items()}


def eval_num_batches(per_process_max: int, batch_size: int) -> int:
    """Batches every process yields: enough for the largest shard, at least one."""
    return max(-(-per_process_max // batch_size), 1)

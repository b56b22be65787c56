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
- Speed. Records are skipped before decoding; per image only the geometry runs (decode, crop,
  flip on uint8), and the RGB offset (lighting noise minus mean) is added to a whole batch in one
  op; each epoch's pipeline is built and started before the previous one runs dry.
- TensorFlow only does host work: its GPUs are hidden before its first op (`augment.hide_gpus`),
  so it never grabs accelerator memory that JAX needs.
"""

from __future__ import annotations

import concurrent.futures
import itertools
import logging
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

from alexnet_jax.data import augment, device_augment
from alexnet_jax.data.base import Batch, pad_batch, read_if_16_bit
from alexnet_jax.errors import UsageError

log = logging.getLogger(__name__)

Records = Any  # tf.data.Dataset of (key, label int32)
MakeEpoch = Callable[[int], Records]
LOOKAHEAD_STEPS = 200  # start the next epoch's pipeline this many steps before it is needed


def import_tf():
    """TensorFlow, with its GPUs hidden (`augment.hide_gpus`, run when augment is imported)."""
    import tensorflow as tf

    augment.hide_gpus()
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


def _finish(image, offset, label):
    """Batch-level photometric step: one vectorised op per batch (see `augment.finish`)."""
    return augment.finish(image, offset), label


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
        if cfg.augment_on == "device":  # decode only; the device step augments (slot keys it)
            return augment.decode_and_resize(
                load(key), cfg.resize_size, cfg.resize_antialias
            ), label
        example_seed = tf.random.experimental.stateless_fold_in(base_seed, slot)
        return (*augment.train_parts(load(key), example_seed, cfg), label)

    def open_epoch(step: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:  # (images, labels)
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
        ds = ds.batch(batch_size, drop_remainder=True)
        if cfg.augment_on == "host":
            ds = ds.map(_finish)
        ds = ds.prefetch(tf.data.AUTOTUNE).with_options(_options(tf))
        batches = ds.as_numpy_iterator()
        first = next(batches)  # starts the pipeline: fills the shuffle buffer
        return itertools.chain([first], batches)

    # Each epoch is its own pipeline. The next one is built and started (shuffle buffer filled,
    # first batch made) while the last LOOKAHEAD_STEPS of the current one are consumed, so an
    # epoch boundary costs no stall, without holding two pipelines for a whole epoch.
    pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="next-epoch")
    slots = (
        {"slot": device_augment.global_slots(batch_size, pid)} if cfg.augment_on == "device" else {}
    )
    try:
        step = start_step
        current = open_epoch(step)
        while True:
            end = (step // steps_per_epoch + 1) * steps_per_epoch
            upcoming = None
            for image, label in current:
                if upcoming is None and end - step <= LOOKAHEAD_STEPS:
                    upcoming = pool.submit(open_epoch, end)
                yield {"image": image, "label": label.astype(np.int32), **slots}
                step += 1
            current = (upcoming or pool.submit(open_epoch, end)).result()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)  # an epoch being opened finishes first


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
    on_device = cfg.augment_on == "device"  # uint8 at resize_size: the device cuts the views

    def parts(key, label):
        if on_device:
            return augment.decode_and_resize(
                load(key), cfg.resize_size, cfg.resize_antialias
            ), label
        return (*augment.eval_parts(load(key), cfg, crops), label)

    ds = records.map(parts, num_parallel_calls=tf.data.AUTOTUNE)
    if skip_errors:
        ds = ds.ignore_errors(log_warning=True)
    ds = ds.batch(batch_size)
    if not on_device:
        ds = ds.map(_finish)
    ds = ds.prefetch(tf.data.AUTOTUNE).with_options(_options(tf))
    view = (crops,) if crops > 1 and not on_device else ()
    side = cfg.resize_size if on_device else cfg.image_size
    shape = (*view, side, side, 3)
    dtype = np.uint8 if on_device else np.float32
    seen = yielded = 0
    for image, label in ds.as_numpy_iterator():
        seen += len(label)
        yielded += 1
        yield pad_batch({"image": image, "label": label.astype(np.int32)}, batch_size)
    if seen != num_examples:
        log.warning(
            "%s: %d of %d images could not be decoded and were left out",
            name,
            num_examples - seen,
            num_examples,
        )
    empty = {
        "image": np.zeros((batch_size, *shape), dtype),
        "label": np.zeros((batch_size,), np.int32),
        "mask": np.zeros((batch_size,), bool),
    }
    for _ in range(num_batches - yielded):
        yield {k: v.copy() for k, v in empty.items()}


def device_spec(cfg: augment.AugmentConfig) -> device_augment.DeviceAugment | None:
    """What the device step needs to augment this source's uint8 batches (None: 'host')."""
    if cfg.augment_on != "device":
        return None
    mean = cfg.mean_rgb if cfg.mean_mode == "channel" else (0.0, 0.0, 0.0)
    return device_augment.DeviceAugment(
        image_size=cfg.image_size,
        resize_size=cfg.resize_size,
        augment=cfg.augment,
        flip=cfg.flip,
        pca_std=cfg.pca_std,
        pca_eigvec=cfg.pca_eigvec,
        sigmas=tuple(float(v) for v in cfg.lighting_sigmas()),
        mean_rgb=mean,
        mean_image=cfg.mean_image if cfg.mean_mode == "pixel" else None,
    )


def eval_num_batches(per_process_max: int, batch_size: int) -> int:
    """Batches every process yields: enough for the largest shard, at least one."""
    return max(-(-per_process_max // batch_size), 1)


def file_preprocessor(config: Any, mean_image: np.ndarray | None) -> Callable[[str], np.ndarray]:
    """The evaluation transform of the TensorFlow sources (`augment.eval_image`) on one file."""
    tf = import_tf()
    cfg = augment.AugmentConfig.from_config(config.data, mean_image)

    def preprocess(path: str) -> np.ndarray:
        # PIL checks the size from the header before TF decodes; a 16-bit PNG is scaled by PIL
        # (TF would decode it too, but the eval pipeline's uint8 path is the one to match).
        pixels = read_if_16_bit(path)
        if pixels is None:
            with open(path, "rb") as f:
                data = f.read()
        else:
            data = tf.io.encode_png(pixels).numpy()
        try:
            return augment.eval_image(tf.constant(data), cfg, config.eval.crops).numpy()
        except tf.errors.InvalidArgumentError as e:
            raise UsageError(f"cannot decode {path}: {e.message.splitlines()[0]}") from None

    return preprocess

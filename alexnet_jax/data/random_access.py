"""The training stream over a random-access copy (ArrayRecord files, `tfds.data_sources`).

Resume in O(1): the example at global slot j of step s is record `perm_e[(s mod spe) * GB + j]`,
where perm_e = `base.epoch_permutation(n, seed, e)` over the whole split, e = s // spe, GB the
global batch and spe = n // GB. So a stream started at step s reads exactly the records of steps
s, s+1, ... and nothing before (the TFRecord stream of `tfds_common` has to read and skip the
earlier records of the epoch and refill its shuffle buffer). Each epoch is a full permutation
(better mixed than a shuffle buffer), and each process takes its slice of every global batch, so
the order is the same for any number of processes (as the digits source does it).

Reading is a Python generator, one batch of records per call (array_record's `__getitems__`,
which bounds the raw copy's rate: README, "Input pipeline speed"); one parse per batch, then
decoding and the host augmentation, when asked for, in tf.data's parallel maps.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np

from alexnet_jax.data import augment, device_augment
from alexnet_jax.data.base import Batch, epoch_permutation
from alexnet_jax.data.tfds_common import import_tf, process_index_count
from alexnet_jax.errors import UsageError


def train_stream(
    source: Any,
    *,
    parse: Any,
    batch_size: int,
    seed: int,
    start_step: int,
    cfg: augment.AugmentConfig,
) -> Iterator[Batch]:
    """The infinite training stream from step `start_step` on.

    `source` is a random-access sequence of serialized examples (a TFDS data source read with
    `DeserializeMethod.RAW_BYTES`) and `parse` turns a [batch] vector of them into `(images,
    labels)` inside tf.data, in one op (`raw_source_and_parser`): encoded bytes, or uint8 pixels
    for the raw copy. Python only looks records up, one batch per call; the per-example work
    (JPEG decode, host augmentation) runs in tf.data's parallel map, off the GIL. A raw copy
    augmented on the device has no per-example work: its batches go from the records to the
    device without being split into examples (what made it slower than the JPEG copy before).
    """
    tf = import_tf()
    pid, count = process_index_count()
    n, global_batch = len(source), batch_size * count
    if n // global_batch < 1:
        raise UsageError(f"global batch {global_batch} exceeds the {n} training examples")
    getitems = getattr(source, "__getitems__", None)
    spe = n // global_batch

    def records():
        step, perm_epoch, perm = start_step, -1, None
        while True:
            epoch, within = divmod(step, spe)
            if epoch != perm_epoch:  # one permutation per epoch: milliseconds for 10^6
                perm_epoch, perm = epoch, epoch_permutation(n, seed, epoch)
            first = within * global_batch + pid * batch_size
            idx = perm[first : first + batch_size].tolist()
            exs = getitems(idx) if getitems else [source[i] for i in idx]
            slots = np.arange(step * batch_size, (step + 1) * batch_size, dtype=np.int64)
            yield slots, np.array(exs, dtype=object)
            step += 1

    signature = (tf.TensorSpec([batch_size], tf.int64), tf.TensorSpec([batch_size], tf.string))
    ds = tf.data.Dataset.from_generator(records, output_signature=signature)
    ds = ds.map(lambda slots, serialized: (slots, *parse(serialized)))
    base_seed = tf.constant([seed, pid], tf.int64)

    def one(slot, image, label):
        if cfg.augment_on == "device":
            return augment.decode_and_resize(image, cfg.resize_size, cfg.resize_antialias), label
        example_seed = tf.random.experimental.stateless_fold_in(base_seed, slot)
        return (*augment.train_parts(image, example_seed, cfg), label)

    raw_on_device = cfg.augment_on == "device" and ds.element_spec[1].dtype == tf.uint8
    if raw_on_device and ds.element_spec[1].shape[1:3] == (cfg.resize_size, cfg.resize_size):
        ds = ds.map(lambda slots, images, labels: (images, labels))
    else:
        ds = ds.unbatch().map(one, num_parallel_calls=tf.data.AUTOTUNE)
        ds = ds.batch(batch_size, drop_remainder=True)
    if cfg.augment_on == "host":
        ds = ds.map(lambda image, offset, label: (augment.finish(image, offset), label))
    options = tf.data.Options()
    options.deterministic = True
    ds = ds.prefetch(tf.data.AUTOTUNE).with_options(options)
    slots = {}
    if cfg.augment_on == "device":
        slots = {"slot": device_augment.global_slots(batch_size, pid)}
    for image, label in ds.as_numpy_iterator():
        yield {"image": image, "label": label, **slots}


def raw_source_and_parser(builder, split: str):
    """(the split's serialized examples by index, [B] serialized -> (images, labels) in TF ops).

    One `tf.io.parse_example` for the whole batch (TFDS's `deserialize_example` parses one
    record per call); a raw copy's pixels (one bytes string each, `Encoding.BYTES`) become a
    [B, H, W, 3] uint8 array in the same op chain. Encoded images stay bytes: they are decoded
    per example, after the parse.
    """
    tf = import_tf()
    import tensorflow_datasets as tfds

    source = builder.as_data_source(
        split=split, deserialize_method=tfds.decode.DeserializeMethod.RAW_BYTES
    )
    image_feature = builder.info.features["image"]
    encoded = isinstance(image_feature, tfds.features.Image)
    shape = tuple(image_feature.shape)
    # Encoded images and raw pixels as one bytes string are a string each; a raw copy written
    # before Encoding.BYTES stores its pixels as an int64 list (TFDS parses uint8 as int64).
    as_bytes = image_feature.get_serialized_info().tf_dtype == tf.string
    image_spec = (
        tf.io.FixedLenFeature([], tf.string) if as_bytes else tf.io.FixedLenFeature(shape, tf.int64)
    )
    spec = {"image": image_spec, "label": tf.io.FixedLenFeature([], tf.int64)}

    def parse(serialized):
        ex = tf.io.parse_example(serialized, spec)
        images = ex["image"]
        if not encoded:
            pixels = tf.io.decode_raw(images, tf.uint8) if as_bytes else tf.cast(images, tf.uint8)
            images = tf.reshape(pixels, (-1, *shape))
        return images, tf.cast(ex["label"], tf.int32)

    return source, parse


def is_random_access(builder) -> bool:
    """Whether `builder`'s records are ArrayRecord files, read by index."""
    fmt = builder.info.file_format
    return fmt is not None and "array_record" in str(getattr(fmt, "value", fmt))


def as_dataset(builder, split: str, *, decoders: Any = None):
    """A tf.data dataset of `split`'s examples (dicts) in record order, for any file format.

    TFDS's `as_dataset` does not read ArrayRecord files; for those, a generator walks the data
    source in index order (the order `as_dataset` gives for TFRecord files unshuffled).
    """
    tf = import_tf()
    import tensorflow_datasets as tfds

    if not is_random_access(builder):
        read_config = tfds.ReadConfig(try_autocache=False)
        return builder.as_dataset(
            split=split, shuffle_files=False, decoders=decoders, read_config=read_config
        )
    source = builder.as_data_source(split=split, decoders=decoders)
    if len(source) == 0:
        raise UsageError(f"split {split!r} of {builder.name} is empty")
    first = source[0]
    signature = {k: _spec(tf, v) for k, v in first.items()}

    def examples():
        for i in range(len(source)):
            yield source[i]

    return tf.data.Dataset.from_generator(examples, output_signature=signature)


def _spec(tf, value):
    if isinstance(value, (bytes, np.bytes_, str)):
        return tf.TensorSpec([], tf.string)
    array = np.asarray(value)
    return tf.TensorSpec(array.shape, tf.as_dtype(array.dtype))

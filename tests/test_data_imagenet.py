"""The `imagenet2012` source on tiny ILSVRC tars, through the real TFDS builder (no mocks)."""

import io
import logging

import ilsvrc_fixtures as fx
import numpy as np
import pytest
from PIL import Image

from alexnet_jax.data import augment, prepare, random_access, tfds_common
from alexnet_jax.data.base import epoch_permutation
from alexnet_jax.data.imagenet import ImageNetSource
from alexnet_jax.errors import DataNotFoundError
from experiments.imagenet import get_config

tf = tfds_common.import_tf()
import tensorflow_datasets as tfds  # noqa: E402  (after import_tf hid the GPUs)

B = 4  # per-process batch


def config(data_dir, manual_dir, **data):
    c = get_config()
    c.data.data_dir = str(data_dir)
    c.data.manual_dir = str(manual_dir)
    c.data.resize_size, c.data.image_size = 32, 24  # tiny images; the pipeline is the same
    c.data.train_split = "train[:80%]"  # 18 of the 22 training images
    c.data.val_split = "train[80%:]"
    c.data.shuffle_buffer = 8
    c.data.augment_on = "host"  # float model inputs to check; device mode has its own tests
    c.data.update(data)
    return c


@pytest.fixture(scope="module")
def ilsvrc(tmp_path_factory):
    root = tmp_path_factory.mktemp("ilsvrc")
    tars = fx.write_ilsvrc_tars(root / "manual")
    c = config(root / "tfds", root / "manual", use_prepared=False)
    return tars, c, ImageNetSource(c)  # prepares imagenet2012 from the tars


@pytest.fixture(scope="module")
def prepared(ilsvrc, tmp_path_factory):
    _, c, _ = ilsvrc
    out = tmp_path_factory.mktemp("prepared")
    path = prepare.prepare_copy(c.data, str(out))
    return out, path


def take(it, n):
    return [next(it) for _ in range(n)]


def test_missing_tars_name_the_files_and_the_directory(tmp_path):
    manual = tmp_path / "manual"
    with pytest.raises(DataNotFoundError) as e:
        ImageNetSource(config(tmp_path / "tfds", manual))
    message = str(e.value)
    assert "ILSVRC2012_img_train.tar" in message and "ILSVRC2012_img_val.tar" in message
    assert str(manual) in message and "\n" not in message


def test_one_missing_tar_is_named(tmp_path, ilsvrc):
    tars, _, _ = ilsvrc
    manual = tmp_path / "manual"
    manual.mkdir()
    (manual / fx.VAL_TAR).write_bytes((tars.manual_dir / fx.VAL_TAR).read_bytes())
    with pytest.raises(DataNotFoundError, match=r"ILSVRC2012_img_train.tar is not in"):
        ImageNetSource(config(tmp_path / "tfds", manual))
    # Splits that only read the validation tar need only that tar.
    source = ImageNetSource(
        config(
            tmp_path / "tfds",
            manual,
            train_split="validation[:6]",
            val_split="validation[6:]",
            test_split="validation[6:]",
        )
    )
    assert source.info.num_examples == {"train": 6, "val": 4, "test": 4}


def test_info(ilsvrc):
    _, _, source = ilsvrc
    info = source.info
    assert info.num_classes == 1000 and info.image_shape == (24, 24, 3)
    assert info.class_names == tuple(fx.label_names())  # synset ids, TFDS's label order
    assert info.num_examples == {"train": 18, "val": 4, "test": 10}


def test_builder_repairs_cmyk_png_and_keeps_grayscale(ilsvrc):
    tars, c, _ = ilsvrc
    builder = tfds.builder("imagenet2012", data_dir=c.data.data_dir)
    images = {
        ex["file_name"].decode(): (ex["image"], ex["label"])
        for ex in tfds.as_numpy(builder.as_dataset(split="train"))
    }
    assert set(images) == set(tars.train)
    stored = {
        ex["file_name"].decode(): Image.open(io.BytesIO(ex["image"]))
        for ex in tfds.as_numpy(
            builder.as_dataset(split="train", decoders={"image": tfds.decode.SkipDecoding()})
        )
    }
    # Repaired by name, as in the real set: the PNG became a JPEG, the CMYK JPEG an RGB one.
    assert stored[fx.PNG_FILE].format == "JPEG" and stored[fx.CMYK_FILE].mode == "RGB"
    assert stored[fx.GRAY_FILE].mode == "L"  # stored as is; decoding gives 3 channels
    for name, (image, label) in images.items():
        synset = tars.train[name]
        assert fx.label_names()[label] == synset
        assert image.shape[-1] == 3
        mean = image.reshape(-1, 3).mean(0)
        if name == fx.GRAY_FILE:
            assert np.ptp(mean) < 1  # gray: R = G = B
        else:  # CMYK and PNG included: converted to RGB JPEGs of the right colour
            np.testing.assert_allclose(mean, fx.class_color(synset), atol=6)


def test_eval_labels_travel_with_their_images_and_count_exactly(ilsvrc):
    tars, c, _ = ilsvrc
    c = config(c.data.data_dir, c.data.manual_dir, use_prepared=False, mean_mode="none")
    source = ImageNetSource(c)
    batches = list(source.eval_batches("test", B))
    assert [b["mask"].sum() for b in batches] == [4, 4, 2]  # 10 images, padded, never dropped
    for b in batches:
        assert b["image"].shape == (B, 24, 24, 3) and b["image"].dtype == np.float32
        assert b["label"].dtype == np.int32 and b["mask"].dtype == bool
    labels = np.concatenate([b["label"][b["mask"]] for b in batches])
    images = np.concatenate([b["image"][b["mask"]] for b in batches])
    names = [fx.label_names()[i] for i in labels]
    assert sorted(names) == sorted(tars.val.values())  # TFDS's validation label assignment
    for name, image in zip(names, images, strict=True):
        np.testing.assert_allclose(image.mean((0, 1)), fx.class_color(name), atol=6)
    again = list(source.eval_batches("test", B))
    for a, b in zip(batches, again, strict=True):
        for key in a:
            np.testing.assert_array_equal(a[key], b[key])


def test_ten_crop_eval_and_val_split(ilsvrc):
    _, _, source = ilsvrc
    batches = list(source.eval_batches("val", 3, crops=10))
    assert [b["mask"].sum() for b in batches] == [3, 1]
    assert batches[0]["image"].shape == (3, 10, 24, 24, 3)
    assert not batches[1]["image"][1:].any()  # padding is zeros


def test_train_stream_shapes_determinism_and_resume(ilsvrc):
    _, _, source = ilsvrc
    first = take(source.train_batches(B, seed=3), 7)  # 4 steps per epoch: crosses into epoch 1
    for b in first:
        assert b["image"].shape == (B, 24, 24, 3) and b["image"].dtype == np.float32
        assert b["label"].dtype == np.int32
        assert {fx.label_names()[i] for i in b["label"]} <= set(fx.SYNSETS)
    again = take(source.train_batches(B, seed=3), 7)
    resumed = take(source.train_batches(B, seed=3, start_step=2), 5)
    for a, b in zip(first, again, strict=True):
        np.testing.assert_array_equal(a["image"], b["image"])
    for a, b in zip(first[2:], resumed, strict=True):
        np.testing.assert_array_equal(a["image"], b["image"])
        np.testing.assert_array_equal(a["label"], b["label"])
    other = take(source.train_batches(B, seed=4), 1)[0]
    assert not np.array_equal(other["image"], first[0]["image"])
    # Epochs 0 and 1 see different orders of the same 16 (= 4 steps x 4) of 18 images.
    epoch0 = np.concatenate([b["label"] for b in first[:4]])
    epoch1 = np.concatenate([b["label"] for b in first[4:7]])
    assert len(epoch0) == 16 and not np.array_equal(epoch0[:12], epoch1)


def test_processes_get_disjoint_shards(ilsvrc, monkeypatch):
    tars, c, _ = ilsvrc
    c = config(c.data.data_dir, c.data.manual_dir, use_prepared=False, augment=False)
    seen_eval, seen_train = [], []
    for pid in range(2):
        monkeypatch.setattr(tfds_common, "process_index_count", lambda pid=pid: (pid, 2))
        source = ImageNetSource(c)
        assert source.info.num_examples["test"] == 10  # global counts
        batches = list(source.eval_batches("test", 4))
        assert len(batches) == 2  # 5 each: the same number of (padded) batches per process
        seen_eval.append(np.concatenate([b["label"][b["mask"]] for b in batches]))
        # 9 training images each; with augment=False an image identifies its example.
        epoch = take(source.train_batches(3, seed=0), 3)
        seen_train.append({image.tobytes() for b in epoch for image in b["image"]})
    expected = sorted(fx.label_names().index(s) for s in tars.val.values())
    assert sorted(np.concatenate(seen_eval)) == expected
    assert len(seen_train[0]) == len(seen_train[1]) == 9 and not seen_train[0] & seen_train[1]


def _stored_and_expected(c, copy):
    """(image in the copy, the central square at data.resize_size that decode_and_resize makes
    from the original JPEG) for each validation image."""
    original = tfds.builder("imagenet2012", data_dir=c.data.data_dir)
    skip = {"image": tfds.decode.SkipDecoding()}
    jpegs = {
        ex["file_name"]: ex["image"]
        for ex in tfds.as_numpy(original.as_dataset(split="validation", decoders=skip))
    }
    for ex in tfds.as_numpy(random_access.as_dataset(copy, "validation")):
        jpeg = tf.constant(jpegs[ex["file_name"]])
        yield ex["image"], augment.decode_and_resize(jpeg, c.data.resize_size).numpy()


def test_prepared_copy_keeps_order_and_is_used(ilsvrc, prepared, caplog):
    _, c, full = ilsvrc
    out, path = prepared
    copy = tfds.builder_from_directory(str(path))
    original = tfds.builder("imagenet2012", data_dir=c.data.data_dir)
    assert random_access.is_random_access(copy)  # ArrayRecord: read by index
    for split in ("train", "validation"):
        names = [
            [ex["file_name"] for ex in tfds.as_numpy(random_access.as_dataset(b, split))]
            for b in (original, copy)
        ]
        assert names[0] == names[1]  # so split strings like train[:80%] name the same images
    side = c.data.resize_size
    for stored, square in _stored_and_expected(c, copy):
        assert stored.shape == (side, side, 3)
        assert np.abs(stored.astype(float) - square).mean() < 3  # JPEG q90 round trip
    with caplog.at_level(logging.INFO):
        source = ImageNetSource(config(c.data.data_dir, c.data.manual_dir, prepared_dir=str(out)))
    assert "prepared copy" in caplog.text
    assert source.info.num_examples == full.info.num_examples
    labels = [next(s.eval_batches("test", 10))["label"] for s in (full, source)]
    np.testing.assert_array_equal(*labels)


@pytest.mark.parametrize("encoding", ["bytes", "varints"])
def test_the_raw_copy_holds_exactly_the_pixels_and_streams_them(
    ilsvrc, tmp_path, monkeypatch, encoding
):
    """storage='raw': each image is the uint8 central square, stored as one bytes string (not
    196,608 varints; copies written before that still read) and streamed to the device path
    unchanged: the batch of step 0 is the stored pixels and labels of the epoch's first records."""
    _, c, _ = ilsvrc
    if encoding == "varints":  # what `prepare --storage raw` wrote before Encoding.BYTES
        monkeypatch.setattr(
            prepare,
            "image_feature",
            lambda storage, size: tfds.features.Tensor(shape=(size, size, 3), dtype=np.uint8),
        )
    data = config(c.data.data_dir, c.data.manual_dir, prepare_storage="raw").data
    path = prepare.prepare_copy(data, str(tmp_path))
    copy = tfds.builder_from_directory(str(path))
    one_string = copy.info.features["image"].get_serialized_info().shape == ()
    assert one_string == (encoding == "bytes")
    for stored, square in _stored_and_expected(c, copy):
        np.testing.assert_array_equal(stored, square)
    source = ImageNetSource(
        config(
            c.data.data_dir,
            c.data.manual_dir,
            prepared_dir=str(tmp_path),
            prepare_storage="raw",
            augment_on="device",
        )
    )
    batch = next(source.train_batches(B, seed=0))
    assert batch["image"].dtype == np.uint8 and batch["image"].shape == (B, 32, 32, 3)
    records = copy.as_data_source(split=c.data.train_split)
    first = epoch_permutation(len(records), 0, 0)[:B]
    np.testing.assert_array_equal(batch["image"], np.stack([records[i]["image"] for i in first]))
    np.testing.assert_array_equal(batch["label"], [records[i]["label"] for i in first])


def test_prepared_dir_without_copy_raises(ilsvrc, tmp_path):
    _, c, _ = ilsvrc
    with pytest.raises(DataNotFoundError, match=r"alexnet_jax\.data\.prepare"):
        ImageNetSource(config(c.data.data_dir, c.data.manual_dir, prepared_dir=str(tmp_path)))


def _prepare_with_mean_image(c, out) -> int:
    """`prepare` of the 32 px copy with its mean image, as a user types it."""
    flags = ["--data_dir", c.data.data_dir, "--manual_dir", c.data.manual_dir, "--out", str(out)]
    return prepare.main([*flags, "--mean_image", "--resize_size", "32"])


def test_prepare_command_writes_mean_image_for_pixel_mode(ilsvrc, prepared, capsys):
    _, c, _ = ilsvrc
    out, path = prepared
    assert _prepare_with_mean_image(c, out) == 0
    mean = np.load(path.parent / "mean_image.npy")
    assert mean.shape == (32, 32, 3) and 0 < mean.mean() < 255
    source = ImageNetSource(
        config(c.data.data_dir, c.data.manual_dir, prepared_dir=str(out), mean_mode="pixel")
    )
    assert next(source.train_batches(B, seed=0))["image"].shape == (B, 24, 24, 3)


@pytest.mark.parametrize("mean_mode", ["channel", "pixel"])
def test_device_augmentation_stream_resumes_exactly_across_an_epoch(ilsvrc, prepared, mean_mode):
    """augment_on='device': the host sends uint8 at resize_size with global slots, and the
    device step's crops of a resumed stream are those of the uninterrupted one."""
    import jax

    from alexnet_jax.data.device_augment import Preprocess

    _, c, _ = ilsvrc
    out, _ = prepared
    _prepare_with_mean_image(c, out)  # the mean image next to the copy (idempotent)
    source = ImageNetSource(
        config(
            c.data.data_dir,
            c.data.manual_dir,
            prepared_dir=str(out),
            augment_on="device",
            mean_mode=mean_mode,
        )
    )
    spec = source.info.device_augment
    assert spec is not None and (spec.mean_image is not None) == (mean_mode == "pixel")
    augment = jax.jit(lambda b, s: Preprocess(spec, 3).train(b, s)["image"])

    def views(start, n):
        batches = take(source.train_batches(B, seed=3, start_step=start), n)
        for b in batches:
            assert b["image"].dtype == np.uint8 and b["image"].shape == (B, 32, 32, 3)
            np.testing.assert_array_equal(b["slot"], np.arange(B))
        return [np.asarray(augment(b, start + k)) for k, b in enumerate(batches)]

    first = views(0, 7)  # 4 steps per epoch: crosses into epoch 1
    resumed = views(3, 4)  # the last step of epoch 0, then epoch 1
    assert first[0].shape == (B, 24, 24, 3)
    for a, b in zip(first[3:], resumed, strict=True):
        np.testing.assert_array_equal(a, b)
    batch = next(source.eval_batches("test", B, crops=10))
    assert batch["image"].dtype == np.uint8 and batch["image"].shape == (B, 32, 32, 3)
    ten = jax.jit(lambda b: Preprocess(spec, 3, crops=10).eval(b)["image"])(batch)
    assert ten.shape == (B, 10, 24, 24, 3)

"""The paper's pre-processing ops on images whose every pixel is known."""

import dataclasses
import io

import numpy as np
import pytest
from PIL import Image

from alexnet_jax.data import augment, tfds_common

tf = tfds_common.import_tf()


def coords_image(h: int, w: int) -> np.ndarray:
    """float32 [h, w, 3]: channel 0 = row, 1 = column, 2 = a constant, so a crop names its place."""
    rows, cols = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    return np.stack([rows, cols, np.full_like(rows, 7)], -1).astype(np.float32)


def png(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array.astype(np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def seed(i: int) -> tf.Tensor:
    return tf.constant([i, 0], tf.int64)


def test_random_crop_is_a_window_and_flip_mirrors_it():
    image = coords_image(32, 40)
    offsets, flips = set(), 0
    for i in range(200):
        crop = augment.random_crop_flip(tf.constant(image), seed(i), 24).numpy()
        flipped = crop[0, 0, 1] > crop[0, -1, 1]
        flips += flipped
        if flipped:
            crop = crop[:, ::-1]
        top, left = int(crop[0, 0, 0]), int(crop[0, 0, 1])
        np.testing.assert_array_equal(crop, image[top : top + 24, left : left + 24])
        offsets.add((top, left))
    # Offsets range over the whole 9 x 17 grid of placements; flips are fair coins.
    assert {t for t, _ in offsets} == set(range(9)) and {x for _, x in offsets} == set(range(17))
    assert 70 < flips < 130
    same = [augment.random_crop_flip(tf.constant(image), seed(3), 24).numpy() for _ in range(2)]
    np.testing.assert_array_equal(*same)


def test_no_flip_when_disabled():
    image = coords_image(16, 16)
    for i in range(20):
        crop = augment.random_crop_flip(tf.constant(image), seed(i), 8, flip=False).numpy()
        assert crop[0, 0, 1] < crop[0, -1, 1]


def test_centre_crop_and_ten_views_are_exact_slices():
    image = coords_image(30, 40)
    centre = augment.center_crop(tf.constant(image), 20).numpy()
    np.testing.assert_array_equal(centre, image[5:25, 10:30])
    views = augment.ten_crops(tf.constant(image), 20).numpy()
    assert views.shape == (10, 20, 20, 3)
    expected = [image[:20, :20], image[:20, 20:], image[10:, :20], image[10:, 20:], centre]
    for i, view in enumerate(expected):
        np.testing.assert_array_equal(views[i], view)
        np.testing.assert_array_equal(views[i + 5], view[:, ::-1])


def test_decode_keeps_the_central_square_of_the_shorter_side():
    # 40 x 100 (h x w): the central 40 x 40 square is green, the side strips red.
    array = np.zeros((40, 100, 3), np.uint8)
    array[:, :30] = array[:, 70:] = (255, 0, 0)
    array[:, 30:70] = (0, 255, 0)
    out = augment.decode_and_resize(tf.constant(png(array)), 64).numpy()
    assert out.shape == (64, 64, 3) and out.dtype == np.uint8
    np.testing.assert_array_equal(out, np.broadcast_to([0, 255, 0], out.shape))


def test_decode_does_not_resample_an_image_already_at_size():
    # The prepared copy's case: the shorter side is already the target, so the central square is
    # returned pixel for pixel (antialiased resampling would blur it slightly).
    array = (np.random.default_rng(2).random((32, 50, 3)) * 255).astype(np.uint8)
    out = augment.decode_and_resize(tf.constant(png(array)), 32).numpy()
    np.testing.assert_array_equal(out, array[:, 9:41])


def test_decode_matches_resize_then_centre_crop():
    # A smooth image, so the reference (Pillow: shorter side to 64, then the central 64 x 64)
    # differs from ours (central square, then resize) only by sub-pixel rounding.
    rows, cols = np.meshgrid(np.linspace(0, 1, 90), np.linspace(0, 1, 150), indexing="ij")
    array = (255 * np.stack([rows, cols, (rows + cols) / 2], -1)).astype(np.uint8)
    ours = augment.decode_and_resize(tf.constant(png(array)), 64).numpy()
    big = Image.fromarray(array).resize((round(150 * 64 / 90), 64), Image.BILINEAR)
    left = (big.width - 64) // 2
    ref = np.asarray(big, np.float32)[:, left : left + 64]
    assert np.abs(ours - ref).mean() < 2.0


def test_jpeg_path_handles_grayscale_and_cmyk():
    for mode, value in (("L", 90), ("CMYK", (0, 255, 255, 0))):
        buf = io.BytesIO()
        Image.new(mode, (50, 30), value).save(buf, "JPEG", quality=95)
        out = augment.decode_and_resize(tf.constant(buf.getvalue()), 16).numpy()
        expected = (90, 90, 90) if mode == "L" else (255, 0, 0)
        np.testing.assert_allclose(out.mean((0, 1)), expected, atol=4)


@pytest.mark.parametrize("scale", ["eigval", "sqrt_eigval"])
def test_lighting_noise_has_the_configured_covariance(scale):
    cfg = augment.AugmentConfig(pca_scale=scale, mean_mode="none")
    n = 20_000

    @tf.function
    def draws():
        seeds = tf.stack([tf.range(n, dtype=tf.int64), tf.zeros([n], tf.int64)], 1)
        return tf.map_fn(
            lambda s: augment.lighting(tf.zeros([2, 2, 3]), s, cfg),
            seeds,
            fn_output_signature=tf.float32,
        )

    noise = draws().numpy()
    # One colour shift per image: every pixel of an image moves by the same RGB vector.
    np.testing.assert_allclose(noise, np.broadcast_to(noise[:, :1, :1], noise.shape), atol=1e-5)
    samples = noise[:, 0, 0]
    v = np.array(cfg.pca_eigvec)
    s = cfg.lighting_sigmas()
    expected = cfg.pca_std**2 * v @ np.diag(s**2) @ v.T
    assert np.abs(samples.mean(0)).max() < 0.05 * np.sqrt(np.diag(expected)).max()
    # Relative Frobenius error of a 20k-sample covariance estimate: about 1-2 %.
    error = np.linalg.norm(np.cov(samples.T) - expected) / np.linalg.norm(expected)
    assert error < 0.05
    # The REFERENCE.md magnitudes: per-component std about [5.5, 0.48, 0.11] vs [11.9, 3.5, 1.7].
    top = {"eigval": 5.55, "sqrt_eigval": 11.89}[scale]
    assert abs(cfg.pca_std * s[0] - top) < 0.02


def test_lighting_off_and_mean_modes():
    image = tf.constant(coords_image(8, 8))
    cfg = augment.AugmentConfig(pca_std=0.0)
    np.testing.assert_array_equal(augment.lighting(image, seed(0), cfg).numpy(), image.numpy())
    channel = augment.subtract_mean(image, cfg).numpy()
    np.testing.assert_allclose(channel, image.numpy() - np.array(cfg.mean_rgb), rtol=1e-6)
    with pytest.raises(ValueError, match="mean image"):
        augment.AugmentConfig(mean_mode="pixel", resize_size=8, image_size=8)
    with pytest.raises(ValueError, match="pca_scale"):
        augment.AugmentConfig(pca_scale="sqrt")


def test_pixel_mean_is_subtracted_before_cropping():
    array = (np.random.default_rng(0).random((32, 32, 3)) * 255).astype(np.uint8)
    data = tf.constant(png(array))
    mean = augment.decode_and_resize(data, 32).numpy()
    cfg = augment.AugmentConfig(image_size=24, resize_size=32, mean_mode="pixel", mean_image=mean)
    # The image minus its own mean image is zero in every crop, centre or random.
    np.testing.assert_allclose(augment.eval_image(data, cfg).numpy(), 0, atol=1e-4)
    np.testing.assert_allclose(augment.eval_image(data, cfg, crops=10).numpy(), 0, atol=1e-4)
    no_noise = dataclasses.replace(cfg, pca_std=0.0)
    np.testing.assert_allclose(augment.train_image(data, seed(1), no_noise).numpy(), 0, atol=1e-4)


def test_train_and_eval_images():
    array = (np.random.default_rng(1).random((50, 70, 3)) * 255).astype(np.uint8)
    data = tf.constant(png(array))
    cfg = augment.AugmentConfig(image_size=24, resize_size=32)
    a, b, c = (augment.train_image(data, seed(i), cfg).numpy() for i in (5, 5, 6))
    assert a.shape == (24, 24, 3) and a.dtype == np.float32
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    assert augment.eval_image(data, cfg, crops=10).shape == (10, 24, 24, 3)
    off = augment.AugmentConfig(image_size=24, resize_size=32, augment=False)
    np.testing.assert_array_equal(
        augment.train_image(data, seed(5), off).numpy(), augment.eval_image(data, cfg).numpy()
    )


def test_config_fields_of_the_experiment():
    from experiments.imagenet import get_config

    data = get_config().data
    cfg = augment.AugmentConfig.from_config(data)
    assert (cfg.image_size, cfg.resize_size, cfg.pca_std) == (224, 256, 0.1)
    assert cfg.pca_scale == "eigval" and cfg.mean_mode == "channel"
    assert cfg == augment.AugmentConfig()  # the module defaults are the experiment's


def test_raw_copy_pixels_pass_through_the_decode():
    """The raw prepared copy stores uint8 pixels: decoding is the identity on them, and the copy
    holds what the decode of the original makes (data/prepare.py, storage='raw')."""
    from alexnet_jax.data import prepare

    array = (np.random.default_rng(3).random((40, 60, 3)) * 255).astype(np.uint8)
    data = tf.constant(png(array))
    stored = prepare.square_image(data, 32, "raw", 90).numpy()
    np.testing.assert_array_equal(stored, augment.decode_and_resize(data, 32).numpy())
    again = augment.decode_and_resize(tf.constant(stored), 32).numpy()
    np.testing.assert_array_equal(again, stored)
    jpeg = prepare.square_image(data, 32, "jpeg", 90).numpy()
    assert isinstance(jpeg, bytes) and tf.io.decode_jpeg(jpeg).shape == (32, 32, 3)

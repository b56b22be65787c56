"""Device augmentation (data/device_augment.py) against the host ops (data/augment.py): the same
distribution of crops, flips and lighting, exactly the same evaluation views, and keys that
depend only on (seed, step, global slot), whatever the number of devices."""

import dataclasses
import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from alexnet_jax.data import augment, device_augment, tfds_common
from alexnet_jax.data.device_augment import DeviceAugment, Preprocess

tf = tfds_common.import_tf()
R, S = 32, 24  # a 9 x 9 grid of crop placements


def coords_image() -> np.ndarray:
    """uint8 [R, R, 3]: channel 0 = row, 1 = column, 2 = 7; a crop names its place."""
    rows, cols = np.meshgrid(np.arange(R), np.arange(R), indexing="ij")
    return np.stack([rows, cols, np.full_like(rows, 7)], -1).astype(np.uint8)


def host_cfg(**kw) -> augment.AugmentConfig:
    return augment.AugmentConfig(image_size=S, resize_size=R, augment_on="host", **kw)


def spec_of(cfg: augment.AugmentConfig) -> DeviceAugment:
    return tfds_common.device_spec(dataclasses.replace(cfg, augment_on="device"))


def device_train(images: np.ndarray, spec: DeviceAugment, *, seed=0, step=0) -> np.ndarray:
    slots = np.arange(len(images), dtype=np.int32)
    fn = jax.jit(lambda b, s: Preprocess(spec, seed).train(b, s)["image"])
    return np.asarray(fn({"image": images, "slot": slots}, jnp.int32(step)))


def host_train(image: np.ndarray, cfg: augment.AugmentConfig, n: int) -> np.ndarray:
    @tf.function
    def draws():
        seeds = tf.stack([tf.range(n, dtype=tf.int64), tf.zeros([n], tf.int64)], 1)
        image_t = tf.constant(image)
        return tf.map_fn(
            lambda s: augment.finish(*_parts(image_t, s, cfg)),
            seeds,
            fn_output_signature=tf.float32,
        )

    return draws().numpy()


def _parts(image, seed, cfg):
    # train_parts decodes bytes; the geometry and offset of an already decoded image:
    crop_seed, light_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
    cropped = augment.random_crop_flip(image, crop_seed, cfg.image_size, cfg.flip)
    return cropped, augment.lighting_offset(light_seed, cfg) + augment._channel_offset(cfg)


def placements(views: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(top * 9 + left, flipped) of coordinate-image crops."""
    flipped = views[:, 0, 0, 1] > views[:, 0, -1, 1]
    left = np.where(flipped, views[:, 0, -1, 1], views[:, 0, 0, 1]).astype(int)
    top = views[:, 0, 0, 0].astype(int)
    return top * (R - S + 1) + left, flipped


N = 3000


def test_crops_and_flips_have_the_host_distribution():
    cfg = host_cfg(pca_std=0.0, mean_mode="none")
    image = coords_image()
    dev = device_train(np.broadcast_to(image, (N, R, R, 3)).copy(), spec_of(cfg))
    host = host_train(image, cfg, N)
    cells = (R - S + 1) ** 2
    counts = []
    for views in (dev, host):
        place, flipped = placements(views)
        # Every view is an exact window (mirrored or not) of the image.
        for v, p, f in list(zip(views, place, flipped, strict=True))[:50]:
            t, left = divmod(int(p), R - S + 1)
            window = image[t : t + S, left : left + S].astype(np.float32)
            np.testing.assert_array_equal(v, window[:, ::-1] if f else window)
        counts.append(np.bincount(place * 2 + flipped, minlength=2 * cells))
        assert stats.chisquare(counts[-1]).pvalue > 1e-3  # uniform over placements x flips
        assert abs(flipped.mean() - 0.5) < 0.05
    # The two samples come from one distribution (chi-square test of homogeneity).
    assert stats.chi2_contingency(np.stack(counts) + 0.5).pvalue > 1e-3


@pytest.mark.parametrize("scale", ["eigval", "sqrt_eigval"])
@pytest.mark.parametrize("mean_mode", ["channel", "pixel"])
def test_lighting_and_mean_have_the_host_distribution(scale, mean_mode):
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (R, R, 3)).astype(np.uint8)
    mean = rng.uniform(0, 255, (R, R, 3)).astype(np.float32) if mean_mode == "pixel" else None
    cfg = host_cfg(pca_scale=scale, mean_mode=mean_mode, mean_image=mean, flip=False)
    no_noise = dataclasses.replace(cfg, pca_std=0.0)
    shifts = []
    for views, clean in (
        (
            device_train(np.broadcast_to(image, (N, R, R, 3)).copy(), spec_of(cfg)),
            device_train(np.broadcast_to(image, (N, R, R, 3)).copy(), spec_of(no_noise)),
        ),
        (
            host_train(_host_input(image, cfg), cfg, N),
            host_train(_host_input(image, cfg), no_noise, N),
        ),
    ):
        # Same crops with and without noise (same keys): the difference is the lighting shift,
        # one RGB vector per image.
        diff = (views - clean).reshape(N, -1, 3)
        np.testing.assert_allclose(diff, np.broadcast_to(diff[:, :1], diff.shape), atol=1e-3)
        shifts.append(diff[:, 0])
    v, s = np.array(cfg.pca_eigvec), cfg.lighting_sigmas()
    expected = cfg.pca_std**2 * v @ np.diag(s**2) @ v.T
    for sample in shifts:
        error = np.linalg.norm(np.cov(sample.T) - expected) / np.linalg.norm(expected)
        assert error < 0.1
    for k in range(3):  # component by component, the two samples agree (Kolmogorov-Smirnov)
        assert stats.ks_2samp(shifts[0][:, k], shifts[1][:, k]).pvalue > 1e-3


def _host_input(image, cfg):
    """What the host path crops: the image, minus the mean image in mode 'pixel'."""
    if cfg.mean_mode == "pixel":
        return image.astype(np.float32) - cfg.mean_image
    return image


@pytest.mark.parametrize("crops", [1, 10])
@pytest.mark.parametrize("mean_mode", ["channel", "pixel", "none"])
def test_evaluation_views_are_exactly_the_host_views(crops, mean_mode):
    rng = np.random.default_rng(1)
    array = rng.integers(0, 256, (50, 70, 3)).astype(np.uint8)
    data = tf.io.encode_png(array)
    mean = rng.uniform(0, 255, (R, R, 3)).astype(np.float32) if mean_mode == "pixel" else None
    cfg = host_cfg(mean_mode=mean_mode, mean_image=mean)
    host = augment.eval_image(data, cfg, crops).numpy()
    pixels = augment.decode_and_resize(data, R).numpy()[None]  # what the device path sends
    device = jax.jit(lambda b: Preprocess(spec_of(cfg), 0, crops).eval(b)["image"])(
        {"image": pixels}
    )
    np.testing.assert_array_equal(np.asarray(device)[0], host)


def test_keys_are_a_function_of_seed_step_and_global_slot_whatever_the_devices():
    cfg = host_cfg()
    spec = spec_of(cfg)
    images = np.random.default_rng(2).integers(0, 256, (8, R, R, 3)).astype(np.uint8)
    slots = device_augment.global_slots(8, 0)
    one = device_train(images, spec, step=5)
    np.testing.assert_array_equal(one, device_train(images, spec, step=5))  # repeatable
    assert not np.array_equal(one, device_train(images, spec, step=6))  # new draws each step
    assert not np.array_equal(one, device_train(images, spec, step=5, seed=1))
    same = np.broadcast_to(images[:1], images.shape).copy()
    drawn = device_train(same, spec, step=5)
    assert len({d.tobytes() for d in drawn}) == 8  # a different draw per slot

    def run(devices):
        n = len(devices)
        fn = jax.pmap(
            lambda b, s: Preprocess(spec, 0).train(b, s)["image"], axis_name="d", devices=devices
        )
        batch = {"image": images.reshape(n, -1, R, R, 3), "slot": slots.reshape(n, -1)}
        return np.asarray(fn(batch, jnp.full((n,), 5, jnp.int32))).reshape(8, S, S, 3)

    assert jax.device_count() == 4
    np.testing.assert_array_equal(run(jax.devices()), run(jax.devices()[:1]))
    np.testing.assert_array_equal(run(jax.devices()), one)
    # A second process holds slots 8..15 of a 16-example global batch: other draws.
    second = jax.jit(lambda b: Preprocess(spec, 0).train(b, jnp.int32(5))["image"])(
        {"image": images, "slot": device_augment.global_slots(8, 1)}
    )
    assert not np.array_equal(np.asarray(second), one)


def test_train_step_with_device_augmentation_on_four_devices_equals_one():
    from alexnet_jax import parallel, steps
    from alexnet_jax.data.digits import DigitsSource
    from experiments.digits import get_config

    config = get_config()
    config.model.dense_features = 64
    config.model.conv_features = (8, 16, 16, 16, 16)
    config.model.dropout_rate = 0.0  # dropout keys are per device by design; crops must not be
    source = DigitsSource(config)
    model = steps.from_config(config.model)
    state, tx = steps.create_state(config, model, (64, 64, 3))
    batch = next(source.train_batches(8, seed=0))
    assert batch["image"].shape == (8, 72, 72, 3) and "slot" in batch
    step = functools.partial(
        steps.train_step,
        model=model,
        tx=tx,
        schedule=lambda s: 0.01,
        axis_name=parallel.AXIS,
        preprocess=Preprocess(source.info.device_augment, 0).train,
    )
    out = []
    for devices in (jax.devices(), jax.devices()[:1]):
        n = len(devices)
        p = jax.pmap(step, axis_name=parallel.AXIS, devices=devices)
        put = functools.partial(_replicate, n=n)
        sharded = {k: v.reshape(n, -1, *v.shape[1:]) for k, v in batch.items()}
        new, metrics = p(put(state), sharded, put(steps.dropout_base_key(0)))
        out.append((jax.device_get(parallel.unreplicate(new)).params, float(metrics["loss"][0])))
    chex.assert_trees_all_close(out[0][0], out[1][0], rtol=1e-4, atol=1e-6)
    assert out[0][1] == pytest.approx(out[1][1], rel=1e-5)


def _replicate(tree, n):
    return jax.tree_util.tree_map(lambda x: np.broadcast_to(np.asarray(x), (n, *np.shape(x))), tree)

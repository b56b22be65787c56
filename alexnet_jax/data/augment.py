"""The paper's image pre-processing as pure TensorFlow ops (Krizhevsky et al. 2012, sec. 2, 4.1).

- Every image: rescale so the shorter side is `resize_size` (256), keep the central square.
- Training: a random `image_size` (224) crop and a random horizontal flip (section 4.1, first
  form), then PCA "lighting" noise drawn once per image (second form), then mean subtraction.
- Evaluation: the centre crop, or the paper's 10 views (four corners and the centre, and the
  mirror of each) stacked as `[10, H, W, C]`.

Every random choice is a `tf.random.stateless_*` op of an explicit seed, which the pipelines
derive from (run seed, example slot): the same seed gives the same crops, flips and noise, in
any process, on any rerun or resume. Pixels stay on the 0-255 scale; the only normalisation is
the mean subtraction (the paper does not divide by a standard deviation).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import tensorflow as tf

from alexnet_jax.data.base import AUGMENT_ON, MEAN_MODES, PCA_SCALES


def hide_gpus() -> None:
    """Makes every GPU invisible to TensorFlow: it only does host work here, and must not take
    accelerator memory that JAX needs. Takes effect only before TF's first op, hence its call
    right below, at import time (idempotent)."""
    try:
        tf.config.set_visible_devices([], "GPU")
    except RuntimeError:  # the runtime is already initialised; it still must hold no GPU
        if tf.config.get_visible_devices("GPU"):
            raise


hide_gpus()

# fb.resnet.torch's ImageNet statistics (pixels in [0, 1]); REFERENCE.md, "Data and augmentation".
# Columns of EIGVEC are the principal components; rows are R, G, B.
PCA_EIGVAL = (0.2175, 0.0188, 0.0045)
PCA_EIGVEC = (
    (-0.5675, 0.7192, 0.4009),
    (-0.5808, -0.0045, -0.8140),
    (-0.5836, -0.6948, 0.4203),
)
IMAGENET_MEAN_RGB = (123.675, 116.28, 103.53)  # 255 * (0.485, 0.456, 0.406)


@dataclasses.dataclass(frozen=True)
class AugmentConfig:
    """The pre-processing fields of `config.data`, checked once."""

    image_size: int = 224
    resize_size: int = 256
    resize_antialias: bool = True  # Pillow-like downscaling; False: plain bilinear, ~2x faster
    augment: bool = True  # False: training images get the evaluation centre crop
    flip: bool = True
    pca_std: float = 0.1  # std of the per-image alphas; 0 turns the lighting noise off
    pca_eigval: tuple[float, ...] = PCA_EIGVAL
    pca_eigvec: tuple[tuple[float, ...], ...] = PCA_EIGVEC
    pca_scale: str = "eigval"  # 'eigval' | 'sqrt_eigval'
    mean_mode: str = "channel"  # 'channel' | 'pixel' | 'none'
    mean_rgb: tuple[float, ...] = IMAGENET_MEAN_RGB
    # 'host': this module augments; 'device': the host only decodes (uint8 at resize_size) and
    # the device step augments (data/device_augment.py); the ops below are the 'host' path.
    augment_on: str = "device"
    # [resize_size, resize_size, 3], for mean_mode="pixel"; not compared (an array has no ==)
    mean_image: np.ndarray | None = dataclasses.field(default=None, compare=False)

    def __post_init__(self):
        if self.image_size > self.resize_size:
            raise ValueError(f"image_size {self.image_size} > resize_size {self.resize_size}")
        if self.pca_scale not in PCA_SCALES:
            raise ValueError(f"pca_scale: 'eigval' or 'sqrt_eigval', not {self.pca_scale!r}")
        if self.mean_mode not in MEAN_MODES:
            raise ValueError(f"mean_mode: 'channel', 'pixel' or 'none', not {self.mean_mode!r}")
        if self.mean_mode == "pixel":
            shape = (self.resize_size, self.resize_size, 3)
            if self.mean_image is None or tuple(self.mean_image.shape) != shape:
                raise ValueError(f"mean_mode='pixel' needs a mean image of shape {shape}")
        if self.augment_on not in AUGMENT_ON:
            raise ValueError(f"augment_on: 'device' or 'host', not {self.augment_on!r}")
        if np.shape(self.pca_eigvec) != (3, 3) or len(self.pca_eigval) != 3:
            raise ValueError("pca_eigvec must be 3x3 and pca_eigval have 3 entries")

    @classmethod
    def from_config(cls, data: Any, mean_image: np.ndarray | None = None) -> AugmentConfig:
        """Reads `config.data`; fields it lacks keep the paper's defaults above."""
        d = cls()
        get = data.get
        return cls(
            image_size=int(get("image_size", d.image_size)),
            resize_size=int(get("resize_size", d.resize_size)),
            resize_antialias=bool(get("resize_antialias", d.resize_antialias)),
            augment=bool(get("augment", d.augment)),
            flip=bool(get("flip", d.flip)),
            pca_std=float(get("pca_std", d.pca_std)),
            pca_eigval=tuple(float(v) for v in get("pca_eigval", d.pca_eigval)),
            pca_eigvec=tuple(tuple(map(float, row)) for row in get("pca_eigvec", d.pca_eigvec)),
            pca_scale=str(get("pca_scale", d.pca_scale)),
            mean_mode=str(get("mean_mode", d.mean_mode)),
            mean_rgb=tuple(float(v) for v in get("mean_rgb", d.mean_rgb)),
            augment_on=str(get("augment_on", d.augment_on)),
            mean_image=mean_image,
        )

    def lighting_sigmas(self) -> np.ndarray:
        """Per-component scale s_i (0-255 pixel units); the noise is eigvec @ (alpha * s).

        'eigval' (the paper as printed, fb.resnet.torch): s = eigval, computed for pixels in
        [0, 1], so 255 * eigval here: about [5.5, 0.48, 0.11] at alpha std 0.1.
        'sqrt_eigval' (cc2, on 0-255 pixels): s = sqrt of the 0-255 eigenvalues
        = 255 * sqrt(eigval): about [11.9, 3.5, 1.7] at alpha std 0.1 with these eigenvalues
        (cc2's own statistics give [12.2, 3.7, 2.0]).
        """
        eigval = np.asarray(self.pca_eigval, np.float64)
        scale = eigval if self.pca_scale == "eigval" else np.sqrt(eigval)
        return (255.0 * scale).astype(np.float32)


# --- decoding --------------------------------------------------------------------------------


def decode_and_resize(image_bytes: tf.Tensor, size: int, antialias: bool = True) -> tf.Tensor:
    """Encoded image -> uint8 [size, size, 3]: shorter side to `size`, central square.

    Cropping the central square first and then resizing it to size x size is the paper's
    "rescale the shorter side to 256, crop the central 256x256 patch" up to sub-pixel rounding,
    and for JPEGs it lets libjpeg skip decoding the discarded strips. Grayscale, CMYK and
    palette images come out as RGB (`channels=3`); PNG, GIF, BMP and WebP go through
    `decode_image`. Downscaling uses an antialiased bilinear filter, as Pillow does (cc2's
    make-data used Pillow), rounded back to uint8 as Pillow's is; TF's antialiased resize costs
    about twice the JPEG decode, so `antialias=False` (plain bilinear, as TF's own ImageNet
    pipelines resize) is there for full-size training. An image already `size` on its shorter
    side (the prepared copy) is not resampled at all, which is most of the copy's speed.
    uint8 pixels (the raw copy) skip the decode.
    """

    def jpeg() -> tf.Tensor:
        shape = tf.image.extract_jpeg_shape(image_bytes)
        side = tf.minimum(shape[0], shape[1])
        window = tf.stack([(shape[0] - side) // 2, (shape[1] - side) // 2, side, side])
        return tf.image.decode_and_crop_jpeg(image_bytes, window, channels=3)

    def other() -> tf.Tensor:
        image = tf.io.decode_image(image_bytes, channels=3, expand_animations=False)
        image.set_shape([None, None, 3])
        return central_square(image)

    image_bytes = tf.convert_to_tensor(image_bytes)  # callers may pass Python bytes
    if image_bytes.dtype == tf.uint8:  # already pixels (the raw prepared copy)
        image = central_square(image_bytes)
    else:
        image = tf.cond(tf.io.is_jpeg(image_bytes), jpeg, other)

    def resize() -> tf.Tensor:
        resized = tf.image.resize(image, [size, size], method="bilinear", antialias=antialias)
        return tf.cast(tf.clip_by_value(tf.round(resized), 0, 255), tf.uint8)

    image = tf.cond(tf.shape(image)[0] == size, lambda: image, resize)
    image.set_shape([size, size, 3])
    return image


def central_square(image: tf.Tensor) -> tf.Tensor:
    shape = tf.shape(image)
    side = tf.minimum(shape[0], shape[1])
    return tf.image.crop_to_bounding_box(
        image, (shape[0] - side) // 2, (shape[1] - side) // 2, side, side
    )


# --- training ops ------------------------------------------------------------------------
# An example is computed in two parts: the geometry (decode, crop, flip) per image, on uint8
# pixels, and a per-image RGB offset (lighting noise minus the channel mean) that `finish` adds
# after batching, in one vectorised op over the whole batch. Both the noise and the channel mean
# are one RGB vector per image, so this is the same arithmetic, at a fraction of the per-image
# cost (scripts/bench_input.py).


def random_crop_flip(image: tf.Tensor, seed: tf.Tensor, size: int, flip: bool = True) -> tf.Tensor:
    """A uniformly placed `size` x `size` crop, mirrored with probability 1/2 (section 4.1)."""
    crop_seed, flip_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
    image = tf.image.stateless_random_crop(image, [size, size, 3], seed=crop_seed)
    if flip:
        image = tf.image.stateless_random_flip_left_right(image, seed=flip_seed)
    return image


def lighting_offset(seed: tf.Tensor, cfg: AugmentConfig) -> tf.Tensor:
    """The RGB shift eigvec @ (alpha * s), alpha ~ N(0, pca_std^2 I), drawn once per image.

    Section 4.1: "add multiples of the found principal components, with magnitudes proportional to
    the corresponding eigenvalues times a random variable drawn from a Gaussian with mean zero and
    standard deviation 0.1". Its covariance is pca_std^2 * V diag(s^2) V^T.
    """
    if cfg.pca_std == 0:
        return tf.zeros([3])
    alpha = tf.random.stateless_normal([3], seed=seed, stddev=cfg.pca_std)
    eigvec = tf.constant(cfg.pca_eigvec, tf.float32)
    return tf.linalg.matvec(eigvec, alpha * tf.constant(cfg.lighting_sigmas()))


def lighting(image: tf.Tensor, seed: tf.Tensor, cfg: AugmentConfig) -> tf.Tensor:
    """`image` (float) plus the lighting shift of `seed` on every pixel."""
    return image + lighting_offset(seed, cfg)


def subtract_mean(image: tf.Tensor, cfg: AugmentConfig) -> tf.Tensor:
    """Mean subtraction: per channel (common), per pixel (the paper) or none.

    For 'pixel' the image must still be resize_size x resize_size: the paper subtracts the mean
    256x256 image before cropping, which equals cropping the mean image along with the patch.
    """
    image = tf.cast(image, tf.float32)
    if cfg.mean_mode == "pixel":
        return image - tf.constant(cfg.mean_image, tf.float32)
    return image + _channel_offset(cfg)


def _channel_offset(cfg: AugmentConfig) -> tf.Tensor:
    mean = cfg.mean_rgb if cfg.mean_mode == "channel" else (0.0, 0.0, 0.0)
    return -tf.constant(mean, tf.float32)


def _resized(image_bytes: tf.Tensor, cfg: AugmentConfig) -> tf.Tensor:
    """uint8, or float32 minus the mean image when mean_mode='pixel' (subtracted before crops)."""
    image = decode_and_resize(image_bytes, cfg.resize_size, cfg.resize_antialias)
    return subtract_mean(image, cfg) if cfg.mean_mode == "pixel" else image


def train_parts(
    image_bytes: tf.Tensor, seed: tf.Tensor, cfg: AugmentConfig
) -> tuple[tf.Tensor, tf.Tensor]:
    """(cropped image, RGB offset) of one training example; `finish` combines them."""
    if not cfg.augment:
        return eval_parts(image_bytes, cfg)
    crop_seed, light_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
    image = random_crop_flip(_resized(image_bytes, cfg), crop_seed, cfg.image_size, cfg.flip)
    offset = lighting_offset(light_seed, cfg)
    if cfg.mean_mode != "pixel":
        offset += _channel_offset(cfg)
    return image, offset


def finish(image: tf.Tensor, offset: tf.Tensor) -> tf.Tensor:
    """float32 image(s) + offset(s): [..., H, W, 3] + [..., 3], for one example or a batch."""
    offset = tf.convert_to_tensor(offset)
    for _ in range(image.shape.rank - offset.shape.rank):
        offset = tf.expand_dims(offset, -2)
    return tf.cast(image, tf.float32) + offset


def train_image(image_bytes: tf.Tensor, seed: tf.Tensor, cfg: AugmentConfig) -> tf.Tensor:
    """One training example: float32 [image_size, image_size, 3]; `seed` is a [2] int tensor."""
    return finish(*train_parts(image_bytes, seed, cfg))


# --- evaluation ops ------------------------------------------------------------------------


def center_crop(image: tf.Tensor, size: int) -> tf.Tensor:
    shape = tf.shape(image)
    return tf.image.crop_to_bounding_box(
        image, (shape[0] - size) // 2, (shape[1] - size) // 2, size, size
    )


def ten_crops(image: tf.Tensor, size: int) -> tf.Tensor:
    """[10, size, size, C]: top-left, top-right, bottom-left, bottom-right, centre, then the
    horizontal mirror of each in the same order (the paper's 10 test patches, section 4.1)."""
    shape = tf.shape(image)
    h, w = shape[0], shape[1]
    corners = [
        image[:size, :size],
        image[:size, w - size :],
        image[h - size :, :size],
        image[h - size :, w - size :],
        center_crop(image, size),
    ]
    views = tf.stack(corners)
    return tf.concat([views, tf.reverse(views, axis=[2])], axis=0)


def eval_parts(
    image_bytes: tf.Tensor, cfg: AugmentConfig, crops: int = 1
) -> tuple[tf.Tensor, tf.Tensor]:
    """(centre crop [H, W, 3] or 10 views [10, H, W, 3], RGB offset); see `finish`."""
    if crops not in (1, 10):
        raise ValueError(f"crops must be 1 or 10, not {crops}")
    image = _resized(image_bytes, cfg)
    if crops == 1:
        image = center_crop(image, cfg.image_size)
    else:
        image = ten_crops(image, cfg.image_size)
    offset = tf.zeros([3]) if cfg.mean_mode == "pixel" else _channel_offset(cfg)
    return image, offset


def eval_image(image_bytes: tf.Tensor, cfg: AugmentConfig, crops: int = 1) -> tf.Tensor:
    """The centre crop [H, W, 3] (crops=1) or the 10 views [10, H, W, 3] (crops=10), float32."""
    return finish(*eval_parts(image_bytes, cfg, crops))

"""The paper's augmentation as pure JAX functions, run inside the device step (`data.augment_on`).

The host decodes and sends each example as uint8 pixels at `resize_size` (256x256x3 = 196,608
bytes, a quarter of the float32 224 crop it used to send), with its `slot`: the example's index
in the *global* batch (process offset + local index). The device step then cuts the random
`image_size` crop, mirrors it, adds the PCA lighting noise and subtracts the mean (per channel or
the mean image), exactly the arithmetic of `augment.py` (which stays as the `host` option).

Every draw comes from `fold_in(fold_in(augment_base_key(seed), step), slot)`: a function of
(seed, step, global slot) alone, so a resumed run, a run on another number of devices or of
processes, sees the same crops, flips and noise for the same global example. Evaluation cuts the
centre crop or the paper's ten views from the same uint8 image, bit for bit what the host path
cuts (tests/test_device_augment.py).

No TensorFlow here: the steps import this module.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

Array = jax.Array
_AUGMENT_KEY = 2  # fold_in(PRNGKey(seed), 0) inits, 1 is dropout's base, 2 augmentation's


@dataclasses.dataclass(frozen=True)
class DeviceAugment:
    """What the device step needs to turn a host batch into the model's input."""

    image_size: int  # the crop (224)
    resize_size: int  # the side of the square images the host sends (256)
    augment: bool = True  # False: training gets the evaluation centre crop
    flip: bool = True
    pca_std: float = 0.0
    pca_eigvec: tuple[tuple[float, ...], ...] = ((1.0, 0, 0), (0, 1.0, 0), (0, 0, 1.0))
    sigmas: tuple[float, ...] = (0.0, 0.0, 0.0)  # lighting scale per component, 0-255 units
    mean_rgb: tuple[float, ...] = (0.0, 0.0, 0.0)  # subtracted per channel (zeros: none)
    # [resize_size, resize_size, 3] float32, subtracted before cropping (mean_mode='pixel');
    # not compared (an array has no ==): `mean_digest` stands for it in == and hash.
    mean_image: np.ndarray | None = dataclasses.field(default=None, compare=False)
    mean_digest: str = ""

    def __post_init__(self):
        if self.image_size > self.resize_size:
            raise ValueError(f"image_size {self.image_size} > resize_size {self.resize_size}")
        if self.mean_image is not None:
            shape = (self.resize_size, self.resize_size, 3)
            if tuple(self.mean_image.shape) != shape:
                raise ValueError(f"the mean image must have shape {shape}")
            digest = hashlib.sha256(np.asarray(self.mean_image, np.float32).tobytes()).hexdigest()
            object.__setattr__(self, "mean_digest", digest)


def augment_base_key(seed: int) -> Array:
    """The key every augmentation draw is folded from; apart from the init and dropout keys."""
    return jax.random.fold_in(jax.random.PRNGKey(seed), _AUGMENT_KEY)


def example_key(base: Array, step: Array, slot: Array) -> Array:
    """fold_in(fold_in(base, step), slot): one key per (step, global example slot)."""
    return jax.random.fold_in(jax.random.fold_in(base, step), slot)


def _float(image: Array, spec: DeviceAugment, top: Array | int, left: Array | int) -> Array:
    """The uint8 window at (top, left) as float32 minus the mean image's same window."""
    size = spec.image_size
    x = lax.dynamic_slice(image, (top, left, 0), (size, size, image.shape[-1])).astype(jnp.float32)
    if spec.mean_image is not None:
        mean = jnp.asarray(spec.mean_image, jnp.float32)
        x = x - lax.dynamic_slice(mean, (top, left, 0), (size, size, 3))
    return x


def lighting_offset(key: Array, spec: DeviceAugment) -> Array:
    """eigvec @ (alpha * sigmas), alpha ~ N(0, pca_std^2 I), once per image (paper 4.1)."""
    if spec.pca_std == 0:
        return jnp.zeros((3,), jnp.float32)
    alpha = jax.random.normal(key, (3,), jnp.float32) * spec.pca_std
    eigvec = jnp.asarray(spec.pca_eigvec, jnp.float32)
    return eigvec @ (alpha * jnp.asarray(spec.sigmas, jnp.float32))


def train_view(image: Array, key: Array, spec: DeviceAugment) -> Array:
    """One training example: [R, R, C] pixels -> float32 [S, S, C], augmented by `key`."""
    if not spec.augment:
        return center_view(image, spec)
    k_crop, k_flip, k_light = jax.random.split(key, 3)
    room = spec.resize_size - spec.image_size
    top, left = jax.random.randint(k_crop, (2,), 0, room + 1)
    x = _float(image, spec, top, left)
    if spec.flip:
        x = jnp.where(jax.random.bernoulli(k_flip), x[:, ::-1], x)
    # One RGB vector per image, as on the host: noise minus the channel mean, added once.
    return x + (lighting_offset(k_light, spec) - jnp.asarray(spec.mean_rgb, jnp.float32))


def center_view(image: Array, spec: DeviceAugment) -> Array:
    off = (spec.resize_size - spec.image_size) // 2
    return _float(image, spec, off, off) + -jnp.asarray(spec.mean_rgb, jnp.float32)


def ten_views(image: Array, spec: DeviceAugment) -> Array:
    """[10, S, S, C]: the four corners, the centre, then the mirror of each (section 4.1), in
    the order `augment.ten_crops` cuts them."""
    far = spec.resize_size - spec.image_size
    centre = far // 2
    places = [(0, 0), (0, far), (far, 0), (far, far), (centre, centre)]
    views = jnp.stack([_float(image, spec, t, left) for t, left in places])
    views = jnp.concatenate([views, views[:, :, ::-1]])
    return views + -jnp.asarray(spec.mean_rgb, jnp.float32)


@dataclasses.dataclass(frozen=True)
class Preprocess:
    """Host batch -> model input inside the device step (see the module docstring)."""

    spec: DeviceAugment
    seed: int
    crops: int = 1

    def train(self, batch: dict[str, Array], step: Array) -> dict[str, Array]:
        base = augment_base_key(self.seed)
        keys = jax.vmap(lambda slot: example_key(base, step, slot))(batch["slot"])
        images = jax.vmap(lambda x, k: train_view(x, k, self.spec))(batch["image"], keys)
        return {k: v for k, v in batch.items() if k != "slot"} | {"image": images}

    def eval(self, batch: dict[str, Array]) -> dict[str, Array]:
        view = ten_views if self.crops == 10 else center_view
        images = jax.vmap(lambda x: view(x, self.spec))(batch["image"])
        return {k: v for k, v in batch.items() if k != "slot"} | {"image": images}


TrainPreprocess = Callable[[dict[str, Array], Array], dict[str, Array]]
EvalPreprocess = Callable[[dict[str, Array]], dict[str, Array]]


def make_preprocess(spec: DeviceAugment | None, seed: int, crops: int = 1) -> Any:
    """The device preprocessing of a run, or None when the host sends the model's input."""
    return None if spec is None else Preprocess(spec, int(seed), int(crops))


def global_slots(batch_size: int, process_index: int) -> np.ndarray:
    """int32 [batch_size]: this process's examples' indices in the global batch."""
    return (process_index * batch_size + np.arange(batch_size)).astype(np.int32)

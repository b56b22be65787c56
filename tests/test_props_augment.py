"""The paper's ten test views (section 4.1) of any image are numpy slices of it: the four corner
patches and the centre patch, then the horizontal mirror of each, in that order."""

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

# The library, imported in one place.
from alexnet_jax.data import augment, tfds_common
from tests.test_evaluate import ten_views  # the paper's ten patches, by hand

tf = tfds_common.import_tf()

SCALE = 10 if settings.get_current_profile_name() == "slow" else 1


@st.composite
def images(draw):
    size = draw(st.integers(1, 12))
    h, w = draw(st.integers(size, size + 9)), draw(st.integers(size, size + 9))
    shape = (h, w, draw(st.sampled_from([1, 3])))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    if draw(st.booleans()):
        # All values distinct: a view taken from the wrong place cannot match.
        image = rng.permutation(h * w * shape[2]).reshape(shape).astype(np.float32)
    else:
        image = rng.integers(0, 256, shape).astype(np.uint8)
    return image, size


# The tf.data pipeline traces ten_crops with the image's height and width unknown.
_graph_ten_crops = {}


def graph_ten_crops(image, size):
    if (size, image.dtype, image.shape[-1]) not in _graph_ten_crops:
        spec = tf.TensorSpec([None, None, image.shape[-1]], tf.as_dtype(image.dtype))
        _graph_ten_crops[size, image.dtype, image.shape[-1]] = tf.function(
            lambda x: augment.ten_crops(x, size), input_signature=[spec]
        )
    return _graph_ten_crops[size, image.dtype, image.shape[-1]](tf.constant(image))


@settings(max_examples=25 * SCALE, deadline=None)
@given(images())
def test_ten_views_are_corners_centre_and_their_mirrors(case):
    image, size = case
    expected = ten_views(image, size)
    eager = augment.ten_crops(tf.constant(image), size).numpy()
    np.testing.assert_array_equal(eager, expected)
    np.testing.assert_array_equal(graph_ten_crops(image, size).numpy(), expected)


@settings(max_examples=10 * SCALE, deadline=None)
@given(images())
def test_the_centre_view_is_the_centre_crop(case):
    image, size = case
    centre = augment.center_crop(tf.constant(image), size).numpy()
    np.testing.assert_array_equal(centre, ten_views(image, size)[4])

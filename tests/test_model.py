"""The model: exact parameter counts, layer shapes, LRN, initialisation and dropout."""

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from alexnet_jax.layers import local_response_norm
from alexnet_jax.model import PRESETS, AlexNet, abstract_params, param_table


def _count(model: AlexNet, size: int = 224) -> int:
    return sum(r[2] for r in param_table(abstract_params(model, (size, size, 3))))


@pytest.mark.parametrize(
    ("fields", "expected"),
    [({}, 60_965_224), ({"groups": 1}, 62_378_344), (PRESETS["torchvision"], 61_100_840)],
    ids=["paper", "ungrouped", "torchvision"],
)
def test_exact_parameter_counts(fields, expected):
    assert _count(AlexNet(**fields)) == expected


def test_227_input_without_padding_has_the_same_parameters():
    # Caffe's convention: 227x227 input, no conv1 padding; same 55x55 map, same 6x6x256 at fc6.
    assert _count(AlexNet(conv1_padding=0), size=227) == 60_965_224


def test_layer_output_shapes_follow_the_paper():
    model = AlexNet()
    x = jnp.zeros((2, 224, 224, 3))

    def run():
        return model.apply(
            model.init(jax.random.key(0), x, train=False),
            x,
            train=False,
            capture_intermediates=True,
            mutable=["intermediates"],
        )

    logits, state = jax.eval_shape(run)
    inter = state["intermediates"]
    shapes = {k: inter[k]["__call__"][0].shape for k in inter if k.startswith(("conv", "fc"))}
    assert shapes == {
        "conv1": (2, 55, 55, 96),
        "conv2": (2, 27, 27, 256),
        "conv3": (2, 13, 13, 384),
        "conv4": (2, 13, 13, 384),
        "conv5": (2, 13, 13, 256),
        "fc6": (2, 4096),
        "fc7": (2, 4096),
        "fc8": (2, 1000),
    }
    assert logits.shape == (2, 1000)
    params = abstract_params(model, (224, 224, 3))
    assert params["fc6"]["kernel"].shape == (6 * 6 * 256, 4096)  # conv5 pooled to 6x6x256
    assert params["conv2"]["kernel"].shape == (5, 5, 48, 256)  # each column sees 48 channels


def _lrn_numpy(x, size, k, alpha, beta, divide):
    sq = x.astype(np.float64) ** 2
    c = x.shape[-1]
    out = np.empty_like(x, dtype=np.float64)
    for i in range(c):
        lo, hi = max(0, i - size // 2), min(c, i + size // 2 + 1)
        s = sq[..., lo:hi].sum(-1)
        out[..., i] = x[..., i] / (k + (alpha / size if divide else alpha) * s) ** beta
    return out


@pytest.mark.parametrize("divide", [False, True], ids=["paper_alpha", "alpha_over_n"])
def test_lrn_matches_the_formula(divide):
    x = np.random.default_rng(0).normal(0, 30, (2, 3, 4, 11)).astype(np.float32)
    got = local_response_norm(
        jnp.asarray(x), size=5, k=2.0, alpha=1e-3, beta=0.75, scale_alpha_by_size=divide
    )
    np.testing.assert_allclose(got, _lrn_numpy(x, 5, 2.0, 1e-3, 0.75, divide), rtol=1e-5)


def test_lrn_per_column_normalises_each_column_on_its_own():
    """model.lrn_per_column: the windows stop at the column boundary, as on the paper's two
    GPUs: the LRN of each half of the channels alone; the one-tower LRN differs only there."""
    x = np.random.default_rng(1).normal(0, 30, (2, 3, 4, 12)).astype(np.float32)
    args = dict(size=5, k=2.0, alpha=1e-3, beta=0.75)
    got = local_response_norm(jnp.asarray(x), groups=2, **args)
    halves = [_lrn_numpy(h, 5, 2.0, 1e-3, 0.75, False) for h in np.split(x, 2, axis=-1)]
    np.testing.assert_allclose(got, np.concatenate(halves, -1), rtol=1e-5)
    tower = np.asarray(local_response_norm(jnp.asarray(x), **args))
    differs = ~np.isclose(np.asarray(got), tower, rtol=1e-6).all(axis=(0, 1, 2))
    assert differs.nonzero()[0].tolist() == [4, 5, 6, 7]  # the channels 2 from the boundary


def test_lrn_conventions_differ_by_n():
    x = jnp.full((1, 1, 1, 8), 20.0)
    a = local_response_norm(x, alpha=5e-4, scale_alpha_by_size=True)
    b = local_response_norm(x, alpha=1e-4, scale_alpha_by_size=False)
    np.testing.assert_allclose(a, b, rtol=1e-6)  # torch(alpha=5e-4) == paper(alpha=1e-4)
    assert not np.allclose(a, local_response_norm(x, alpha=5e-4))


def test_paper_initialisation():
    params = AlexNet().init(jax.random.key(0), jnp.zeros((1, 224, 224, 3)), train=False)["params"]
    for layer in ("conv1", "conv3", "fc8"):
        assert float(jnp.abs(params[layer]["bias"]).max()) == 0.0
    for layer in ("conv2", "conv4", "conv5", "fc6", "fc7"):
        np.testing.assert_array_equal(params[layer]["bias"], 1.0)
    std = float(jnp.std(params["fc6"]["kernel"]))
    assert abs(std - 0.01) < 2e-4


def test_small_model_trains_on_64px_inputs():
    model = AlexNet(num_classes=10, conv_features=(8, 16, 16, 16, 16), dense_features=32)
    x = jnp.ones((3, 64, 64, 3))
    out = model.apply(model.init(jax.random.key(0), x, train=False), x, train=False)
    chex.assert_shape(out, (3, 10))
    chex.assert_tree_all_finite(out)


class TestDropout:
    model = AlexNet(num_classes=10, conv_features=(8, 16, 16, 16, 16), dense_features=64)
    x = jax.random.normal(jax.random.key(1), (4, 64, 64, 3))
    variables = model.init(jax.random.key(0), x, train=False)

    def test_eval_needs_no_key_and_ignores_one(self):
        a = self.model.apply(self.variables, self.x, train=False)
        b = self.model.apply(
            self.variables, self.x, train=False, rngs={"dropout": jax.random.key(5)}
        )
        np.testing.assert_array_equal(a, b)

    def test_train_is_a_function_of_the_key(self):
        def f(seed):
            return self.model.apply(
                self.variables, self.x, train=True, rngs={"dropout": jax.random.key(seed)}
            )

        np.testing.assert_array_equal(f(1), f(1))
        assert not np.allclose(f(1), f(2))

    def test_train_without_key_fails(self):
        with pytest.raises(Exception, match="dropout"):
            self.model.apply(self.variables, self.x, train=True)

    def test_inverted_dropout_keeps_the_mean(self):
        x = jnp.ones((200_000,))
        y = nn.Dropout(0.5, deterministic=False).apply({}, x, rngs={"dropout": jax.random.key(0)})
        assert set(np.unique(np.asarray(y)).tolist()) == {0.0, 2.0}
        assert abs(float(y.mean()) - 1.0) < 0.01


def test_torchvision_preset_puts_dropout_before_the_dense_layers():
    # In the torchvision model, fc8's input is *not* dropped: with dropout only before fc6/fc7,
    # zeroing every fc7 output can't happen; in the paper model the fc7 outputs are dropped.
    model = AlexNet(**PRESETS["torchvision"], num_classes=10, dropout_rate=0.5)
    assert model.dropout_before_dense and not AlexNet().dropout_before_dense


def test_a_preset_is_a_base_that_overrides_apply_on_top_of():
    from alexnet_jax import config as config_lib
    from alexnet_jax.model import from_config
    from experiments import imagenet

    config = imagenet.get_config()
    overrides = {"model.use_lrn": "true", "model.preset": "torchvision", "model.lrn_size": "3"}
    config_lib.apply_overrides(config, overrides)  # the preset goes first, whatever the order
    model = from_config(config.model)
    assert model.groups == 1 and model.pool_to_6x6 and model.dropout_before_dense  # the preset
    assert model.use_lrn and model.lrn_size == 3  # and the overrides, never dropped
    config.model.preset = "torchvision"  # the name alone, as a careless experiment file might
    config.model.update({k: getattr(AlexNet, k) for k in ("groups", "use_lrn", "conv_features")})
    config.model.update({"dropout_before_dense": False, "pool_to_6x6": False})
    with pytest.raises(config_lib.UsageError, match="its architecture is not"):
        config_lib.validate(config, num_devices=1)

"""The fast formulations in model.py compute the same function and gradient as the plain ones.

Each fast form (grouped conv as separate convs, LRN as a sum of shifted slices with a hand-written
gradient, max pooling with a padding-based gradient, t**-0.75 via rsqrt) is checked against the
textbook form, values and gradients; the PyTorch yardstick of `alexnet_jax.bench` is checked to be
the same network; and `cpu_flags` and the FLOP count of the benchmark are checked.
"""

import os
from importlib import metadata

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from alexnet_jax import bench, costs, cpu_flags
from alexnet_jax.layers import GroupedConv, local_response_norm, max_pool
from alexnet_jax.model import AlexNet


def _grad_of_sum_with(f, x, g):
    """d/dx sum(f(x) * g): the vector-Jacobian product with a fixed random cotangent."""
    return jax.jit(jax.grad(lambda x: jnp.sum(f(x) * g)))(x)


# --- grouped convolution ------------------------------------------------------------------


@pytest.mark.parametrize(
    "size,cin,cout,kernel,stride,pad,groups",
    [(9, 8, 12, 3, 1, 1, 2), (11, 6, 8, 5, 2, 2, 2), (7, 12, 6, 3, 1, 0, 3)],
)
def test_grouped_conv_equals_feature_group_count(size, cin, cout, kernel, stride, pad, groups):
    x = jax.random.normal(jax.random.key(0), (2, size, size, cin))
    conv = GroupedConv(cout, kernel, stride, pad, groups, nn.initializers.normal(0.3))
    params = conv.init(jax.random.key(1), x)["params"]

    def plain(params, x):
        y = lax.conv_general_dilated(
            x,
            params["kernel"],
            (stride, stride),
            [(pad, pad)] * 2,
            dimension_numbers=("NHWC", "HWIO", "NHWC"),
            feature_group_count=groups,
        )
        return y + params["bias"]

    fast = lambda params, x: conv.apply({"params": params}, x)  # noqa: E731
    np.testing.assert_allclose(
        jax.jit(fast)(params, x), jax.jit(plain)(params, x), rtol=1e-5, atol=1e-5
    )
    g = jax.random.normal(jax.random.key(2), plain(params, x).shape)
    loss = lambda f: lambda p, x: jnp.sum(f(p, x) * g)  # noqa: E731
    got = jax.jit(jax.grad(loss(fast), argnums=(0, 1)))(params, x)
    want = jax.jit(jax.grad(loss(plain), argnums=(0, 1)))(params, x)
    jax.tree_util.tree_map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4), got, want
    )


def test_grouped_conv_rejects_channels_that_do_not_split():
    with pytest.raises(ValueError, match="groups"):
        GroupedConv(6, 3, groups=2).init(jax.random.key(0), jnp.zeros((1, 5, 5, 3)))


# --- local response normalisation ---------------------------------------------------------


def _lrn_plain(x, size, k, alpha, beta):
    """The textbook LRN: a clipped window sum of squares by padding and slicing, and lax.pow."""
    half = size // 2
    sq = jnp.pad(jnp.square(x), [(0, 0)] * (x.ndim - 1) + [(half, half)])
    window = sum(sq[..., d : d + x.shape[-1]] for d in range(size))
    return x * lax.pow(k + alpha * window, -beta)


@pytest.mark.parametrize("beta", [0.75, 0.5], ids=["paper_beta_rsqrt", "general_beta_pow"])
@pytest.mark.parametrize("channels,size", [(11, 5), (16, 3), (4, 5), (9, 4)])
def test_lrn_value_and_gradient_equal_the_plain_form(beta, channels, size):
    x = jax.random.normal(jax.random.key(0), (2, 3, 5, channels)) * 20.0
    g = jax.random.normal(jax.random.key(1), x.shape)
    fast = lambda x: local_response_norm(x, size=size, k=2.0, alpha=1e-3, beta=beta)  # noqa: E731
    plain = lambda x: _lrn_plain(x, size, 2.0, 1e-3, beta)  # noqa: E731
    np.testing.assert_allclose(fast(x), plain(x), rtol=1e-5, atol=1e-6)
    got, want = _grad_of_sum_with(fast, x, g), _grad_of_sum_with(plain, x, g)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("size", [5, 4])
def test_lrn_per_column_value_and_gradient_equal_the_plain_form_on_each_column(size):
    """model.lrn_per_column: neither the windows nor their gradient's sums cross the columns."""
    x = jax.random.normal(jax.random.key(0), (2, 3, 5, 12)) * 20.0
    g = jax.random.normal(jax.random.key(1), x.shape)
    fast = lambda x: local_response_norm(x, size=size, k=2.0, alpha=1e-3, groups=2)  # noqa: E731

    def plain(x):
        halves = jnp.split(x, 2, axis=-1)
        return jnp.concatenate([_lrn_plain(h, size, 2.0, 1e-3, 0.75) for h in halves], axis=-1)

    np.testing.assert_allclose(fast(x), plain(x), rtol=1e-5, atol=1e-6)
    got, want = _grad_of_sum_with(fast, x, g), _grad_of_sum_with(plain, x, g)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)


def test_lrn_gradient_in_its_hyper_parameters_equals_the_plain_form():
    # The written-out gradient also covers k, alpha and beta (traced, as a sweep could pass them).
    x = jax.random.normal(jax.random.key(2), (2, 3, 3, 8)) * 20.0
    g = jax.random.normal(jax.random.key(3), x.shape)

    def grads(f):
        return jax.grad(lambda k, a, b: jnp.sum(f(x, k, a, b) * g), argnums=(0, 1, 2))(
            2.0, 1e-3, 0.75
        )

    got = grads(lambda x, k, a, b: local_response_norm(x, size=5, k=k, alpha=a, beta=b))
    want = grads(lambda x, k, a, b: _lrn_plain(x, 5, k, a, b))
    for u, v in zip(got, want, strict=True):
        np.testing.assert_allclose(u, v, rtol=1e-4)


def test_lrn_gradient_matches_finite_differences():
    x = np.random.default_rng(3).normal(0, 30, (1, 1, 2, 7))
    f = lambda x: local_response_norm(x, size=5, k=2.0, alpha=1e-3, beta=0.75)  # noqa: E731
    with jax.enable_x64(True):
        jax.test_util.check_grads(f, (jnp.asarray(x, jnp.float64),), order=1, modes=["rev"])


def test_lrn_alpha_conventions_in_the_fast_gradient():
    """scale_alpha_by_size=True with n*alpha is the same function and gradient as the paper's."""
    x = jax.random.normal(jax.random.key(4), (2, 2, 2, 9)) * 10.0
    g = jax.random.normal(jax.random.key(5), x.shape)
    paper = lambda x: local_response_norm(x, alpha=1e-4)  # noqa: E731
    torch_style = lambda x: local_response_norm(x, alpha=5e-4, scale_alpha_by_size=True)  # noqa: E731
    np.testing.assert_allclose(
        _grad_of_sum_with(paper, x, g), _grad_of_sum_with(torch_style, x, g), rtol=1e-5
    )


# --- max pooling --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "size,window,stride",
    [(55, 3, 2), (27, 3, 2), (13, 3, 2), (8, 3, 2), (9, 2, 2), (10, 3, 3), (9, 2, 3)],
)
def test_max_pool_value_and_gradient_equal_flax_even_with_ties(size, window, stride):
    """Integer-valued inputs make ties common: the gradient must go to the first maximum of each
    window exactly as XLA's select_and_scatter (nn.max_pool's gradient) sends it."""
    rng = np.random.default_rng(size)
    x = jnp.asarray(rng.integers(-2, 3, (2, size, size, 3)), jnp.float32)
    plain = lambda x: nn.max_pool(x, (window, window), strides=(stride, stride))  # noqa: E731
    fast = lambda x: max_pool(x, window, stride)  # noqa: E731
    np.testing.assert_array_equal(fast(x), plain(x))
    g = jnp.asarray(rng.integers(-3, 4, plain(x).shape), jnp.float32)
    np.testing.assert_array_equal(_grad_of_sum_with(fast, x, g), _grad_of_sum_with(plain, x, g))


def test_max_pool_in_bfloat16():
    x = jax.random.normal(jax.random.key(6), (2, 13, 13, 4), jnp.bfloat16)
    g = jnp.ones((2, 6, 6, 4), jnp.bfloat16)
    plain = lambda x: nn.max_pool(x, (3, 3), strides=(2, 2))  # noqa: E731
    fast = lambda x: max_pool(x, 3, 2)  # noqa: E731
    assert fast(x).dtype == jnp.bfloat16
    np.testing.assert_array_equal(
        np.asarray(_grad_of_sum_with(fast, x, g), np.float32),
        np.asarray(_grad_of_sum_with(plain, x, g), np.float32),
    )


# --- the PyTorch yardstick ----------------------------------------------------------------


@pytest.mark.parametrize("lrn_scale_alpha_by_size", [False, True])
def test_torch_reference_is_the_same_network(lrn_scale_alpha_by_size):
    torch = pytest.importorskip("torch")
    from alexnet_jax import torch_reference

    model = AlexNet(
        num_classes=10,
        conv_features=(8, 16, 12, 12, 8),
        dense_features=24,
        init_scheme="he",
        lrn_alpha=1e-2,  # large enough that the LRN matters at these activation sizes
        lrn_scale_alpha_by_size=lrn_scale_alpha_by_size,
    )
    x = jax.random.normal(jax.random.key(0), (2, 224, 224, 3))
    params = jax.jit(lambda k: model.init(k, x, train=False)["params"])(jax.random.key(1))
    net = torch_reference.TorchAlexNet(model)
    torch_reference.load_params(net, params)
    net.eval()
    with torch.no_grad():
        got = net(torch.from_numpy(np.asarray(x).transpose(0, 3, 1, 2).copy())).numpy()
    want = jax.jit(lambda p: model.apply({"params": p}, x, train=False))(params)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_torch_train_step_runs_and_decays_only_kernels():
    torch = pytest.importorskip("torch")
    from alexnet_jax import torch_reference

    model = AlexNet(num_classes=10, conv_features=(8, 16, 12, 12, 8), dense_features=24)
    net = torch_reference.TorchAlexNet(model)
    opt = torch_reference.make_sgd(
        net, learning_rate=0.01, momentum=0.9, weight_decay=5e-4, decay_biases=False
    )
    loss = torch_reference.train_step(
        net, opt, torch.randn(4, 3, 224, 224), torch.randint(0, 10, (4,))
    )
    assert np.isfinite(loss)
    decays = {p.ndim: g["weight_decay"] for g in opt.param_groups for p in g["params"]}
    assert decays == {4: 5e-4, 2: 5e-4, 1: 0.0}


@pytest.mark.parametrize(
    "mode",
    [
        "eager",
        "bf16",
        pytest.param("compile", marks=pytest.mark.slow),  # Inductor compiles for a minute
        pytest.param("compile_bf16", marks=pytest.mark.slow),
    ],
)
def test_torch_modes_compute_the_same_loss(mode):
    """The benchmark's PyTorch variants are the same step: the first loss (before any update)
    equals eager float32's, to bf16 precision under autocast."""
    torch = pytest.importorskip("torch")
    from alexnet_jax import torch_reference

    model = AlexNet(num_classes=10, conv_features=(8, 16, 12, 12, 8), dense_features=24)
    losses = {}
    for m in ("eager", mode):
        torch.manual_seed(0)
        net = torch_reference.TorchAlexNet(model)
        net.drop.p = 0.0  # the same masks are not the point here
        opt = torch_reference.make_sgd(
            net, learning_rate=0.01, momentum=0.9, weight_decay=5e-4, decay_biases=False
        )
        images, labels = torch.randn(4, 3, 224, 224), torch.randint(0, 10, (4,))
        losses[m] = torch_reference.make_step(net, opt, images, labels, m)()
    tolerance = 2e-2 if mode.endswith("bf16") else 1e-5
    assert losses[mode] == pytest.approx(losses["eager"], rel=tolerance)


def test_bench_rejects_an_unknown_torch_mode(capsys):
    assert bench.main(["--torch_modes", "eager,compiled"]) == 2
    err = capsys.readouterr().err
    assert "--torch_modes must be one of" in err and "'compile'" in err


@pytest.mark.parametrize(
    "override,hint",
    [
        ("model.dtype=bfloat16", "use --dtypes"),
        ("batch_size=8", "use --batch_sizes"),
        ("dataset=digits", "synthetic"),
    ],
)
def test_bench_refuses_overrides_it_would_silently_replace(capsys, override, hint):
    assert bench.main([f"--config.{override}", "--no_torch"]) == 2
    err = capsys.readouterr().err.strip()
    assert "is set by the benchmark" in err and hint in err and len(err.splitlines()) == 1


# --- the benchmark's model FLOPs and the XLA:CPU flag -------------------------------------


def test_xla_cpu_computes_bf16_convolutions_and_matmuls_in_float32():
    """The evidence behind the README's bf16-on-CPU note: jaxlib 0.10's XLA:CPU upcasts them (no
    AMX path). A jaxlib that stops doing so fails here: then measure bf16 on CPU again."""
    if jax.default_backend() != "cpu" or not metadata.version("jaxlib").startswith("0.10."):
        pytest.skip("measured for XLA:CPU in jaxlib 0.10")
    assert cpu_flags.bf16_upcast()


def test_forward_flops_of_the_paper_network():
    """0.724 GMAC per 224 px image (REFERENCE.md): convs and dense layers, groups counted."""
    macs = costs.forward_flops(AlexNet(), (224, 224, 3)) / 2
    assert macs == pytest.approx(0.724e9, rel=2e-3)
    assert costs.forward_flops(AlexNet(groups=1), (224, 224, 3)) > 2 * macs  # ungrouped costs more


def test_cpu_flags_configure_adds_the_option_once_and_respects_the_user(monkeypatch):
    monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=4")
    expected = metadata.version("jaxlib").startswith(cpu_flags.TESTED_JAXLIB)
    assert cpu_flags.configure() == expected
    if expected:
        flags = os.environ["XLA_FLAGS"]
        assert flags.startswith("--xla_force_host_platform_device_count=4 ")
        assert cpu_flags.active()
        cpu_flags.configure()
        assert os.environ["XLA_FLAGS"] == flags  # idempotent
    monkeypatch.setenv("XLA_FLAGS", f"{cpu_flags.OPTION}=")  # the user turned YNNPACK off
    assert cpu_flags.configure()
    assert os.environ["XLA_FLAGS"] == f"{cpu_flags.OPTION}="
    assert not cpu_flags.active()


# --- model.kernels: the CPU forms and XLA's native forms ---------------------------------


def test_cpu_and_portable_kernels_give_the_same_network():
    """Same parameters, same outputs and gradients, whichever `model.kernels` form runs."""
    from alexnet_jax import onednn
    from alexnet_jax.layers import resolve_kernels

    # The tests run on CPU devices, where requirements.txt installs oneDNN (built with a compiler).
    assert resolve_kernels("auto") == ("onednn" if onednn._compiler() else "cpu")
    assert resolve_kernels("portable") == "portable"
    kw = dict(num_classes=10, conv_features=(8, 16, 16, 16, 16), dense_features=32, groups=2)
    cpu, portable = AlexNet(**kw, kernels="cpu"), AlexNet(**kw, kernels="portable")
    x = jax.random.normal(jax.random.PRNGKey(0), (2, 67, 67, 3))
    params = cpu.init(jax.random.PRNGKey(1), x, train=False)["params"]
    other = portable.init(jax.random.PRNGKey(1), x, train=False)["params"]
    assert jax.tree_util.tree_structure(params) == jax.tree_util.tree_structure(other)

    def loss(model):
        return jax.jit(
            jax.value_and_grad(lambda p: jnp.sum(model.apply({"params": p}, x, train=False) ** 2))
        )(params)

    (lc, gc), (lp, gp) = loss(cpu), loss(portable)
    np.testing.assert_allclose(lc, lp, rtol=1e-5)
    for a, b in zip(jax.tree_util.tree_leaves(gc), jax.tree_util.tree_leaves(gp), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_cpu_kernels_in_bfloat16_track_the_portable_form():
    """bfloat16 with the CPU forms (`precision.Upcast`: each conv and matmul in float32 on
    bf16-rounded operands, forward and backward; float32 activations) stays as close to float32
    as XLA's bf16 form does. A pooling gradient that compares unrounded values with rounded
    maxima zeroes the gradient below it: the 3 x 3 pools here would catch it."""
    kw = dict(num_classes=10, conv_features=(8, 16, 16, 16, 16), dense_features=32, groups=2)
    x = jax.random.normal(jax.random.PRNGKey(0), (2, 67, 67, 3)) * 50  # the pixels' scale
    f32 = AlexNet(**kw, kernels="cpu")
    params = f32.init(jax.random.PRNGKey(1), x, train=False)["params"]

    def grads(model):
        loss = lambda p: jnp.sum(model.apply({"params": p}, x, train=False).astype(jnp.float32))  # noqa: E731
        return jax.jit(jax.grad(loss))(params)

    want = grads(f32)
    cpu = grads(AlexNet(**kw, kernels="cpu", dtype=jnp.bfloat16))
    portable = grads(AlexNet(**kw, kernels="portable", dtype=jnp.bfloat16))
    norm = lambda a: float(jnp.linalg.norm(a.astype(jnp.float32)))  # noqa: E731
    for (path, w), c, p in zip(
        jax.tree_util.tree_leaves_with_path(want),
        jax.tree_util.tree_leaves(cpu),
        jax.tree_util.tree_leaves(portable),
        strict=True,
    ):
        assert c.dtype == jnp.float32  # the parameters' dtype
        err_cpu, err_portable = norm(c - w) / norm(w), norm(p - w) / norm(w)
        assert err_cpu < 2 * err_portable + 0.02, (
            jax.tree_util.keystr(path),
            err_cpu,
            err_portable,
        )

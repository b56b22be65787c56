"""`model.kernels=onednn`: oneDNN's convolutions as XLA FFI calls compute what XLA's do, values
and both gradients, in the model and in the real pmapped train step on four devices; a machine
that cannot build them is refused before any data or compilation."""

import io
import shutil
from contextlib import redirect_stdout

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from alexnet_jax import cli, onednn, parallel, steps
from alexnet_jax.data import make_source
from alexnet_jax.model import AlexNet
from experiments import digits

# The library is compiled on first use; without a compiler there is nothing to test here (the
# wheels come with requirements.txt, and a missing wheel fails these tests, as it should).
pytestmark = pytest.mark.skipif(
    onednn._compiler() is None, reason="no C++ compiler to build csrc/onednn_conv.cc"
)

DIMS = ("NHWC", "HWIO", "NHWC")


@pytest.mark.parametrize(
    "shape,kernel,features,stride,pad",
    [
        ((2, 23, 19, 3), 11, 8, 4, 2),  # conv1's geometry, small; the stride leaves rows unused
        ((2, 17, 17, 5), 5, 6, 1, 2),  # conv2's
        ((3, 7, 9, 4), 3, 5, 1, 1),  # conv3-5's, not square
        ((1, 30, 30, 3), 11, 4, 4, 0),  # rows no window reaches: cut before oneDNN sees them
        ((2, 8, 8, 3), 3, 2, 2, 0),
    ],
)
def test_conv_value_and_gradients_equal_xla(shape, kernel, features, stride, pad):
    x = jax.random.normal(jax.random.key(0), shape)
    k = jax.random.normal(jax.random.key(1), (kernel, kernel, shape[-1], features))

    def xla(x, k):
        return lax.conv_general_dilated(
            x, k, (stride, stride), [(pad, pad)] * 2, dimension_numbers=DIMS
        )

    def ours(x, k):
        return onednn.conv(x, k, stride, pad)

    g = jax.random.normal(jax.random.key(2), jax.eval_shape(xla, x, k).shape)
    for fn in (xla, ours):
        y, vjp = jax.jit(lambda x, k, fn=fn: jax.vjp(fn, x, k))(x, k)
        if fn is xla:
            want = (y, *vjp(g))
        else:
            got = (y, *vjp(g))
    for a, b, what in zip(want, got, ("value", "input gradient", "kernel gradient"), strict=True):
        scale = float(jnp.max(jnp.abs(a)))
        np.testing.assert_allclose(b, a, atol=2e-6 * scale, rtol=0, err_msg=what)


@pytest.mark.parametrize(
    "shape,kernel,features,stride,pad", [((2, 23, 19, 3), 11, 8, 4, 2), ((3, 7, 9, 4), 3, 5, 1, 1)]
)
def test_bf16_conv_is_xla_on_bf16_rounded_operands(shape, kernel, features, stride, pad):
    """`bf16=True`: the float32 convolution of the bf16-rounded x and kernel, and its gradients
    from the bf16-rounded output gradient (what a bf16 matrix unit with a float32 accumulator
    computes); float32 results and gradients."""
    x = jax.random.normal(jax.random.key(0), shape)
    k = jax.random.normal(jax.random.key(1), (kernel, kernel, shape[-1], features))
    r = lambda a: a.astype(jnp.bfloat16).astype(jnp.float32)  # noqa: E731

    def xla(x, k):
        return lax.conv_general_dilated(
            x, k, (stride, stride), [(pad, pad)] * 2, dimension_numbers=DIMS
        )

    y = jax.jit(lambda x, k: onednn.conv(x, k, stride, pad, True))(x, k)
    g = jax.random.normal(jax.random.key(2), y.shape)
    dx, dk = jax.jit(
        lambda x, k, g: jax.vjp(lambda x, k: onednn.conv(x, k, stride, pad, True), x, k)[1](g)
    )(x, k, g)
    want_y, vjp = jax.vjp(xla, r(x), r(k))
    want_dx, want_dk = vjp(r(g))
    assert y.dtype == dx.dtype == dk.dtype == jnp.float32
    for a, b in ((want_y, y), (want_dx, dx), (want_dk, dk)):
        np.testing.assert_allclose(b, a, atol=2e-6 * float(jnp.max(jnp.abs(a))), rtol=0)


def test_the_bf16_model_uses_the_bf16_kernels_where_the_cpu_has_them():
    kw = dict(num_classes=10, conv_features=(8, 16, 16, 16, 16), dense_features=32, groups=2)
    model = AlexNet(**kw, kernels="onednn", dtype=jnp.bfloat16)
    x = jnp.zeros((2, 67, 67, 3))
    params = jax.eval_shape(lambda: model.init(jax.random.key(0), x, train=False))["params"]
    text = str(jax.make_jaxpr(lambda p: model.apply({"params": p}, x, train=False))(params))
    assert ("OnednnConvForwardBf16" in text) == onednn.native_bf16()


def test_conv_refuses_other_dtypes():
    x = jnp.zeros((1, 8, 8, 3), jnp.bfloat16)
    with pytest.raises(TypeError, match="float32"):
        onednn.conv(x, jnp.zeros((3, 3, 3, 4), jnp.bfloat16), 1, 1)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_the_model_on_onednn_equals_the_cpu_form(dtype):
    """The whole network (grouped columns, stride-4 conv1, LRN, pooling), loss and every
    parameter's gradient; in bf16 both round the same operands (`precision.Upcast`)."""
    kw = dict(num_classes=10, conv_features=(8, 16, 16, 16, 16), dense_features=32, groups=2)
    x = jax.random.normal(jax.random.key(0), (2, 67, 67, 3)) * 50
    params = AlexNet(**kw).init(jax.random.key(1), x, train=False)["params"]

    def loss_and_grads(kernels):
        model = AlexNet(**kw, kernels=kernels, dtype=dtype)
        loss = lambda p: jnp.sum(model.apply({"params": p}, x, train=False) ** 2)  # noqa: E731
        return jax.jit(jax.value_and_grad(loss))(params)

    (lc, gc), (lo, go) = loss_and_grads("cpu"), loss_and_grads("onednn")
    rtol = 1e-4 if dtype == jnp.float32 else 2e-2  # bf16: a rounding flipped by the order of sums
    np.testing.assert_allclose(lo, lc, rtol=rtol)
    for (path, a), b in zip(
        jax.tree_util.tree_leaves_with_path(gc), jax.tree_util.tree_leaves(go), strict=True
    ):
        err = float(jnp.linalg.norm(b - a) / jnp.linalg.norm(a))
        assert err < rtol * 10, (jax.tree_util.keystr(path), err)


def _three_steps(kernels: str):
    config = digits.get_config()
    config.model.kernels = kernels
    config.data.augment = False
    source = make_source(config)
    state, run, _, _ = steps.build(config, source.info)
    per_process = parallel.per_device_batch(config.batch_size) * jax.local_device_count()
    batches = parallel.prefetch(source.train_batches(per_process, seed=config.seed))
    pstate = parallel.replicate(state)
    rng = parallel.replicate(steps.dropout_base_key(config.seed))
    losses = []
    for _, batch in zip(range(3), batches, strict=False):
        pstate, metrics = run.train(pstate, batch, rng)
        losses.append(float(parallel.unreplicate(metrics)["loss"]))
    return np.array(losses), jax.device_get(parallel.unreplicate(pstate).params)


def test_the_pmapped_train_step_on_four_devices_equals_the_cpu_form():
    """The real step, pmapped over the four CPU devices (each device's convolutions are FFI
    calls; oneDNN runs one at a time): the same losses and parameters after three steps."""
    assert jax.local_device_count() == 4
    (want, pw), (got, pg) = _three_steps("cpu"), _three_steps("onednn")
    np.testing.assert_allclose(got, want, rtol=1e-5)
    for a, b in zip(jax.tree_util.tree_leaves(pw), jax.tree_util.tree_leaves(pg), strict=True):
        np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-6)


def test_the_library_is_built_once_and_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    first = onednn.build()
    assert first.startswith(str(tmp_path)) and first.endswith(".so")
    mtime = (tmp_path / "alexnet_jax" / first.rsplit("/", 1)[1]).stat().st_mtime_ns
    assert onednn.build() == first
    assert (tmp_path / "alexnet_jax" / first.rsplit("/", 1)[1]).stat().st_mtime_ns == mtime
    assert [p.name for p in (tmp_path / "alexnet_jax").iterdir()] == [first.rsplit("/", 1)[1]]


@pytest.mark.parametrize(
    "env,message",
    [
        (
            {"ALEXNET_JAX_ONEDNN_PREFIX": "/nonexistent"},
            "oneDNN's headers (onednn-devel-cpu-gomp) not found",
        ),
        ({"CXX": "no-such-compiler"}, "needs a C++ compiler"),
    ],
)
def test_a_machine_that_cannot_build_it_is_refused_in_one_line(monkeypatch, capsys, env, message):
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    if "CXX" in env:
        assert shutil.which(env["CXX"]) is None
    out = io.StringIO()
    with redirect_stdout(out):
        rc = cli.main(["experiments/digits.py", "--config.model.kernels=onednn", "--dry_run"])
    err = capsys.readouterr().err
    assert rc == 2 and message in err and len(err.strip().splitlines()) == 1, err

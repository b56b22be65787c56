"""A checkpoint round trip returns the tree that was saved: structure, dtypes, shapes and every
bit of every array, with its meta, for random trees (Orbax is slow: few examples)."""

import shutil
import tempfile

import hypothesis.extra.numpy as hnp
import jax
import numpy as np
import pytest
from hypothesis import Phase, given, settings
from hypothesis import strategies as st

# The library, imported in one place.
from alexnet_jax import checkpoint
from alexnet_jax.checkpoint import Checkpointer

SCALE = 10 if settings.get_current_profile_name() == "slow" else 1

# The dtypes of a TrainState (float32 parameters, int32 step and counters) and of a bfloat16 or
# data-pipeline state; float64 stays float64 on the host.
DTYPES = [np.float32, np.int32, np.uint32, np.float64, np.int64, np.bool_, np.uint8]

arrays = st.sampled_from(DTYPES).flatmap(
    lambda dtype: hnp.arrays(dtype, hnp.array_shapes(min_dims=0, max_dims=3, max_side=4))
)
names = st.text("abcdefghij_", min_size=1, max_size=6)
trees = st.recursive(
    st.dictionaries(names, arrays, min_size=1, max_size=3),
    lambda children: st.dictionaries(names, children, min_size=1, max_size=3),
    max_leaves=8,
)
metas = st.dictionaries(
    names, st.one_of(st.integers(-(2**31), 2**31), st.text(max_size=8), st.booleans()), max_size=3
)


def _assert_same_tree(got, want):
    assert jax.tree_util.tree_structure(got) == jax.tree_util.tree_structure(want)
    for g, w in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want), strict=True):
        g = np.asarray(g)
        assert g.dtype == w.dtype and g.shape == w.shape
        # Bit for bit: NaN payloads and -0.0 included.
        assert g.tobytes() == np.ascontiguousarray(w).tobytes()


@pytest.fixture(scope="module")
def scratch():
    path = tempfile.mkdtemp(prefix="props_checkpoint_")
    yield path
    shutil.rmtree(path, ignore_errors=True)


# No shrinking: each step of it is an Orbax save and restore (minutes); the trees are small.
@settings(max_examples=5 * SCALE, deadline=None, phases=[Phase.explicit, Phase.generate])
@given(tree=trees, meta=metas, step=st.integers(0, 2**31 - 1))
def test_save_then_restore_returns_the_same_tree(scratch, tree, meta, step):
    workdir = tempfile.mkdtemp(dir=scratch)  # one fresh workdir per example
    ckpt = Checkpointer(workdir)
    try:
        ckpt.save(step, tree, meta)
        ckpt.wait()
        assert ckpt.latest_step() == step
        _assert_same_tree(ckpt.restore(tree, step), tree)
        # The restore target may be abstract: only shapes and dtypes.
        abstract = jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), tree)
        _assert_same_tree(jax.device_get(ckpt.restore(abstract, step)), tree)
        restored = ckpt.restore_meta(step)
        assert restored.pop("digests").keys() == checkpoint.digests(tree).keys()  # verified
        assert restored == meta
    finally:
        ckpt.close()


@pytest.mark.slow
@settings(max_examples=2 * SCALE, deadline=None, phases=[Phase.explicit, Phase.generate])
@given(seed=st.integers(0, 2**32 - 1), step=st.integers(0, 10**6))
def test_a_quickstart_train_state_round_trips(scratch, seed, step):
    """The tree that training saves: the quickstart model's parameters, the optimiser state with
    its injected learning rate, and the plateau state."""
    from alexnet_jax import optim
    from alexnet_jax.model import abstract_params, from_config
    from alexnet_jax.steps import TrainState
    from experiments import digits

    config = digits.get_config()
    rng = np.random.default_rng(seed)
    params = jax.tree_util.tree_map(
        lambda s: rng.normal(size=s.shape).astype(np.float32),
        abstract_params(from_config(config.model), (64, 64, 3)),
    )
    tx = optim.make_optimizer(config.optim, params)
    state = jax.device_get(
        TrainState(np.int32(step), params, tx.init(params), optim.plateau_init())
    )
    ckpt = Checkpointer(tempfile.mkdtemp(dir=scratch))
    try:
        ckpt.save(step, state, {"seed": seed % 2**31}, val_top1_error=0.5)
        ckpt.wait()
        _assert_same_tree(ckpt.restore(state, step), state)
    finally:
        ckpt.close()

"""Exact evaluation counting: over all processes, every example of a split is evaluated exactly
once, whatever the split size, batch size and process count, and padding is always masked."""

import hypothesis.extra.numpy as hnp
import jax
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

# The library, imported in one place.
from alexnet_jax.data.base import eval_index_batches, pad_batch

SCALE = 10 if settings.get_current_profile_name() == "slow" else 1


def batches_of_every_process(num_examples, batch_size, processes):
    """eval_index_batches as each of `processes` processes sees it."""
    out = []
    for pid in range(processes):
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(jax, "process_index", lambda pid=pid: pid)
            mp.setattr(jax, "process_count", lambda: processes)
            out.append(eval_index_batches(num_examples, batch_size))
    return out


@settings(max_examples=200 * SCALE, deadline=None)
@given(num_examples=st.integers(0, 700), batch_size=st.integers(1, 96), processes=st.integers(1, 9))
def test_every_example_is_evaluated_exactly_once(num_examples, batch_size, processes):
    per_process = batches_of_every_process(num_examples, batch_size, processes)

    # Every process steps the (collective) eval step equally often, in full batches.
    assert len({len(b) for b in per_process}) == 1
    assert all(batch.shape == (batch_size,) for b in per_process for batch in b)

    # The real indices over all processes are 0..N-1, each once; the rest is -1 padding.
    slots = np.concatenate([np.concatenate(b) for b in per_process])
    real = slots[slots >= 0]
    np.testing.assert_array_equal(np.sort(real), np.arange(num_examples))
    assert np.all(slots[slots < 0] == -1)

    # No process runs a batch that is padding on every process (one is run for an empty split).
    num_batches = len(per_process[0])
    last = np.concatenate([b[-1] for b in per_process])
    assert num_batches == 1 or np.any(last >= 0)

    # Padding only after a process's real examples: the sources fill a batch front to back.
    for b in per_process:
        flat = np.concatenate(b)
        n_real = int(np.sum(flat >= 0))
        assert np.all(flat[:n_real] >= 0) and np.all(flat[n_real:] == -1)


@st.composite
def batches(draw):
    batch_size = draw(st.integers(1, 16))
    n = draw(st.integers(0, batch_size))
    arrays = {
        "label": draw(hnp.arrays(np.int32, (n,), fill=st.nothing())),
        "image": draw(
            hnp.arrays(
                draw(st.sampled_from([np.float32, np.uint8])),
                (n, *draw(hnp.array_shapes(min_dims=0, max_dims=3, max_side=3))),
                fill=st.nothing(),
            )
        ),
    }
    return arrays, batch_size


@settings(max_examples=100 * SCALE, deadline=None)
@given(batches())
def test_pad_batch_masks_exactly_the_padding(case):
    batch, batch_size = case
    n = len(batch["label"])
    out = pad_batch(batch, batch_size)
    assert set(out) == {*batch, "mask"}
    np.testing.assert_array_equal(out["mask"], np.arange(batch_size) < n)
    assert out["mask"].dtype == bool
    for key, value in batch.items():
        assert out[key].shape == (batch_size, *value.shape[1:])
        assert out[key].dtype == value.dtype
        np.testing.assert_array_equal(out[key][:n], value)  # the real rows untouched
        assert not np.any(out[key][n:])  # padding is zeros: finite through the model


@settings(max_examples=100 * SCALE, deadline=None)
@given(num_examples=st.integers(0, 300), batch_size=st.integers(1, 32), processes=st.integers(1, 5))
def test_a_pass_with_padded_batches_counts_the_split_once(num_examples, batch_size, processes):
    """How the sources combine the two: the indices of a batch select the real examples, the
    batch is padded, and the summed mask over all processes is the split size."""
    labels = np.arange(num_examples, dtype=np.int32)
    count, seen = 0, []
    for per_process in batches_of_every_process(num_examples, batch_size, processes):
        for idx in per_process:
            real = idx[idx >= 0]
            batch = pad_batch({"label": labels[real]}, batch_size)
            count += int(batch["mask"].sum())
            seen.extend(batch["label"][batch["mask"]])
    assert count == num_examples
    np.testing.assert_array_equal(np.sort(seen), labels)


def test_pad_batch_refuses_a_batch_larger_than_the_batch_size():
    with pytest.raises(ValueError):
        pad_batch({"label": np.zeros(5, np.int32)}, 4)

"""Parallel plans: how a run's state and batches are laid out on the devices, and moved there.

A plan is chosen by `parallel.mode` (`PLANS`). It owns placement only: putting the host state
and host batches on the devices in the layout its steps expect, prefetching, and reading state
and metrics back. How the pure per-device steps are wrapped for the plan (`jax.pmap` today) is
`steps.py`'s; the training loop, the evaluation modes and the checkpoints see only the plan.

'data' is plain data parallelism: the state is replicated along a leading device axis and
each device takes `global_batch / devices` examples. Since JAX 0.8 `device_put_replicated` and
`device_put_sharded` are gone: a leading device axis is placed with a `NamedSharding` over a
one-axis mesh of the local devices, in the order `jax.pmap` expects.

'columns' and 'owt' are model-parallel (model_parallel.py): a `MeshPlan` holds global arrays on
a mesh of every device, each leaf of the state split or replicated as the layout's `spec` says,
and the batch split over the data axis; `jax.shard_map` steps run on it.
"""

from __future__ import annotations

import collections
import itertools
from collections.abc import Callable, Iterable, Iterator
from typing import Any, Protocol

import chex
import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from alexnet_jax.errors import UsageError
from alexnet_jax.model_parallel import BATCH_AXIS, COLUMN_AXIS, COLUMNS, Layout

AXIS = BATCH_AXIS  # the data-parallel axis name, for pmap and the mesh alike


class Plan(Protocol):
    """What the training loop and the evaluation pass need from a parallel layout."""

    mode: str
    axis_name: str

    @property
    def layout(self) -> Layout | None: ...  # the model-parallel layout ('data': none)

    def per_process_batch(self, global_batch: int) -> int: ...
    def put_state(self, tree: Any) -> Any: ...
    def get_state(self, tree: Any) -> Any: ...
    def get_metrics(self, tree: Any) -> Any: ...
    def prefetch(self, batches: Iterable[dict[str, Any]]) -> Iterator[dict[str, Any]]: ...


def batch_sharding() -> jax.sharding.NamedSharding:
    """Splits a leading axis of size `local_device_count` over the local devices."""
    # The axis is named like the pmap axis: the step's outputs then carry the same sharding as
    # its inputs, and the train step compiles once instead of twice.
    mesh = jax.sharding.Mesh(np.array(jax.local_devices()), (AXIS,))
    return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(AXIS))


def per_device_batch(global_batch: int) -> int:
    """The per-device batch; a clear error when the devices do not divide the global batch."""
    n = jax.device_count()
    if global_batch % n:
        raise UsageError(
            f"batch_size {global_batch} is not divisible by the {n} devices "
            f"({jax.process_count()} process(es)); use a multiple of {n}"
        )
    return global_batch // n


def shard(batch: dict[str, np.ndarray]) -> dict[str, jax.Array]:
    """(B, ...) host arrays -> (local_devices, B / local_devices, ...) arrays on the devices."""
    n = jax.local_device_count()
    chex.assert_equal_shape_prefix(list(batch.values()), 1)
    if len(batch["label"]) % n:
        raise ValueError(f"a host batch of {len(batch['label'])} does not split over {n} devices")

    def put(x: np.ndarray) -> jax.Array:
        if isinstance(x, jax.Array):  # made on the devices already (the synthetic source)
            return x
        return jax.device_put(np.asarray(x).reshape((n, -1, *x.shape[1:])), batch_sharding())

    return {k: put(v) for k, v in batch.items()}


def replicate(tree: Any) -> Any:
    """A copy of every leaf on every local device, along a new leading axis."""
    n = jax.local_device_count()
    return jax.device_put(
        jax.tree_util.tree_map(lambda x: np.broadcast_to(np.asarray(x), (n, *np.shape(x))), tree),
        batch_sharding(),
    )


def unreplicate(tree: Any) -> Any:
    """The first device's copy of a replicated tree, as host-transferable arrays."""
    return jax.tree_util.tree_map(lambda x: x.addressable_shards[0].data[0], tree)


def prefetch(
    batches: Iterable[dict[str, np.ndarray]],
    size: int = 2,
    put: Callable[[dict[str, Any]], dict[str, jax.Array]] = shard,
) -> Iterator[dict[str, Any]]:
    """Places batches on the devices (`put`: a plan's layout) `size` steps ahead of their use.

    `device_put` is asynchronous, so the copy of batch t+1 overlaps the step on batch t (Flax's
    `prefetch_to_device` does the same; 2 is enough to hide the copy on a GPU).
    """
    queue: collections.deque = collections.deque()
    it = iter(batches)
    for batch in itertools.islice(it, size):
        queue.append(put(batch))
    while queue:
        yield queue.popleft()
        for batch in itertools.islice(it, 1):
            queue.append(put(batch))


class DataPlan:
    """`parallel.mode='data'`: replicated state, the batch split over every device."""

    mode = "data"
    axis_name = AXIS
    layout: Layout | None = None

    def per_process_batch(self, global_batch: int) -> int:
        return per_device_batch(global_batch) * jax.local_device_count()

    def put_state(self, tree: Any) -> Any:
        return replicate(tree)

    def get_state(self, tree: Any) -> Any:
        """A host (numpy) copy of a device state, e.g. for a checkpoint."""
        return jax.device_get(unreplicate(tree))

    def get_metrics(self, tree: Any) -> Any:
        return jax.device_get(unreplicate(tree))

    def prefetch(self, batches: Iterable[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        return prefetch(batches)


class MeshPlan:
    """`parallel.mode='columns'` or `'owt'`: global arrays on a mesh of every device.

    columns: a (devices / 2, 2) mesh `('batch', 'column')`, each row two neighbouring devices of
    one process (a column pair never spans hosts: the column traffic is the heavy one). owt: one
    `batch` axis over every device, which the dense layers' neurons are split over as well.
    """

    axis_name = AXIS

    def __init__(self, layout: Layout) -> None:
        self.mode = layout.mode
        self.layout: Layout | None = layout
        devices = np.array(jax.devices())
        if layout.model_axis == COLUMN_AXIS:
            self.mesh = jax.sharding.Mesh(devices.reshape(-1, COLUMNS), (AXIS, COLUMN_AXIS))
        else:
            self.mesh = jax.sharding.Mesh(devices, (AXIS,))
        self.batch_sharding = NamedSharding(self.mesh, P(AXIS))

    def per_process_batch(self, global_batch: int) -> int:
        per_device_batch(global_batch)  # the same divisibility rule (and message) as 'data'
        return global_batch // jax.process_count()

    def specs(self, tree: Any) -> Any:
        """The PartitionSpec of every leaf of a state (or params) tree."""
        assert self.layout is not None
        return jax.tree_util.tree_map_with_path(self.layout.spec, tree)

    def put_state(self, tree: Any) -> Any:
        """Host arrays (identical in every process) -> global arrays, split as `specs` says."""

        def put(x: Any, spec: P) -> jax.Array:
            x = np.asarray(x)
            sharding = NamedSharding(self.mesh, spec)
            return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])

        return jax.tree_util.tree_map(put, tree, self.specs(tree))

    def get_state(self, tree: Any) -> Any:
        """The whole state as host arrays, in every process (split leaves span processes)."""
        if jax.process_count() > 1:
            return multihost_utils.process_allgather(tree, tiled=True)
        return jax.device_get(tree)

    def get_metrics(self, tree: Any) -> Any:
        """The first copy of metrics that the steps return once per model shard."""
        return jax.tree_util.tree_map(lambda x: np.asarray(x.addressable_shards[0].data)[0], tree)

    def prefetch(self, batches: Iterable[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        return prefetch(batches, put=self._put_batch)

    def _put_batch(self, batch: dict[str, Any]) -> dict[str, jax.Array]:
        """A process's host batch -> global arrays split over the data axis."""

        def put(x: Any) -> jax.Array:
            if isinstance(x, jax.Array):  # made on the devices already (the synthetic source)
                return jax.device_put(x.reshape((-1, *x.shape[2:])), self.batch_sharding)
            return jax.make_array_from_process_local_data(self.batch_sharding, np.asarray(x))

        return {k: put(v) for k, v in batch.items()}


# parallel.mode -> its plan; steps.WRAPPERS holds how each wraps the steps.
PLANS: dict[str, type] = {"data": DataPlan, "columns": MeshPlan, "owt": MeshPlan}


def make_plan(mode: str = "data", layout: Layout | None = None) -> Plan:
    """The plan of `parallel.mode`; the model-parallel ones take the model's layout."""
    if mode == "data":
        return DataPlan()
    if layout is None:
        raise ValueError(f"parallel.mode={mode!r} needs the model's layout")
    return MeshPlan(layout)


def initialize_distributed(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    *,
    heartbeat_timeout: float = 30.0,
    init_timeout: float = 300.0,
) -> None:
    """Joins a multi-process JAX cluster; must run before any JAX computation.

    With explicit flags, the cluster is formed over `coordinator_address`. Without them, the
    cluster is the one JAX detects in the environment (SLURM, Cloud TPU, ...); where there is
    none, a plain single-machine run goes on alone and never waits for a coordinator. The
    timeouts bound how long a process waits for the others to join, and for a dead process to be
    noticed (alexnet_jax/distributed.py).
    """
    from alexnet_jax import distributed

    _check_cluster_flags(coordinator_address, num_processes, process_id)
    if heartbeat_timeout <= 0 or init_timeout <= 0:
        raise UsageError("--heartbeat_timeout and --init_timeout must be positive (seconds)")
    distributed.initialize(
        coordinator_address,
        num_processes,
        process_id,
        heartbeat_timeout=heartbeat_timeout,
        init_timeout=init_timeout,
    )


def _check_cluster_flags(address: str | None, count: int | None, index: int | None) -> None:
    if address is None:
        if count is not None or index is not None:
            raise UsageError("--num_processes and --process_id need --coordinator_address")
        return
    if count is None or index is None:
        raise UsageError("--coordinator_address needs --num_processes and --process_id")
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise UsageError(f"--coordinator_address must be HOST:PORT; got {address!r}")
    if count < 1 or not 0 <= index < count:
        raise UsageError(
            f"--process_id must be in [0, --num_processes); got {index} of {count} processes"
        )

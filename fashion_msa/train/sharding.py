"""Data parallelism with jax.sharding: a 1-D device mesh, batch and parameter shardings.

Every device of the job (over all hosts) is in a 1-D `Mesh` with axis `data`.
Batches are split along their first dimension on that axis and parameters and
optimizer state are replicated, so XLA inserts the gradient all-reduce. Each
process feeds only its own rows (`jax.make_array_from_process_local_data`).
"""

from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
from absl import logging
from jax.sharding import Mesh, NamedSharding, PartitionSpec

DATA_AXIS = "data"


def initialize_distributed(
    coordinator_address: str | None,
    num_processes: int | None,
    process_id: int | None,
) -> None:
    """Call `jax.distributed.initialize` when a multi-host launch is requested.

    Nothing happens when all three arguments are None (a single-process run).
    Setting some but not all of them raises ValueError.
    """
    given = [v is not None for v in (coordinator_address, num_processes, process_id)]
    if not any(given):
        return
    if not all(given):
        raise ValueError(
            "multi-host launch needs coordinator_address, num_processes and "
            f"process_id together; got coordinator_address={coordinator_address!r}, "
            f"num_processes={num_processes!r}, process_id={process_id!r}"
        )
    jax.distributed.initialize(
        coordinator_address=coordinator_address,
        num_processes=num_processes,
        process_id=process_id,
    )
    logging.info(
        "Initialised process %d of %d; %d global devices",
        jax.process_index(),
        jax.process_count(),
        jax.device_count(),
    )


def create_mesh(devices: Sequence[jax.Device] | None = None) -> Mesh:
    """Build a 1-D mesh with axis `data` over `devices` (default: every device)."""
    devices = list(jax.devices() if devices is None else devices)
    return Mesh(np.array(devices), (DATA_AXIS,))


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Sharding that splits the leading (batch) dimension over the `data` axis."""
    return NamedSharding(mesh, PartitionSpec(DATA_AXIS))


def replicated_sharding(mesh: Mesh) -> NamedSharding:
    """Sharding that keeps a full copy on every device."""
    return NamedSharding(mesh, PartitionSpec())


def check_batch_size(global_batch_size: int, mesh: Mesh) -> None:
    """Raise ValueError unless the batch divides evenly over the mesh and processes."""
    num_devices = mesh.devices.size
    if global_batch_size % num_devices:
        raise ValueError(
            f"batch size {global_batch_size} is not divisible by the {num_devices} "
            f"devices of the data-parallel mesh; use a multiple of {num_devices}"
        )
    if global_batch_size % jax.process_count():
        raise ValueError(
            f"batch size {global_batch_size} is not divisible by the "
            f"{jax.process_count()} processes"
        )


def shard_batch(batch: Mapping[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """Assemble this process's rows of a batch into global arrays split on `data`.

    Args:
      batch: numpy arrays whose first dimension is this process's share of the
        global batch (the whole batch in a single-process run).
      mesh: the data-parallel mesh.

    Returns:
      Global `jax.Array`s of leading size `local rows * process_count`.

    Raises:
      ValueError: arrays disagree on the number of rows, or the global batch does
        not divide evenly over the mesh's devices.
    """
    sizes = {np.shape(v)[0] for v in batch.values()}
    if len(sizes) != 1:
        raise ValueError(
            f"batch arrays disagree on the number of rows: {sorted(sizes)}"
        )
    check_batch_size(sizes.pop() * jax.process_count(), mesh)
    sharding = batch_sharding(mesh)
    return {
        key: jax.make_array_from_process_local_data(sharding, np.asarray(value))
        for key, value in batch.items()
    }


def replicate(tree: Any, mesh: Mesh) -> Any:
    """Place every leaf of `tree` on all devices of the mesh."""
    return jax.device_put(tree, replicated_sharding(mesh))

"""Data-parallel sharding: one ``data`` mesh axis over every device; state replicated, batch sharded."""

from __future__ import annotations

from collections.abc import Mapping

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

DATA_AXIS = "data"


def make_mesh(num_devices: int | None = None) -> Mesh:
    """A 1-D mesh with axis ``'data'`` over all devices (or the first ``num_devices``)."""
    devices = jax.devices()
    if num_devices is not None:
        if not 1 <= num_devices <= len(devices):
            raise ValueError(f"num_devices must be in [1, {len(devices)}], got {num_devices}")
        devices = devices[:num_devices]
    # Auto axes: shardings propagate through the model without explicit annotations on every op.
    return jax.make_mesh((len(devices),), (DATA_AXIS,), (jax.sharding.AxisType.Auto,), devices=devices)


def replicated(mesh: Mesh) -> NamedSharding:
    """Parameters, BatchNorm statistics and optimizer state: a full copy on every device."""
    return NamedSharding(mesh, PartitionSpec())


def batch_sharded(mesh: Mesh) -> NamedSharding:
    """Batches: split along the leading (batch) axis over ``'data'``."""
    return NamedSharding(mesh, PartitionSpec(DATA_AXIS))


def global_batch(host_batch: Mapping[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """Turns this process's part of a batch into global arrays sharded over ``'data'``.

    The global batch is the concatenation of every process's local batch, so each process's local batch
    size must be divisible by its number of local devices.
    """
    sharding = batch_sharded(mesh)
    local_devices = len(mesh.local_devices)
    out = {}
    for key, value in host_batch.items():
        if value.shape[0] % local_devices:
            raise ValueError(
                f"batch[{key!r}] has {value.shape[0]} examples on this process, not divisible by its "
                f"{local_devices} devices: choose a batch size divisible by the device count"
            )
        out[key] = jax.make_array_from_process_local_data(sharding, value)
    return out

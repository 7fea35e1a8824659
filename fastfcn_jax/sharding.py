"""Data-parallel sharding: one ``data`` mesh axis over every device; state replicated, batch sharded."""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

DATA_AXIS = "data"


def make_mesh(num_devices: int | None = None) -> Mesh:
    """A 1-D mesh with axis ``'data'`` over all devices (or the first ``num_devices``)."""
    devices = jax.devices()
    if num_devices is not None:
        share = devices_per_process(num_devices)
        devices = [d for p in range(jax.process_count()) for d in [d for d in devices if d.process_index == p][:share]]
    # Auto axes: shardings propagate through the model without explicit annotations on every op.
    return jax.make_mesh((len(devices),), (DATA_AXIS,), (jax.sharding.AxisType.Auto,), devices=devices)


def evaluation_devices(num_devices: int = 0) -> list[jax.Device]:
    """This process's devices for evaluation and prediction (``ProtocolRunner``): its share of ``num_devices``
    (counted over all processes, as for training's mesh), or with 0 every local device; on CPUs one (forced
    host devices share the same cores: more of them only add compilations)."""
    devices = jax.local_devices()
    if num_devices:
        return devices[: devices_per_process(num_devices)]
    return devices[:1] if jax.default_backend() == "cpu" else devices


def devices_per_process(num_devices: int) -> int:
    """Each process's share of ``config.num_devices`` (counted over all processes: each process feeds its own
    devices its share of every batch); ValueError for a count out of range or not a multiple of the processes."""
    total, processes = jax.device_count(), jax.process_count()
    if not 1 <= num_devices <= total:
        raise ValueError(f"config.num_devices={num_devices}: must be in [1, {total}] (0: all)")
    if num_devices % processes:
        raise ValueError(f"config.num_devices={num_devices}: must be a multiple of the {processes} processes (0: all)")
    return num_devices // processes


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


def with_mesh(fn: Callable[..., Any], mesh: Mesh) -> Callable[..., Any]:
    """``fn`` traced with ``mesh`` as the context mesh, for :func:`over_batch` inside it (``jax.set_mesh``
    cannot be entered under ``jit``; this wraps the function that ``jit`` traces)."""

    @functools.wraps(fn)
    def traced(*args: Any, **kwargs: Any) -> Any:
        with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
            return fn(*args, **kwargs)

    return traced


def has_data_mesh() -> bool:
    """Whether a mesh with a ``'data'`` axis is the context mesh (``jax.set_mesh``, :func:`with_mesh`)."""
    mesh = jax.sharding.get_abstract_mesh()
    return not mesh.empty and DATA_AXIS in mesh.axis_names


def data_parallel_size() -> int:
    """Devices on the ``'data'`` axis of the context mesh (``jax.set_mesh``, :func:`with_mesh`; 1 without one)."""
    return jax.sharding.get_abstract_mesh().shape[DATA_AXIS] if has_data_mesh() else 1


def over_batch(
    fn: Callable[..., Sequence[jax.Array]], *args: jax.Array, batched: Sequence[bool], summed: Sequence[bool]
) -> tuple[jax.Array, ...]:
    """``fn(*args)`` run on each device's part of the batch of the context mesh (:func:`with_mesh`).

    For Pallas kernels: XLA's SPMD partitioner cannot split a custom call it knows nothing about, so it
    gathers the batch-sharded operands onto every device and runs the whole batch everywhere. Here each
    device runs ``fn`` on its own examples (``jax.shard_map`` over ``'data'``). ``batched[i]``: argument i is
    split along its leading axis (else every device gets all of it). ``fn`` returns a tuple; ``summed[j]``:
    output j is a sum over the batch, added over the devices (else it is split along its leading axis).
    Without a data-parallel mesh, ``fn(*args)``.
    """
    devices = data_parallel_size()
    if devices == 1:
        return tuple(fn(*args))
    for arg, split in zip(args, batched, strict=True):
        if split and arg.shape[0] % devices:
            raise ValueError(
                f"a batch of {arg.shape[0]} (argument of shape {arg.shape}) does not split over the {devices} "
                "devices of the mesh's 'data' axis: choose a batch size divisible by the device count"
            )
    in_specs = tuple(PartitionSpec(DATA_AXIS) if b else PartitionSpec() for b in batched)
    out_specs = tuple(PartitionSpec() if s else PartitionSpec(DATA_AXIS) for s in summed)

    def local(*local_args):
        outs = fn(*local_args)
        return tuple(jax.lax.psum(o, DATA_AXIS) if s else o for o, s in zip(outs, summed, strict=True))

    # check_vma=False: a pallas_call's outputs carry no record of how they vary over the mesh.
    mesh = jax.sharding.get_abstract_mesh()
    return jax.shard_map(local, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_vma=False)(*args)

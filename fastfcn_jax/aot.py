"""Compile-only builds: a model's forward pass or training step compiled for accelerators this machine lacks.

XLA compiles for a device it does not have from a description of it: a GPU target description
(``experiments/gpu_aot.py``) or a TPU topology (``libtpu`` installed, no TPU: ``experiments/tpu_aot.py``).
The program gets the target compiler's real fusions, layouts and memory plan, so its bytes, FLOPs, memory
footprint and (on TPUs) the compiler's own per-kernel cycle estimates can be read before hardware time is
spent. Lowering is the same code path as training (:func:`fastfcn_jax.train.make_train_step`, batch
sharded over a ``data`` mesh, state replicated, BatchNorm statistics over the global batch) and as the
benchmark's forward pass.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding

from fastfcn_jax.sharding import DATA_AXIS, batch_sharded, with_mesh
from fastfcn_jax.sharding import replicated as replicated_sharding


@dataclasses.dataclass(frozen=True)
class TpuTarget:
    """A TPU generation as JAX sees it: figures per JAX device (a core on v2/v3, a chip on v5e)."""

    name: str
    device_kind: str
    topologies: Mapping[int, str]  # devices -> topology name for jax.experimental.topologies
    clock_hz: float  # converts the compiler's estimated cycles to seconds
    peak_flops: float  # bf16 matmul peak
    bandwidth: float  # HBM bytes/s
    memory: int  # HBM bytes


# Cloud TPU system-architecture pages (per chip: v2 45 TFLOP/s, 16 GiB, 600 GB/s, 2 cores; v3 123 TFLOP/s,
# 32 GiB, 900 GB/s, 2 cores; v5e 197 TFLOP/s, 16 GB, 819 GB/s, 1 core) and the published core clocks.
# The compiler's cost model reproduces these peaks: an 8192^3 bf16 matmul's optimal_seconds give 22.8,
# 61.4 and 197 TFLOP/s per device.
TPUS = {
    "v2": TpuTarget("v2", "TPU v2", {8: "v2:2x2"}, 700e6, 22.5e12, 300e9, 8 * 2**30),
    "v3": TpuTarget("v3", "TPU v3", {8: "v3:2x2"}, 940e6, 61.5e12, 450e9, 16 * 2**30),
    "v5e": TpuTarget(
        "v5e", "TPU v5 lite", {1: "v5e:1x1", 4: "v5e:2x2", 8: "v5e:2x4"}, 1.5e9, 197e12, 819e9, 16_000_000_000
    ),
}


class MissingCompilerError(RuntimeError):
    """The installed jax cannot compile for the target (its plugin is missing); the message says what to install."""


# The modules of jax's compiler plugins (any one of them), by platform.
_PLUGIN_MODULES = {"cuda": ("jax_cuda12_plugin", "jax_plugins.xla_cuda12"), "tpu": ("libtpu",)}


def require_compiler(platform: str) -> None:
    """Raises :class:`MissingCompilerError`, naming what to install, unless jax's plugin for compiling for
    ``platform`` (``'cuda'`` or ``'tpu'``) is installed; compiling for a machine one does not have needs it."""
    import importlib.util

    import jax

    def found(module: str) -> bool:
        try:
            return importlib.util.find_spec(module) is not None
        except ImportError:  # a dotted name whose parent package is missing
            return False

    if not any(found(module) for module in _PLUGIN_MODULES[platform]):
        extra, size = ("cuda12", ", about 5 GB") if platform == "cuda" else ("tpu", "")
        raise MissingCompilerError(
            f"compiling for {'a GPU' if platform == 'cuda' else 'a TPU'} without one needs jax's {platform} plugin: "
            f"pip install 'jax[{extra}]=={jax.__version__}'{size} (the script's docstring)"
        )


def tpu_devices(target: TpuTarget, count: int) -> list[Any]:
    """``count`` compile-only devices of ``target`` (needs ``libtpu``; no TPU): the smallest topology with
    at least that many devices, of which the first ``count`` are used."""
    from jax.experimental.topologies import get_topology_desc

    sizes = sorted(n for n in target.topologies if n >= count)
    if count < 1 or not sizes:
        raise ValueError(f"{target.name}: device count must be 1..{max(target.topologies)}, got {count}")
    topology_name = target.topologies[sizes[0]]
    # A single-chip slice is its own host; larger ones use libtpu's default host bounds.
    options = {"chips_per_host_bounds": [1, 1, 1]} if sizes[0] == 1 else {}
    require_compiler("tpu")
    devices = list(get_topology_desc(topology_name, "tpu", **options).devices)
    return devices[:count]


def _state_and_step(model: Any, variables: Any, name: str) -> tuple[Any, Any]:
    from fastfcn_jax.benchmark import recipe_train_step
    from fastfcn_jax.train import TrainState

    optimizer, step = recipe_train_step(model, name)
    state = jax.eval_shape(
        lambda v: TrainState(
            step=jnp.zeros((), jnp.int32),
            params=v["params"],
            batch_stats=v["batch_stats"],
            opt_state=optimizer.init(v["params"]),
        ),
        variables,
    )
    return state, step


def lower(
    name: str,
    devices: Sequence[Any],
    *,
    backend: str,
    num_classes: int = 150,
    batch_size: int = 16,
    size: int = 512,
    dtype: str = "bfloat16",
    ops: Mapping[str, str] | None = None,
    train: bool = False,
) -> jax.stages.Lowered:
    """The forward pass (``train=False``, ``model.apply(..., train=False)``) or the training step of model
    ``name`` lowered for ``devices``, from shapes only (no arrays are allocated).

    ``batch_size`` is the global batch, split over the devices; ``backend`` ('cpu', 'gpu' or 'tpu') is what
    ``'auto'`` op choices resolve for (:func:`fastfcn_jax.models.op_choices.target_backend`).
    """
    from fastfcn_jax.benchmark import synthetic_variables
    from fastfcn_jax.models import create_model
    from fastfcn_jax.models.op_choices import op_overrides, target_backend

    if batch_size % len(devices):
        raise ValueError(f"batch size {batch_size} is not divisible by the {len(devices)} devices")
    # The training job's shardings (fastfcn_jax.sharding) over a mesh of the target's devices.
    mesh = Mesh(np.asarray(devices), (DATA_AXIS,))
    replicated, batched = replicated_sharding(mesh), batch_sharded(mesh)

    def shaped(tree: Any, sharding: NamedSharding) -> Any:
        return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding), tree)

    model = create_model(name, num_classes, dtype=dtype, **op_overrides(ops))
    variables = jax.eval_shape(lambda: synthetic_variables(model, jnp.zeros((1, 64, 64, 3), jnp.float32)))
    images = jax.ShapeDtypeStruct((batch_size, size, size, 3), jnp.float32, sharding=batched)
    with target_backend(backend):
        if not train:
            forward = jax.jit(with_mesh(functools.partial(model.apply, train=False), mesh))
            return forward.lower(shaped(variables, replicated), images)
        state, step = _state_and_step(model, variables, name)
        batch = {"image": images, "label": jax.ShapeDtypeStruct(images.shape[:3], jnp.int32, sharding=batched)}
        rng = shaped(jax.eval_shape(lambda: jax.random.PRNGKey(0)), replicated)
        return jax.jit(with_mesh(step, mesh), donate_argnums=0).lower(shaped(state, replicated), batch, rng)


def memory_per_device(compiled: Any) -> dict[str, int]:
    """Bytes each device holds while the program runs: arguments, outputs (less what aliases a donated
    argument), temporaries, generated code; ``total`` is their sum, the figure to compare with HBM."""
    stats = compiled.memory_analysis()
    sizes = {
        "arguments": int(stats.argument_size_in_bytes),
        "outputs": int(stats.output_size_in_bytes - stats.alias_size_in_bytes),
        "temporaries": int(stats.temp_size_in_bytes),
        "code": int(stats.generated_code_size_in_bytes),
    }
    sizes["total"] = sum(sizes.values())
    return sizes

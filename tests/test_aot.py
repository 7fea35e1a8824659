"""Compile-only lowering (fastfcn_jax/aot.py) and the TPU script's plumbing, on this machine's CPU devices.

The TPU and GPU targets themselves need libtpu or jax's CUDA plugin (experiments/tpu_aot.py,
experiments/gpu_aot.py); the lowering they share is the same for any devices, so it is tested here on the
four host devices of conftest.py.
"""

from __future__ import annotations

import re

import jax
import pytest
from jax.sharding import PartitionSpec

from fastfcn_jax import aot
from fastfcn_jax.sharding import DATA_AXIS
from tests.test_perf_scripts import _load


def test_train_step_is_lowered_batch_sharded_with_the_state_replicated() -> None:
    devices = jax.devices()[:2]
    lowered = aot.lower("fcn_jpu_tiny", devices, backend="cpu", batch_size=4, size=32, dtype="float32", train=True)
    compiled = lowered.compile()
    state_shardings, batch_shardings, _ = compiled.input_shardings[0]
    assert batch_shardings["image"].spec == PartitionSpec(DATA_AXIS)
    assert batch_shardings["label"].spec == PartitionSpec(DATA_AXIS)
    assert all(s.spec == PartitionSpec() for s in jax.tree.leaves(state_shardings))
    assert set(batch_shardings["image"].device_set) == set(devices)
    # The step returns (state, metrics): the new state, donated, aliases the old one.
    memory = aot.memory_per_device(compiled)
    assert memory["total"] == memory["arguments"] + memory["outputs"] + memory["temporaries"] + memory["code"]
    assert memory["arguments"] > 0 and memory["outputs"] < memory["arguments"]


def test_auto_op_choices_resolve_for_the_target_backend() -> None:
    devices = jax.devices()[:1]

    def lowered_text(backend: str) -> str:
        return aot.lower("fcn_jpu_tiny", devices, backend=backend, batch_size=1, size=32, dtype="float32").as_text()

    # The bilinear resizes: gathers on CPUs and GPUs, interpolation matrices (dots) on TPUs.
    assert "stablehlo.gather" in lowered_text("cpu")
    assert "stablehlo.gather" not in lowered_text("tpu")


def test_a_batch_that_does_not_split_over_the_devices_is_refused() -> None:
    with pytest.raises(ValueError, match="not divisible by the 4 devices"):
        aot.lower("fcn_jpu_tiny", jax.devices()[:4], backend="cpu", batch_size=6, size=32)


def test_tpu_targets_and_script_options() -> None:
    for target in aot.TPUS.values():
        assert target.peak_flops > 1e13 and target.bandwidth > 1e11 and target.memory >= 8 * 2**30
        with pytest.raises(ValueError, match="device count"):
            aot.tpu_devices(target, max(target.topologies) + 1)
    script = _load("tpu_aot")
    args = script._parse_args(
        ["--tpu", "v2", "--devices", "8", "--train", "--ops", "", "--ops", "resize=gather", "--model", "a,b"]
    )
    assert args.tpu == "v2" and args.devices == 8 and args.train and args.ops == ["", "resize=gather"]


def test_a_missing_compiler_plugin_is_named_with_what_to_install(monkeypatch) -> None:
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name.startswith(("jax_cuda", "libtpu")) else real(name, *a),
    )
    for platform, install in (("cuda", "jax[cuda12]"), ("tpu", "jax[tpu]")):
        with pytest.raises(
            aot.MissingCompilerError, match=rf"needs jax's {platform} plugin: pip install '{re.escape(install)}"
        ):
            aot.require_compiler(platform)
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: object() if name == "libtpu" else None)
    aot.require_compiler("tpu")  # installed: nothing said

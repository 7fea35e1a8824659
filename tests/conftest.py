"""Shared test setup: fake devices, fixture paths, and a persistent compilation cache for speed."""

from __future__ import annotations

import os
from pathlib import Path

# Set before jax is imported anywhere in the test process, and inherited by the processes tests start
# (`python -m fastfcn_jax.main`, the notebook's kernel, two-process jobs), which read them when they import jax:
# - 4 fake CPU devices, for the sharded code paths;
# - XLA:CPU compiling for speed of compilation, not of the program: LLVM without optimisation and the
#   classic loop emitters instead of the MLIR fusion emitters take the tiny model's train step from 25 to
#   7 s of compilation (the tests run tiny shapes, so the slower code costs little); the same operations, at
#   most summed in another order;
# - one persistent compilation cache for all of them (xdist workers and subprocesses included): most tests
#   compile the same few tiny-model programs (one of 0.2 s or more is kept);
# - the 'rbg' generator: model init compiles about twice as fast; nothing tested depends on init values.
REPO = Path(__file__).resolve().parent.parent
TEST_XLA_FLAGS = "--xla_backend_optimization_level=0 --xla_cpu_use_fusion_emitters=false"
os.environ.setdefault("XLA_FLAGS", f"--xla_force_host_platform_device_count=4 {TEST_XLA_FLAGS}")
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", str(REPO / ".venv" / "jax_cache"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.2")
os.environ.setdefault("JAX_DEFAULT_PRNG_IMPL", "rbg")

import pytest  # noqa: E402

FIXTURES = Path(__file__).parent / "fixtures"


@pytest.fixture(scope="session")
def fixtures_dir() -> Path:
    return FIXTURES

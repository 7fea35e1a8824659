"""Shared test setup: tiny models, fixture paths, and a persistent compilation cache for speed."""

from __future__ import annotations

import os
from pathlib import Path

# Must be set before jax is imported anywhere in the test process.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=4")

import jax  # noqa: E402
import pytest  # noqa: E402

FIXTURES = Path(__file__).parent / "fixtures"

# Compiled executables are reused across test processes and runs (xdist workers included).
jax.config.update("jax_compilation_cache_dir", str(Path(__file__).parent.parent / ".venv" / "jax_cache"))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
# Model init compiles about twice as fast with the 'rbg' generator; nothing tested depends on init values.
jax.config.update("jax_default_prng_impl", "rbg")


@pytest.fixture(scope="session")
def fixtures_dir() -> Path:
    return FIXTURES

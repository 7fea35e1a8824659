"""The models' dtype policy.

Parameters and normalisation statistics are float32 (``param_dtype``); convolutions and matmuls run in
``dtype`` (bfloat16 on accelerators); normalisation, resampling and per-tap sums are computed in float32
(:func:`exact_dtype`; float64 in the float64 exactness tests) and cast back.
"""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp

Dtype = Any


def exact_dtype(dtype: Dtype) -> Dtype:
    """The dtype resampling is computed in: float32, or float64 for float64 inputs (exactness tests)."""
    return jnp.promote_types(dtype, jnp.float32)

"""fastfcn-jax: FastFCN (Joint Pyramid Upsampling) semantic segmentation in JAX/Flax.

Importing the package is cheap: the public names below load their modules (JAX, Flax) on first use.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# name -> module that defines it (PEP 562 lazy attributes: `import fastfcn_jax` imports neither Flax nor TF).
_LAZY = {
    "Predictor": "fastfcn_jax.predict",
    "create_model": "fastfcn_jax.models",
    "run_evaluation": "fastfcn_jax.evaluate",
    "run_prediction": "fastfcn_jax.predict",
}

__all__ = ["__version__", "code_version", *_LAZY]


def code_version() -> str:
    """``__version__`` and the git commit of the source tree it runs from (``0.1.0+8a07876``; ``+unknown``
    outside a git checkout), recorded with training runs and evaluation results."""
    import subprocess
    from pathlib import Path

    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
            cwd=Path(__file__).parent,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        commit = "unknown"
    return f"{__version__}+{commit}"


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value  # later lookups skip this function
        return value
    raise AttributeError(f"module 'fastfcn_jax' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))

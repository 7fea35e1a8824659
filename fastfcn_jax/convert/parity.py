"""Parity with the official PyTorch FastFCN: rebuild a fixture's synthetic weights, convert them, run the
Flax model on the fixture's input and measure every stored array against the official output.

The fixtures (``tests/fixtures/parity``, from ``shared/parity``) hold the official model's outputs (FastFCN
master 126661b) for weights that ``synthetic_weights.py`` in the same folder rebuilds from each key list.
Used by ``tests/test_parity.py`` and ``experiments/parity_check.py`` (which runs on any backend).
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from fastfcn_jax.convert.converter import ConversionReport, convert_with_report
from fastfcn_jax.models import create_model

# fixture -> (model name, number of classes)
PARITY_FIXTURES = {
    "encnet_jpu_r50_ade": ("encnet_jpu_r50", 150),
    "psp_jpu_r50_pcontext": ("psp_jpu_r50", 59),
    "deeplab_jpu_r50_pcontext": ("deeplab_jpu_r50", 59),
    "fcn_jpu_r50_pcontext": ("fcn_jpu_r50", 59),
    "encnet_dilated_r50_pcontext": ("encnet_dilated_r50", 59),
    "encnet_jpux_r50_pcontext": ("encnet_jpux_r50", 59),
}
# max|out - ref| / std(ref); the official model's own float32 noise is about 1e-5.
TOLERANCE = 1e-4


def official_state_dict(fixture_dir: str | Path, fixture: str) -> dict[str, np.ndarray]:
    """The synthetic official state_dict of a fixture, rebuilt by the fixture folder's own generator."""
    fixture_dir = Path(fixture_dir)
    spec = importlib.util.spec_from_file_location("synthetic_weights", fixture_dir / "synthetic_weights.py")
    weights = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(weights)
    return weights.synthetic_state_dict(weights.load_keys(fixture_dir / f"{fixture}.keys.json"), seed=0)


def parity_errors(
    fixture_dir: str | Path, fixture: str, **model_overrides: Any
) -> tuple[dict[str, float], ConversionReport]:
    """``{array name: max|out - ref| / std(ref)}`` for every array the fixture stores, and the conversion report.

    Runs at full float32 precision (``jax.default_matmul_precision('highest')``): TF32 or bfloat16 matmul
    passes on accelerators give errors far above the tolerance.
    """
    model_name, num_classes = PARITY_FIXTURES[fixture]
    recorded = json.loads((Path(fixture_dir) / f"{fixture}.keys.json").read_text())["nclass"]
    if recorded != num_classes:
        raise ValueError(f"{fixture}: the fixture was made with {recorded} classes, not {num_classes}")
    variables, report = convert_with_report(official_state_dict(fixture_dir, fixture), model_name, num_classes)
    reference = np.load(Path(fixture_dir) / f"{fixture}.npz")
    images = jnp.asarray(reference["input"].transpose(0, 2, 3, 1))  # NCHW -> NHWC
    model = create_model(model_name, num_classes, **model_overrides)
    with jax.default_matmul_precision("highest"):
        outputs, state = jax.jit(lambda v, x: model.apply(v, x, train=False, mutable=["intermediates"]))(
            variables, images
        )
    produced = {**outputs, **state["intermediates"]}
    errors = {}
    for name in reference.files:
        if name == "input":
            continue
        ref, out = reference[name], np.asarray(produced[name])
        if out.ndim == 4:
            out = out.transpose(0, 3, 1, 2)  # NHWC -> NCHW like the fixture
        if out.shape != ref.shape:
            raise ValueError(f"{fixture}/{name}: shape {out.shape} vs the official {ref.shape}")
        errors[name] = float(np.max(np.abs(out - ref)) / np.std(ref))
    return errors, report

"""Parity with the PyTorch originals: rebuild a fixture's synthetic weights, convert them, run the Flax model
on the fixture's input and measure every stored array against the original's output.

The fixtures (``tests/fixtures/parity``, from ``shared/parity``) hold the official model's outputs (FastFCN
master 126661b) for weights that ``synthetic_weights.py`` in the same folder rebuilds from each key list;
``tests/fixtures/parity_mmseg`` those of mmsegmentation 1.2.2's FastFCN models and a dilated PSPNet, made the
same way by its ``make_fixtures.py``. Used by ``tests/test_parity.py`` and ``experiments/parity_check.py``
(which runs on any backend).
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

# fixture -> (model name, number of classes, converter source)
PARITY_FIXTURES = {
    "encnet_jpu_r50_ade": ("encnet_jpu_r50", 150, "official"),
    "psp_jpu_r50_pcontext": ("psp_jpu_r50", 59, "official"),
    "deeplab_jpu_r50_pcontext": ("deeplab_jpu_r50", 59, "official"),
    "fcn_jpu_r50_pcontext": ("fcn_jpu_r50", 59, "official"),
    "encnet_dilated_r50_pcontext": ("encnet_dilated_r50", 59, "official"),
    "encnet_jpux_r50_pcontext": ("encnet_jpux_r50", 59, "official"),
    "psp_jpu_r50_mmseg": ("psp_jpu_r50", 19, "mmseg"),
    "deeplab_jpu_r50_mmseg": ("deeplab_jpu_r50", 19, "mmseg"),
    "encnet_jpu_r50_mmseg": ("encnet_jpu_r50", 19, "mmseg"),
    "psp_dilated_r50_mmseg": ("psp_dilated_r50", 19, "mmseg"),
    "deeplab_dilated_r50_mmseg": ("deeplab_dilated_r50", 19, "mmseg"),
    "encnet_dilated_r50_mmseg": ("encnet_dilated_r50", 19, "mmseg"),
}
# The folder under tests/fixtures of each source's fixtures.
FIXTURE_FOLDERS = {"official": "parity", "mmseg": "parity_mmseg"}
# max|out - ref| / std(ref); the official model's own float32 noise is about 1e-5.
TOLERANCE = 1e-4


def official_state_dict(fixture_dir: str | Path, fixture: str) -> dict[str, np.ndarray]:
    """The synthetic state_dict of a fixture, rebuilt by the generator its key list names (``weights.module``,
    relative to the fixture's folder)."""
    fixture_dir = Path(fixture_dir)
    keys_file = fixture_dir / f"{fixture}.keys.json"
    recipe = json.loads(keys_file.read_text())["weights"]
    spec = importlib.util.spec_from_file_location("synthetic_weights", fixture_dir / recipe["module"])
    weights = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(weights)
    make = getattr(weights, recipe["function"])
    return make(weights.load_keys(keys_file), seed=recipe["seed"])


def parity_errors(
    fixture_dir: str | Path, fixture: str, **model_overrides: Any
) -> tuple[dict[str, float], ConversionReport]:
    """``{array name: max|out - ref| / std(ref)}`` for every array the fixture stores, and the conversion report.

    Runs at full float32 precision (``jax.default_matmul_precision('highest')``): TF32 or bfloat16 matmul
    passes on accelerators give errors far above the tolerance.
    """
    model_name, num_classes, source = PARITY_FIXTURES[fixture]
    recorded = json.loads((Path(fixture_dir) / f"{fixture}.keys.json").read_text())["nclass"]
    if recorded != num_classes:
        raise ValueError(f"{fixture}: the fixture was made with {recorded} classes, not {num_classes}")
    variables, report = convert_with_report(official_state_dict(fixture_dir, fixture), model_name, num_classes, source)
    reference = np.load(Path(fixture_dir) / f"{fixture}.npz")
    images = jnp.asarray(reference["input"].transpose(0, 2, 3, 1))  # NCHW -> NHWC
    if source == "mmseg":
        model_overrides = {"reference": "mmseg", **model_overrides}
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

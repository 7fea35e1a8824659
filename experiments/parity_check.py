"""Parity with the official PyTorch FastFCN on every fixture, on whatever backend jax runs on.

    python experiments/parity_check.py            # prints max|out - ref| / std(ref) per array and fixture

Needs only jax, flax and numpy (no torch, no TensorFlow): the official outputs are in
tests/fixtures/parity and the synthetic weights are rebuilt from each key list. Runs at float32 with
``jax.default_matmul_precision('highest')`` (TF32 convolutions on GPUs give errors far above 1e-4).
Exits non-zero if any array exceeds the 1e-4 threshold.
"""

from __future__ import annotations

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from fastfcn_jax.convert import convert_state_dict  # noqa: E402
from fastfcn_jax.models import create_model  # noqa: E402

PARITY = REPO / "tests" / "fixtures" / "parity"
FIXTURES = {
    "encnet_jpu_r50_ade": ("encnet_jpu_r50", 150),
    "psp_jpu_r50_pcontext": ("psp_jpu_r50", 59),
    "deeplab_jpu_r50_pcontext": ("deeplab_jpu_r50", 59),
    "fcn_jpu_r50_pcontext": ("fcn_jpu_r50", 59),
    "encnet_dilated_r50_pcontext": ("encnet_dilated_r50", 59),
    "encnet_jpux_r50_pcontext": ("encnet_jpux_r50", 59),
}
TOLERANCE = 1e-4


def main() -> int:
    sys.path.insert(0, str(PARITY))
    import synthetic_weights

    print(f"backend {jax.default_backend()} ({jax.devices()[0].device_kind}), jax {jax.__version__}")
    worst = 0.0
    for fixture, (name, num_classes) in FIXTURES.items():
        state_dict = synthetic_weights.synthetic_state_dict(
            synthetic_weights.load_keys(PARITY / f"{fixture}.keys.json"), seed=0
        )
        variables = convert_state_dict(state_dict, name, num_classes)
        reference = np.load(PARITY / f"{fixture}.npz")
        model = create_model(name, num_classes)
        images = jnp.asarray(reference["input"].transpose(0, 2, 3, 1))
        with jax.default_matmul_precision("highest"):
            outputs, state = jax.jit(lambda v, x, m=model: m.apply(v, x, mutable=["intermediates"]))(variables, images)
        produced = {**outputs, **state["intermediates"]}
        errors = {}
        for key in reference.files:
            if key == "input":
                continue
            out = np.asarray(produced[key])
            if out.ndim == 4:
                out = out.transpose(0, 3, 1, 2)
            errors[key] = float(np.max(np.abs(out - reference[key])) / np.std(reference[key]))
        worst = max(worst, *errors.values())
        print(
            f"{fixture:30s} worst {max(errors.values()):.2e}  " + "  ".join(f"{k} {v:.1e}" for k, v in errors.items())
        )
    print(
        f"worst over all fixtures: {worst:.2e} (threshold {TOLERANCE:.0e}): {'PASS' if worst < TOLERANCE else 'FAIL'}"
    )
    return 0 if worst < TOLERANCE else 1


if __name__ == "__main__":
    sys.exit(main())

"""ONNX export of each model: converted as ``--mode=export`` converts it (BatchNorm folded, XLA forms), run in
ONNX Runtime against the JAX model on random images, timed beside it (batch 1, median after one untimed run).

    python experiments/onnx_check.py                                   # the twelve tiny models, 64x64
    python experiments/onnx_check.py --models encnet_jpu_r50 --size 512 --repeats 5

Random weights (tiny models: BatchNorm statistics calibrated on random images, so that every layer matters);
the error is max |onnx - jax| / std(jax) against the unfolded JAX model. Needs the ``onnx`` extra and
jax2onnx (docs/export.md: ONNX). Prints a markdown table, and JSON lines with ``--json``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from fastfcn_jax import export  # noqa: E402
from fastfcn_jax.models import available_models, create_model  # noqa: E402
from fastfcn_jax.models.batch_norm import fold_batch_norm  # noqa: E402
from fastfcn_jax.models.op_choices import xla_forms  # noqa: E402

TINY = [name for name in available_models() if name.endswith("_tiny")]


def check(name: str, size: int, repeats: int, directory: Path) -> dict[str, object]:
    """Converts ``name`` at ``size`` x ``size``; its error against JAX and both runtimes' batch-1 latencies."""
    import onnxruntime

    model = create_model(name, 5 if name.endswith("_tiny") else 150)
    images = np.random.default_rng(3).standard_normal((2, size, size, 3)).astype(np.float32)
    if name.endswith("_tiny"):
        from tests.model_weights import calibrated_variables

        variables = calibrated_variables(model, size)
    else:
        variables = jax.jit(lambda x: model.init(jax.random.PRNGKey(0), x, train=False))(images[:1])
    start = time.perf_counter()
    with xla_forms():
        path = export.export_onnx(
            model.clone(norm_implementation="folded"),
            fold_batch_norm(variables),
            directory / f"{name}.onnx",
            image_size=(size, size),
            metadata={"model_name": name},
        )
    convert_s = time.perf_counter() - start
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    forward = jax.jit(lambda v, x: model.apply(v, x, train=False)["logits"])
    want = np.asarray(forward(variables, images))
    (got,) = session.run(None, {"images": images})
    times: dict[str, list[float]] = {"onnx": [], "jax": []}
    runs = {
        "onnx": lambda: session.run(None, {"images": images[:1]}),
        "jax": lambda: jax.block_until_ready(forward(variables, images[:1])),
    }
    for _ in range(repeats + 1):  # in turn, so that a drifting machine slows both alike; the first untimed
        for runtime, run in runs.items():
            start = time.perf_counter()
            run()
            times[runtime].append(time.perf_counter() - start)
    return {
        "model": name,
        "size": size,
        "relative_error": float(np.max(np.abs(got - want)) / np.std(want)),
        "convert_s": round(convert_s, 1),
        "onnx_ms": round(1e3 * statistics.median(times["onnx"][1:]), 1),
        "jax_ms": round(1e3 * statistics.median(times["jax"][1:]), 1),
        "onnx_mb": round(path.stat().st_size / 2**20, 1),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default=",".join(TINY), help="comma-separated (default: every tiny model)")
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", action="store_true", help="also print one JSON line per model")
    args = parser.parse_args(argv)
    rows = []
    print("| model | size | max error / std | convert (s) | ONNX Runtime (ms) | JAX (ms) | file (MB) |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    with tempfile.TemporaryDirectory() as directory:
        for name in args.models.split(","):
            row = check(name, args.size, args.repeats, Path(directory))
            rows.append(row)
            print(
                f"| {name} | {args.size} | {row['relative_error']:.2e} | {row['convert_s']} | {row['onnx_ms']} | "
                f"{row['jax_ms']} | {row['onnx_mb']} |",
                flush=True,
            )
    if args.json:
        for row in rows:
            print(json.dumps(row))
    return 0


if __name__ == "__main__":
    sys.exit(main())

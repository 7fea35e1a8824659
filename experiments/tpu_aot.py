"""Compile models for a Cloud TPU on a machine without one: memory per device and the compiler's estimates.

With ``libtpu`` installed, XLA builds a compile-only TPU topology and compiles the forward pass or the
training step with the TPU compiler's real fusions, layouts and memory plan (:mod:`fastfcn_jax.aot`). The
compiler writes its cost model's cycle count into every kernel; this script sums them into an estimated
step time (cycles / core clock), next to the roofline of the same kernels (:mod:`fastfcn_jax.roofline`),
and reports each device's memory (arguments, outputs, temporaries) against its HBM. The estimate is a
model, not a measurement; use it to compare formulations and models and to size batches.

    python3 -m venv /tmp/tpuaot && /tmp/tpuaot/bin/pip install "jax[tpu]==0.10.2" flax optax
    PYTHONPATH=. /tmp/tpuaot/bin/python experiments/tpu_aot.py --tpu v5e --model encnet_jpu_r50,encnet_dilated_r50
    PYTHONPATH=. /tmp/tpuaot/bin/python experiments/tpu_aot.py --tpu v2 --devices 8 --train --size 480
    PYTHONPATH=. /tmp/tpuaot/bin/python experiments/tpu_aot.py --tpu v5e --ops '' --ops resize=gather --details

Every combination of ``--model`` (comma-separated) and ``--ops`` (repeatable; ``''`` is the defaults)
gives one row of the summary table; ``--details`` also prints each program's per-scope breakdown and its
costliest kernels. Op choices: ``'auto'`` resolves for a TPU (``op_choices.target_backend('tpu')``).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

_COLLECTIVES = frozenset({"all-reduce", "all-reduce-start", "all-gather", "all-gather-start", "reduce-scatter"})


def _parse_args(argv: list[str]) -> argparse.Namespace:
    from fastfcn_jax.aot import TPUS

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tpu", choices=sorted(TPUS), default="v5e")
    parser.add_argument("--devices", type=int, default=1, help="devices the batch is split over (data parallel)")
    parser.add_argument("--model", default="encnet_jpu_r50", help="comma-separated model names")
    parser.add_argument("--num-classes", type=int, default=150)
    parser.add_argument("--batch-size", type=int, default=1, help="global batch, over all --devices")
    parser.add_argument("--size", type=int, default=512, help="square input size (the paper's crop is 480)")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--train", action="store_true", help="the training step instead of the forward pass")
    parser.add_argument(
        "--ops", action="append", default=None, help="op choices, e.g. resize=gather (repeat to compare)"
    )
    parser.add_argument("--details", action="store_true", help="per-scope table and top kernels per program")
    parser.add_argument("--depth", type=int, default=2, help="scope parts to group kernels by")
    parser.add_argument("--top", type=int, default=15, help="kernels to list with --details")
    parser.add_argument("--hlo-dir", default=None, help="write each optimized HLO text into this folder")
    return parser.parse_args(argv)


def analyse(args: argparse.Namespace, model: str, ops: str) -> dict:
    """Compiles one program for the TPU and returns its summary row (and its kernels)."""
    from fastfcn_jax import aot, roofline
    from fastfcn_jax.models.op_choices import parse_ops

    target = aot.TPUS[args.tpu]
    devices = aot.tpu_devices(target, args.devices)
    lowered = aot.lower(
        model,
        devices,
        backend="tpu",
        num_classes=args.num_classes,
        batch_size=args.batch_size,
        size=args.size,
        dtype=args.dtype,
        ops=parse_ops(ops),
        train=args.train,
    )
    start = time.perf_counter()
    compiled = lowered.compile()
    compile_s = time.perf_counter() - start
    text = compiled.as_text()
    if args.hlo_dir:
        os.makedirs(args.hlo_dir, exist_ok=True)
        label = f"{model}_{'train' if args.train else 'forward'}_{ops.replace('=', '-').replace(',', '_') or 'auto'}"
        with open(os.path.join(args.hlo_dir, label + ".hlo.txt"), "w") as f:
            f.write(text)
    found = roofline.kernels(text, peak_flops=target.peak_flops, bandwidth=target.bandwidth, clock_hz=target.clock_hz)
    estimate = roofline.estimated_total(found) or float("nan")
    # FLOPs per device: the program is one device's share of the global batch.
    flops = sum(k.flops for k in found)
    memory = aot.memory_per_device(compiled)
    # The cost model gives no cycles for collectives: their bytes are reported beside the estimate.
    collective_bytes = sum(k.bytes for k in found if k.kind in _COLLECTIVES)
    return {
        "model": model,
        "ops": ops or "auto",
        "compile_s": compile_s,
        "gflops": flops / 1e9,
        "estimate_ms": estimate * 1e3,
        "roofline_ms": sum(k.seconds for k in found) * 1e3,
        "images_per_s": args.batch_size / estimate,
        "of_peak": flops / estimate / target.peak_flops,
        "memory": memory,
        "fits": memory["total"] <= target.memory,
        "collective_mb": collective_bytes / 1e6,
        "kernels": found,
    }


def main(argv: list[str] | None = None) -> None:
    os.environ.setdefault("JAX_PLATFORMS", "cpu")  # compile-only: no TPU runtime is started
    args = _parse_args(sys.argv[1:] if argv is None else argv)
    from fastfcn_jax import aot, roofline

    try:
        aot.require_compiler("tpu")
    except aot.MissingCompilerError as error:
        sys.exit(f"error: {error}")
    target = aot.TPUS[args.tpu]
    what = "train step" if args.train else "forward"
    print(
        f"{target.device_kind} x{args.devices} (compile-only), {what}, global batch {args.batch_size}, "
        f"{args.size}x{args.size}, {args.dtype}; per device: {target.peak_flops / 1e12:.1f} TFLOP/s, "
        f"{target.bandwidth / 1e9:.0f} GB/s, {target.memory / 2**30:.1f} GiB HBM, clock {target.clock_hz / 1e9:.2f} GHz"
    )
    rows = []
    for model in args.model.split(","):
        for ops in args.ops or [""]:
            row = analyse(args, model, ops)
            rows.append(row)
            print(f"compiled {model} [{row['ops']}] in {row['compile_s']:.1f} s", file=sys.stderr, flush=True)
            if args.details:
                print(f"\n## {model} [{row['ops']}]")
                print(roofline.format_report(row["kernels"], depth=args.depth, top=args.top))
    print()
    print(
        "| model | ops | GFLOPs/device | estimated ms | img/s | of peak | roofline ms | memory/device GiB "
        "(args + out + temp) | fits | all-reduce MB/device (not in the estimate) |"
    )
    print("|---|---|---:|---:|---:|---:|---:|---:|---|---:|")
    for row in rows:
        m = row["memory"]
        print(
            f"| {row['model']} | {row['ops']} | {row['gflops']:.1f} | {row['estimate_ms']:.2f} | "
            f"{row['images_per_s']:.1f} | {row['of_peak']:.0%} | {row['roofline_ms']:.2f} | "
            f"{m['total'] / 2**30:.2f} ({m['arguments'] / 2**30:.2f} + {m['outputs'] / 2**30:.2f} + "
            f"{m['temporaries'] / 2**30:.2f}) | {'yes' if row['fits'] else 'NO'} | {row['collective_mb']:.0f} |"
        )


if __name__ == "__main__":
    main()

"""One model's training step under several op choices, in one process, timed in turn round by round.

    python experiments/train_variants.py --model encnet_jpu_r50 --batch-size 16 --size 480 --dtype bfloat16 \
        --variant default --variant depthwise_input_grad=fused --variant loss_gradient=float32
    python experiments/train_variants.py --quick          # tiny model at 64x64 on CPU: a smoke test

Why one process: on a lent GPU each new process pays JAX's start and XLA's autotuning again, and timings
taken in different processes of the same machine differed by up to 15%. Variants are compiled first, then
timed round-robin (one step of each per round), so a slow drift of the machine hits all alike. A variant
is ``default`` or ``OP=CHOICE[,OP=CHOICE...]`` (see ``fastfcn_jax.models.layers.OpChoices``); ``--model``
may name other models too (``--variant model=encnet_dilated_r50``). Prints a markdown table; ``--output``
writes the JSON. Needs only jax, flax, optax and numpy.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import jax

from fastfcn_jax.benchmark import compile_train_step, environment, tiny_variant
from fastfcn_jax.models.layers import parse_ops


def parse_variant(text: str, model: str) -> tuple[str, str, dict[str, str]]:
    """``'model=NAME,OP=CHOICE'`` -> (label, model, ops); ``'default'`` -> the default ops of ``model``."""
    ops = {} if text == "default" else parse_ops(text)
    return text, ops.pop("model", model), ops


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="encnet_jpu_r50")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--size", type=int, default=480)
    parser.add_argument("--dtype", default="bfloat16", choices=("float32", "bfloat16", "float16"))
    parser.add_argument("--variant", action="append", default=None, help="'default' or OP=CHOICE,...")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--output", type=Path, default=None)
    parser.add_argument("--quick", action="store_true", help="tiny model, 64x64, batch 2, 2 repeats")
    args = parser.parse_args(argv)
    variants = [parse_variant(v, args.model) for v in (args.variant or ["default"])]
    batch, size, repeats = (2, 64, 2) if args.quick else (args.batch_size, args.size, args.repeats)
    if args.quick:
        variants = [(label, tiny_variant(model), ops) for label, model, ops in variants]
    env = environment()
    steps = {}
    for label, model, ops in variants:
        print(f"compiling {label} ({model}) ...", file=sys.stderr, flush=True)
        steps[label] = compile_train_step(model, image_size=(size, size), batch_size=batch, dtype=args.dtype, ops=ops)
    states = {label: step.state for label, step in steps.items()}
    for _ in range(args.warmup):
        for label, step in steps.items():
            states[label] = jax.block_until_ready(step.run(states[label]))
    times: dict[str, list[float]] = {label: [] for label in steps}
    for _ in range(repeats):
        for label, step in steps.items():
            start = time.perf_counter()
            states[label] = jax.block_until_ready(step.run(states[label]))
            times[label].append((time.perf_counter() - start) * 1e3)
    rows = []
    for (label, model, ops), step in zip(variants, steps.values(), strict=True):
        median = statistics.median(times[label])
        rows.append({
            "variant": label, "model": model, "ops": ops, "median_ms": median, "min_ms": min(times[label]),
            "runs_ms": times[label], "images_per_s": batch * 1e3 / median, "flops": step.flops,
            "compile_s": step.compile_s,
        })  # fmt: skip
    print(
        f"{env['device_kind']} ({env['backend']}), jax {env['jax_version']}; train step, batch {batch}, "
        f"{size}x{size}, {args.dtype}; median of {repeats} after {args.warmup} warm-up, variants in turn\n"
    )
    print("| variant | model | median ms | min ms | img/s | TFLOP/s | vs first |\n|---|---|---:|---:|---:|---:|---:|")
    first = rows[0]["median_ms"]
    for row in rows:
        tflops = f"{row['flops'] / row['median_ms'] / 1e9:.1f}" if row["flops"] else "n/a"
        print(
            f"| {row['variant']} | {row['model']} | {row['median_ms']:.2f} | {row['min_ms']:.2f} "
            f"| {row['images_per_s']:.1f} | {tflops} | {row['median_ms'] / first:.3f} |"
        )
    if args.output:
        args.output.write_text(
            json.dumps({"environment": env, "batch_size": batch, "size": size, "rows": rows}, indent=1)
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())

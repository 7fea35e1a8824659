"""One model's training step under several op choices, in one process, timed in turn round by round.

    python experiments/train_variants.py --model encnet_jpu_r50 --batch-size 16 --size 480 --dtype bfloat16 \
        --variant default --variant depthwise_input_grad=fused --variant loss_gradient=float32
    python experiments/train_variants.py --quick          # tiny model at 64x64 on CPU: a smoke test

Why one process: on a lent GPU each new process pays JAX's start and XLA's autotuning again, and timings
taken in different processes of the same machine differed by up to 15%. Each variant is timed as soon as it
is compiled (its row printed and saved at once: a time limit loses only what was not reached), then all of
them again in turn, round by round, so that a slow drift of the machine hits all alike. Each is timed with a
wait after every step (``median ms``) and with its steps dispatched back to back as the training loop runs
them (``b2b ms``, per step; TFLOP/s from it). A variant that fails to compile or run is reported and skipped. A variant
is ``default`` or ``OP=CHOICE[,OP=CHOICE...]`` (see ``fastfcn_jax.models.op_choices.OpChoices``); ``--model``
may name other models too (``--variant model=encnet_dilated_r50``). Prints a markdown table; ``--output``
writes the JSON. Needs only jax, flax, optax and numpy.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

# Runnable from a source checkout without `pip install -e .`.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fastfcn_jax.benchmark import compile_train_step, describe_device, environment, tiny_variant  # noqa: E402
from fastfcn_jax.models.op_choices import parse_ops  # noqa: E402


def parse_variant(text: str, model: str) -> tuple[str, str, dict[str, str]]:
    """``'model=NAME,OP=CHOICE'`` -> (label, model, ops); ``'default'`` -> the default ops of ``model``."""
    ops = {} if text == "default" else parse_ops(text)
    return text, ops.pop("model", model), ops


def _row(row: dict, first_ms: float) -> str:
    tflops = f"{row['flops'] / row['back_to_back_ms'] / 1e9:.1f}" if row["flops"] else "n/a"
    return (
        f"| {row['variant']} | {row['model']} | {row['median_ms']:.2f} | {row['min_ms']:.2f} "
        f"| {row['back_to_back_ms']:.2f} | {row['images_per_s']:.1f} | {tflops} "
        f"| {row['back_to_back_ms'] / first_ms:.3f} | {row['compile_s']:.0f} |"
    )


def _save(path: Path | None, report: dict) -> None:
    if path is not None:
        path.write_text(json.dumps(report, indent=1))


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
    parser.add_argument(
        "--no-interleave", dest="interleave", action="store_false", help="skip the second, round-robin pass"
    )
    args = parser.parse_args(argv)
    variants = [parse_variant(v, args.model) for v in (args.variant or ["default"])]
    batch, size, repeats = (2, 64, 2) if args.quick else (args.batch_size, args.size, args.repeats)
    if args.quick:
        variants = [(label, tiny_variant(model), ops) for label, model, ops in variants]
    env = environment()
    print(
        f"{describe_device(env)}; train step, batch {batch}, "
        f"{size}x{size}, {args.dtype}; median of {repeats} after {args.warmup} warm-up\n",
        flush=True,
    )
    print(
        "| variant | model | median ms | min ms | b2b ms | img/s (b2b) | TFLOP/s (b2b) | vs first | compile s |",
        flush=True,
    )
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|", flush=True)
    steps, states, rows = {}, {}, []
    report = {"environment": env, "batch_size": batch, "size": size, "rows": rows, "failed": {}, "interleaved": None}
    for label, model, ops in variants:
        # Each variant is timed as soon as it is compiled and its row printed and saved: a compile takes about
        # 45 s on a lent H200, and a run cut by its time limit must still bring back what it measured.
        print(f"compiling {label} ({model}) ...", file=sys.stderr, flush=True)
        try:
            step = compile_train_step(model, image_size=(size, size), batch_size=batch, dtype=args.dtype, ops=ops)
            state, times = step.timed_steps(step.state, args.warmup, repeats)
            state, back_to_back = step.back_to_back_ms(state, repeats)
        except Exception as error:  # noqa: BLE001 - one variant's failure must not cost the others' results
            message = f"{type(error).__name__}: {error}"[:600]
            report["failed"][label] = message
            print(f"| {label} | {model} | failed: {message.splitlines()[0][:200]} |", flush=True)
            _save(args.output, report)
            continue
        steps[label], states[label] = step, state
        row = {
            "variant": label, "model": model, "ops": ops, "median_ms": statistics.median(times),
            "min_ms": min(times), "runs_ms": times, "back_to_back_ms": back_to_back, "flops": step.flops,
            "compile_s": step.compile_s,
        }  # fmt: skip
        row["images_per_s"] = batch * 1e3 / row["back_to_back_ms"]
        rows.append(row)
        print(_row(row, rows[0]["back_to_back_ms"]), flush=True)
        _save(args.output, report)
    if args.interleave and len(steps) > 1:
        # A second pass, variants in turn round by round (three steps back to back each), so that a drift of
        # the machine hits all alike.
        times = {label: [] for label in steps}
        for _ in range(repeats):
            for label, step in steps.items():
                states[label], ms = step.back_to_back_ms(states[label], 3)
                times[label].append(ms)
        report["interleaved"] = {label: statistics.median(t) for label, t in times.items()}
        print(
            "\ninterleaved pass (median ms per step, back to back): "
            + ", ".join(f"{k} {v:.2f}" for k, v in report["interleaved"].items())
        )
        _save(args.output, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())

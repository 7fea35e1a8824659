"""Forward latency and XLA FLOPs of FastFCN models, dilated vs. JPU (the paper's speed comparison).

    python experiments/benchmark.py                      # 6 r50 models, 512x512, batch 1
    python experiments/benchmark.py --quick              # tiny variants at 64x64, a smoke test
    python experiments/benchmark.py --models encnet_jpu_r101,encnet_dilated_r101 --dtype bfloat16 \\
        --output /tmp/bench.json

Prints the JSON results (unless --no-print-json) and then a markdown table to stdout; progress goes to
stderr.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

# Runnable from a source checkout without `pip install -e .`.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fastfcn_jax.benchmark import (  # noqa: E402
    DEFAULT_MODELS,
    benchmark_input_pipeline,
    format_table,
    run_benchmark,
    tiny_variant,
)
from fastfcn_jax.models.op_choices import op_overrides, parse_ops  # noqa: E402


def _image_size(text: str) -> tuple[int, int]:
    parts = text.lower().split("x")
    if len(parts) not in (1, 2) or not all(p.isdigit() and int(p) > 0 for p in parts):
        raise argparse.ArgumentTypeError(f"expected SIZE or HxW, got {text!r}")
    return (int(parts[0]), int(parts[-1]))


def _ops(text: str) -> dict[str, str]:
    try:
        ops = parse_ops(text)
        op_overrides(ops)  # unknown ops and choices: a usage error now, not a traceback after other models
        return ops
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def _sizes(text: str) -> list[tuple[int, int]]:
    try:
        sizes = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: square sizes, comma-separated (256,480)") from None
    if not sizes or min(sizes) <= 0:
        raise argparse.ArgumentTypeError(f"{text!r}: positive square sizes, comma-separated (256,480)")
    return [(size, size) for size in sizes]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--models",
        help=f"comma-separated model names (default: {','.join(DEFAULT_MODELS)}; empty: only --train-models)",
    )
    parser.add_argument("--num-classes", type=int, default=150, help="150 (ADE20K) or 59 (PASCAL Context)")
    parser.add_argument("--size", type=_image_size, help="input size, SIZE or HxW (default 512)")
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--warmup", type=int, help="untimed runs after compilation (default 2)")
    parser.add_argument("--repeats", type=int, help="timed runs; the median is reported (default 5)")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    parser.add_argument("--no-aux", dest="aux", action="store_false", help="drop the auxiliary FCN head")
    parser.add_argument("--output", type=Path, help="also write the JSON results to this file")
    parser.add_argument("--no-print-json", dest="print_json", action="store_false")
    parser.add_argument(
        "--quick", action="store_true", help="smoke test: _tiny variants at 64x64, 1 warm-up, 2 repeats"
    )
    parser.add_argument("--train-models", default="", help="comma-separated models whose training step is also timed")
    parser.add_argument(
        "--train-sizes",
        type=_sizes,
        default=None,
        help="comma-separated square sizes for the train step (default 256,480; --quick: 64)",
    )
    parser.add_argument("--train-batch-size", type=int, default=2)
    parser.add_argument(
        "--ops",
        type=_ops,
        default={},
        help="op implementations to compare, e.g. depthwise=grouped,resize=matmul (see OpChoices)",
    )
    parser.add_argument(
        "--until",
        choices=("c1", "c2", "c3", "c4", "jpu", "head"),
        help="time the forward only up to this feature map (c4: backbone, jpu: + neck, head: all but upsampling)",
    )
    parser.add_argument("--no-peak", dest="peak", action="store_false", help="skip the matmul peak measurement")
    parser.add_argument(
        "--sequential",
        dest="interleave",
        action="store_false",
        help="time one model after the other instead of all in turn, round by round (the default)",
    )
    parser.add_argument(
        "--constant-weights",
        action="store_true",
        help="compile the weights into the forward program as a deployment does (XLA folds the BN arithmetic)",
    )
    parser.add_argument(
        "--input-pipeline",
        metavar="DATASET",
        help="also measure the training input pipeline's images/s on DATASET (imports TensorFlow)",
    )
    parser.add_argument("--data-dir", default=None, help="tfds data dir for --input-pipeline")
    parser.add_argument("--pipeline-crop", type=int, default=None, help="crop size for --input-pipeline")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    # --models= (empty) times only the --train-models.
    names = args.models.split(",") if args.models is not None else list(DEFAULT_MODELS)
    names = [n.strip() for n in names if n.strip()]
    # --quick only fills in what was not given explicitly.
    quick = args.quick
    size = args.size or ((64, 64) if quick else (512, 512))
    warmup = args.warmup if args.warmup is not None else (1 if quick else 2)
    repeats = args.repeats if args.repeats is not None else (2 if quick else 5)
    train_names = [n.strip() for n in args.train_models.split(",") if n.strip()]
    train_sizes = args.train_sizes or ([(64, 64)] if quick else [(256, 256), (480, 480)])
    if quick:
        names = [tiny_variant(n) for n in names]
        train_names = [tiny_variant(n) for n in train_names]

    results = run_benchmark(
        names,
        num_classes=args.num_classes,
        image_size=size,
        batch_size=args.batch_size,
        warmup=warmup,
        repeats=repeats,
        dtype=args.dtype,
        aux=args.aux,
        ops=args.ops,
        until=args.until,
        constant_weights=args.constant_weights,
        peak=args.peak,
        train_names=train_names,
        train_sizes=train_sizes,
        train_batch_size=args.train_batch_size,
        interleave=args.interleave,
    )
    if args.input_pipeline:
        results["input_pipeline"] = benchmark_input_pipeline(
            args.input_pipeline, data_dir=args.data_dir, batch_size=16, crop_size=args.pipeline_crop
        )
    text = json.dumps(results, indent=2)
    if args.output:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(text + "\n")
    if args.print_json:
        print(text)
        print()
    print(format_table(results))


if __name__ == "__main__":
    main()

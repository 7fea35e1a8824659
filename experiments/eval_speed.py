"""Images/s of ``--mode=eval``'s test protocol (the reference's sliding windows, flip, every scale) and the
host's share of it, on random weights and random images (``fastfcn_jax.benchmark.benchmark_evaluation``).

    python experiments/eval_speed.py                                # EncNet+JPU R50, ADE20K multi-scale
    python experiments/eval_speed.py --model encnet_jpu_r101 --dtype bfloat16 --devices 8
    python experiments/eval_speed.py --dataset cityscapes --image-size 1024,2048 --base-size 2048 --crop-size 768

Runs from the source tree with only jax, flax, optax and numpy importable (no TensorFlow, no ml_collections).
Prints a markdown table, and the JSON result with ``--json``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402

from fastfcn_jax.benchmark import benchmark_evaluation, describe_device, environment, format_evaluation  # noqa: E402
from fastfcn_jax.protocols import PROTOCOLS  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="encnet_jpu_r50")
    parser.add_argument("--protocol", default="multi_scale", choices=PROTOCOLS)
    parser.add_argument(
        "--dataset", default="", help="cityscapes adds the scales 2.0 and 2.25; the mmseg protocols take its test scale"
    )
    parser.add_argument("--num-classes", type=int, default=150)
    parser.add_argument("--image-size", default="512,683", help="HEIGHT,WIDTH of the random images")
    parser.add_argument("--base-size", type=int, default=520)
    parser.add_argument("--crop-size", type=int, default=480)
    parser.add_argument("--images", type=int, default=16, help="images timed (after every device's first group)")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    parser.add_argument("--window-batch", type=int, default=8)
    parser.add_argument("--images-per-call", type=int, default=4)
    parser.add_argument("--devices", type=int, default=0, help="0: every local device (one on CPUs)")
    parser.add_argument("--json", action="store_true", help="also print the JSON result")
    args = parser.parse_args(argv)
    height, width = (int(s) for s in args.image_size.split(","))
    if not 0 <= args.devices <= len(jax.local_devices()):
        parser.error(f"--devices must be in [0, {len(jax.local_devices())}] (0: every local device, one on CPUs)")
    devices = jax.local_devices()[: args.devices] if args.devices else None
    result = benchmark_evaluation(
        args.model,
        protocol=args.protocol,
        num_classes=args.num_classes,
        image_size=(height, width),
        base_size=args.base_size,
        crop_size=args.crop_size,
        images=args.images,
        dtype=args.dtype,
        window_batch=args.window_batch,
        images_per_call=args.images_per_call,
        devices=devices,
        dataset=args.dataset,
    )
    print(f"\n{describe_device(environment())}\n")
    print(format_evaluation(result))
    if args.json:
        print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

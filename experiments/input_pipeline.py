"""Training input pipeline throughput on the demo dataset and on a real-format one (ADE20K layout).

    python experiments/input_pipeline.py --workdir /tmp/pipe             # 160 ADE20K-format images, 480 crops
    python experiments/input_pipeline.py --workdir /tmp/pipe --images 400 --batches 40

The real ADE20K cannot be downloaded here, so this writes a tree in its exact layout and encoding
(``ADEChallengeData2016/images/training/*.jpg``, ``annotations/training/*.png`` with 0 = other and 1..150 the
classes) at ADE20K's typical image sizes, with textured photos-like content so JPEG decoding costs what real
photos cost, builds it with the package's tfds builder (``pipeline.prepare``) and times
``pipeline.train_batches`` (decode, random scale/crop/flip/blur, batch; uint8 images, which the train step
normalises) as training runs it. It prints images/s next to what the train step consumes. Imports TensorFlow.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from fastfcn_jax.benchmark import benchmark_input_pipeline  # noqa: E402
from fastfcn_jax.data import pipeline  # noqa: E402

# ADE20K training images are mostly 4:3 / 3:4 with the short side near 512 (a few are larger or smaller).
_SIZES = ((512, 683), (683, 512), (512, 512), (384, 512), (512, 768), (600, 800))


def write_ade20k_tree(root: Path, images: int, seed: int = 0) -> Path:
    """Writes ``images`` training and 8 validation examples in the ADE20K release layout under ``root``."""
    rng = np.random.default_rng(seed)
    base = root / "ADEChallengeData2016"
    for split, count, prefix in (("training", images, "ADE_train"), ("validation", 8, "ADE_val")):
        (base / "images" / split).mkdir(parents=True, exist_ok=True)
        (base / "annotations" / split).mkdir(parents=True, exist_ok=True)
        for index in range(1, count + 1):
            height, width = _SIZES[index % len(_SIZES)]
            # Smooth colour fields plus fine noise: compresses (and decodes) like a photo, unlike flat colour.
            coarse = rng.uniform(0, 255, (height // 32 + 1, width // 32 + 1, 3)).astype(np.uint8)
            image = np.asarray(Image.fromarray(coarse).resize((width, height), Image.BILINEAR), np.float32)
            image = np.clip(image + rng.normal(0, 12, image.shape), 0, 255).astype(np.uint8)
            blocks = rng.integers(0, 151, (height // 64 + 1, width // 64 + 1), dtype=np.uint8)
            mask = np.asarray(Image.fromarray(blocks).resize((width, height), Image.NEAREST))
            name = f"{prefix}_{index:08d}"
            Image.fromarray(image).save(base / "images" / split / f"{name}.jpg", quality=90)
            Image.fromarray(mask, "L").save(base / "annotations" / split / f"{name}.png")
    return root


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, required=True)
    parser.add_argument("--images", type=int, default=160, help="ADE20K-format training images to write")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--batches", type=int, default=20)
    parser.add_argument("--output", type=Path, help="also write the JSON results here")
    args = parser.parse_args(argv)

    raw, data_dir = args.workdir / "raw", args.workdir / "tfds"
    if not (raw / "ADEChallengeData2016").exists():
        print(f"writing {args.images} ADE20K-format images under {raw} ...", file=sys.stderr, flush=True)
        write_ade20k_tree(raw, args.images)
    pipeline.prepare("ade20k", data_dir, manual_dir=raw)
    results = {"host_cpus": os.cpu_count()}
    for dataset in ("synthetic_shapes", "ade20k"):
        print(f"timing the {dataset} training pipeline ...", file=sys.stderr, flush=True)
        results[dataset] = benchmark_input_pipeline(
            dataset, data_dir=str(data_dir), batch_size=args.batch_size, batches=args.batches
        )
    text = json.dumps(results, indent=2)
    if args.output:
        args.output.write_text(text + "\n")
    print(text)
    print(f"\n| dataset | crop | batch | images/s ({os.cpu_count()} host CPUs) |\n|---|---|---:|---:|")
    for dataset in ("synthetic_shapes", "ade20k"):
        result = results[dataset]
        crop = "x".join(str(s) for s in result["crop_size"])
        print(f"| {dataset} | {crop} | {result['batch_size']} | {result['images_per_s']:.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())

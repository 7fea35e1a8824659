"""Converts PyTorch weights into a fastfcn-jax checkpoint directory.

    python -m fastfcn_jax.convert --model encnet_jpu_r50 --num-classes 150 --from official IN.pth --out DIR
    python -m fastfcn_jax.convert --model psp_jpu_r50 --num-classes 19 --from mmseg MMSEG.pth --out DIR

The whole conversion happens in memory and is written to a temporary folder beside ``--out`` that is
renamed into place only once complete, so a failed run leaves ``--out`` as it was. The result is read by
``fastfcn_jax.checkpointing.restore_variables(DIR)`` (and ``--config.init_from=DIR``).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import sys
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from fastfcn_jax.checkpointing import save_variables
from fastfcn_jax.convert.converter import SOURCES, convert_with_report
from fastfcn_jax.convert.readers import load_state_dict


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m fastfcn_jax.convert",
        description="Convert PyTorch FastFCN (official or mmsegmentation) / ImageNet ResNet weights (.pth, "
        ".pth.tar, .pt, .npz, .safetensors) into a fastfcn-jax checkpoint directory. Pickles are read without "
        "torch and without running any code they contain.",
    )
    parser.add_argument("input", type=Path, help="weights file")
    parser.add_argument("--model", required=True, help="model name, e.g. encnet_jpu_r50")
    parser.add_argument("--num-classes", required=True, type=int, help="59 Pascal Context, 150 ADE20K")
    parser.add_argument(
        "--from",
        dest="source",
        default="official",
        choices=SOURCES,
        help="official: a FastFCN checkpoint; mmseg: an mmsegmentation FastFCN (fastfcn_r50-d32_jpu_*) or "
        "dilated EncNet/PSPNet/DeepLabV3 (*_r50-d8, *_r101-d8) checkpoint, converted into the reference='mmseg' "
        "variant of the model; resnet_s: deep-stem ImageNet ResNet (e.g. timm resnet50s.gluon_in1k); "
        "torchvision: 7x7-stem ImageNet ResNet (default: official)",
    )
    parser.add_argument("--out", required=True, type=Path, help="output checkpoint directory")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    parser.add_argument("--allow-missing", action="store_true", help="initialise model variables the file lacks")
    parser.add_argument("--allow-unexpected", action="store_true", help="ignore file keys the model does not use")
    parser.add_argument(
        "--reinit-classifier",
        action="store_true",
        help="freshly initialise the main, aux and SE classifiers (fine-tuning to another class count)",
    )
    parser.add_argument(
        "--class-names",
        help="a dataset name (pcontext, ade20k, cityscapes, pascal_voc, ...) or a file with the class names, "
        "one per line or a JSON list, stored with the checkpoint",
    )
    parser.add_argument(
        "--stem",
        choices=("deep", "standard"),
        help="backbone stem (default: standard for --from torchvision, else deep)",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed for freshly initialised variables")
    return parser


def read_class_names(source: str | Path, num_classes: int) -> list[str]:
    """Class names of a registered dataset, or from a text file (one per line, blank lines skipped) or a
    JSON list of strings."""
    path = Path(source)
    if not path.exists():
        from fastfcn_jax.data.datasets import available_datasets, get_dataset_info

        if str(source) not in available_datasets():
            raise ValueError(
                f"--class-names {source!r} is neither a file nor a dataset ({', '.join(available_datasets())})"
            )
        names = list(get_dataset_info(str(source)).class_names)
        if len(names) != num_classes:
            raise ValueError(
                f"--class-names {source}: that dataset has {len(names)} classes, but --num-classes is {num_classes}"
            )
        return names
    text = path.read_text()
    try:
        names = json.loads(text)
    except json.JSONDecodeError:
        names = [line.strip() for line in text.splitlines() if line.strip()]
    if not isinstance(names, list) or not all(isinstance(name, str) for name in names):
        raise ValueError(f"--class-names {path}: expected one class name per line or a JSON list of strings")
    if len(names) != num_classes:
        raise ValueError(f"--class-names {path}: holds {len(names)} class names, but --num-classes is {num_classes}")
    return names


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _check_out(out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file; give a directory")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise ValueError(f"--out {out} is not empty; pass --overwrite to replace it")


def _write(out: Path, variables: dict[str, Any], info: dict[str, Any], overwrite: bool) -> None:
    """Saves into a temporary sibling of ``out`` and renames it into place, so a failure writes nothing."""
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = out.parent / f".{out.name}.partial-{uuid.uuid4().hex[:12]}"
    staging.mkdir()  # not mkdtemp: its 0o700 mode would stay on the renamed output
    try:
        save_variables(staging, variables, info)
        _check_out(out, overwrite)  # again: another process may have written there meanwhile
        if out.is_dir():
            shutil.rmtree(out)
        staging.rename(out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def convert_file(args: argparse.Namespace) -> str:
    """Runs one conversion as the command line describes it; returns the report summary."""
    out = args.out.expanduser().absolute()
    _check_out(out, args.overwrite)
    class_names = read_class_names(args.class_names, args.num_classes) if args.class_names else None
    overrides: dict[str, Any] = {}
    if args.stem:
        overrides["stem"] = args.stem
    elif args.source == "torchvision":
        overrides["stem"] = "standard"
    if args.source == "mmseg":
        overrides["reference"] = "mmseg"  # stored: evaluation, prediction and export rebuild mmseg's variant
    state_dict = load_state_dict(args.input)
    variables, report = convert_with_report(
        state_dict,
        args.model,
        args.num_classes,
        args.source,
        allow_missing=args.allow_missing,
        allow_unexpected=args.allow_unexpected,
        reinit_classifier=args.reinit_classifier,
        seed=args.seed,
        model_overrides=overrides,
    )
    info = {
        "model_name": args.model,
        "num_classes": args.num_classes,
        "class_names": class_names,
        "model_overrides": overrides,
        "source": args.source,
        "input_file": args.input.name,
        "input_sha256": sha256_of(args.input),
        "conversion_report": report.summary(),
    }
    _write(out, variables, info, args.overwrite)
    return report.summary()


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; returns the exit status (0 on success, 1 on any error)."""
    args = _parser().parse_args(argv)
    try:
        summary = convert_file(args)
    except (ValueError, OSError, KeyError) as error:  # ConversionError, CheckpointReadError included
        message = str(error)
        # Reader errors name the file, conversion errors the keys; a flag's own error names the flag.
        if str(args.input) not in message and not message.startswith("--"):
            message = f"{args.input}: {message}"
        print(f"error: {message}", file=sys.stderr)
        print(f"nothing was written: {args.out} is as it was", file=sys.stderr)
        return 1
    print(summary)
    print(f"wrote {args.model} ({args.num_classes} classes) to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Build a dataset's tfds files once, before training.

  python -m fastfcn_jax.data.prepare --dataset synthetic_shapes --data-dir ~/tensorflow_datasets
  python -m fastfcn_jax.data.prepare --dataset ade20k --manual-dir ~/raw/ade20k --data-dir ~/tensorflow_datasets
  python -m fastfcn_jax.data.prepare --dataset folder:mydata --source ~/mydata --data-dir ~/tensorflow_datasets

Real datasets are read from ``--manual-dir`` (their download instructions and expected layout are printed
when files are missing, and by ``--instructions``).
"""

from __future__ import annotations

import argparse
import sys

from fastfcn_jax.data import datasets


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", required=True, help=f"one of {', '.join(datasets.available_datasets())}")
    parser.add_argument("--data-dir", default=None, help="tfds data dir to write (default ~/tensorflow_datasets)")
    parser.add_argument("--manual-dir", default=None, help="folder with the raw files of a real dataset")
    parser.add_argument("--source", default=None, help="custom data folder for --dataset folder[:NAME]")
    parser.add_argument("--instructions", action="store_true", help="print how to get the raw data and exit")
    parser.add_argument(
        "--overwrite", action="store_true", help="rebuild a dataset already prepared in --data-dir from the raw files"
    )
    args = parser.parse_args(argv)

    if args.instructions:
        if args.dataset.startswith("folder"):
            from fastfcn_jax.data.builders import folder

            print(folder.INSTRUCTIONS)
        else:
            print(datasets.get_dataset_info(args.dataset).download_instructions)
        return 0

    from fastfcn_jax.data import pipeline

    try:
        builder, built = pipeline.prepare_status(
            args.dataset, args.data_dir, manual_dir=args.manual_dir, source_dir=args.source, overwrite=args.overwrite
        )
    except (FileNotFoundError, ValueError) as err:  # missing raw files; bad data (common.DataError) names the file
        # On a line of its own: a build that failed midway leaves tfds' progress bar unterminated.
        print(f"\nerror: {err}", file=sys.stderr)
        return 1
    splits = ", ".join(f"{name} {split.num_examples}" for name, split in builder.info.splits.items())
    if built:
        print(f"{args.dataset}: prepared in {builder.data_dir} ({splits})")
    else:
        print(
            f"{args.dataset}: already prepared in {builder.data_dir} ({splits}); reused as it is, the raw files were "
            "not read: pass --overwrite to build it again from them"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())

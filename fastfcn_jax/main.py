"""Command line entry point: ``python -m fastfcn_jax.main --config configs/<name>.py --workdir DIR``.

Thin glue: parses flags, validates the config and dispatches to the mode's module.
"""

from __future__ import annotations

import sys

from absl import app, flags
from ml_collections import config_flags

MODES = ("summary",)

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Experiment config file (configs/*.py).", lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for outputs (summaries, checkpoints, metrics).")
flags.DEFINE_enum("mode", None, MODES, "What to run; defaults to the config's `mode`.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    config = FLAGS.config
    mode = FLAGS.mode or config.get("mode", "summary")
    if mode not in MODES:
        raise app.UsageError(f"unknown mode {mode!r}; expected one of {MODES}")
    try:
        if mode == "summary":
            from fastfcn_jax.summary import run_summary

            run_summary(config.model, tuple(config.image_size), config.batch_size, config.seed, FLAGS.workdir)
    except (ValueError, FileNotFoundError) as error:
        # A user error (bad config value, missing file): say what is wrong without a traceback.
        sys.exit(f"error: {error}")


if __name__ == "__main__":
    app.run(main)

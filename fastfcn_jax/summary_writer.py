"""Scalars: TensorBoard event files and a JSON-lines copy. TensorFlow is imported lazily here, never on the
model or step import path."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path


class SummaryWriter:
    """Writes scalars as TensorBoard event files under ``logdir`` and, with ``jsonl``, one JSON line per call
    (``{"step": N, "train/loss": ...}``: readable without TensorBoard); ``logdir=None`` writes nothing
    (processes other than the first)."""

    def __init__(
        self, logdir: str | Path | None, start_step: int | None = None, jsonl: str | Path | None = None
    ) -> None:
        """``start_step``: the step this run starts from (the restored one, 0 for a run from scratch); points an
        earlier run in ``logdir`` logged after it are removed, as this run logs those steps again."""
        self._writer = None
        self._jsonl = None
        if logdir is not None:
            import tensorflow as tf

            tf.config.set_visible_devices([], "GPU")  # TF must not take accelerator memory from JAX
            self._tf = tf
            if start_step is not None:
                drop_steps_after(logdir, start_step)
                if jsonl is not None:
                    drop_lines_after(jsonl, start_step)
            self._writer = tf.summary.create_file_writer(str(logdir))
            if jsonl is not None:
                self._jsonl = open(jsonl, "a")  # noqa: SIM115 -- open for the run, closed by close()

    def scalars(self, step: int, values: Mapping[str, float]) -> None:
        if self._writer is None:
            return
        with self._writer.as_default(step=int(step)):
            for name, value in values.items():
                self._tf.summary.scalar(name, float(value))
        self._writer.flush()
        if self._jsonl is not None:
            self._jsonl.write(json.dumps({"step": int(step), **{k: float(v) for k, v in values.items()}}) + "\n")
            self._jsonl.flush()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
        if self._jsonl is not None:
            self._jsonl.close()


def drop_lines_after(path: str | Path, step: int) -> None:
    """Keeps the lines of a JSON-lines scalar log up to ``step`` (and none cut short by a kill)."""
    path = Path(path)
    if not path.is_file():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:  # the last line of a killed run, cut short
            continue
        if record.get("step", 0) <= step:
            kept.append(line + "\n")
    partial = path.with_name(f".{path.name}.tmp")
    partial.write_text("".join(kept))
    partial.replace(path)


def drop_steps_after(logdir: str | Path, step: int) -> int:
    """Removes the events logged after ``step`` from the event files in ``logdir``; returns how many.

    A run killed after its last checkpoint (SIGKILL, a lost node) logged steps that its resumed run trains and
    logs again; TensorBoard would show both, as a zig-zag. Files are rewritten beside and renamed over; a
    file cut short by the kill keeps its readable records. Never stops training: a failure is a warning.
    """
    import tensorflow as tf
    from absl import logging

    dropped = 0
    paths = sorted(Path(logdir).glob("events.out.tfevents.*")) if Path(logdir).is_dir() else []
    for path in paths:
        try:
            records, truncated = [], False
            iterator = iter(tf.data.TFRecordDataset(str(path)))
            while True:
                try:
                    records.append(bytes(next(iterator).numpy()))
                except StopIteration:
                    break
                except tf.errors.DataLossError:  # a record cut short: kept up to it
                    truncated = True
                    break
            kept = [r for r in records if tf.compat.v1.Event.FromString(r).step <= step]
            if len(kept) == len(records) and not truncated:
                continue
            # Not named like an event file: TensorBoard must not read a leftover of an interrupted rewrite.
            partial = path.with_name(f".rewrite-{path.stat().st_ino}.tmp")
            with tf.io.TFRecordWriter(str(partial)) as writer:
                for record in kept:
                    writer.write(record)
            partial.replace(path)
            dropped += len(records) - len(kept)
        except Exception as error:  # noqa: BLE001 -- housekeeping of the logs must not block a resume
            logging.warning("TensorBoard log %s not cleaned of steps after %d: %s", path, step, error)
    return dropped

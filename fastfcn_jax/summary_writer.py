"""TensorBoard scalars. TensorFlow is imported lazily here, never on the model or step import path."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path


class SummaryWriter:
    """Writes scalars as TensorBoard event files under ``logdir``; ``logdir=None`` writes nothing
    (processes other than the first)."""

    def __init__(self, logdir: str | Path | None, resume_step: int | None = None) -> None:
        """``resume_step``: the step a resumed run restored; points logged after it by the interrupted run
        are removed, as the resumed run logs those steps again."""
        self._writer = None
        if logdir is not None:
            import tensorflow as tf

            tf.config.set_visible_devices([], "GPU")  # TF must not take accelerator memory from JAX
            self._tf = tf
            if resume_step is not None:
                drop_steps_after(logdir, resume_step)
            self._writer = tf.summary.create_file_writer(str(logdir))

    def scalars(self, step: int, values: Mapping[str, float]) -> None:
        if self._writer is None:
            return
        with self._writer.as_default(step=int(step)):
            for name, value in values.items():
                self._tf.summary.scalar(name, float(value))
        self._writer.flush()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()


def drop_steps_after(logdir: str | Path, step: int) -> int:
    """Removes the events logged after ``step`` from the event files in ``logdir``; returns how many.

    A run killed after its last checkpoint (SIGKILL, a lost node) logged steps that its resumed run trains and
    logs again; TensorBoard would show both, as a zig-zag. Files are rewritten beside and renamed over.
    """
    import tensorflow as tf

    dropped = 0
    for path in sorted(Path(logdir).glob("events.out.tfevents.*")) if Path(logdir).is_dir() else []:
        records = [bytes(r) for r in tf.data.TFRecordDataset(str(path)).as_numpy_iterator()]
        kept = [r for r in records if tf.compat.v1.Event.FromString(r).step <= step]
        if len(kept) == len(records):
            continue
        partial = path.with_name(path.name + ".partial")
        with tf.io.TFRecordWriter(str(partial)) as writer:
            for record in kept:
                writer.write(record)
        partial.replace(path)
        dropped += len(records) - len(kept)
    return dropped

"""TensorBoard scalars. TensorFlow is imported lazily here, never on the model or step import path."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path


class SummaryWriter:
    """Writes scalars as TensorBoard event files under ``logdir``; ``logdir=None`` writes nothing
    (processes other than the first)."""

    def __init__(self, logdir: str | Path | None) -> None:
        self._writer = None
        if logdir is not None:
            import tensorflow as tf

            tf.config.set_visible_devices([], "GPU")  # TF must not take accelerator memory from JAX
            self._tf = tf
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

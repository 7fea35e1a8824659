"""Segmentation metrics as the reference computes them (FastFCN ``utils/metrics.py``): confusion
matrices summed over the whole dataset, then pixAcc and mIoU.

mIoU is the mean over all C classes of inter / (eps + union): a class absent from both labels and
predictions counts as 0, as in the reference. ``mean_iou_present`` is the variant that averages only over
classes with a non-empty union.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

# The reference adds this to denominators (np.spacing(1)).
EPS = float(np.spacing(1))


def batch_confusion(
    labels: jax.Array, predictions: jax.Array, num_classes: int, weights: jax.Array | None = None
) -> jax.Array:
    """[C, C] int32 counts (rows = label, columns = prediction) for use inside ``jit``.

    Pixels whose label is outside [0, C) (the ignore label -1, padding) are not counted, and never index
    out of bounds; ``weights`` (same shape as labels, 0/1) masks further pixels, e.g. padded examples.
    """
    labels = labels.astype(jnp.int32)
    predictions = jnp.clip(predictions.astype(jnp.int32), 0, num_classes - 1)
    valid = (labels >= 0) & (labels < num_classes)
    if weights is not None:
        valid = valid & (weights > 0)
    index = jnp.where(valid, labels * num_classes + predictions, 0)
    counts = jnp.bincount(index.ravel(), weights=valid.ravel().astype(jnp.int32), length=num_classes * num_classes)
    return counts.reshape(num_classes, num_classes).astype(jnp.int32)


def confusion_matrix(labels: Any, predictions: Any, num_classes: int, ignore_label: int = -1) -> np.ndarray:
    """NumPy [C, C] int64 confusion counts (rows = label, columns = prediction), outside ``jit``.

    Accepts NumPy or JAX integer arrays of any (equal) shape. Pixels labelled ``ignore_label`` are
    skipped; any other label outside [0, C) or prediction outside [0, C) is an error.
    """
    labels = np.asarray(labels).astype(np.int64).ravel()
    predictions = np.asarray(predictions).astype(np.int64).ravel()
    if labels.shape != predictions.shape:
        raise ValueError(f"labels and predictions differ in size: {labels.size} vs {predictions.size}")
    keep = labels != ignore_label
    labels, predictions = labels[keep], predictions[keep]
    for name, values in (("label", labels), ("prediction", predictions)):
        bad = (values < 0) | (values >= num_classes)
        if np.any(bad):
            raise ValueError(f"{name} value {values[bad][0]} outside [0, {num_classes}) (ignore label {ignore_label})")
    return np.bincount(labels * num_classes + predictions, minlength=num_classes * num_classes).reshape(
        num_classes, num_classes
    )


def segmentation_scores(confusion: Any) -> dict[str, Any]:
    """pixel_accuracy, mean_iou (reference: absent classes count 0), mean_iou_present, per_class_iou.

    All are fractions in [0, 1]; ``per_class_iou`` is a list of C floats.
    """
    confusion = np.asarray(confusion, dtype=np.int64)
    inter = np.diag(confusion).astype(np.float64)
    labelled = confusion.sum(axis=1).astype(np.float64)
    predicted = confusion.sum(axis=0).astype(np.float64)
    union = labelled + predicted - inter
    iou = inter / (EPS + union)
    present = union > 0
    return {
        "pixel_accuracy": float(inter.sum() / (EPS + labelled.sum())),
        "mean_iou": float(iou.mean()),
        "mean_iou_present": float(iou[present].mean()) if present.any() else 0.0,
        "per_class_iou": [float(v) for v in iou],
    }

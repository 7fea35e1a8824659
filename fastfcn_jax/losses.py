"""The reference's training loss (FastFCN ``SegmentationLosses``): CE + aux CE + SE BCE, in float32."""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp

from fastfcn_jax import sharding, upsampled_loss_pallas
from fastfcn_jax.models import op_choices
from fastfcn_jax.models.resize import resize_bilinear

IGNORE_LABEL = -1


def cross_entropy(
    logits: jax.Array,
    labels: jax.Array,
    ignore_label: int = IGNORE_LABEL,
    *,
    gradient_dtype: Any = jnp.float32,
    upsample: str = "fused",
) -> jax.Array:
    """Pixel cross-entropy averaged over non-ignored pixels (PyTorch ``CrossEntropyLoss(ignore_index)``).

    logits [B, h, w, C], labels [B, H, W] integer. Logits smaller than the labels are first resized to them
    (bilinear, align corners: the reference's upsampling of the head's output), inside the loss, so that
    the full-resolution logits are never written (:func:`_upsampled_cross_entropy`). A batch without any
    labelled pixel gives 0 (PyTorch would give NaN), so one empty crop cannot poison a run. The mean is over
    the whole global batch: the reference's ``DataParallelCriterion`` averaged the means of its GPUs' shares
    (4 crops each on 4 GPUs), which weights crops by their share's labelled pixels and changes with the
    number of GPUs; one mean over the batch does not.

    Computed as ``logsumexp(z) - z[label]`` with the label's logit picked by a compare-and-sum over classes
    rather than ``log_softmax`` and ``take_along_axis``: the same value, but no [B, H, W, C] log-probability
    array is written and the gradient is ``softmax - one_hot`` in one elementwise pass instead of a gather's
    scatter-add. At the paper's crop the logits are full-resolution (batch 16, 480x480, 150 classes: 2.2 GB
    in float32 per head): XLA:GPU's memory traffic for the two heads' losses fell from about 60 to 21 GB,
    the training step's roofline estimate on an H200 from 37 to 29 ms (``experiments/gpu_aot.py``).

    ``gradient_dtype`` (logits smaller than the labels only; ``OpChoices.loss_gradient``): the full-resolution
    gradient is rounded to it before it is resized back to the logits' size (in float32). The training step
    passes the model's compute dtype: bfloat16 is what autodiff of a bfloat16 model hands its last layer
    anyway, and half the bytes of the largest array of its training step.

    ``upsample`` (logits smaller than the labels only; ``OpChoices.loss_upsample``): ``'fused'`` as above;
    ``'pallas'`` resizes the width at the logits' height and hands the rest to one Pallas kernel
    (:func:`_pallas_upsampled_cross_entropy`).
    """
    if upsample not in ("fused", "pallas"):
        raise ValueError(f"unknown upsample {upsample!r}; expected 'fused' or 'pallas'")
    if logits.shape[:-1] != labels.shape:
        smaller = (
            logits.ndim == 4
            and labels.ndim == 3
            and logits.shape[1] <= labels.shape[1]
            and logits.shape[2] <= labels.shape[2]
        )
        if logits.shape[0] != labels.shape[0] or not smaller:
            raise ValueError(
                f"logits {logits.shape} do not match labels {labels.shape} (expected [B, h, w, C] with h <= H, "
                "w <= W for labels [B, H, W])"
            )
        narrow = jnp.dtype(gradient_dtype).name
        if upsample == "pallas":
            return _pallas_upsampled_cross_entropy(logits.astype(jnp.float32), labels, ignore_label, narrow)
        return _upsampled_cross_entropy(logits.astype(jnp.float32), labels, ignore_label, narrow)
    log_sum_exp, picked = _log_sum_exp_and_picked(logits.astype(jnp.float32), labels)
    return _labelled_mean(log_sum_exp - picked, labels != ignore_label)[0]


def _labelled_mean(per_pixel: jax.Array, valid: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(mean over the labelled pixels, their count at least 1): 0, not NaN, when none is labelled."""
    count = jnp.maximum(jnp.sum(valid), 1)
    return jnp.sum(jnp.where(valid, per_pixel, 0.0)) / count, count


def _log_sum_exp_and_picked(logits: jax.Array, labels: jax.Array) -> tuple[jax.Array, jax.Array]:
    classes = jnp.arange(logits.shape[-1], dtype=labels.dtype)
    picked = jnp.sum(jnp.where(classes == labels[..., None], logits, 0.0), axis=-1)
    return jax.nn.logsumexp(logits, axis=-1), picked


def _one_pass_log_sum_exp_and_picked(logits: jax.Array, labels: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Like :func:`_log_sum_exp_and_picked` as one variadic reduction over the classes (running maximum,
    sum of exponentials relative to it, picked logit): the logits have one consumer, so XLA can compute
    them inside the reduction rather than write them."""
    classes = jnp.arange(logits.shape[-1], dtype=labels.dtype)
    picked_terms = jnp.where(classes == labels[..., None], logits, 0.0)

    def combine(a, b):
        (m_a, s_a, p_a), (m_b, s_b, p_b) = a, b
        m = jnp.maximum(m_a, m_b)
        safe = jnp.where(jnp.isfinite(m), m, 0.0)
        return m, s_a * jnp.exp(m_a - safe) + s_b * jnp.exp(m_b - safe), p_a + p_b

    init = (jnp.float32(-jnp.inf), jnp.float32(0.0), jnp.float32(0.0))
    m, total, picked = jax.lax.reduce((logits, jnp.ones_like(logits), picked_terms), init, combine, (logits.ndim - 1,))
    return m + jnp.log(total), picked


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _upsampled_cross_entropy(
    logits: jax.Array, labels: jax.Array, ignore_label: int, gradient_dtype: str = "float32"
) -> jax.Array:
    """:func:`cross_entropy` of ``logits`` resized to the labels' size, never writing the resized logits:
    the forward pass reduces them in one pass (:func:`_one_pass_log_sum_exp_and_picked`) as XLA computes
    them, the backward pass recomputes them and keeps only the per-pixel log-sum-exp in between, where
    autodiff would write the [B, H, W, C] array and read it three times. For XLA:GPU: the EncNet+JPU
    training step at batch 16, 480x480 moves 78 instead of 88 GB (compile-only H200 estimate); on XLA:CPU
    the plain form is faster (see ``OpChoices.loss_logits``). The full-resolution gradient is rounded to
    ``gradient_dtype`` before it is resized back."""
    return _upsampled_cross_entropy_fwd(logits, labels, ignore_label, gradient_dtype)[0]


def _upsampled_cross_entropy_fwd(
    logits: jax.Array, labels: jax.Array, ignore_label: int, gradient_dtype: str
) -> tuple[jax.Array, tuple]:
    log_sum_exp, picked = _one_pass_log_sum_exp_and_picked(resize_bilinear(logits, labels.shape[1:3]), labels)
    loss, count = _labelled_mean(log_sum_exp - picked, labels != ignore_label)
    return loss, (logits, labels, log_sum_exp, count)


def _upsampled_cross_entropy_bwd(
    ignore_label: int, gradient_dtype: str, residuals: tuple, grad: jax.Array
) -> tuple[jax.Array, None]:
    logits, labels, log_sum_exp, count = residuals
    size = labels.shape[1:3]
    # Without the barrier XLA merges this resize with the forward's and keeps its full-resolution output
    # (and the label mask) alive from the forward pass to here: the memory traffic this function avoids.
    logits, labels = jax.lax.optimization_barrier((logits, labels))
    upsampled, adjoint = jax.vjp(lambda z: resize_bilinear(z, size), logits)
    classes = jnp.arange(logits.shape[-1], dtype=labels.dtype)
    scale = jnp.where(labels != ignore_label, grad / count, 0.0)[..., None]
    softmax = jnp.exp(upsampled - log_sum_exp[..., None])
    full = (softmax - (classes == labels[..., None])) * scale
    if gradient_dtype != "float32":
        # XLA:GPU writes this array for the resize's adjoint (a K-tap gather accumulating in float32): 2.2 GB
        # per head in float32 at batch 16, 480x480, 150 classes. The barrier keeps it in the narrow dtype,
        # where XLA had moved the conversion back to float32 into the writing kernel.
        full = jax.lax.optimization_barrier(full.astype(gradient_dtype)).astype(jnp.float32)
    (grad_logits,) = adjoint(full)
    return grad_logits, None


_upsampled_cross_entropy.defvjp(_upsampled_cross_entropy_fwd, _upsampled_cross_entropy_bwd)


def _pallas_upsampled_cross_entropy(
    logits: jax.Array, labels: jax.Array, ignore_label: int, gradient_dtype: str
) -> jax.Array:
    """:func:`cross_entropy` of ``logits`` resized to the labels' size: the width resized here (a [B, h, W, C]
    array, the labels' width at the logits' height; its gradient is the resize's K-tap adjoint), the height,
    the log-sum-exp and the gradient by ``upsampled_loss_pallas`` in one pass, which accumulates the
    gradient of each source row in float32 and writes it in ``gradient_dtype``."""
    rows = resize_bilinear(logits, (logits.shape[1], labels.shape[2]))
    count = jnp.maximum(jnp.sum(labels != ignore_label), 1)
    return _height_upsampled_sum(rows, labels, ignore_label, gradient_dtype, op_choices.pallas_interpret()) / count


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _height_upsampled_sum(
    rows: jax.Array, labels: jax.Array, ignore_label: int, gradient_dtype: str, interpret: bool
) -> jax.Array:
    (loss,) = sharding.over_batch(
        lambda rows, labels: upsampled_loss_pallas.height_upsampled_cross_entropy(
            rows, labels, ignore_label=ignore_label, with_gradient=False, interpret=interpret
        )[:1],
        rows,
        labels,
        batched=(True, True),
        summed=(True,),
    )
    return loss


def _height_upsampled_sum_fwd(rows, labels, ignore_label, gradient_dtype, interpret):
    # The gradient is computed with the value, in the same pass over the logits; the backward pass scales it.
    # Each device computes its examples' (sharding.over_batch): the sum is added over devices.
    loss, grad = sharding.over_batch(
        lambda rows, labels: upsampled_loss_pallas.height_upsampled_cross_entropy(
            rows, labels, ignore_label=ignore_label, gradient_dtype=gradient_dtype, interpret=interpret
        ),
        rows,
        labels,
        batched=(True, True),
        summed=(True, False),
    )
    return loss, grad


def _height_upsampled_sum_bwd(ignore_label, gradient_dtype, interpret, grad_rows, grad):
    return grad_rows.astype(jnp.float32) * grad, None


_height_upsampled_sum.defvjp(_height_upsampled_sum_fwd, _height_upsampled_sum_bwd)


def class_presence(labels: jax.Array, num_classes: int) -> jax.Array:
    """[B, C] float targets of the SE loss: 1 where class c occurs among the image's labelled pixels.

    The reference's histogram over [0, C-1] ignores -1 because it falls outside the range.
    """
    flat = labels.reshape(labels.shape[0], -1)
    # A boolean any-reduction: 17x faster on XLA:CPU than the max of a float32 one-hot (batch 2, 256x256,
    # 150 classes: 1.2 vs 21 ms), no scatter on any backend.
    return jnp.any(flat[:, :, None] == jnp.arange(num_classes), axis=1).astype(jnp.float32)


def binary_cross_entropy_with_logits(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """Mean of PyTorch ``BCELoss(sigmoid(logits), targets)``, in the numerically stable log-sigmoid form."""
    logits = logits.astype(jnp.float32)
    return jnp.mean(-(targets * jax.nn.log_sigmoid(logits) + (1.0 - targets) * jax.nn.log_sigmoid(-logits)))


def segmentation_loss(
    outputs: Mapping[str, jax.Array],
    labels: jax.Array,
    *,
    aux_weight: float,
    se_weight: float,
    ignore_label: int = IGNORE_LABEL,
    gradient_dtype: Any = jnp.float32,
    upsample: str = "fused",
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Total = CE(logits) + aux_weight * CE(aux_logits) + se_weight * BCE(se_logits, presence).

    Terms whose outputs the model does not produce (no aux head, no SE branch) are left out. Returns the
    total and each term. ``gradient_dtype``, ``upsample``: see :func:`cross_entropy`.
    """
    options = {"gradient_dtype": gradient_dtype, "upsample": upsample}
    terms = {"ce": cross_entropy(outputs["logits"], labels, ignore_label, **options)}
    total = terms["ce"]
    if "aux_logits" in outputs and aux_weight:
        terms["aux_ce"] = cross_entropy(outputs["aux_logits"], labels, ignore_label, **options)
        total = total + aux_weight * terms["aux_ce"]
    if "se_logits" in outputs and se_weight:
        targets = class_presence(labels, outputs["se_logits"].shape[-1])
        terms["se_bce"] = binary_cross_entropy_with_logits(outputs["se_logits"], targets)
        total = total + se_weight * terms["se_bce"]
    terms["loss"] = total
    return total, terms

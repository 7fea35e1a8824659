"""The training loss's height upsampling, log-sum-exp and gradient in one Pallas (Triton) kernel for GPUs.

With ``loss_logits='head'`` the cross-entropy receives the heads' stride-8 logits and upsamples them to the
labels' size itself (``losses.cross_entropy``). XLA:GPU computes that loss in three full-resolution passes
(H200, EncNet+JPU R50 train step at batch 16, 480x480, 150 classes, two heads): the forward log-sum-exp with
the 2-D bilinear gather recomputed inside a variadic reduction (3.05 ms), the gradient ``softmax - one_hot``
written at full resolution (2 x 1.15 ms) and the resize's adjoint reading it back (about 1.4 ms), where the
arrays the loss needs to read are a few hundred MB.

``losses`` resizes the width first, at the logits' height, where it is cheap (``[B, h, W, C]``: 8x smaller
than the full map), and this kernel does the rest. Each program owns one image and ``block`` columns of
every output row and walks the low-resolution rows top to bottom: output row ``y`` of band ``i`` (the rows
whose lower source row is ``i``) is the lerp of source rows ``i`` and ``i + 1``; the kernel takes its
log-sum-exp and the label's logit over the classes in registers, adds ``lse - logit[label]`` to the
columns' loss, and adds ``softmax - one_hot`` times the two lerp weights to the two source rows' gradient
accumulators, so when the band ends source row ``i``'s gradient is complete and is written. Every input
element is read once and the full-resolution logits and gradient never exist in memory.

Off GPUs the kernel runs in Pallas's interpreter (``interpret=True``: tests). Checked against XLA's forms
in the interpreter and, as Triton on an H200, by ``experiments/pallas_check.py`` (session 9: relative error
3.2e-7 on the gradient; one head's loss and gradient 4.72 -> 2.00 ms; the train step 43.2 -> 38.8 ms alone,
34.1 ms with the depthwise kernels), so ``OpChoices.loss_upsample='auto'`` picks it on GPUs. Over several
devices each runs its own examples (``sharding.over_batch``), as the depthwise kernels (``depthwise_pallas``).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from fastfcn_jax.models.resize import align_corners_taps

# Columns per program and warps: timed on an H200 (session 9, experiments/pallas_check.py: one head's kernel
# at batch 16, 60 -> 480 rows, 150 classes): 8 columns, 4 warps 1.42 ms; 16/8 1.48; 4/4 1.91; 8/8 1.84;
# 2/4 2.70. With classes in chunks of 128 + 32 lanes (class_chunks), ptxas gave the kernel at 4 columns 64
# registers per thread and no spills (168 with one [8, 256] tile per row); 8 columns were not read back.
COLUMN_BLOCK = 8
NUM_WARPS = 4


def class_chunks(classes: int) -> tuple[tuple[int, int], ...]:
    """(first class, size) of power-of-two chunks that cover ``classes`` rounded up to 16 (Triton tensors are
    powers of two): 150 -> 128 + 32 lanes rather than 256, 59 -> 64, 21 -> 32."""
    remaining, first, chunks = -(-classes // 16) * 16, 0, []
    while remaining:
        size = 1 << (remaining.bit_length() - 1)
        chunks.append((first, size))
        first, remaining = first + size, remaining - size
    return tuple(chunks)


@functools.lru_cache(maxsize=64)
def height_bands(in_h: int, out_h: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(first output row [in_h], row count [in_h], upper weight [out_h]) of each source row's band: the
    output rows whose lower source row it is under the align-corners resize (``resize.align_corners_taps``)."""
    lower, _, weight = align_corners_taps(in_h, out_h)
    counts = np.bincount(lower, minlength=in_h).astype(np.int32)
    starts = (np.cumsum(counts) - counts).astype(np.int32)
    return starts, counts, weight.astype(np.float32)


@functools.partial(
    jax.jit, static_argnames=("ignore_label", "with_gradient", "gradient_dtype", "block", "num_warps", "interpret")
)
def height_upsampled_cross_entropy(
    rows: jax.Array,
    labels: jax.Array,
    *,
    ignore_label: int,
    with_gradient: bool = True,
    gradient_dtype=jnp.float32,
    block: int = COLUMN_BLOCK,
    num_warps: int = NUM_WARPS,
    interpret: bool = False,
) -> tuple[jax.Array, jax.Array | None]:
    """Cross-entropy terms of ``rows`` [B, h, W, C] resized (bilinear, align corners) along the height to
    the labels [B, H, W], H >= h, and their gradient with respect to ``rows``.

    Returns (the sum over labelled pixels of ``logsumexp(z) - z[label]``, float32 scalar; the gradient of
    that sum with respect to ``rows``, [B, h, W, C] in ``gradient_dtype``, or None without
    ``with_gradient``). Pixels labelled ``ignore_label`` add nothing; a label outside [0, C) adds
    ``logsumexp(z)`` (as the compare-and-sum of ``losses``). Accumulates in float32 whatever ``rows``' dtype.
    """
    if block < 1 or block & (block - 1):
        raise ValueError(f"block must be a power of two (Triton tensors are), got {block}")
    batch, in_h, width, classes = rows.shape
    out_h = labels.shape[1]
    if labels.shape != (batch, out_h, width) or out_h < in_h:
        raise ValueError(f"labels {labels.shape} do not match rows {rows.shape}: expected [B, H >= h, W]")
    starts, counts, weights = height_bands(in_h, out_h)
    band_rows = int(counts.max())
    chunks = class_chunks(classes)
    lanes = sum(size for _, size in chunks)
    blocks = -(-width // block)
    if interpret:
        # The interpreter clamps a window that runs past an array's end, where a GPU masks its lanes.
        padded_w = blocks * block
        rows = jnp.pad(rows, ((0, 0), (0, 0), (0, padded_w - width), (0, lanes - classes)))
        labels = jnp.pad(labels, ((0, 0), (0, 0), (0, padded_w - width)), constant_values=ignore_label)

    def body(rows_ref, labels_ref, starts_ref, counts_ref, weights_ref, loss_ref, *grad_refs):
        n, col0 = pl.program_id(0), pl.program_id(1) * block
        col_ok = jnp.arange(block) < width - col0
        start = jnp.asarray(col0, jnp.int32)
        # Per chunk of classes: (first class, lane index, lane holds a class, tile holds a class and column).
        parts = []
        for c0, size in chunks:
            lane = c0 + jnp.arange(size)
            parts.append((c0, size, lane, lane < classes, col_ok[:, None] & (lane < classes)[None, :]))

        def window(ref, i, c0, size):
            return ref.at[n, i, pl.ds(start, block), pl.ds(jnp.asarray(c0, jnp.int32), size)]

        def source_row(i):
            return [
                plgpu.load(window(rows_ref, i, c0, size), mask=ok, other=0).astype(jnp.float32)
                for c0, size, _, _, ok in parts
            ]

        def output_row(i, k, carry):
            upper_row, lower_row, loss, acc_lower, acc_upper = carry
            y = jnp.minimum(starts_ref[i] + k, out_h - 1)
            active = k < counts_ref[i]
            a = weights_ref[y]
            label = plgpu.load(labels_ref.at[n, y, pl.ds(start, block)], mask=col_ok, other=ignore_label)
            valid = col_ok & active & (label != ignore_label)
            z = [
                jnp.where(lane_ok[None, :], low + (high - low) * a, -jnp.inf)
                for low, high, (_, _, _, lane_ok, _) in zip(lower_row, upper_row, parts, strict=True)
            ]
            peak = functools.reduce(jnp.maximum, [jnp.max(t, axis=1) for t in z])
            exps = [jnp.exp(t - peak[:, None]) for t in z]
            total = sum(jnp.sum(t, axis=1) for t in exps)
            hits = [(lane[None, :] == label[:, None]) & lane_ok[None, :] for _, _, lane, lane_ok, _ in parts]
            picked = sum(jnp.sum(jnp.where(hit, t, 0.0), axis=1) for hit, t in zip(hits, z, strict=True))
            loss = loss + jnp.where(valid, peak + jnp.log(total) - picked, 0.0)
            if with_gradient:
                # softmax - one_hot, zero for unlabelled pixels: the scale folds the mask into the division.
                scale = jnp.where(valid, 1.0 / total, 0.0)[:, None]
                for j, (e, hit) in enumerate(zip(exps, hits, strict=True)):
                    grad = e * scale - jnp.where(hit & valid[:, None], 1.0, 0.0)
                    acc_lower[j] = acc_lower[j] + grad * (1.0 - a)
                    acc_upper[j] = acc_upper[j] + grad * a
            return upper_row, lower_row, loss, acc_lower, acc_upper

        def zeros():
            return [jnp.zeros((block, size), jnp.float32) for _, size, _, _, _ in parts]

        def band(i, carry):
            lower_row, loss, acc_lower = carry
            upper_row = source_row(jnp.minimum(i + 1, in_h - 1))
            inner = functools.partial(output_row, i)
            _, _, loss, acc_lower, acc_upper = jax.lax.fori_loop(
                0, band_rows, inner, (upper_row, lower_row, loss, acc_lower, zeros())
            )
            if with_gradient:
                for acc, (c0, size, _, _, ok) in zip(acc_lower, parts, strict=True):
                    plgpu.store(window(grad_refs[0], i, c0, size), acc.astype(grad_refs[0].dtype), mask=ok)
            return upper_row, loss, acc_upper

        zero = jnp.asarray(0, jnp.int32)
        _, loss, _ = jax.lax.fori_loop(0, in_h, band, (source_row(zero), jnp.zeros((block,), jnp.float32), zeros()))
        loss_ref[n, pl.program_id(1), :] = loss

    out_shape = [jax.ShapeDtypeStruct((batch, blocks, block), jnp.float32)]
    if with_gradient:
        out_shape.append(jax.ShapeDtypeStruct(rows.shape, gradient_dtype))
    outputs = pl.pallas_call(
        body,
        out_shape=out_shape,
        grid=(batch, blocks),
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=1),
        interpret=interpret,
        name="height_upsampled_cross_entropy",
    )(rows, labels.astype(jnp.int32), jnp.asarray(starts), jnp.asarray(counts), jnp.asarray(weights))
    loss = jnp.sum(outputs[0])
    if not with_gradient:
        return loss, None
    grad = outputs[1]
    return loss, (grad[:, :, :width, :classes] if interpret else grad)

"""PyTorch's bilinear resize and adaptive average pooling, with NHWC tensors.

The reference resizes with bilinear ``align_corners=True`` everywhere (``jax.image.resize`` uses half-pixel
centres); mmsegmentation's FastFCN with ``align_corners=False`` (half-pixel centres, PyTorch's clamping at
the borders). :func:`resize_bilinear` reproduces PyTorch's index formulas for either exactly, as small
interpolation matrices (exact, static-shape, MXU/tensor-core friendly) or as two-tap gathers with a gather for
a gradient (``OpChoices.resize``). :func:`adaptive_avg_pool` is PyTorch's ``AdaptiveAvgPool2d`` by the same
matrices, and :func:`conv_of_resized` a convolution over resized maps computed at their own size
(``OpChoices.resized``).
Why each form: :mod:`fastfcn_jax.models.op_choices`.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from fastfcn_jax.models.dtypes import Dtype, exact_dtype
from fastfcn_jax.models.op_choices import choose


def align_corners_matrix(in_size: int, out_size: int) -> np.ndarray:
    """``resize_matrix(in_size, out_size, align_corners=True)``: the reference's interpolation."""
    return resize_matrix(in_size, out_size, True)


@functools.lru_cache(maxsize=512)
def resize_matrix(in_size: int, out_size: int, align_corners: bool = True) -> np.ndarray:
    """[out_size, in_size] matrix of PyTorch's 1-D linear interpolation (``upsample_bilinear2d`` given an
    output size; no antialiasing when downsampling).

    Output index ``i`` reads source ``i * (in - 1) / (out - 1)`` (0 when ``out == 1``) with ``align_corners``,
    else ``(i + 0.5) * in / out - 0.5`` clamped below at 0; it interpolates between ``floor(src)`` and
    ``min(floor(src) + 1, in - 1)``.
    """
    if in_size < 1 or out_size < 1:
        raise ValueError(f"sizes must be positive, got in_size={in_size}, out_size={out_size}")
    matrix = np.zeros((out_size, in_size), np.float64)
    if align_corners:
        scale = (in_size - 1) / (out_size - 1) if out_size > 1 else 0.0
        sources = [i * scale for i in range(out_size)]
    else:
        sources = [max((i + 0.5) * in_size / out_size - 0.5, 0.0) for i in range(out_size)]
    for i, src in enumerate(sources):
        lo = min(int(np.floor(src)), in_size - 1)
        hi = min(lo + 1, in_size - 1)
        frac = src - lo
        matrix[i, lo] += 1.0 - frac
        matrix[i, hi] += frac
    matrix.setflags(write=False)
    return matrix


@functools.lru_cache(maxsize=512)
def adaptive_pool_matrix(in_size: int, out_size: int) -> np.ndarray:
    """[out_size, in_size] averaging matrix of PyTorch's 1-D adaptive average pooling.

    Bin ``i`` averages the half-open range ``[floor(i * in / out), ceil((i + 1) * in / out))``.
    """
    if in_size < 1 or out_size < 1:
        raise ValueError(f"sizes must be positive, got in_size={in_size}, out_size={out_size}")
    matrix = np.zeros((out_size, in_size), np.float64)
    for i in range(out_size):
        start = (i * in_size) // out_size
        end = -((-(i + 1) * in_size) // out_size)  # ceil division
        matrix[i, start:end] = 1.0 / (end - start)
    matrix.setflags(write=False)
    return matrix


def _apply_separable(x: jax.Array, rows: np.ndarray, cols: np.ndarray) -> jax.Array:
    """Applies a [H', H] matrix along axis 1 and a [W', W] matrix along axis 2 of an NHWC array.

    In float32 (:func:`dtypes.exact_dtype`) at full precision whatever ``x``'s dtype (a bfloat16 1/3 is 0.334; TPU
    matmuls default to bfloat16 passes), cast back at the end.
    """
    dtype, exact, hp = x.dtype, exact_dtype(x.dtype), jax.lax.Precision.HIGHEST
    x = jnp.einsum("oh,bhwc->bowc", jnp.asarray(rows, exact), x.astype(exact), precision=hp)
    return jnp.einsum("pw,bowc->bopc", jnp.asarray(cols, exact), x, precision=hp).astype(dtype)


@functools.lru_cache(maxsize=512)
def align_corners_taps(
    in_size: int, out_size: int, align_corners: bool = True
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(lower index, upper index, upper weight) per output index: the two non-zero entries of each row
    of :func:`resize_matrix` (adjacent indices, or one index with weight 0 for the upper)."""
    matrix = resize_matrix(in_size, out_size, align_corners)
    rows = np.arange(out_size)
    lower = np.argmax(matrix > 0, axis=1).astype(np.int32)  # every row has a positive entry
    upper = np.minimum(lower + 1, in_size - 1)
    weight = np.where(upper > lower, matrix[rows, upper], 0.0)
    for array in (lower, upper, weight):
        array.setflags(write=False)  # cached: shared by every caller
    return lower, upper, weight


@functools.lru_cache(maxsize=512)
def align_corners_adjoint_taps(
    in_size: int, out_size: int, align_corners: bool = True
) -> tuple[np.ndarray, np.ndarray]:
    """(output indices [in, K], weights [in, K]): the non-zero entries of each *column* of
    :func:`resize_matrix`, padded with weight 0, so the adjoint of a resize is a K-tap gather."""
    matrix = resize_matrix(in_size, out_size, align_corners)
    columns = [np.flatnonzero(matrix[:, i]) for i in range(in_size)]
    taps = max(1, max(len(c) for c in columns))
    indices = np.zeros((in_size, taps), np.int32)
    weights = np.zeros((in_size, taps), np.float64)
    for i, rows in enumerate(columns):
        indices[i, : len(rows)] = rows
        weights[i, : len(rows)] = matrix[rows, i]
    indices.setflags(write=False)
    weights.setflags(write=False)
    return indices, weights


def _taken(x: jax.Array, indices: np.ndarray, axis: int) -> jax.Array:
    # Indices are in range by construction: 'clip' gathers without the bounds select of the default mode.
    return jnp.take(x, jnp.asarray(indices), axis=axis, mode="clip")


def _along(values: np.ndarray, axis: int, ndim: int, dtype: Dtype) -> jax.Array:
    shape = [1] * ndim
    shape[axis] = values.shape[0]
    return jnp.asarray(values, dtype).reshape(shape)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2, 3))
def _lerp_axis(x: jax.Array, axis: int, out_size: int, align_corners: bool = True) -> jax.Array:
    lower, upper, weight = align_corners_taps(x.shape[axis], out_size, align_corners)
    exact = exact_dtype(x.dtype)
    low = _taken(x, lower, axis).astype(exact)
    high = _taken(x, upper, axis).astype(exact)
    # Lerp in float32 (exact weights), stored back in x's dtype.
    return (low + (high - low) * _along(weight, axis, x.ndim, exact)).astype(x.dtype)


def _lerp_axis_fwd(x: jax.Array, axis: int, out_size: int, align_corners: bool) -> tuple[jax.Array, jax.Array]:
    # An empty array is the residual: its shape and dtype carry the input size and dtype, and nothing else.
    return _lerp_axis(x, axis, out_size, align_corners), jnp.zeros((x.shape[axis], 0), x.dtype)


def _lerp_axis_bwd(
    axis: int, out_size: int, align_corners: bool, residual: jax.Array, grad: jax.Array
) -> tuple[jax.Array]:
    # The gradient of a gather is a scatter-add: serial on CPU (about 30 ms per final upsample of a batch 2,
    # 256x256 train step) and atomic, hence non-deterministic, on GPU. Each input index receives from a
    # short contiguous run of outputs, so the adjoint is a K-tap gather (K ~ 2 x the upsampling factor).
    in_size, dtype = residual.shape[0], residual.dtype
    indices, weights = align_corners_adjoint_taps(in_size, out_size, align_corners)
    grad = grad.astype(exact_dtype(dtype))
    total = None
    for k in range(indices.shape[1]):
        term = _taken(grad, indices[:, k], axis) * _along(weights[:, k], axis, grad.ndim, grad.dtype)
        total = term if total is None else total + term
    return (total.astype(dtype),)


_lerp_axis.defvjp(_lerp_axis_fwd, _lerp_axis_bwd)


def resize_bilinear(
    x: jax.Array, size: Sequence[int], implementation: str = "auto", align_corners: bool = True
) -> jax.Array:
    """Bilinear resize of ``x`` [B, H, W, C] to ``size`` (H', W') as PyTorch's ``F.interpolate(...,
    mode='bilinear', align_corners=align_corners)``.

    ``align_corners=True`` is the interpolation of every resize in the reference (JPU, PSP and ASPP pooling
    branches, the final upsampling and the test-time rescaling); ``False`` that of mmsegmentation's FastFCN
    models (``jax.image.resize`` without antialiasing, for upsampling). Works for any sizes, up or down,
    including 1-pixel inputs and outputs. ``implementation``: ``'gather'``, ``'matmul'`` or ``'auto'`` (see
    :mod:`fastfcn_jax.models.op_choices`).
    """
    out_h, out_w = int(size[0]), int(size[1])
    in_h, in_w = x.shape[1], x.shape[2]
    if (in_h, in_w) == (out_h, out_w):
        return x
    implementation = choose(implementation, tpu="matmul", other="gather")
    if implementation == "matmul":
        return _apply_separable(x, resize_matrix(in_h, out_h, align_corners), resize_matrix(in_w, out_w, align_corners))
    if implementation != "gather":
        raise ValueError(f"unknown resize implementation {implementation!r}; expected 'gather', 'matmul' or 'auto'")
    # The smaller intermediate first: resize the axis that grows least before the other.
    if out_h * in_w <= in_h * out_w:
        return _lerp_axis(_lerp_axis(x, 1, out_h, align_corners), 2, out_w, align_corners)
    return _lerp_axis(_lerp_axis(x, 2, out_w, align_corners), 1, out_h, align_corners)


def adaptive_avg_pool(x: jax.Array, size: int | Sequence[int]) -> jax.Array:
    """PyTorch ``AdaptiveAvgPool2d(size)`` on ``x`` [B, H, W, C] -> [B, size_h, size_w, C]."""
    out_h, out_w = (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
    in_h, in_w = x.shape[1], x.shape[2]
    return _apply_separable(x, adaptive_pool_matrix(in_h, out_h), adaptive_pool_matrix(in_w, out_w))


@functools.lru_cache(maxsize=512)
def shifted_resize_matrices(in_size: int, out_size: int, kernel_size: int, align_corners: bool = True) -> np.ndarray:
    """[k, out_size, in_size]: for each tap ``t`` of a stride-1 'same' kxk convolution, the resize
    matrix with its rows moved by ``t - k // 2`` and zero rows where the tap reads the convolution's zero
    padding. Row ``y`` of tap ``t`` interpolates the pixel that output ``y`` reads through that tap."""
    matrix = resize_matrix(in_size, out_size, align_corners)
    half = kernel_size // 2
    out = np.zeros((kernel_size, out_size, in_size), np.float64)
    for t in range(kernel_size):
        src = np.arange(out_size) + t - half
        valid = (src >= 0) & (src < out_size)
        out[t, valid] = matrix[src[valid]]
    out.setflags(write=False)
    return out


def conv_of_resized(
    inputs: Sequence[jax.Array], kernel: jax.Array, size: Sequence[int], dtype: Dtype, align_corners: bool = True
) -> jax.Array:
    """``conv(concat([resize_bilinear(p, size, align_corners=align_corners) for p in inputs]), kernel)``
    (stride 1, 'same' zero padding), without upsampling: [B, H, W, out] in float32 (float64 for float64
    ``dtype``).

    Resizing acts on each channel alone and a convolution tap mixes channels of one pixel, so the two
    commute: each tap's matrix is applied to the small pooled maps (PSP's 1x1 to 6x6) and the products are
    resized, by matrices shifted by the tap's offset whose zero rows are the convolution's padding. PSP's
    3x3 conv over its four pyramid levels (half of that conv's multiply-adds, 77 GFLOPs at 512x512) becomes
    0.4 GFLOPs. The tap products run in ``dtype`` (accumulated in float32), the resizing in float32 at full
    precision.
    """
    out_h, out_w = int(size[0]), int(size[1])
    k, hp = kernel.shape[0], jax.lax.Precision.HIGHEST
    exact = exact_dtype(dtype)
    rows, parts, start = [], [], 0
    for p in inputs:
        batch, in_h, in_w, channels = p.shape
        # One [pixels, C] x [C, out] product per tap, batched over the taps: the HWIO kernel is read in
        # place (an einsum to [pixels, k*k*out] transposed it first: 21 vs 14 ms on XLA:CPU for PSP R50).
        pixels = jnp.broadcast_to(p.astype(dtype).reshape(1, -1, channels), (k * k, batch * in_h * in_w, channels))
        taps = jax.lax.dot_general(
            pixels,
            kernel[:, :, start : start + channels].astype(dtype).reshape(k * k, channels, -1),
            (((2,), (1,)), ((0,), (0,))),
            preferred_element_type=exact,
        ).reshape(k, k, batch, in_h, in_w, -1)
        start += channels
        cols = jnp.asarray(shifted_resize_matrices(in_w, out_w, k, align_corners), exact)
        part = jnp.einsum("jxc,ijbaco->biaxo", cols, taps, precision=hp)  # [B, k, in_h, W, out]
        parts.append(part.reshape(batch, k * in_h, out_w, part.shape[-1]))
        rows.append(shifted_resize_matrices(in_h, out_h, k, align_corners).transpose(1, 0, 2).reshape(out_h, k * in_h))
    if start != kernel.shape[2]:
        raise ValueError(f"kernel has {kernel.shape[2]} input channels, the resized inputs {start}")
    rows_matrix = jnp.asarray(np.concatenate(rows, axis=1), exact)
    return jnp.einsum("yr,brxo->byxo", rows_matrix, jnp.concatenate(parts, axis=1), precision=hp)

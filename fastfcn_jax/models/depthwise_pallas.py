"""The JPU's depthwise convolution and its gradients as Pallas (Triton) kernels for GPUs.

XLA:GPU computes the gradients of the shifted depthwise conv (``depthwise._depthwise_shifted``) at a fraction
of their memory roofline: its reductions over nine shifted views re-read the gradient and the input once
per tap (H200, EncNet+JPU R50 train step at batch 16, 480x480: 4.5 ms for the four branches' kernel
gradients in two kernels whose memory roofline is 0.23 ms each), and its input-gradient kernels reached a
fifth of theirs (0.6-0.74 ms per branch). Each kernel here walks the rows of one image and one block of channels, so
the nine taps' reads of a row hit the cache and every element leaves memory once.

Both are written over one correlation with a zero border (``offset``)::

    out[n, r, j, c] = sum_{a, b} x[n, r + a*d - offset, j + b*d - offset, c] * kernel[a, b, c]

which is the forward conv (``offset = padding - margin``) and, over the gradient with the kernel flipped,
its input gradient (``offset = padding + margin``). Off GPUs they run in Pallas's interpreter
(``interpret=True``: tests).

Measured on an H200 (jax 0.11.2, batch 16, 480x480, bf16, steps back to back): the EncNet+JPU R50 train step
43.4 ms with XLA's forms, 40.4 with this kernel gradient, 38.7 with both gradients, 37.9 with the forward
too (session 7); kernel gradients 0.42-0.50 ms per branch, input gradients 0.26-0.33 ms. Session 9 checked
their values on the H200 against the XLA forms (``experiments/pallas_check.py``: relative errors <= 3.2e-7
in float32), so ``'auto'`` picks them on GPUs (``op_choices.pallas_for_auto``). Over several devices they run on
each device's examples when traced with the mesh as context (``sharding.with_mesh``, as the training loop
does; ``sharding.over_batch``): XLA's SPMD partitioner cannot split a custom call it knows nothing about,
and would replicate its operands.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

_NUM_WARPS = 4
# The kernel gradient's output rows are split into this many bands, one program each (per image and channel
# block). H200, one JPU branch at batch 16, 60x60, 1536 channels, bfloat16 (session 9, pallas_check): 60
# rows per program 1.09 ms, 30 0.90, 15 0.81, 8 1.11, 4 1.27 (XLA's stacked reduction 1.28).
KERNEL_GRAD_ROW_BANDS = 4


def channel_block(channels: int, largest: int = 64) -> int:
    """The largest power of two up to ``largest`` that divides ``channels`` (Triton tensors are powers of two)."""
    block = largest
    while channels % block:
        block //= 2
    return block


def _column_block(width: int) -> int:
    """The window width (32 or 64 columns, or the next power of two of a narrower map) whose windows cover
    ``width`` with the fewest wasted columns: 60 -> 64, 76 -> 32 (three windows)."""
    if width <= 32:
        return pl.next_power_of_2(width)
    return min((64, 32), key=lambda cols: -(-width // cols) * cols)


def _compiler_params():
    return plgpu.CompilerParams(num_warps=_NUM_WARPS, num_stages=1)


def _masked_window(ref, n, row, col0, cols, c0, block, *, rows, width, limit, origin):
    """x[n, row, col0:col0 + cols, c0:c0 + block] of the array ``ref`` holds at ``origin`` (its zero border
    in the interpreter, 0 on GPUs), zero where the row or a column lies outside ``x`` (``rows`` x ``width``)
    or a column is at or past ``limit`` within the window."""
    j = jnp.arange(cols)
    col = col0 + j
    ok = (row >= 0) & (row < rows) & (col >= 0) & (col < width) & (j < limit)
    mask = jnp.broadcast_to(ok[:, None], (cols, block))
    # Traced indices: on GPUs a masked window may begin before column 0 or end past the last one (its
    # masked lanes touch no memory), which indexing would reject for Python ints.
    safe_row = jnp.clip(row, -origin, rows - 1) + origin
    start = jnp.asarray(col0 + origin, jnp.int32)
    return plgpu.load(ref.at[n, safe_row, pl.ds(start, cols), pl.ds(c0, block)], mask=mask, other=0)


def _tap_windows(x_ref, n, r, j0, cols, c0, block, *, k, dilation, offset, rows, width, limit, origin):
    """The k*k float32 windows of ``x`` that output row ``r``, columns ``j0:j0 + cols`` read, tap (a, b) at
    ``a * k + b`` (see :func:`_masked_window`). A generator: each window is loaded as it is consumed, so the
    kernel holds one in registers at a time."""
    for a in range(k):
        for b in range(k):
            yield _masked_window(
                x_ref, n, r + a * dilation - offset, j0 + b * dilation - offset, cols, c0, block,
                rows=rows, width=width, limit=limit, origin=origin,
            ).astype(jnp.float32)  # fmt: skip


def _border(x: jax.Array, border: int, width_to: int | None = None) -> jax.Array:
    """``x`` with ``border`` zeros around its rows and columns (and columns up to ``width_to``): the
    interpreter clamps out-of-bounds windows where a GPU masks them."""
    extra = 0 if width_to is None else max(0, width_to - x.shape[2] - 2 * border)
    return jnp.pad(x, ((0, 0), (border, border), (border, border + extra), (0, 0)))


@functools.partial(jax.jit, static_argnames=("dilation", "offset", "out_size", "out_dtype", "interpret"))
def depthwise_correlate(
    x: jax.Array,
    kernel: jax.Array,
    *,
    dilation: int,
    offset: int,
    out_size: tuple[int, int],
    out_dtype=None,
    interpret: bool = False,
) -> jax.Array:
    """out[n, r, j, c] = sum_ab x[n, r + a*d - offset, j + b*d - offset, c] * kernel[a, b, c] (zero outside
    ``x``), accumulated in float32; x [N, H, W, C], kernel [k, k, C], out [N, *out_size, C]. ``interpret``:
    Pallas's interpreter (any backend) instead of a Triton kernel (GPUs)."""
    (out,) = correlate_terms(
        (x,),
        kernel[None],
        terms=((0, 0, dilation, offset, 0),),
        outputs=1,
        out_size=out_size,
        out_dtype=out_dtype,
        interpret=interpret,
    )
    return out


@functools.partial(jax.jit, static_argnames=("terms", "outputs", "out_size", "out_dtype", "interpret"))
def correlate_terms(
    inputs: tuple[jax.Array, ...],
    kernels: jax.Array,
    *,
    terms: tuple[tuple[int, int, int, int, int], ...],
    outputs: int,
    out_size: tuple[int, int],
    out_dtype=None,
    interpret: bool = False,
) -> tuple[jax.Array, ...]:
    """Sums of correlations in one kernel: output ``o`` is the sum over the terms ``(i, b, d, offset, o)`` of
    :func:`depthwise_correlate` of ``inputs[i]`` with ``kernels[b]`` ([B, k, k, C]), dilation ``d``.

    The JPU's four branches read one padded input: their forwards are four terms of one input into four
    outputs (the input leaves memory once), their input gradients four terms of four gradients into one
    output (no per-branch gradient written and added)."""
    batch, _, _, channels = inputs[0].shape
    k = kernels.shape[1]
    out_h, out_w = out_size
    block, cols = channel_block(channels), _column_block(out_w)
    chunks = range(0, out_w, cols)
    out_dtype = out_dtype or inputs[0].dtype
    origin = max((k - 1) * d + abs(offset) for _, _, d, offset, _ in terms) + cols if interpret else 0
    # The interpreter also clamps the last column window of the output: it writes a wider array, cut below.
    stored_w = len(chunks) * cols if interpret else out_w
    shapes = [x.shape[1:3] for x in inputs]

    def body(*refs):
        in_refs, k_ref, out_refs = refs[: len(inputs)], refs[len(inputs)], refs[len(inputs) + 1 :]
        n, c0, r = pl.program_id(0), pl.program_id(1) * block, pl.program_id(2)
        # One [block] row per tap: Triton arrays have power-of-two sizes, and k*k is not.
        taps = {
            b: [k_ref[b * k * k + t, pl.ds(c0, block)].astype(jnp.float32) for t in range(k * k)]
            for b in sorted({term[1] for term in terms})
        }

        def add_term(term, j0, acc):
            i, b, dilation, offset, _ = term
            (rows, width) = shapes[i]
            windows = _tap_windows(
                in_refs[i], n, r, j0, cols, c0, block,
                k=k, dilation=dilation, offset=offset, rows=rows, width=width, limit=out_w - j0, origin=origin,
            )  # fmt: skip
            for tap, window in zip(taps[b], windows, strict=True):
                acc += window * tap[None, :]
            return acc

        for o, o_ref in enumerate(out_refs):
            summed = [term for term in terms if term[4] == o]
            for j0 in chunks:
                acc = jnp.zeros((cols, block), jnp.float32)
                for term in summed:
                    acc = add_term(term, j0, acc)
                mask = jnp.broadcast_to((jnp.arange(cols) < out_w - j0)[:, None], (cols, block))
                out_window = o_ref.at[n, r, pl.ds(jnp.asarray(j0, jnp.int32), cols), pl.ds(c0, block)]
                plgpu.store(out_window, acc.astype(o_ref.dtype), mask=mask)

    results = pl.pallas_call(
        body,
        out_shape=[jax.ShapeDtypeStruct((batch, out_h, stored_w, channels), out_dtype)] * outputs,
        grid=(batch, channels // block, out_h),
        compiler_params=_compiler_params(),
        interpret=interpret,
        name="depthwise_correlate",
    )(*(_border(x, origin) if interpret else x for x in inputs), kernels.reshape(-1, channels))
    return tuple(out[:, :, :out_w] if interpret else out for out in results)


@functools.partial(jax.jit, static_argnames=("dilation", "offset", "kernel_size", "rows_per_program", "interpret"))
def depthwise_kernel_gradient(
    x: jax.Array,
    grad: jax.Array,
    *,
    dilation: int,
    offset: int,
    kernel_size: int,
    rows_per_program: int | None = None,
    interpret: bool = False,
) -> jax.Array:
    """[k*k, C] float32: sum over n, r, j of x[n, r + a*d - offset, j + b*d - offset, c] * grad[n, r, j, c],
    tap (a, b) at a*k + b (zero outside ``x``): the kernel gradient of :func:`depthwise_correlate`.

    ``rows_per_program``: each program sums this many output rows, partial sums added after (None: the rows
    in :data:`KERNEL_GRAD_ROW_BANDS` bands)."""
    return kernel_gradient_terms(
        x,
        (grad,),
        terms=((0, dilation, offset),),
        kernel_size=kernel_size,
        rows_per_program=rows_per_program,
        interpret=interpret,
    )[0]


@functools.partial(jax.jit, static_argnames=("terms", "kernel_size", "rows_per_program", "interpret"))
def kernel_gradient_terms(
    x: jax.Array,
    grads: tuple[jax.Array, ...],
    *,
    terms: tuple[tuple[int, int, int], ...],
    kernel_size: int,
    rows_per_program: int | None = None,
    interpret: bool = False,
) -> jax.Array:
    """[T, k*k, C]: for each term ``(g, d, offset)`` the :func:`depthwise_kernel_gradient` of ``x`` and
    ``grads[g]`` at dilation ``d``, in one kernel that reads ``x`` once for all of them (the JPU's branches)."""
    batch, height, width, channels = x.shape
    _, out_h, out_w, _ = grads[0].shape
    k = kernel_size
    block, cols = channel_block(channels), _column_block(out_w)
    chunks = range(0, out_w, cols)
    origin = max((k - 1) * d + abs(offset) for _, d, offset in terms) + cols if interpret else 0
    rows_per_program = min(rows_per_program or -(-out_h // KERNEL_GRAD_ROW_BANDS), out_h)
    groups = -(-out_h // rows_per_program)

    def body(x_ref, *refs):
        g_refs, o_ref = refs[:-1], refs[-1]
        n, c0, first = pl.program_id(0), pl.program_id(1) * block, pl.program_id(2) * rows_per_program

        def row_step(t, accs):
            # Rows past the last (in the last group) read a masked, zero gradient window.
            r = first + t
            accs = list(accs)
            for j0 in chunks:
                limit = out_w - j0
                for term, (g_index, dilation, offset) in enumerate(terms):
                    g = _masked_window(
                        g_refs[g_index], n, r, j0, cols, c0, block, rows=out_h, width=out_w, limit=limit, origin=origin
                    ).astype(jnp.float32)
                    windows = _tap_windows(
                        x_ref, n, r, j0, cols, c0, block,
                        k=k, dilation=dilation, offset=offset, rows=height, width=width, limit=limit, origin=origin,
                    )  # fmt: skip
                    for tap, window in enumerate(windows):
                        accs[term * k * k + tap] += jnp.sum(window * g, axis=0)
            return tuple(accs)

        init = tuple(jnp.zeros((block,), jnp.float32) for _ in range(len(terms) * k * k))
        accs = jax.lax.fori_loop(0, rows_per_program, row_step, init)
        for index, acc in enumerate(accs):
            o_ref[n, pl.program_id(2), index, pl.ds(c0, block)] = acc

    if interpret:
        x, grads = _border(x, origin), tuple(_border(g, origin) for g in grads)
    partial = pl.pallas_call(
        body,
        out_shape=jax.ShapeDtypeStruct((batch, groups, len(terms) * k * k, channels), jnp.float32),
        grid=(batch, channels // block, groups),
        compiler_params=_compiler_params(),
        interpret=interpret,
        name="depthwise_kernel_gradient",
    )(x, *grads)
    return jnp.sum(partial, axis=(0, 1)).reshape(len(terms), k * k, channels)

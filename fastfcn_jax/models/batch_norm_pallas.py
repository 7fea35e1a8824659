"""BatchNorm's per-channel sums as one Pallas (Triton) kernel for GPUs.

A training step's BatchNorms reduce every activation of the network over its rows (batch and pixels) twice:
the forward's two moments and the backward's ``sum(dy)`` and ``sum(dy * x)``. XLA:GPU emits these as
reduction fusions that ran at 3-20x their memory roofline on an H200 (session 9, EncNet+JPU R50 train step
at batch 16, 480x480: 58 forward reductions 2.03 ms against a 0.37 ms roofline, 156 backward ones 4.34 ms
against 1.31; ``docs/performance.md``). One kernel here serves both: for ``u`` and ``v`` of shape
``[M, C]`` and per-channel shifts it returns, in float32,

    sums[c] = sum_m (u[m, c] - u_shift[c])
    products[c] = sum_m (u[m, c] - u_shift[c]) * (v[m, c] - v_shift[c])

(``v`` defaults to ``u``: the moments about a shift, read in one pass). Each program owns a block of
channels and a band of rows, which it walks in tiles of :data:`TILE_ROWS` rows, accumulating in registers;
the bands' partial sums are added by XLA. Off GPUs it runs in Pallas's interpreter (``interpret=True``:
tests). Used by ``batch_norm.BatchNorm`` with ``OpChoices.norm_statistics='pallas'`` (opt-in until a GPU has
timed it: ``experiments/pallas_check.py``).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from fastfcn_jax.models.depthwise_pallas import channel_block

# Rows per loaded tile, and programs to aim for: a few per streaming multiprocessor of an H100/H200 (132).
TILE_ROWS = 32
CHANNEL_BLOCK = 128  # at most: the largest power of two up to this that divides the channels
TARGET_PROGRAMS = 1024
NUM_WARPS = 4


def rows_per_band(rows: int, channel_blocks: int, programs: int = TARGET_PROGRAMS) -> int:
    """Rows per program: a multiple of :data:`TILE_ROWS` that gives about ``programs`` programs."""
    bands = max(1, programs // channel_blocks)
    per_band = -(-rows // bands)
    return -(-per_band // TILE_ROWS) * TILE_ROWS


@functools.partial(jax.jit, static_argnames=("programs", "interpret"))
def channel_sums(
    u: jax.Array,
    u_shift: jax.Array,
    v: jax.Array | None = None,
    v_shift: jax.Array | None = None,
    *,
    programs: int = TARGET_PROGRAMS,
    interpret: bool = False,
) -> tuple[jax.Array, jax.Array]:
    """(sum over rows of ``u - u_shift``, of ``(u - u_shift) * (v - v_shift)``), both float32 [C] (float64 for
    float64 inputs), for ``u`` (and ``v``) [M, C] and shifts [C]; without ``v``, the second is the sum of
    squares about ``u_shift``. ``programs``: about how many programs to split the work over (the interpreter
    runs them one after another)."""
    rows, channels = u.shape
    same = v is None
    if same:
        v, v_shift = u, u_shift
    if v.shape != u.shape:
        raise ValueError(f"u {u.shape} and v {v.shape} differ")
    block = channel_block(channels, CHANNEL_BLOCK)
    per_band = rows_per_band(rows, channels // block, programs)
    bands = -(-rows // per_band)
    tiles = per_band // TILE_ROWS
    if interpret:  # the interpreter clamps out-of-bounds windows where a GPU masks them
        padding = ((0, bands * per_band - rows), (0, 0))
        u = jnp.pad(u, padding)
        v = u if same else jnp.pad(v, padding)
    # float32 sums (float64 inputs, in the interpreter: float64 for exactness tests).
    acc_dtype = jnp.promote_types(jnp.promote_types(u.dtype, v.dtype), jnp.float32)
    shifts = jnp.stack([u_shift, v_shift]).astype(acc_dtype)

    def body(*refs):
        u_ref, v_ref = refs[0], refs[0 if same else 1]
        shift_ref, sums_ref, products_ref = refs[1 if same else 2 :]
        c0, band = pl.program_id(0) * block, pl.program_id(1)
        u0 = shift_ref[0, pl.ds(c0, block)]
        v0 = shift_ref[1, pl.ds(c0, block)]

        def tile(t, accs):
            first = band * per_band + t * TILE_ROWS
            ok = jnp.broadcast_to(((first + jnp.arange(TILE_ROWS)) < rows)[:, None], (TILE_ROWS, block))
            window = (pl.ds(first, TILE_ROWS), pl.ds(c0, block))
            d = jnp.where(ok, plgpu.load(u_ref.at[window], mask=ok, other=0).astype(acc_dtype) - u0[None], 0.0)
            if same:
                e = d
            else:
                e = jnp.where(ok, plgpu.load(v_ref.at[window], mask=ok, other=0).astype(acc_dtype) - v0[None], 0.0)
            return accs[0] + jnp.sum(d, axis=0), accs[1] + jnp.sum(d * e, axis=0)

        zeros = jnp.zeros((block,), acc_dtype)
        sums, products = jax.lax.fori_loop(0, tiles, tile, (zeros, zeros))
        sums_ref[band, pl.ds(c0, block)] = sums
        products_ref[band, pl.ds(c0, block)] = products

    partial = jax.ShapeDtypeStruct((bands, channels), acc_dtype)
    sums, products = pl.pallas_call(
        body,
        out_shape=(partial, partial),
        grid=(channels // block, bands),
        compiler_params=plgpu.CompilerParams(num_warps=NUM_WARPS, num_stages=1),
        interpret=interpret,
        name="channel_sums",
    )(*((u,) if same else (u, v)), shifts)
    return jnp.sum(sums, axis=0), jnp.sum(products, axis=0)

"""Checks the Pallas kernels against the XLA forms of the same maths, on this machine's backend.

    python experiments/pallas_check.py            # the training step's shapes (batch 16, 480x480 crops)
    python experiments/pallas_check.py --quick    # small shapes (CPU: Pallas's interpreter)

On a GPU the kernels are the Triton programs training would run (``OpChoices`` ``depthwise``,
``depthwise_input_grad``, ``depthwise_kernel_grad`` = ``'pallas'``); elsewhere Pallas's interpreter runs them.
Inputs are float32, so the only differences are summation order. For each dilation of the JPU (1, 2, 4, 8):
the forward, the input gradient and the kernel gradient, their largest absolute error relative to the
largest reference value. Then the training loss with ``OpChoices.loss_upsample='pallas'`` against
``'fused'`` (150 classes at stride 8, labels at full resolution, a tenth of them ignored): the loss and its
gradient with respect to the logits, and on a GPU their times and the kernel's under other column blocks
and warp counts (``upsampled_loss_pallas``). Then BatchNorm's sums (``OpChoices.norm_statistics='pallas'``,
``batch_norm_pallas``): the forward's moments and the backward's ``sum(dy)``, ``sum(dy * x)`` at three of
the training step's shapes, and on a GPU their times against XLA's reductions. Exits 1 if any error
exceeds ``--tolerance``. Needs only jax, flax and numpy (as the benchmark).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

# Runnable from a source checkout without `pip install -e .`.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fastfcn_jax import losses, upsampled_loss_pallas  # noqa: E402
from fastfcn_jax.benchmark import time_calls  # noqa: E402
from fastfcn_jax.models import batch_norm_pallas, depthwise, depthwise_pallas, resize  # noqa: E402

# (column block, warps) of the loss kernel timed on a GPU; the first is the default.
LOSS_KERNEL_CONFIGS = (
    (upsampled_loss_pallas.COLUMN_BLOCK, upsampled_loss_pallas.NUM_WARPS),
    (4, 4),
    (16, 4),
    (8, 8),
    (16, 8),
)


def check(batch: int, size: int, channels: int, dilation: int, margin: int, interpret: bool) -> dict[str, float]:
    """Relative max errors of the three kernels against the XLA forms for one dilation."""
    keys = jax.random.split(jax.random.PRNGKey(dilation), 3)
    x = jax.random.normal(keys[0], (batch, size + 2 * margin, size + 2 * margin, channels), jnp.float32)
    kernel = jax.random.normal(keys[1], (3, 3, 1, channels), jnp.float32)
    grad = jax.random.normal(keys[2], (batch, size, size, channels), jnp.float32)
    pad = dilation

    # The XLA form and autodiff's gradients of it (elementwise multiply-adds: no matmul precision to set). One
    # jitted function of the arrays: jitting the vjp closure would compile its residuals in as constants (3 GB
    # at the training shapes, minutes of compile on an H200).
    @jax.jit
    def reference(x, kernel, grad):
        forward, vjp = jax.vjp(lambda x, k: depthwise._shifted_taps(x, k, dilation, margin), x, kernel)
        return forward, *vjp(grad)

    want_forward, want_x, want_kernel = reference(x, kernel, grad)
    forward = depthwise_pallas.depthwise_correlate(
        x, kernel[:, :, 0], dilation=dilation, offset=pad - margin, out_size=(size, size), interpret=interpret
    )
    got_x = depthwise_pallas.depthwise_correlate(
        grad, kernel[::-1, ::-1, 0], dilation=dilation, offset=pad + margin, out_size=x.shape[1:3], interpret=interpret
    )
    got_kernel = depthwise_pallas.depthwise_kernel_gradient(
        x, grad, dilation=dilation, offset=pad - margin, kernel_size=3, interpret=interpret
    ).reshape(kernel.shape)

    return {
        "forward": _error(forward, want_forward),
        "input_grad": _error(got_x, want_x),
        "kernel_grad": _error(got_kernel, want_kernel),
    }


def _error(got: jax.Array, want: jax.Array) -> float:
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    return float(np.abs(got - want).max() / max(np.abs(want).max(), 1e-30))


def _loss_inputs(batch: int, low: int, high: int, classes: int) -> tuple[jax.Array, jax.Array]:
    keys = jax.random.split(jax.random.PRNGKey(7), 3)
    logits = 4.0 * jax.random.normal(keys[0], (batch, low, low, classes), jnp.float32)
    labels = jax.random.randint(keys[1], (batch, high, high), 0, classes)
    ignored = jax.random.uniform(keys[2], labels.shape) < 0.1
    return logits, jnp.where(ignored, losses.IGNORE_LABEL, labels)


def _loss_functions() -> dict[str, object]:
    """Loss and logits gradient, ``f(logits, labels)``, per form (labels an argument, not a compiled constant)."""
    return {
        upsample: jax.jit(jax.value_and_grad(lambda z, y, u=upsample: losses.cross_entropy(z, y, upsample=u)))
        for upsample in ("fused", "pallas")
    }


def check_loss(batch: int, low: int, high: int, classes: int) -> dict[str, float]:
    """Relative errors of the Pallas loss (value, gradient) against the fused XLA form, float32 gradients."""
    logits, labels = _loss_inputs(batch, low, high, classes)
    functions = _loss_functions()
    (want, want_grad), (got, got_grad) = (functions[name](logits, labels) for name in ("fused", "pallas"))
    return {"loss": _error(got, want), "loss_grad": _error(got_grad, want_grad)}


def _median_ms(function, *args, runs: int = 20) -> float:
    return float(np.median(time_calls(function, args, warmup=1, repeats=runs)))


def time_loss(
    batch: int, low: int, high: int, classes: int, *, interpret: bool, runs: int = 20
) -> list[tuple[str, float]]:
    """(what, median ms) of one head's loss and gradient in both forms, and of the kernel alone under
    :data:`LOSS_KERNEL_CONFIGS` (GPUs: Triton)."""
    logits, labels = _loss_inputs(batch, low, high, classes)
    rows = resize.resize_bilinear(logits, (low, high))
    timings = [
        (f"loss + gradient, {name}", _median_ms(f, logits, labels, runs=runs)) for name, f in _loss_functions().items()
    ]
    for block, warps in LOSS_KERNEL_CONFIGS:
        kernel = jax.jit(
            lambda r, y, block=block, warps=warps: upsampled_loss_pallas.height_upsampled_cross_entropy(
                r,
                y,
                ignore_label=losses.IGNORE_LABEL,
                gradient_dtype=jnp.bfloat16,
                block=block,
                num_warps=warps,
                interpret=interpret,
            )
        )
        timings.append((f"kernel alone, {block} columns, {warps} warps", _median_ms(kernel, rows, labels, runs=runs)))
    return timings


# Output rows per program of the depthwise kernel gradient timed on a GPU (None: the default,
# depthwise_pallas.KERNEL_GRAD_ROW_BANDS bands).
KERNEL_GRAD_ROWS = (None, 60, 30, 8, 4)


def time_kernel_gradient(
    batch: int, size: int, channels: int, dilation: int, margin: int, *, interpret: bool, runs: int = 20
) -> list[tuple[str, float]]:
    """(what, median ms) of one JPU branch's depthwise kernel gradient: XLA's stacked form, and the Pallas
    kernel under :data:`KERNEL_GRAD_ROWS` (the activations in bfloat16, as training has them)."""
    keys = jax.random.split(jax.random.PRNGKey(dilation))
    x = jax.random.normal(keys[0], (batch, size + 2 * margin, size + 2 * margin, channels), jnp.bfloat16)
    grad = jax.random.normal(keys[1], (batch, size, size, channels), jnp.bfloat16)
    xla = jax.jit(
        lambda x, g: depthwise._tap_gradients(depthwise._shifted_views(x, 3, dilation, margin), g, form="stacked")
    )
    timings = [("XLA, stacked taps", _median_ms(xla, x, grad, runs=runs))]
    for rows in KERNEL_GRAD_ROWS:
        kernel = jax.jit(
            lambda x, g, rows=rows: depthwise_pallas.depthwise_kernel_gradient(
                x, g, dilation=dilation, offset=dilation - margin, kernel_size=3, rows_per_program=rows,
                interpret=interpret,
            )
        )  # fmt: skip
        per_program = min(rows or -(-size // depthwise_pallas.KERNEL_GRAD_ROW_BANDS), size)
        what = f"Pallas, {per_program} rows per program{' (default)' if rows is None else ''}"
        timings.append((what, _median_ms(kernel, x, grad, runs=runs)))
    return timings


# (rows, channels) of BatchNorm inputs in the training step (batch 16, 480x480): layer1's 120x120x256, the
# JPU's and layer2's 60x60x512, layer3's 30x30x1024; and the programs the kernel is split over.
NORM_SHAPES = ((16 * 120 * 120, 256), (16 * 60 * 60, 512), (16 * 30 * 30, 1024))
NORM_PROGRAMS = (batch_norm_pallas.TARGET_PROGRAMS, 256, 4096)


def _norm_inputs(rows: int, channels: int, dtype=jnp.bfloat16) -> tuple[jax.Array, ...]:
    keys = jax.random.split(jax.random.PRNGKey(rows + channels), 4)
    x = (2.0 * jax.random.normal(keys[0], (rows, channels)) + 1.0).astype(dtype)
    dy = jax.random.normal(keys[1], (rows, channels)).astype(dtype)
    return x, dy, jax.random.normal(keys[2], (channels,)), jnp.zeros((channels,))


@jax.jit
def _xla_moments(x, shift):
    """XLA's form of the forward's sums: of ``x - shift`` and of its squares."""
    d = x.astype(jnp.float32) - shift
    return jnp.sum(d, 0), jnp.sum(d * d, 0)


@jax.jit
def _xla_gradient_sums(dy, x):
    """XLA's form of the backward's sums: ``sum(dy)``, ``sum(dy * x)``."""
    g = dy.astype(jnp.float32)
    return jnp.sum(g, 0), jnp.sum(g * x.astype(jnp.float32), 0)


def check_norm_statistics(rows: int, channels: int, interpret: bool) -> dict[str, float]:
    """Relative errors of the BatchNorm sums kernel (``OpChoices.norm_statistics='pallas'``) against XLA's
    reductions, float32 inputs."""
    x, dy, shift, zeros = _norm_inputs(rows, channels, jnp.float32)
    (want_sum, want_square), (want_dy, want_dyx) = _xla_moments(x, shift), _xla_gradient_sums(dy, x)
    got_sum, got_square = batch_norm_pallas.channel_sums(x, shift, interpret=interpret)
    got_dy, got_dyx = batch_norm_pallas.channel_sums(dy, zeros, x, zeros, interpret=interpret)
    return {
        "moments": max(_error(got_sum, want_sum), _error(got_square, want_square)),
        "gradient_sums": max(_error(got_dy, want_dy), _error(got_dyx, want_dyx)),
    }


def time_norm_statistics(rows: int, channels: int, *, interpret: bool, runs: int = 20) -> list[tuple[str, float]]:
    """(what, median ms) of one BatchNorm's sums (bfloat16 activations, as training has them): XLA's
    reductions and the Pallas kernel split over :data:`NORM_PROGRAMS` programs, forward and backward."""
    x, dy, shift, zeros = _norm_inputs(rows, channels)
    timings = [
        ("XLA, moments", _median_ms(_xla_moments, x, shift, runs=runs)),
        ("XLA, sum(dy), sum(dy * x)", _median_ms(_xla_gradient_sums, dy, x, runs=runs)),
    ]
    for programs in NORM_PROGRAMS:
        moments = jax.jit(
            lambda x, s, p=programs: batch_norm_pallas.channel_sums(x, s, programs=p, interpret=interpret)
        )
        sums = jax.jit(
            lambda g, x, z, p=programs: batch_norm_pallas.channel_sums(g, z, x, z, programs=p, interpret=interpret)
        )
        timings.append((f"Pallas, moments, {programs} programs", _median_ms(moments, x, shift, runs=runs)))
        timings.append(
            (f"Pallas, sum(dy), sum(dy * x), {programs} programs", _median_ms(sums, dy, x, zeros, runs=runs))
        )
    return timings


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="batch 2, 13x13, 96 channels")
    parser.add_argument("--tolerance", type=float, default=1e-5)
    parser.add_argument("--time", action="store_true", help="time the loss forms in the interpreter too")
    args = parser.parse_args(argv)
    batch, size, channels = (2, 13, 96) if args.quick else (16, 60, 1536)
    interpret = jax.default_backend() != "gpu"
    device = jax.devices()[0].device_kind
    print(
        f"{device} ({jax.default_backend()}{', interpreted' if interpret else ', Triton'}), jax {jax.__version__}; "
        f"batch {batch}, {size}x{size} + margin 8, {channels} channels, float32\n"
    )
    print("| dilation | forward | input gradient | kernel gradient |\n|---:|---:|---:|---:|")
    worst = 0.0
    for dilation in (1, 2, 4, 8):
        errors = check(batch, size, channels, dilation, margin=8, interpret=interpret)
        worst = max(worst, *errors.values())
        print(
            f"| {dilation} | {errors['forward']:.2e} | {errors['input_grad']:.2e} | {errors['kernel_grad']:.2e} |",
            flush=True,
        )
    if not interpret or args.time:
        print("\n| one branch's depthwise kernel gradient, dilation 4 | ms |\n|---|---:|")
        runs = 2 if args.quick else 20
        for what, ms in time_kernel_gradient(batch, size, channels, 4, 8, interpret=interpret, runs=runs):
            print(f"| {what} | {ms:.3f} |", flush=True)
    loss_shape = (2, 5, 33, 150) if args.quick else (batch, 60, 480, 150)
    print(
        f"\nloss (one head): logits [{loss_shape[0]}, {loss_shape[1]}, {loss_shape[1]}, {loss_shape[3]}], labels "
        f"{loss_shape[2]}x{loss_shape[2]}\n\n| loss | gradient |\n|---:|---:|"
    )
    errors = check_loss(*loss_shape)
    worst = max(worst, *errors.values())
    print(f"| {errors['loss']:.2e} | {errors['loss_grad']:.2e} |", flush=True)
    if not interpret or args.time:
        print(f"\n| one head's loss, batch {loss_shape[0]} | ms |\n|---|---:|")
        for what, ms in time_loss(*loss_shape, interpret=interpret, runs=2 if args.quick else 20):
            print(f"| {what} | {ms:.3f} |", flush=True)
    norm_shapes = ((1000, 96),) if args.quick else NORM_SHAPES
    print("\n| BatchNorm sums, rows x channels | moments | gradient sums |\n|---|---:|---:|")
    for rows, channels in norm_shapes:
        errors = check_norm_statistics(rows, channels, interpret)
        worst = max(worst, *errors.values())
        print(f"| {rows} x {channels} | {errors['moments']:.2e} | {errors['gradient_sums']:.2e} |", flush=True)
    if not interpret or args.time:
        for rows, channels in norm_shapes:
            print(f"\n| one BatchNorm's sums, {rows} x {channels}, bfloat16 | ms |\n|---|---:|")
            for what, ms in time_norm_statistics(rows, channels, interpret=interpret, runs=2 if args.quick else 20):
                print(f"| {what} | {ms:.3f} |", flush=True)
    verdict = "PASS" if worst <= args.tolerance else "FAIL"
    print(f"\nworst relative error {worst:.2e} (tolerance {args.tolerance:.0e}): {verdict}")
    return 0 if verdict == "PASS" else 1


if __name__ == "__main__":
    sys.exit(main())

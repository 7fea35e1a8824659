"""Checks the Pallas depthwise kernels against the XLA forms of the same maths, on this machine's backend.

    python experiments/pallas_check.py            # the JPU's shapes: batch 16, 60x60 (+ margin 8), 1536 channels
    python experiments/pallas_check.py --quick    # small shapes (CPU: Pallas's interpreter)

On a GPU the kernels are the Triton programs training would run (``OpChoices`` ``depthwise``,
``depthwise_input_grad``, ``depthwise_kernel_grad`` = ``'pallas'``); elsewhere Pallas's interpreter runs them.
Inputs are float32, so the only differences are summation order. For each dilation of the JPU (1, 2, 4, 8):
the forward, the input gradient and the kernel gradient, their largest absolute error relative to the
largest reference value. Exits 1 if any exceeds ``--tolerance``. Needs only jax and numpy.
"""

from __future__ import annotations

import argparse
import sys

import jax
import jax.numpy as jnp
import numpy as np

from fastfcn_jax.models import depthwise_pallas, layers


def check(batch: int, size: int, channels: int, dilation: int, margin: int, interpret: bool) -> dict[str, float]:
    """Relative max errors of the three kernels against the XLA forms for one dilation."""
    keys = jax.random.split(jax.random.PRNGKey(dilation), 3)
    x = jax.random.normal(keys[0], (batch, size + 2 * margin, size + 2 * margin, channels), jnp.float32)
    kernel = jax.random.normal(keys[1], (3, 3, 1, channels), jnp.float32)
    grad = jax.random.normal(keys[2], (batch, size, size, channels), jnp.float32)
    pad = dilation

    # The XLA form and autodiff's gradients of it (elementwise multiply-adds: no matmul precision to set).
    want_forward, vjp = jax.vjp(lambda x, k: layers._shifted_taps(x, k, dilation, margin), x, kernel)
    want_x, want_kernel = jax.jit(vjp)(grad)
    forward = depthwise_pallas.depthwise_correlate(
        x, kernel[:, :, 0], dilation=dilation, offset=pad - margin, out_size=(size, size), interpret=interpret
    )
    got_x = depthwise_pallas.depthwise_correlate(
        grad, kernel[::-1, ::-1, 0], dilation=dilation, offset=pad + margin, out_size=x.shape[1:3], interpret=interpret
    )
    got_kernel = depthwise_pallas.depthwise_kernel_gradient(
        x, grad, dilation=dilation, offset=pad - margin, kernel_size=3, interpret=interpret
    ).reshape(kernel.shape)

    def error(got: jax.Array, want: jax.Array) -> float:
        got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
        return float(np.abs(got - want).max() / max(np.abs(want).max(), 1e-30))

    return {
        "forward": error(forward, want_forward),
        "input_grad": error(got_x, want_x),
        "kernel_grad": error(got_kernel, want_kernel),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="batch 2, 13x13, 96 channels")
    parser.add_argument("--tolerance", type=float, default=1e-5)
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
    verdict = "PASS" if worst <= args.tolerance else "FAIL"
    print(f"\nworst relative error {worst:.2e} (tolerance {args.tolerance:.0e}): {verdict}")
    return 0 if verdict == "PASS" else 1


if __name__ == "__main__":
    sys.exit(main())

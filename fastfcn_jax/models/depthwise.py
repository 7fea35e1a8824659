"""The JPU's depthwise dilated convolution and its separable convolution (depthwise, norm, pointwise).

:class:`DepthwiseConv` computes the depthwise conv as k*k shifted multiply-adds with custom gradients, or as
the Pallas kernels of ``depthwise_pallas`` (GPUs); :func:`depthwise_joint` serves the JPU's four branches with
one kernel per pass; :class:`SeparableConv` is a JPU branch. The forms (``OpChoices.depthwise``,
``depthwise_input_grad``, ``depthwise_kernel_grad``, ``separable``, ``jpu_depthwise``) and their
measurements: :mod:`fastfcn_jax.models.op_choices`.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from fastfcn_jax import sharding
from fastfcn_jax.models import depthwise_pallas
from fastfcn_jax.models.batch_norm import make_norm
from fastfcn_jax.models.dtypes import Dtype
from fastfcn_jax.models.layers import conv2d
from fastfcn_jax.models.op_choices import DEFAULT_OPS, OpChoices, choose, choose_pallas, pallas_interpret


class DepthwiseConv(nn.Module):
    """Depthwise 3x3 (or kxk) dilated convolution, stride 1, padding ``dilation * (k - 1) // 2``.

    The kernel has Flax's depthwise layout [k, k, 1, C]. It is computed as k*k shifted multiply-adds
    (``implementation='shifted'``): on XLA:CPU ``feature_group_count`` convolutions are very slow (and
    their kernel gradient runs as a dense conv), while the shifted form is exact and fuses well on every
    backend. ``implementation='grouped'`` uses ``lax.conv_general_dilated`` with ``feature_group_count``;
    ``'pallas'`` is the shifted form with its forward as a Pallas kernel (:mod:`depthwise_pallas`; GPUs, and
    Pallas's interpreter elsewhere); ``'auto'`` (the default) is ``'pallas'`` when training where
    :func:`op_choices.pallas_for_auto`, else ``'shifted'``. ``input_grad`` and ``kernel_grad`` pick the backward's forms
    (:func:`depthwise_forms`). ``margin`` > 0 says ``x`` already carries that many zero rows and
    columns on each side (at least the padding): the output is then ``x``'s size less ``2 * margin``, the taps
    read the margin in place of padding, and the input gradient covers the whole padded array.
    """

    kernel_size: int = 3
    dilation: int = 1
    dtype: Dtype = jnp.float32
    implementation: str = "auto"  # OpChoices.depthwise
    margin: int = 0
    input_grad: str = "auto"  # OpChoices.depthwise_input_grad
    kernel_grad: str = "auto"  # OpChoices.depthwise_kernel_grad

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool = False, kernel_only: bool = False) -> jax.Array:
        """The convolution of ``x``; with ``kernel_only``, the kernel in the compute dtype (for
        :func:`depthwise_joint`, which convolves several branches' kernels at once). ``train`` only picks the
        forward's form (:func:`depthwise_forms`)."""
        channels = x.shape[-1]
        k, d = self.kernel_size, self.dilation
        kernel = self.param(
            "kernel",
            nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform", in_axis=(0, 1, 2), out_axis=3),
            (k, k, 1, channels),
            jnp.float32,
        )
        kernel = kernel.astype(self.dtype)
        if kernel_only:
            return kernel
        x = x.astype(self.dtype)
        pad = d * (k - 1) // 2
        if self.margin and self.margin < pad:
            raise ValueError(f"a margin of {self.margin} is less than the padding {pad} of dilation {d}")
        if self.implementation == "grouped":
            if self.margin:
                skip = self.margin - pad
                x = x[:, skip : x.shape[1] - skip, skip : x.shape[2] - skip, :]
            return jax.lax.conv_general_dilated(
                x,
                kernel,
                window_strides=(1, 1),
                padding=((0, 0), (0, 0)) if self.margin else ((pad, pad), (pad, pad)),
                rhs_dilation=(d, d),
                dimension_numbers=("NHWC", "HWIO", "NHWC"),
                feature_group_count=channels,
            )
        if self.implementation not in ("shifted", "pallas", "auto"):
            raise ValueError(f"unknown depthwise implementation {self.implementation!r}")
        forms = depthwise_forms(self.implementation, self.input_grad, self.kernel_grad, train=train)
        return _depthwise_shifted(x, kernel, d, self.margin, forms)


def depthwise_forms(forward: str, input_grad: str, kernel_grad: str, *, train: bool) -> tuple[str, str, str]:
    """(forward, input gradient, kernel gradient) forms of the shifted depthwise conv for the backend traced
    for (``OpChoices`` ``depthwise``, ``depthwise_input_grad``, ``depthwise_kernel_grad``). ``'auto'`` takes
    the Pallas kernels where :func:`op_choices.pallas_for_auto`; the forward's only when ``train``: its speed-up was
    timed in the training step (H200, session 7: 38.7 -> 37.9 ms), while inference keeps XLA's one fused
    kernel for the JPU's four branches (at batch 1 a GPU is bound by the number of kernels)."""
    OpChoices(depthwise=forward, depthwise_input_grad=input_grad, depthwise_kernel_grad=kernel_grad)  # validates
    if forward == "auto" and not train:
        forward = "shifted"
    return (
        choose_pallas("depthwise", forward, "shifted"),
        choose_pallas(
            "depthwise_input_grad", input_grad, choose("auto", tpu="fused", other="fused", gpu="materialized")
        ),
        choose_pallas(
            "depthwise_kernel_grad", kernel_grad, choose("auto", tpu="per_tap", other="per_tap", gpu="stacked")
        ),
    )


def _shifted_views(x: jax.Array, kernel_size: int, dilation: int, margin: int = 0) -> list[jax.Array]:
    """The k*k views of ``x`` zero-padded by ``dilation * (k - 1) // 2`` that a stride-1 'same' conv reads,
    tap (i, j) at index ``i * k + j``. With ``margin`` > 0, ``x`` is already padded by ``margin`` (>= the
    padding) and is sliced in place."""
    pad = dilation * (kernel_size - 1) // 2
    if margin:
        padded, skip = x, margin - pad
        height, width = x.shape[1] - 2 * margin, x.shape[2] - 2 * margin
    else:
        padded, skip = jnp.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0))), 0
        height, width = x.shape[1], x.shape[2]
    return [
        padded[
            :, skip + i * dilation : skip + i * dilation + height, skip + j * dilation : skip + j * dilation + width, :
        ]
        for i in range(kernel_size)
        for j in range(kernel_size)
    ]


def _shifted_taps(x: jax.Array, kernel: jax.Array, dilation: int, margin: int = 0) -> jax.Array:
    """sum_ij x_padded[h + i*d, w + j*d] * kernel[i, j] in float32: a stride-1 'same' depthwise conv."""
    k = kernel.shape[0]
    out = None
    for index, view in enumerate(_shifted_views(x, k, dilation, margin)):
        # Products and sums in float32 as a convolution accumulates; XLA fuses the taps into one pass.
        term = view.astype(jnp.float32) * kernel[index // k, index % k, 0].astype(jnp.float32)
        out = term if out is None else out + term
    return out


def _pallas_terms(kernel_size: int, dilations: tuple[int, ...], sign: int, margin: int):
    # (branch, dilation, offset): offset = padding - margin for the forward and the kernel gradient,
    # padding + margin for the input gradient (sign +1).
    return tuple((b, d, d * (kernel_size - 1) // 2 + sign * margin) for b, d in enumerate(dilations))


def _pallas_forward(x: jax.Array, kernels: jax.Array, dilations: tuple[int, ...], margin: int) -> tuple[jax.Array, ...]:
    """Each branch's depthwise conv of ``x`` (kernels [B, k, k, C]), one Pallas kernel for all branches, on
    each device's part of the batch."""
    k, interpret = kernels.shape[1], pallas_interpret()
    terms = tuple((0, b, d, offset, b) for b, d, offset in _pallas_terms(k, dilations, -1, margin))
    size = (x.shape[1] - 2 * margin, x.shape[2] - 2 * margin)
    return sharding.over_batch(
        lambda x, kernels: depthwise_pallas.correlate_terms(
            (x,), kernels, terms=terms, outputs=len(dilations), out_size=size, interpret=interpret
        ),
        x,
        kernels,
        batched=(True, False),
        summed=(False,) * len(dilations),
    )


def _pallas_input_gradient(
    x: jax.Array, kernels: jax.Array, dilations: tuple[int, ...], margin: int, grads: Sequence[jax.Array]
) -> jax.Array:
    """The sum of the branches' input gradients (their outputs' gradients correlated with the flipped
    kernels), one Pallas kernel."""
    k, interpret = kernels.shape[1], pallas_interpret()
    terms = tuple((b, b, d, offset, 0) for b, d, offset in _pallas_terms(k, dilations, 1, margin))
    (grad_x,) = sharding.over_batch(
        lambda flipped, *grads: depthwise_pallas.correlate_terms(
            grads, flipped, terms=terms, outputs=1, out_size=x.shape[1:3], out_dtype=x.dtype, interpret=interpret
        ),
        kernels[:, ::-1, ::-1],
        *grads,
        batched=(False,) + (True,) * len(grads),
        summed=(False,),
    )
    return grad_x


def _pallas_kernel_gradients(
    x: jax.Array, kernel_size: int, dilations: tuple[int, ...], margin: int, grads: Sequence[jax.Array]
) -> jax.Array:
    """[B, k*k, C] float32: each branch's kernel gradient, one Pallas kernel."""
    interpret, terms = pallas_interpret(), _pallas_terms(kernel_size, dilations, -1, margin)
    (taps,) = sharding.over_batch(
        lambda x, *grads: (
            depthwise_pallas.kernel_gradient_terms(x, grads, terms=terms, kernel_size=kernel_size, interpret=interpret),
        ),
        x,
        *grads,
        batched=(True,) * (len(grads) + 1),
        summed=(True,),
    )
    return taps


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _depthwise_shifted(
    x: jax.Array,
    kernel: jax.Array,
    dilation: int,
    margin: int = 0,
    forms: tuple[str, str, str] = ("shifted", "fused", "per_tap"),
) -> jax.Array:
    """``forms``: (forward, input gradient, kernel gradient) implementations, as in :class:`OpChoices`."""
    if forms[0] == "pallas":
        return _pallas_forward(x, kernel[None, :, :, 0], (dilation,), margin)[0]
    return _shifted_taps(x, kernel, dilation, margin).astype(x.dtype)


def _depthwise_shifted_fwd(
    x: jax.Array, kernel: jax.Array, dilation: int, margin: int, forms: tuple[str, str, str]
) -> tuple[jax.Array, tuple]:
    return _depthwise_shifted(x, kernel, dilation, margin, forms), (x, kernel)


def _tap_gradients(views: list[jax.Array], grad: jax.Array, *, form: str) -> jax.Array:
    """[k*k, C] kernel gradient of a depthwise conv: sum over B, H, W of each tap's view times ``grad``.

    ``form`` (``OpChoices.depthwise_kernel_grad``): ``'per_tap'``, ``'stacked'`` or ``'stacked_minor'``."""
    grad32 = grad.astype(jnp.float32)
    views = [view.astype(jnp.float32) for view in views]
    if form == "stacked_minor":
        # The taps as the minor dimension of one reduction to [C, k*k]: the threads of a warp that share a
        # channel read the same gradient element. With the taps major ('stacked') XLA:GPU gave each tap its
        # own thread blocks, which re-read the float32 gradient from memory once per tap: on an H200 two
        # branches' kernel gradients took 2.4 ms for 1 GB of unique traffic (batch 16, 480x480), about what
        # nine reads of the gradient cost. Not yet measured on a GPU.
        return jnp.sum(jnp.stack(views, axis=-1) * grad32[..., None], (0, 1, 2)).T
    if form == "per_tap":
        # XLA:CPU: nine reductions beat one over a stacked [k*k, B, H, W, C] operand by about 6% of the
        # EncNet+JPU R50 train step (batch 2, 256x256: 1.75 vs 1.86 s). The TPU compiler writes the stack
        # out in float32 (nine in-place updates, then four 10 ms reductions for the JPU at batch 16,
        # 480x480); nine sums take its EncNet+JPU train-step estimate from 280 to 218 ms
        # (experiments/tpu_aot.py, v5e).
        return jnp.stack([jnp.sum(view * grad32, (0, 1, 2)) for view in views])
    # XLA:GPU splits nine separate sums into several reduction kernels that each re-read x and the gradient;
    # one reduction over the stacked taps reads them once by the compile-only H200 estimate
    # (experiments/gpu_aot.py: the JPU's backward traffic at batch 16, 480x480 fell from 24.3 to 17.2 GB),
    # but on the H200 it ran at a tenth of that estimate's speed (see 'stacked_minor' above).
    return jnp.sum(jnp.stack(views) * grad32, (1, 2, 3))


def _depthwise_shifted_bwd(
    dilation: int, margin: int, forms: tuple[str, str, str], residuals: tuple, grad: jax.Array
) -> tuple[jax.Array, jax.Array]:
    _, input_grad, kernel_grad = forms
    x, kernel = residuals
    k = kernel.shape[0]
    if input_grad == "pallas":
        grad_x = _pallas_input_gradient(x, kernel[None, :, :, 0], (dilation,), margin, (grad,))
    else:
        grad_x = _xla_input_gradient(x, kernel, dilation, margin, grad, input_grad)
    if kernel_grad == "pallas":
        taps = _pallas_kernel_gradients(x, k, (dilation,), margin, (grad,))[0]
    else:
        taps = _tap_gradients(_shifted_views(x, k, dilation, margin), grad, form=kernel_grad)
    return grad_x, taps.reshape(kernel.shape).astype(kernel.dtype)


def _xla_input_gradient(
    x: jax.Array, kernel: jax.Array, dilation: int, margin: int, grad: jax.Array, form: str
) -> jax.Array:
    # Autodiff would transpose each tap's slice into a pad: nine padded copies of the incoming gradient,
    # summed (about 25 ms each on XLA:CPU for the JPU at batch 2, 256x256). The input gradient of a
    # stride-1 'same' correlation is the same correlation with the kernel flipped: one fused pass. For a
    # pre-padded input it is that correlation over the gradient padded by the margin (the whole array).
    grad_in = jnp.pad(grad, ((0, 0), (margin, margin), (margin, margin), (0, 0))) if margin else grad
    grad_x = _shifted_taps(grad_in, kernel[::-1, ::-1], dilation).astype(x.dtype)
    if form == "materialized":
        # XLA:GPU fused the four JPU branches' input gradients (added where their input is shared) into one
        # 36-tap kernel of 236 registers per thread at 12.5% occupancy: 7.7 ms of the EncNet+JPU R50 train
        # step at batch 16, 480x480 on an H200, for about 1.7 GB of traffic (0.4 ms at 4.3 TB/s).
        grad_x = jax.lax.optimization_barrier(grad_x)
    return grad_x


_depthwise_shifted.defvjp(_depthwise_shifted_fwd, _depthwise_shifted_bwd)


def depthwise_joint(
    x: jax.Array, kernels: Sequence[jax.Array], dilations: Sequence[int], margin: int
) -> tuple[jax.Array, ...]:
    """The depthwise convs of several branches over one input padded by ``margin`` (the JPU's), each
    kernel [k, k, 1, C] at its dilation, as Pallas kernels that serve all branches at once: one forward
    reads ``x`` once for every branch, one backward kernel writes the sum of the branches' input gradients
    (no per-branch gradient written and added) and one reads ``x`` once for all kernel gradients. For the
    all-Pallas forms (``depthwise``, ``depthwise_input_grad``, ``depthwise_kernel_grad`` = ``'pallas'``)."""
    return _depthwise_joint(x, jnp.stack([k[:, :, 0] for k in kernels]), tuple(dilations), margin)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _depthwise_joint(
    x: jax.Array, kernels: jax.Array, dilations: tuple[int, ...], margin: int
) -> tuple[jax.Array, ...]:
    return _pallas_forward(x, kernels, dilations, margin)


def _depthwise_joint_fwd(x, kernels, dilations, margin):
    return _depthwise_joint(x, kernels, dilations, margin), (x, kernels)


def _depthwise_joint_bwd(dilations, margin, residuals, grads):
    x, kernels = residuals
    grad_x = _pallas_input_gradient(x, kernels, dilations, margin, grads)
    taps = _pallas_kernel_gradients(x, kernels.shape[1], dilations, margin, grads)
    return grad_x, taps.reshape(kernels.shape).astype(kernels.dtype)


_depthwise_joint.defvjp(_depthwise_joint_fwd, _depthwise_joint_bwd)


class SeparableConv(nn.Module):
    """The reference's JPU branch: depthwise dilated conv -> norm -> pointwise 1x1 -> norm -> ReLU.

    There is no ReLU between the depthwise norm and the pointwise conv. Submodules: ``depthwise``,
    ``depthwise_norm``, ``pointwise``, ``pointwise_norm``. ``norm`` is ``'batch'`` (JPU) or ``'group'``
    (JPU_X's JUM units).
    """

    features: int
    dilation: int = 1
    kernel_size: int = 3
    norm: str = "batch"
    num_groups: int = 32
    dtype: Dtype = jnp.float32
    ops: OpChoices = DEFAULT_OPS
    margin: int = 0  # the input is already zero-padded by this much (see DepthwiseConv)

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False, *, stage: str = "all") -> jax.Array:
        """The branch on ``x``. ``stage`` (the JPU's joint depthwise, :func:`depthwise_joint`): ``'kernel'``
        returns the depthwise kernel only, ``'rest'`` takes ``x`` as the depthwise conv's output and applies
        the rest; ``'all'``: everything."""
        if stage not in ("all", "kernel", "rest"):
            raise ValueError(f"unknown stage {stage!r}; expected 'all', 'kernel' or 'rest'")
        if stage != "rest":
            x = DepthwiseConv(
                self.kernel_size,
                self.dilation,
                dtype=self.dtype,
                implementation=self.ops.depthwise,
                margin=self.margin,
                input_grad=self.ops.depthwise_input_grad,
                kernel_grad=self.ops.depthwise_kernel_grad,
                name="depthwise",
            )(x, train=train, kernel_only=stage == "kernel")
            if stage == "kernel":
                return x
        norm = functools.partial(
            make_norm,
            self.norm,
            train=train,
            dtype=self.dtype,
            num_groups=self.num_groups,
            folded=self.ops.norm == "folded",
            statistics=self.ops.norm_statistics,
        )
        x = norm(name="depthwise_norm")(x)
        if self.ops.separable == "split":
            # Keeps XLA from pulling the nine depthwise taps into the pointwise matmul's operand, where a
            # tiled GEMM would recompute them for every output tile.
            x = jax.lax.optimization_barrier(x)
        x = conv2d(self.features, 1, dtype=self.dtype, ops=self.ops, name="pointwise")(x)
        x = norm(name="pointwise_norm")(x)
        return nn.relu(x)

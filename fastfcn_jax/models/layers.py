"""Convolutions and the small blocks shared by the backbone, the JPU neck and the heads.

Everything here reproduces a PyTorch operation of the reference code exactly (same padding, same pooling index
formulas, same initialisation), with NHWC tensors: :class:`Conv2D` (and :func:`conv2d`), :class:`ConvBNReLU`,
the stem's :func:`max_pool`, :func:`channel_dropout` and the heads' :class:`Classifier`.

The other building blocks, one concept per module: ``op_choices`` (:class:`OpChoices`: how each
performance-sensitive op is computed on each backend, and why), ``dtypes`` (the dtype policy), ``resize``
(corner-aligned bilinear resize, adaptive average pooling), ``batch_norm`` (PyTorch's BatchNorm, its folding
into convolutions) and ``depthwise`` (the JPU's depthwise and separable convolutions).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from fastfcn_jax.models.batch_norm import make_norm
from fastfcn_jax.models.dtypes import Dtype, exact_dtype
from fastfcn_jax.models.op_choices import DEFAULT_OPS, OpChoices, backend, choose
from fastfcn_jax.models.resize import conv_of_resized, resize_bilinear

# Convolutions over at most this many output pixels (batch x height x width) run per tap on CPU.
SMALL_MAP_PIXELS = 256


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2, 3, 4))
def max_pool(x: jax.Array, window: int, stride: int, padding: int, forward: str = "window") -> jax.Array:
    """PyTorch ``MaxPool2d(window, stride, padding)`` on ``x`` [B, H, W, C] (padding never selected), whose
    gradient goes to the first maximum of each window in row-major order, as autodiff's (and PyTorch's);
    only windows holding a NaN (the loss is NaN anyway) or nothing but -inf may send theirs elsewhere.

    The gradient is computed as a gather (``OpChoices.max_pool_grad='taps'``): each window's first maximum
    tap, then each phase of the input sums the taps that reach it, all elementwise and fused by XLA, where
    autodiff's select-and-scatter visits every window again with a scatter (H200: 0.76 ms for the ResNet
    stem's pool at batch 16, 480x480, four times its memory roofline). ``forward``: ``OpChoices.max_pool``."""
    return _max_pool_forward(x, window, stride, padding, forward)


def _max_pool_forward(x: jax.Array, window: int, stride: int, padding: int, forward: str) -> jax.Array:
    if forward == "taps":
        out_shape = (x.shape[0], *((n + 2 * padding - window) // stride + 1 for n in x.shape[1:3]))
        return functools.reduce(jnp.maximum, (tap for _, tap in _max_pool_taps(x, out_shape, window, stride, padding)))
    return nn.max_pool(x, (window, window), strides=(stride, stride), padding=((padding, padding),) * 2)


def _max_pool_taps(x: jax.Array, out_shape: Sequence[int], window: int, stride: int, padding: int):
    """Tap (a, b) of every window: x[:, s*p - pad + a, s*q - pad + b], -inf outside ``x``."""
    padded = jnp.pad(x, ((0, 0), (padding, padding), (padding, padding), (0, 0)), constant_values=-jnp.inf)
    rows, cols = out_shape[1], out_shape[2]
    for a in range(window):
        for b in range(window):
            yield (a, b), padded[:, a : a + stride * (rows - 1) + 1 : stride, b : b + stride * (cols - 1) + 1 : stride]


def _max_pool_fwd(x, window, stride, padding, forward):
    return _max_pool_forward(x, window, stride, padding, forward), x


def _max_pool_bwd(window, stride, padding, forward, x, grad):
    # Each window's first maximum tap in row-major order (a later tap wins only if strictly greater), found
    # from x alone, so the pooled output need not be kept for the backward pass. XLA:GPU writes this index
    # array for the fused placement below to read: int8, a quarter of int32's bytes.
    index_dtype = jnp.int8 if window * window < 128 else jnp.int32
    first, best = None, None
    for (a, b), tap in _max_pool_taps(x, grad.shape, window, stride, padding):
        if first is None:
            first, best = jnp.zeros(grad.shape, index_dtype), tap
        else:
            better = tap > best
            first, best = (
                jnp.where(better, jnp.asarray(a * window + b, index_dtype), first),
                jnp.where(better, tap, best),
            )
    # Input row s*m + r is tap a of window m + (r + pad - a) / s for the taps with (r + pad - a) % s == 0
    # (columns alike): each of the s*s phases of the input sums only the taps that reach it (ResNet's stem,
    # 3x3 stride 2: 1, 2, 2 and 4 of the 9), and the phases interleave by a reshape. On the H200 the form that
    # placed all nine taps by strided pads evaluated nine selects per input element: 0.86 ms, 6.6x its
    # memory roofline. Terms are added in tap order, as there, so the values are the same.
    batch, height, width, channels = x.shape
    rows, cols = -(-height // stride), -(-width // stride)
    zero = jnp.zeros((), grad.dtype)

    def window_at(chosen: jax.Array, dr: int, dc: int) -> jax.Array:
        # [B, rows, cols, C]: chosen[:, m + dr, n + dc], zero outside (negative padding crops).
        h, w = chosen.shape[1], chosen.shape[2]
        return jax.lax.pad(chosen, zero, ((0, 0, 0), (-dr, rows - h + dr, 0), (-dc, cols - w + dc, 0), (0, 0, 0)))

    phases = []
    for r in range(stride):
        row_phases = []
        for c in range(stride):
            total = None
            for a in range(window):
                for b in range(window):
                    if (r + padding - a) % stride or (c + padding - b) % stride:
                        continue
                    chosen = jnp.where(first == a * window + b, grad, zero)
                    term = window_at(chosen, (r + padding - a) // stride, (c + padding - b) // stride)
                    total = term if total is None else total + term
            row_phases.append(jnp.zeros((batch, rows, cols, channels), grad.dtype) if total is None else total)
        phases.append(jnp.stack(row_phases, axis=3))  # [B, rows, cols, s (column phase), C]
    placed = jnp.stack(phases, axis=2).reshape(batch, rows * stride, cols * stride, channels)
    return (placed[:, :height, :width],)


max_pool.defvjp(_max_pool_fwd, _max_pool_bwd)


def conv_kernel_init(out_features: int, kernel_size: int):
    """Reference ResNet init: normal(0, sqrt(2 / (k * k * out_channels)))."""
    return nn.initializers.normal(stddev=float(np.sqrt(2.0 / (kernel_size * kernel_size * out_features))))


def torch_default_kernel_init():
    """PyTorch's default Conv2d/Linear weight init (kaiming-uniform, a=sqrt(5)): U(+-1/sqrt(fan_in))."""
    return nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


def torch_default_bias_init(fan_in: int):
    """PyTorch's default Conv2d/Linear bias init: U(+-1/sqrt(fan_in))."""
    bound = 1.0 / float(np.sqrt(max(fan_in, 1)))

    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


def _conv_xla(x: jax.Array, kernel: jax.Array, stride: int, dilation: int) -> jax.Array:
    pad = dilation * (kernel.shape[0] - 1) // 2
    return jax.lax.conv_general_dilated(
        x,
        kernel,
        window_strides=(stride, stride),
        padding=((pad, pad), (pad, pad)),
        rhs_dilation=(dilation, dilation),
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
    )


def _conv_im2col(x: jax.Array, kernel: jax.Array, stride: int, dilation: int) -> jax.Array:
    """The same convolution as one matmul over k*k shifted (strided) views: [B, Ho, Wo, k*k*C] x [k*k*C, O]."""
    k = kernel.shape[0]
    pad = dilation * (k - 1) // 2
    height, width = x.shape[1], x.shape[2]
    out_h = (height + 2 * pad - dilation * (k - 1) - 1) // stride + 1
    out_w = (width + 2 * pad - dilation * (k - 1) - 1) // stride + 1
    padded = jnp.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    views = [
        padded[:, i * dilation : i * dilation + stride * (out_h - 1) + 1 : stride,
               j * dilation : j * dilation + stride * (out_w - 1) + 1 : stride, :]
        for i in range(k)
        for j in range(k)
    ]  # fmt: skip
    patches = jnp.concatenate(views, axis=-1)
    return jnp.einsum("bhwk,ko->bhwo", patches, kernel.reshape(-1, kernel.shape[-1]))


def _valid_tap_fraction(height: int, width: int, kernel_size: int, dilation: int) -> float:
    """Share of a stride-1 kxk conv's multiply-adds that touch real pixels rather than zero padding."""

    def axis(n: int) -> float:
        half = kernel_size // 2
        return sum(max(n - abs(t - half) * dilation, 0) for t in range(kernel_size)) / n

    return axis(height) * axis(width) / kernel_size**2


def _conv_valid_taps(x: jax.Array, kernel: jax.Array, dilation: int) -> jax.Array:
    """A stride-1 'same' kxk conv as one matmul per tap over only the pixels the tap reads inside the image.

    For large dilations (ASPP rates 24 and 36 on a 64x64 map) most taps read padding: skipping it does the
    same sums with a fraction of the multiply-adds (61% fewer at rate 36).
    """
    k = kernel.shape[0]
    height, width = x.shape[1], x.shape[2]
    out = None
    for i in range(k):
        for j in range(k):
            dy, dx = (i - k // 2) * dilation, (j - k // 2) * dilation
            y0, y1 = max(0, -dy), min(height, height - dy)
            x0, x1 = max(0, -dx), min(width, width - dx)
            if y0 >= y1 or x0 >= x1:
                continue
            # Summed in float32, as a convolution accumulates, whatever the compute dtype.
            part = jnp.einsum(
                "bhwc,co->bhwo",
                x[:, y0 + dy : y1 + dy, x0 + dx : x1 + dx, :],
                kernel[i, j],
                preferred_element_type=exact_dtype(x.dtype),
            )
            part = jnp.pad(part, ((0, 0), (y0, height - y1), (x0, width - x1), (0, 0)))
            out = part if out is None else out + part
    return out.astype(x.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _conv_im2col_grad(x: jax.Array, kernel: jax.Array, stride: int, dilation: int) -> jax.Array:
    """XLA's convolution forward; the gradient of the im2col matmul form backward (same maths)."""
    return _conv_xla(x, kernel, stride, dilation)


def _conv_im2col_grad_fwd(x, kernel, stride, dilation):
    return _conv_xla(x, kernel, stride, dilation), (x, kernel)


def _conv_im2col_grad_bwd(stride, dilation, residuals, grad):
    x, kernel = residuals
    _, vjp = jax.vjp(lambda x, kernel: _conv_im2col(x, kernel, stride, dilation), x, kernel)
    return vjp(grad)


_conv_im2col_grad.defvjp(_conv_im2col_grad_fwd, _conv_im2col_grad_bwd)


class Conv2D(nn.Module):
    """Square convolution with PyTorch's symmetric padding ``dilation * (k - 1) // 2`` on both sides.

    Flax's ``'SAME'`` would pad a stride-2 conv asymmetrically on even sizes, which breaks parity.
    Variables as ``nn.Conv``'s: ``kernel`` [k, k, in, out] (float32) and optional ``bias`` [out].
    A 1x1 kernel runs as a matmul over channels (``pointwise_implementation='dot'``, see
    :mod:`fastfcn_jax.models.op_choices`); ``'conv'`` forces the convolution op. Larger kernels run XLA's
    convolution forward; ``conv_gradient='im2col'`` computes their gradient as the im2col matmul's instead of
    XLA's backward convolutions.
    """

    features: int
    kernel_size: int = 3
    stride: int = 1
    dilation: int = 1
    use_bias: bool = False
    dtype: Dtype = jnp.float32
    kernel_init: Any = None
    pointwise_implementation: str = "dot"
    conv_gradient: str = "auto"
    dilated_implementation: str = "auto"
    resized_implementation: str = "low_res"
    resize_implementation: str = "auto"
    small_maps_implementation: str = "auto"
    align_corners: bool = True  # how ``resized`` inputs are resized (resize.resize_bilinear)

    def _per_tap(self, batch: int, height: int, width: int) -> bool:
        choice = choose(self.small_maps_implementation, tpu="conv", gpu="conv", other="per_tap")
        # A symbolic batch (an export for any batch size) is judged by one image, as served.
        pixels = height * width * (batch if isinstance(batch, int) else 1)
        if self.kernel_size % 2 == 0:  # the per-tap form keeps the size: 'same' convs only
            return False
        small = self.kernel_size > 1 and isinstance(pixels, int) and pixels <= SMALL_MAP_PIXELS
        return (small and choice == "per_tap") or self._valid_taps(height, width)

    def _valid_taps(self, height: int, width: int) -> bool:
        if self.dilated_implementation == "conv" or self.dilation == 1:
            return False
        if self.dilated_implementation == "valid_taps":
            return True
        # 'auto': on CPU, when at least a fifth of the multiply-adds would read padding.
        fraction = _valid_tap_fraction(height, width, self.kernel_size, self.dilation)
        return backend() == "cpu" and fraction < 0.8

    @nn.compact
    def __call__(self, x: jax.Array, resized: Sequence[jax.Array] = ()) -> jax.Array:
        """Convolves ``x``, or with ``resized`` the concatenation ``[x, *resized]`` where each of ``resized``
        is first resized to ``x``'s height and width (``align_corners``): PSP's pyramid levels, ASPP's pooling
        branch. The kernel spans all the channels either way."""
        k, in_features = self.kernel_size, x.shape[-1] + sum(r.shape[-1] for r in resized)
        kernel = self.param(
            "kernel",
            self.kernel_init or torch_default_kernel_init(),
            (k, k, in_features, self.features),
            jnp.float32,
        )
        if resized and (self.stride != 1 or self.dilation != 1 or k % 2 == 0):
            raise ValueError("resized inputs need a stride-1, undilated convolution of odd size")
        if resized and self.resized_implementation == "upsampled":
            size = x.shape[1:3]
            x = jnp.concatenate(
                [x, *(resize_bilinear(r, size, self.resize_implementation, self.align_corners) for r in resized)], -1
            )
            resized = ()
        x = x.astype(self.dtype)
        kernel = kernel.astype(self.dtype)
        y = self._conv(x, kernel[:, :, : x.shape[-1]])
        if resized:
            y = y + conv_of_resized(
                resized, kernel[:, :, x.shape[-1] :], x.shape[1:3], self.dtype, self.align_corners
            ).astype(self.dtype)
        if self.use_bias:
            bias = self.param("bias", torch_default_bias_init(in_features * k * k), (self.features,), jnp.float32)
            y = y + bias.astype(self.dtype)
        return y

    def _conv(self, x: jax.Array, kernel: jax.Array) -> jax.Array:
        if self.kernel_size == 1 and self.pointwise_implementation == "dot":
            if self.stride > 1:  # PyTorch's 1x1 stride-s conv without padding reads every s-th pixel
                x = x[:, :: self.stride, :: self.stride, :]
            return jnp.einsum("bhwc,co->bhwo", x, kernel[0, 0])
        if self.stride == 1 and self._per_tap(*x.shape[:3]):
            return _conv_valid_taps(x, kernel, self.dilation)
        if self.conv_gradient == "im2col" or (self.conv_gradient == "auto" and backend() == "cpu"):
            return _conv_im2col_grad(x, kernel, self.stride, self.dilation)
        return _conv_xla(x, kernel, self.stride, self.dilation)


def conv2d(
    features: int,
    kernel_size: int,
    *,
    stride: int = 1,
    dilation: int = 1,
    use_bias: bool = False,
    dtype: Dtype = jnp.float32,
    kernel_init=None,
    ops: OpChoices = DEFAULT_OPS,
    align_corners: bool = True,
    name: str | None = None,
) -> Conv2D:
    """A :class:`Conv2D` (PyTorch padding; PyTorch's default init unless ``kernel_init`` is given)."""
    return Conv2D(
        features,
        kernel_size,
        stride=stride,
        dilation=dilation,
        use_bias=use_bias,
        dtype=dtype,
        kernel_init=kernel_init,
        pointwise_implementation=ops.pointwise,
        conv_gradient=ops.conv_gradient,
        dilated_implementation=ops.dilated,
        resized_implementation=ops.resized,
        resize_implementation=ops.resize,
        small_maps_implementation=ops.small_maps,
        align_corners=align_corners,
        name=name,
    )


class ConvBNReLU(nn.Module):
    """Conv (no bias, symmetric padding) -> norm -> optional ReLU. Submodules ``conv`` and ``bn``.

    ``resized``: maps to resize to ``x``'s size and concatenate after it before the conv (see
    :meth:`Conv2D.__call__`)."""

    features: int
    kernel_size: int = 3
    stride: int = 1
    dilation: int = 1
    relu: bool = True
    norm: str = "batch"
    num_groups: int = 32
    dtype: Dtype = jnp.float32
    kernel_init: Any = None
    ops: OpChoices = DEFAULT_OPS
    align_corners: bool = True  # how ``resized`` inputs are resized

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False, resized: Sequence[jax.Array] = ()) -> jax.Array:
        x = conv2d(
            self.features,
            self.kernel_size,
            stride=self.stride,
            dilation=self.dilation,
            dtype=self.dtype,
            kernel_init=self.kernel_init,
            ops=self.ops,
            align_corners=self.align_corners,
            name="conv",
        )(x, resized)
        folded = self.ops.norm == "folded"
        x = make_norm(
            self.norm,
            train=train,
            dtype=self.dtype,
            num_groups=self.num_groups,
            folded=folded,
            statistics=self.ops.norm_statistics,
            name="bn",
        )(x)
        return nn.relu(x) if self.relu else x


def channel_dropout(rate: float, *, train: bool, name: str | None = None) -> nn.Dropout:
    """PyTorch ``Dropout2d``: drops whole channels per example (mask broadcast over H and W)."""
    return nn.Dropout(rate=rate, broadcast_dims=(1, 2), deterministic=not train, name=name)


class Classifier(nn.Module):
    """Channel dropout then a 1x1 conv with bias to ``num_classes`` (the heads' last layers), in float32."""

    num_classes: int
    dropout: float = 0.1
    ops: OpChoices = DEFAULT_OPS

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        x = channel_dropout(self.dropout, train=train)(x)
        # The logits are computed in float32 whatever the compute dtype: the last layer is cheap (C outputs)
        # and the loss and argmax see full-precision values.
        return conv2d(self.num_classes, 1, use_bias=True, dtype=jnp.float32, ops=self.ops, name="conv")(x)

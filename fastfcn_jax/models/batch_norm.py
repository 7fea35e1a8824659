"""Batch normalisation with PyTorch's semantics, and its folding into convolutions for inference.

:class:`BatchNorm` (synchronous over the global batch under ``jax.jit``, as the reference's SyncBN; its training
statistics optionally summed by the Pallas kernel of ``batch_norm_pallas``), :func:`frozen_batch_norm` (training
with the running statistics), :func:`make_norm` (BatchNorm or GroupNorm by name) and :func:`fold_batch_norm`
(each BatchNorm folded into the convolution before it: ``OpChoices.norm='folded'``). The images' input
normalisation (ImageNet mean and std) is :mod:`fastfcn_jax.normalization`.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from fastfcn_jax import sharding
from fastfcn_jax.models import batch_norm_pallas
from fastfcn_jax.models.dtypes import Dtype, exact_dtype
from fastfcn_jax.models.op_choices import pallas_interpret, unless_xla_forms

# PyTorch BatchNorm defaults (momentum 0.1 in PyTorch's convention is 0.9 in Flax's).
BN_MOMENTUM = 0.9
NORM_EPSILON = 1e-5


class BatchNorm(nn.Module):
    """BatchNorm with PyTorch semantics: eps 1e-5, momentum 0.1, running variance updated unbiased.

    Statistics are computed in float32 over every axis but ``feature_axis`` (under ``jax.jit`` with a
    batch-sharded input this is the global batch, i.e. the reference's SyncBN). The running variance is
    updated with the unbiased batch variance and the batch is normalised with the biased one, as
    PyTorch and the reference's SyncBN do. Variables are named as Flax's ``nn.BatchNorm`` names them
    (params ``scale``/``bias``, batch_stats ``mean``/``var``).
    """

    use_running_average: bool | None = None
    feature_axis: int = -1
    momentum: float = BN_MOMENTUM
    epsilon: float = NORM_EPSILON
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32
    folded: bool = False  # inference only: the conv before carries the scale, ``bias`` the whole shift
    statistics: str = "xla"  # OpChoices.norm_statistics: 'xla' | 'pallas' (training, channels last)

    @nn.compact
    def __call__(self, x: jax.Array, use_running_average: bool | None = None) -> jax.Array:
        use_running_average = nn.merge_param("use_running_average", self.use_running_average, use_running_average)
        if self.folded and not use_running_average:
            raise ValueError(
                f"BatchNorm {self.name!r} is folded into its convolution (norm_implementation='folded'), which "
                "only evaluates; train with norm_implementation='standard'"
            )
        axis = self.feature_axis % x.ndim
        features = x.shape[axis]
        reduce_axes = tuple(a for a in range(x.ndim) if a != axis)
        stat_shape = [1] * x.ndim
        stat_shape[axis] = features

        ra_mean = self.variable("batch_stats", "mean", lambda: jnp.zeros((features,), jnp.float32))
        ra_var = self.variable("batch_stats", "var", lambda: jnp.ones((features,), jnp.float32))
        scale = self.param("scale", nn.initializers.ones, (features,), self.param_dtype)
        bias = self.param("bias", nn.initializers.zeros, (features,), self.param_dtype)

        wide = exact_dtype(x.dtype)  # float32 (float64 in exactness tests)
        x32 = x.astype(wide)
        if self.folded:
            return (x32 + bias.astype(wide).reshape(stat_shape)).astype(self.dtype or x.dtype)
        statistics = unless_xla_forms("norm_statistics", self.statistics)
        if statistics not in ("xla", "pallas"):
            raise ValueError(f"unknown BatchNorm statistics {self.statistics!r}; expected 'xla' or 'pallas'")
        if use_running_average:
            mean, var = ra_mean.value, ra_var.value
        else:
            # Both moments in one pass over x (the two-pass form reads a training batch's activations twice;
            # XLA fuses the two sums into one reduction), about the running mean so that E[d^2] - E[d]^2
            # does not cancel when |mean| >> std (the shifted-data algorithm; exact for any shift).
            shift = jax.lax.stop_gradient(ra_mean.value).reshape(stat_shape)
            count = int(np.prod([x.shape[a] for a in reduce_axes]))
            if statistics == "pallas" and axis == x.ndim - 1:
                y, mean, var = _pallas_batch_norm(
                    x, scale, bias, shift.reshape(-1), self.epsilon, jnp.dtype(self.dtype or x.dtype).name
                )
            else:
                y = None
                centred = x32 - shift
                mean_centred = jnp.mean(centred, axis=reduce_axes)
                var = jnp.maximum(jnp.mean(jnp.square(centred), axis=reduce_axes) - jnp.square(mean_centred), 0.0)
                mean = mean_centred + shift.reshape(-1)
            if not self.is_initializing():
                unbiased = var * (count / max(count - 1, 1))
                ra_mean.value = self.momentum * ra_mean.value + (1.0 - self.momentum) * mean
                ra_var.value = self.momentum * ra_var.value + (1.0 - self.momentum) * unbiased
            if y is not None:
                return y

        multiplier = scale.astype(wide) * jax.lax.rsqrt(var + self.epsilon)
        offset = bias.astype(wide) - mean * multiplier
        y = x32 * multiplier.reshape(stat_shape) + offset.reshape(stat_shape)
        return y.astype(self.dtype or x.dtype)


def _channel_sums(u: jax.Array, u_shift: jax.Array, v: jax.Array | None = None, v_shift: jax.Array | None = None):
    """:func:`batch_norm_pallas.channel_sums` over the rows of channels-last ``u`` (and ``v``), on each
    device's part of the batch, added over the devices."""
    interpret = pallas_interpret()
    channels = u.shape[-1]

    def local(u, *v):
        v = (v[0].reshape(-1, channels), v_shift) if v else ()
        # The interpreter runs programs one after another: one per channel block (tests).
        programs = 1 if interpret else batch_norm_pallas.TARGET_PROGRAMS
        return batch_norm_pallas.channel_sums(
            u.reshape(-1, channels), u_shift, *v, programs=programs, interpret=interpret
        )

    args = (u,) if v is None else (u, v)
    return sharding.over_batch(local, *args, batched=(True,) * len(args), summed=(True, True))


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _pallas_batch_norm(
    x: jax.Array, scale: jax.Array, bias: jax.Array, shift: jax.Array, epsilon: float, out_dtype: str
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """A training BatchNorm of channels-last ``x`` with :class:`BatchNorm`'s formulas: (output in
    ``out_dtype``, batch mean, biased batch variance). The forward's moments about ``shift`` and the
    backward's ``sum(dy)``, ``sum(dy * x)`` are Pallas kernels; everything else is elementwise, in float32
    (float64 for float64 inputs), and the input gradient is rounded to ``x``'s dtype once."""
    return _pallas_batch_norm_fwd(x, scale, bias, shift, epsilon, out_dtype)[0]


def _pallas_batch_norm_fwd(x, scale, bias, shift, epsilon, out_dtype):
    wide = exact_dtype(x.dtype)
    count = x.size // x.shape[-1]
    sums, squares = _channel_sums(x, shift)
    mean_centred = sums / count
    raw_var = squares / count - jnp.square(mean_centred)
    var = jnp.maximum(raw_var, 0.0)
    mean = mean_centred + shift
    rstd = jax.lax.rsqrt(var + epsilon)
    multiplier = scale.astype(wide) * rstd
    offset = bias.astype(wide) - mean * multiplier
    y = (x.astype(wide) * multiplier + offset).astype(out_dtype)
    return (y, mean, var), (x, scale, bias, shift, mean_centred, raw_var, mean, rstd, multiplier)


def _pallas_batch_norm_bwd(epsilon, out_dtype, residuals, cotangents):
    # Autodiff of the forward above, step by step, with its two per-channel sums in one Pallas kernel. The
    # shift (the running mean) is a constant of the step: no gradient.
    x, scale, bias, shift, mean_centred, raw_var, mean, rstd, multiplier = residuals
    grad_y, grad_mean, grad_var = cotangents
    wide, count = multiplier.dtype, x.size // x.shape[-1]
    zeros = jnp.zeros(x.shape[-1:], wide)
    sum_dy, sum_dy_x = _channel_sums(grad_y, zeros, x, zeros)
    # y = x * multiplier + bias - mean * multiplier, multiplier = scale * rstd, rstd = (var + eps)^-1/2
    grad_multiplier = sum_dy_x - mean * sum_dy
    grad_rstd = grad_multiplier * scale.astype(wide)
    grad_var = grad_var + jnp.where(raw_var > 0.0, -0.5 * grad_rstd * rstd**3, 0.0)
    grad_mean = grad_mean - multiplier * sum_dy
    # mean = sums / count + shift, var = squares / count - (sums / count)^2, both sums over x - shift.
    grad_sums = (grad_mean - 2.0 * mean_centred * grad_var) / count
    grad_squares = grad_var / count
    grad_x = grad_y.astype(wide) * multiplier + grad_sums + 2.0 * grad_squares * (x.astype(wide) - shift)
    grad_scale, grad_bias = (grad_multiplier * rstd).astype(scale.dtype), sum_dy.astype(bias.dtype)
    return grad_x.astype(x.dtype), grad_scale, grad_bias, jnp.zeros_like(shift)


_pallas_batch_norm.defvjp(_pallas_batch_norm_fwd, _pallas_batch_norm_bwd)


_FROZEN_BATCH_NORM: contextvars.ContextVar[bool] = contextvars.ContextVar("fastfcn_frozen_batch_norm", default=False)


@contextlib.contextmanager
def frozen_batch_norm(frozen: bool = True) -> Iterator[None]:
    """Within the block (trace inside it), training BatchNorms normalise with their running statistics and
    leave them unchanged, while their scale and bias still train: the reference author's remedy when a device
    holds too few images for batch statistics (FastFCN issue #19, one 12 GB GPU). GroupNorm is unaffected."""
    token = _FROZEN_BATCH_NORM.set(bool(frozen))
    try:
        yield
    finally:
        _FROZEN_BATCH_NORM.reset(token)


def uses_running_statistics(train: bool) -> bool:
    """Whether a BatchNorm normalises with its running statistics: in inference, or frozen in training."""
    return not train or _FROZEN_BATCH_NORM.get()


def make_norm(
    kind: str,
    *,
    train: bool,
    dtype: Dtype,
    num_groups: int = 32,
    folded: bool = False,
    statistics: str = "xla",
    name: str | None = None,
):
    """A normalisation layer by name: ``'batch'`` (PyTorch BatchNorm) or ``'group'`` (GroupNorm, eps 1e-5).
    ``folded``: a BatchNorm whose scale is in the preceding convolution (see :func:`fold_batch_norm`);
    ``statistics``: how a training BatchNorm sums (``OpChoices.norm_statistics``)."""
    if kind == "batch":
        running = uses_running_statistics(train)
        return BatchNorm(use_running_average=running, dtype=dtype, folded=folded, statistics=statistics, name=name)
    if kind == "group":
        # Two-pass variance, as PyTorch computes it.
        return nn.GroupNorm(
            num_groups=num_groups,
            epsilon=NORM_EPSILON,
            dtype=dtype,
            param_dtype=jnp.float32,
            use_fast_variance=False,
            name=name,
        )
    raise ValueError(f"unknown norm {kind!r}; expected 'batch' or 'group'")


# The (convolution, BatchNorm) sibling pairs that fold_batch_norm folds: ConvBNReLU's and SeparableConv's.
FOLDABLE_PAIRS = (("conv", "bn"), ("depthwise", "depthwise_norm"), ("pointwise", "pointwise_norm"))


def fold_batch_norm(variables: Any, epsilon: float = NORM_EPSILON, keep: Sequence[str] = ()) -> dict[str, Any]:
    """Variables for ``norm_implementation='folded'``: each BatchNorm that follows a convolution is folded in.

    ``bn(conv(x, W)) = conv(x, W * m) + (bias - mean * m)`` with ``m = scale / sqrt(var + eps)`` per output
    channel: the kernel takes ``m`` along its last (output) axis, the BatchNorm's ``bias`` the shift, its
    ``scale``, ``mean`` and ``var`` become 1, 0, 1 (unused). Computed in float64, stored in the variables'
    dtypes. GroupNorms (no running statistics) and BatchNorms without a convolution sibling (EncNet's
    codeword BatchNorm) are left as they are, and so does the model built with ``'folded'``. ``keep``: top-level
    modules left as they are (another backbone, whose own layers ``'folded'`` does not reach).
    """
    params, stats = variables["params"], variables.get("batch_stats", {})

    def fold(params_node: Any, stats_node: Any) -> Any:
        if not isinstance(params_node, Mapping):
            return params_node
        out = {
            key: fold(value, stats_node.get(key, {}) if isinstance(stats_node, Mapping) else {})
            for key, value in params_node.items()
        }
        for conv_name, norm_name in FOLDABLE_PAIRS:
            norm_stats = stats_node.get(norm_name) if isinstance(stats_node, Mapping) else None
            if conv_name not in out or norm_name not in out or not norm_stats:
                continue
            conv, norm = dict(out[conv_name]), dict(out[norm_name])
            if "bias" in conv:
                raise ValueError(f"cannot fold {norm_name!r} into {conv_name!r}: the convolution has a bias")
            scale = np.asarray(norm["scale"], np.float64)
            multiplier = scale / np.sqrt(np.asarray(norm_stats["var"], np.float64) + epsilon)
            shift = np.asarray(norm["bias"], np.float64) - np.asarray(norm_stats["mean"], np.float64) * multiplier
            kernel = np.asarray(conv["kernel"])
            conv["kernel"] = (kernel.astype(np.float64) * multiplier).astype(kernel.dtype)
            norm["scale"] = np.ones_like(np.asarray(norm["scale"]))
            norm["bias"] = shift.astype(np.asarray(norm["bias"]).dtype)
            out[conv_name], out[norm_name] = conv, norm
        return out

    def reset_stats(params_node: Any, stats_node: Any) -> Any:
        if not isinstance(stats_node, Mapping):
            return stats_node
        out = {
            key: reset_stats(params_node.get(key, {}) if isinstance(params_node, Mapping) else {}, value)
            for key, value in stats_node.items()
        }
        for conv_name, norm_name in FOLDABLE_PAIRS:
            if isinstance(params_node, Mapping) and conv_name in params_node and norm_name in out:
                out[norm_name] = {
                    "mean": np.zeros_like(np.asarray(out[norm_name]["mean"])),
                    "var": np.ones_like(np.asarray(out[norm_name]["var"])),
                }
        return out

    folded = dict(variables)
    kept_params, kept_stats = ({k: v for k, v in tree.items() if k in keep} for tree in (params, stats))
    params, stats = ({k: v for k, v in tree.items() if k not in keep} for tree in (params, stats))
    folded["params"] = {**fold(params, stats), **kept_params}
    if "batch_stats" in variables:
        folded["batch_stats"] = {**reset_stats(params, stats), **kept_stats}
    return folded

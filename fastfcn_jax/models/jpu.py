"""Joint Pyramid Upsampling (JPU) and its pyramid version JPU_X (FastFCN ``encoding/nn/customize.py``).

JPU: c4, c3, c2 are each projected by a 3x3 conv-BN-ReLU to ``width`` channels, the first two are
resized (align-corners bilinear) to c2's stride-8 size, concatenated in the order [c4, c3, c2], and fed to
parallel separable convolutions with dilations 1, 2, 4, 8 whose outputs are concatenated (4 x width =
2048 channels at output stride 8). There is no fusion conv: the head consumes the concatenation.

JPU_X: two cascaded JUM units, JUM(c3 -> c2, width/2, dilations 1/2/4) then JUM(c4 -> JUM1, width,
dilations 2/4/8); their separable branches use GroupNorm, their input convs BatchNorm.
"""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from fastfcn_jax.models.depthwise import SeparableConv, depthwise_forms, depthwise_joint
from fastfcn_jax.models.dtypes import Dtype
from fastfcn_jax.models.layers import ConvBNReLU
from fastfcn_jax.models.op_choices import DEFAULT_OPS, OpChoices, choose
from fastfcn_jax.models.resize import resize_bilinear


class JPU(nn.Module):
    """The paper's JPU neck. ``__call__(c2, c3, c4)`` -> [B, H2, W2, len(dilations) * width].

    ``align_corners=False`` and ``c2_first=True`` give mmsegmentation's JPU (``mmseg/models/necks/jpu.py``):
    half-pixel resizing, and the projected maps concatenated as [c2, c3, c4] (the order the separable
    convolutions' input channels follow).
    """

    width: int = 512
    dilations: Sequence[int] = (1, 2, 4, 8)
    dtype: Dtype = jnp.float32
    ops: OpChoices = DEFAULT_OPS
    align_corners: bool = True
    c2_first: bool = False

    @nn.compact
    def __call__(self, c2: jax.Array, c3: jax.Array, c4: jax.Array, train: bool = False) -> jax.Array:
        size = c2.shape[1:3]
        feats = [
            ConvBNReLU(self.width, 3, dtype=self.dtype, ops=self.ops, name="conv5")(c4, train),
            ConvBNReLU(self.width, 3, dtype=self.dtype, ops=self.ops, name="conv4")(c3, train),
            ConvBNReLU(self.width, 3, dtype=self.dtype, ops=self.ops, name="conv3")(c2, train),
        ]
        if self.c2_first:
            feats.reverse()
        feat = jnp.concatenate([resize_bilinear(f, size, self.ops.resize, self.align_corners) for f in feats], axis=-1)
        forms = depthwise_forms(
            self.ops.depthwise, self.ops.depthwise_input_grad, self.ops.depthwise_kernel_grad, train=train
        )
        all_pallas = forms == ("pallas",) * 3
        # 'auto' pads once on GPUs for XLA's forms (OpChoices.jpu_input). The per-branch Pallas kernels mask
        # the border themselves, so there a padded copy is only traffic: compile-only H200 train step at batch
        # 16, 480x480, 64.15 -> 61.38 GB, roofline 19.93 -> 19.29 ms (docs/performance.md, session 11).
        gpu_input = "fused" if all_pallas and self.ops.jpu_depthwise == "branches" else "padded"
        margin = 0
        if choose(self.ops.jpu_input, tpu="fused", other="fused", gpu=gpu_input) == "padded":
            # Padded once for every branch and written out, so the taps read plain slices (depthwise.py).
            margin = max(self.dilations)  # the 3x3 depthwise convs pad by their dilation
            feat = jax.lax.optimization_barrier(jnp.pad(feat, ((0, 0), (margin, margin), (margin, margin), (0, 0))))
        branches = [
            SeparableConv(
                self.width, dilation=d, dtype=self.dtype, ops=self.ops, margin=margin, name=f"dilation{i + 1}"
            )
            for i, d in enumerate(self.dilations)
        ]
        if margin and all_pallas and self.ops.jpu_depthwise == "joint":
            # One kernel per pass serves the four branches (depthwise_joint).
            kernels = [branch(feat, train, stage="kernel") for branch in branches]
            outputs = depthwise_joint(feat.astype(self.dtype), kernels, self.dilations, margin)
            return jnp.concatenate(
                [branch(y, train, stage="rest") for branch, y in zip(branches, outputs, strict=True)], axis=-1
            )
        return jnp.concatenate([branch(feat, train) for branch in branches], axis=-1)


class JUM(nn.Module):
    """Joint upsampling unit of JPU_X: fuses a low-resolution map into a high-resolution one.

    Output: concat[resized conv_l(low), one separable branch per dilation] = (1 + len(dilations)) x width
    channels at the high-resolution size (the reference's JUM has three branches, dilations d, 2d, 4d).
    """

    width: int
    dilations: Sequence[int] = (1, 2, 4)
    num_groups: int = 32
    dtype: Dtype = jnp.float32
    ops: OpChoices = DEFAULT_OPS

    @nn.compact
    def __call__(self, low: jax.Array, high: jax.Array, train: bool = False) -> jax.Array:
        low = ConvBNReLU(self.width, 3, dtype=self.dtype, ops=self.ops, name="conv_l")(low, train)
        high = ConvBNReLU(self.width, 3, dtype=self.dtype, ops=self.ops, name="conv_h")(high, train)
        low = resize_bilinear(low, high.shape[1:3], self.ops.resize)
        feat = jnp.concatenate([low, high], axis=-1)
        branches = [
            SeparableConv(
                self.width,
                dilation=d,
                norm="group",
                num_groups=self.num_groups,
                dtype=self.dtype,
                ops=self.ops,
                name=f"dilation{i + 1}",
            )(feat, train)
            for i, d in enumerate(self.dilations)
        ]
        return jnp.concatenate([low, *branches], axis=-1)


class JPUX(nn.Module):
    """JPU_X: ``jum_1`` = JUM(c3 -> c2, width/2, dilation 1); ``jum_2`` = JUM(c4 -> jum_1, width, dilation 2).

    Output: 4 x width channels at c2's size. ``dilations`` holds each unit's branch dilations.
    """

    width: int = 512
    dilations: Sequence[Sequence[int]] = ((1, 2, 4), (2, 4, 8))
    num_groups: int = 32
    dtype: Dtype = jnp.float32
    ops: OpChoices = DEFAULT_OPS

    @nn.compact
    def __call__(self, c2: jax.Array, c3: jax.Array, c4: jax.Array, train: bool = False) -> jax.Array:
        common = dict(
            num_groups=self.num_groups,
            dtype=self.dtype,
            ops=self.ops,
        )
        first, second = (tuple(d) for d in self.dilations)
        feat = JUM(self.width // 2, first, name="jum_1", **common)(c3, c2, train)
        return JUM(self.width, second, name="jum_2", **common)(c4, feat, train)

"""DeepLabV3 (ASPP) head (FastFCN ``encoding/models/deeplabv3.py``)."""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from fastfcn_jax.models.dtypes import Dtype
from fastfcn_jax.models.layers import Classifier, ConvBNReLU, channel_dropout
from fastfcn_jax.models.op_choices import DEFAULT_OPS, OpChoices


class DeepLabV3Head(nn.Module):
    """ASPP of width in/8 (256 for 2048 channels): a 1x1 branch, 3x3 branches at ``rates`` (12, 24, 36)
    and image pooling (global mean -> 1x1 conv + BN + ReLU -> broadcast back), each with BN + ReLU;
    concatenated and projected by a 1x1 conv + BN + ReLU + Dropout2d(0.5); then the 3x3 block
    (conv + BN + ReLU + Dropout2d(0.1) + 1x1 conv to classes)."""

    num_classes: int
    rates: Sequence[int] = (12, 24, 36)
    aspp_features: int | None = None
    project_dropout: float = 0.5
    dropout: float = 0.1
    dtype: Dtype = jnp.float32
    ops: OpChoices = DEFAULT_OPS

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> dict[str, jax.Array]:
        width = self.aspp_features or x.shape[-1] // 8
        branches = [ConvBNReLU(width, 1, dtype=self.dtype, ops=self.ops, name="aspp_b0")(x, train)]
        for i, rate in enumerate(self.rates):
            branches.append(
                ConvBNReLU(width, 3, dilation=rate, dtype=self.dtype, ops=self.ops, name=f"aspp_b{i + 1}")(x, train)
            )
        pooled = jnp.mean(x.astype(jnp.float32), axis=(1, 2), keepdims=True).astype(x.dtype)
        pooled = ConvBNReLU(width, 1, dtype=self.dtype, ops=self.ops, name="aspp_pool")(pooled, train)
        # The pooled branch is broadcast back (align-corners upsampling of a 1x1 map) after the others;
        # the projection takes it at 1x1 (ops.resized).
        y = jnp.concatenate(branches, axis=-1)
        y = ConvBNReLU(width, 1, dtype=self.dtype, ops=self.ops, name="aspp_project")(y, train, resized=[pooled])
        y = channel_dropout(self.project_dropout, train=train)(y)
        y = ConvBNReLU(width, 3, dtype=self.dtype, ops=self.ops, name="block")(y, train)
        logits = Classifier(self.num_classes, self.dropout, ops=self.ops, name="classifier")(y, train)
        return {"logits": logits}


class MMSegASPPHead(nn.Module):
    """mmsegmentation's ASPPHead (``mmseg/models/decode_heads/aspp_head.py``, FastFCN configs' ``dilations=(1,
    12, 24, 36)``), which differs from the reference's DeepLabV3 head: branches of width in/4 (512 for 2048
    channels): image pooling (global mean -> 1x1 conv + BN + ReLU), a 1x1 branch and 3x3 branches at ``rates``;
    concatenated with the pooled branch *first*, then a 3x3 ``bottleneck`` conv + BN + ReLU, Dropout2d(0.1) and
    the 1x1 conv to classes. No projection, no second block."""

    num_classes: int
    rates: Sequence[int] = (12, 24, 36)
    dropout: float = 0.1
    dtype: Dtype = jnp.float32
    ops: OpChoices = DEFAULT_OPS

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> dict[str, jax.Array]:
        width = x.shape[-1] // 4
        pooled = jnp.mean(x.astype(jnp.float32), axis=(1, 2), keepdims=True).astype(x.dtype)
        pooled = ConvBNReLU(width, 1, dtype=self.dtype, ops=self.ops, name="aspp_pool")(pooled, train)
        branches = [ConvBNReLU(width, 1, dtype=self.dtype, ops=self.ops, name="aspp_b0")(x, train)]
        for i, rate in enumerate(self.rates):
            branches.append(
                ConvBNReLU(width, 3, dilation=rate, dtype=self.dtype, ops=self.ops, name=f"aspp_b{i + 1}")(x, train)
            )
        # Resizing a 1x1 map is a broadcast whatever the interpolation. Written out here: the bottleneck's
        # kernel takes the pooled branch first, where ConvBNReLU's resized inputs come after the others.
        pooled = jnp.broadcast_to(pooled, (*branches[0].shape[:3], width)).astype(branches[0].dtype)
        y = jnp.concatenate([pooled, *branches], axis=-1)
        y = ConvBNReLU(width, 3, dtype=self.dtype, ops=self.ops, name="bottleneck")(y, train)
        logits = Classifier(self.num_classes, self.dropout, ops=self.ops, name="classifier")(y, train)
        return {"logits": logits}

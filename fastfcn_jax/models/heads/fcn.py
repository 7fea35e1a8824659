"""FCN head (FastFCN ``encoding/models/fcn.py``), also the auxiliary head on c3."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from fastfcn_jax.models.dtypes import Dtype
from fastfcn_jax.models.layers import Classifier, ConvBNReLU
from fastfcn_jax.models.op_choices import DEFAULT_OPS, OpChoices


class FCNHead(nn.Module):
    """3x3 conv (in -> in/4) + BN + ReLU -> Dropout2d(0.1) -> 1x1 conv to classes (with bias).

    ``inter_features`` defaults to a quarter of the input channels, as the reference computes it
    (aux: 1024 -> 256; FCN main head: 2048 -> 512).
    """

    num_classes: int
    inter_features: int | None = None
    dropout: float = 0.1
    dtype: Dtype = jnp.float32
    ops: OpChoices = DEFAULT_OPS

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> dict[str, jax.Array]:
        inter = self.inter_features or x.shape[-1] // 4
        x = ConvBNReLU(inter, 3, dtype=self.dtype, ops=self.ops, name="conv5")(x, train)
        logits = Classifier(self.num_classes, self.dropout, ops=self.ops, name="classifier")(x, train)
        return {"logits": logits}

"""PSP head (FastFCN ``encoding/models/psp.py`` and ``PyramidPooling`` in ``encoding/nn/customize.py``)."""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from fastfcn_jax.models.dtypes import Dtype
from fastfcn_jax.models.layers import Classifier, ConvBNReLU
from fastfcn_jax.models.op_choices import DEFAULT_OPS, OpChoices
from fastfcn_jax.models.resize import adaptive_avg_pool


class PSPHead(nn.Module):
    """Pyramid pooling (bins 1, 2, 3, 6; each 1x1 conv to in/4 + BN + ReLU, resized back with align
    corners), concatenated after the input (2 x in channels), 3x3 conv to in/4 + BN + ReLU, Dropout2d(0.1),
    1x1 conv to classes."""

    num_classes: int
    bins: Sequence[int] = (1, 2, 3, 6)
    dropout: float = 0.1
    dtype: Dtype = jnp.float32
    ops: OpChoices = DEFAULT_OPS
    align_corners: bool = True  # False: mmsegmentation's PSPHead (the same layers, half-pixel resizing)

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> dict[str, jax.Array]:
        inter = x.shape[-1] // 4
        pooled = [
            ConvBNReLU(inter, 1, dtype=self.dtype, ops=self.ops, name=f"pool{i + 1}")(adaptive_avg_pool(x, b), train)
            for i, b in enumerate(self.bins)
        ]
        # The conv over [x, upsampled levels] takes the levels at their pooled size (ops.resized).
        x = ConvBNReLU(inter, 3, dtype=self.dtype, ops=self.ops, align_corners=self.align_corners, name="conv5")(
            x, train, resized=pooled
        )
        logits = Classifier(self.num_classes, self.dropout, ops=self.ops, name="classifier")(x, train)
        return {"logits": logits}

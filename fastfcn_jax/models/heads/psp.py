"""PSP head (FastFCN ``encoding/models/psp.py`` and ``PyramidPooling`` in ``encoding/nn/customize.py``)."""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from fastfcn_jax.models.layers import (
    DEFAULT_OPS,
    Classifier,
    ConvBNReLU,
    Dtype,
    OpChoices,
    adaptive_avg_pool,
    resize_bilinear,
)


class PSPHead(nn.Module):
    """Pyramid pooling (bins 1, 2, 3, 6; each 1x1 conv to in/4 + BN + ReLU, resized back with align
    corners), concatenated after the input (2 x in channels), 3x3 conv to in/4 + BN + ReLU, Dropout2d(0.1),
    1x1 conv to classes."""

    num_classes: int
    bins: Sequence[int] = (1, 2, 3, 6)
    dropout: float = 0.1
    dtype: Dtype = jnp.float32
    ops: OpChoices = DEFAULT_OPS

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> dict[str, jax.Array]:
        size = x.shape[1:3]
        inter = x.shape[-1] // 4
        pooled = [
            resize_bilinear(
                ConvBNReLU(inter, 1, dtype=self.dtype, ops=self.ops, name=f"pool{i + 1}")(
                    adaptive_avg_pool(x, b), train
                ),
                size,
                self.ops.resize,
            )
            for i, b in enumerate(self.bins)
        ]
        x = jnp.concatenate([x, *pooled], axis=-1)
        x = ConvBNReLU(inter, 3, dtype=self.dtype, ops=self.ops, name="conv5")(x, train)
        logits = Classifier(self.num_classes, self.dropout, ops=self.ops, name="classifier")(x, train)
        return {"logits": logits}

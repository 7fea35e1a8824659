"""EncNet head: Context Encoding Module with SE branch (FastFCN ``encoding/models/encnet.py``,
``encoding/nn/encoding.py``, ``encoding/functions/encoding.py``)."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from fastfcn_jax.models.batch_norm import BatchNorm, uses_running_statistics
from fastfcn_jax.models.dtypes import Dtype
from fastfcn_jax.models.layers import Classifier, ConvBNReLU, torch_default_bias_init, torch_default_kernel_init
from fastfcn_jax.models.op_choices import DEFAULT_OPS, OpChoices


class Encoding(nn.Module):
    """The Encoding layer: learned codewords with scaled-L2 soft assignment and residual aggregation.

    For pixels x_i [B, N, D] and codewords d_k [K, D] with smoothing factors s_k:
    a_ik = softmax_k(s_k * ||x_i - d_k||^2),  e_k = sum_i a_ik (x_i - d_k)  -> E [B, K, D].
    Always computed in float32: the expanded squared distance cancels badly in bfloat16, and the layer is
    tiny (K = 32).
    """

    num_codes: int = 32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        batch, dim = x.shape[0], x.shape[-1]
        bound = 1.0 / np.sqrt(self.num_codes * dim)
        # The reference's reset_params: codewords U(-1/sqrt(K*D), +), scale U(-1, 0).
        codewords = self.param(
            "codewords",
            lambda key, shape: jax.random.uniform(key, shape, jnp.float32, -bound, bound),
            (self.num_codes, dim),
        )
        scale = self.param(
            "scale",
            lambda key, shape: jax.random.uniform(key, shape, jnp.float32, -1.0, 0.0),
            (self.num_codes,),
        )
        x = x.astype(jnp.float32).reshape(batch, -1, dim)  # [B, N, D]
        hp = jax.lax.Precision.HIGHEST
        # ||x - d||^2 = ||x||^2 - 2 x.d + ||d||^2, as matmuls.
        distances = (
            jnp.sum(jnp.square(x), axis=-1, keepdims=True)
            - 2.0 * jnp.einsum("bnd,kd->bnk", x, codewords, precision=hp)
            + jnp.sum(jnp.square(codewords), axis=-1)
        )
        assignment = jax.nn.softmax(distances * scale, axis=-1)  # over codewords, [B, N, K]
        weighted = jnp.einsum("bnk,bnd->bkd", assignment, x, precision=hp)
        return weighted - jnp.sum(assignment, axis=1)[..., None] * codewords  # [B, K, D]


class EncNetHead(nn.Module):
    """EncNet head on the JPU output (or on c4 for the dilated baseline).

    conv5 (1x1 with JPU, 3x3 without) + BN + ReLU -> EncModule: 1x1 conv + BN + ReLU -> Encoding (K
    codewords) -> BN over the codeword axis -> ReLU -> mean over codewords = e [B, D]; channel gate
    relu(x + x * sigmoid(fc(e))); SE classifier on e -> ``se_logits``; Dropout2d(0.1) + 1x1 conv ->
    ``logits``. Also returns ``enc_x``, ``enc_e``, ``enc_en`` for inspection.
    """

    num_classes: int
    width: int = 512
    num_codes: int = 32
    conv5_kernel: int = 1
    se_loss: bool = True
    dropout: float = 0.1
    dtype: Dtype = jnp.float32
    ops: OpChoices = DEFAULT_OPS

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> dict[str, jax.Array]:
        x = ConvBNReLU(self.width, self.conv5_kernel, dtype=self.dtype, ops=self.ops, name="conv5")(x, train)
        enc_x = ConvBNReLU(self.width, 1, dtype=self.dtype, ops=self.ops, name="enc_conv")(x, train)
        enc_e = Encoding(self.num_codes, name="encoding")(enc_x)
        # BatchNorm1d(K) on [B, K, D]: statistics per codeword over (B, D).
        enc_en = nn.relu(
            BatchNorm(use_running_average=uses_running_statistics(train), feature_axis=1, name="enc_bn")(enc_e)
        )
        enc_en = jnp.mean(enc_en, axis=1)  # [B, D]

        def dense(features, name):
            return nn.Dense(
                features,
                kernel_init=torch_default_kernel_init(),
                bias_init=torch_default_bias_init(self.width),
                param_dtype=jnp.float32,
                name=name,
            )

        gamma = jax.nn.sigmoid(dense(self.width, "fc")(enc_en))
        x = nn.relu(x + x * gamma[:, None, None, :].astype(x.dtype))
        out = {
            "logits": Classifier(self.num_classes, self.dropout, ops=self.ops, name="classifier")(x, train),
            "enc_x": enc_x,
            "enc_e": enc_e,
            "enc_en": enc_en,
        }
        if self.se_loss:
            out["se_logits"] = dense(self.num_classes, "se_classifier")(enc_en)
        return out

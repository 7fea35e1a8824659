"""ResNet backbones of FastFCN: the reference's deep-stem ResNet and the torchvision 7x7-stem variant.

The reference (FastFCN ``encoding/dilated/resnet.py``, ``deep_base=True``) is the GluonCV "v1s" ResNet:
stem of three 3x3 convs (64-64-128) then BN, ReLU and a 3x3/2 max-pool; bottlenecks with the stride on
the 3x3 conv; a 1x1-conv + BN projection shortcut. FastFCN runs it undilated (output stride 32); the
dilated baselines use output stride 8 (layer3 dilation 2, layer4 dilation 4) or 16 (layer4 dilation 2),
where the first block of a dilated stage runs at half the stage's rate, as the reference does.
"""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from fastfcn_jax.models.dtypes import Dtype
from fastfcn_jax.models.layers import ConvBNReLU, conv_kernel_init, max_pool
from fastfcn_jax.models.op_choices import DEFAULT_OPS, OpChoices, choose

STAGE_SIZES = {
    50: (3, 4, 6, 3),
    101: (3, 4, 23, 3),
    152: (3, 8, 36, 3),
}


def stage_dilations(output_stride: int, dilations: Sequence[int] | None = None) -> tuple[tuple[int, int], ...]:
    """(stride, dilation) of layer1..layer4 for an output stride, as the reference's ``ResNet`` sets them;
    ``dilations`` replaces the stages' dilations (mmsegmentation's R-50-D32 dilates its strided layer3 and
    layer4 by 2 and 4: ``ResNetV1c(strides=(1, 2, 2, 2), dilations=(1, 1, 2, 4))``)."""
    if output_stride == 32:
        stages = ((1, 1), (2, 1), (2, 1), (2, 1))
    elif output_stride == 16:
        stages = ((1, 1), (2, 1), (2, 1), (1, 2))
    elif output_stride == 8:
        stages = ((1, 1), (2, 1), (1, 2), (1, 4))
    else:
        raise ValueError(f"output_stride must be 32 (FastFCN), 16 or 8 (dilated baselines), got {output_stride}")
    if dilations is None:
        return stages
    if len(dilations) != 4:
        raise ValueError(f"dilations must give the four stages' dilations, got {tuple(dilations)}")
    return tuple((stride, int(d)) for (stride, _), d in zip(stages, dilations, strict=True))


def first_block_dilation(dilation: int) -> int:
    """The reference's ``_make_layer``: a stage of dilation 1 or 2 starts at 1, a stage of dilation 4 at 2
    (mmsegmentation's ``contract_dilation=True`` halves them likewise)."""
    if dilation in (1, 2):
        return 1
    if dilation == 4:
        return 2
    raise ValueError(f"unsupported stage dilation {dilation}")


class Bottleneck(nn.Module):
    """1x1 -> 3x3 (stride, dilation) -> 1x1 (4x planes), shortcut 1x1 conv + BN when the shape changes."""

    planes: int
    stride: int = 1
    dilation: int = 1
    expansion: int = 4
    dtype: Dtype = jnp.float32
    ops: OpChoices = DEFAULT_OPS

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        out_features = self.planes * self.expansion

        def block(features, kernel_size, stride=1, dilation=1, relu=True, name=None):
            return ConvBNReLU(
                features,
                kernel_size,
                stride=stride,
                dilation=dilation,
                relu=relu,
                dtype=self.dtype,
                kernel_init=conv_kernel_init(features, kernel_size),
                ops=self.ops,
                name=name,
            )

        residual = x
        y = block(self.planes, 1, name="conv1")(x, train)
        y = block(self.planes, 3, stride=self.stride, dilation=self.dilation, name="conv2")(y, train)
        y = block(out_features, 1, relu=False, name="conv3")(y, train)
        if self.stride != 1 or x.shape[-1] != out_features:
            residual = block(out_features, 1, stride=self.stride, relu=False, name="downsample")(x, train)
        return nn.relu(y + residual)


class ResNet(nn.Module):
    """Bottleneck ResNet returning the four stage outputs ``(c1, c2, c3, c4)`` (NHWC).

    Attributes:
      stage_sizes: blocks per stage, e.g. (3, 4, 6, 3) for ResNet-50.
      stem: ``'deep'`` (three 3x3 convs, the reference) or ``'standard'`` (one 7x7 conv, torchvision).
      stem_width: width of the deep stem's first two convs (its third has twice this); the 7x7 stem
        has ``stem_width`` channels.
      base_width: planes of layer1 (doubles each stage; outputs are 4x planes).
      output_stride: 32, 16 or 8.
      dilations: the four stages' dilations, if not the reference's for ``output_stride``
        (:func:`stage_dilations`).
    """

    stage_sizes: Sequence[int] = STAGE_SIZES[50]
    stem: str = "deep"
    stem_width: int = 64
    base_width: int = 64
    output_stride: int = 32
    dilations: Sequence[int] | None = None
    dtype: Dtype = jnp.float32
    ops: OpChoices = DEFAULT_OPS

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> tuple[jax.Array, ...]:
        x = x.astype(self.dtype)

        def stem_conv(features, kernel_size, stride, relu, name):
            return ConvBNReLU(
                features,
                kernel_size,
                stride=stride,
                relu=relu,
                dtype=self.dtype,
                kernel_init=conv_kernel_init(features, kernel_size),
                ops=self.ops,
                name=name,
            )

        if self.stem == "deep":
            x = stem_conv(self.stem_width, 3, 2, True, "stem1")(x, train)
            x = stem_conv(self.stem_width, 3, 1, True, "stem2")(x, train)
            x = stem_conv(self.stem_width * 2, 3, 1, True, "stem3")(x, train)
        elif self.stem == "standard":
            x = stem_conv(self.stem_width, 7, 2, True, "stem1")(x, train)
        else:
            raise ValueError(f"unknown stem {self.stem!r}; expected 'deep' or 'standard'")
        if self.ops.max_pool == "taps" or choose(self.ops.max_pool_grad, tpu="select", other="taps") == "taps":
            x = max_pool(x, 3, 2, 1, self.ops.max_pool)
        else:
            x = nn.max_pool(x, window_shape=(3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))

        features = []
        for stage, ((stride, dilation), num_blocks) in enumerate(
            zip(stage_dilations(self.output_stride, self.dilations), self.stage_sizes, strict=True)
        ):
            planes = self.base_width * 2**stage
            for index in range(num_blocks):
                x = Bottleneck(
                    planes,
                    stride=stride if index == 0 else 1,
                    dilation=first_block_dilation(dilation) if index == 0 else dilation,
                    dtype=self.dtype,
                    ops=self.ops,
                    name=f"layer{stage + 1}_{index}",
                )(x, train)
            features.append(x)
        return tuple(features)

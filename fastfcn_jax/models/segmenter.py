"""The FastFCN segmenter: backbone -> (JPU | JPU_X | dilated backbone) -> head, plus the auxiliary head.

Mirrors the reference's ``BaseNet.base_forward`` and the per-model ``forward`` (FastFCN
``encoding/models/{base,encnet,psp,deeplabv3,fcn}.py``): the head reads the JPU output (or c4 of the
dilated backbone), the auxiliary FCN head reads c3, and both are upsampled to the input size with
align-corners bilinear interpolation.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from fastfcn_jax.models.dtypes import Dtype
from fastfcn_jax.models.heads import DeepLabV3Head, EncNetHead, FCNHead, MMSegASPPHead, PSPHead
from fastfcn_jax.models.jpu import JPU, JPUX
from fastfcn_jax.models.op_choices import OpChoices
from fastfcn_jax.models.resize import resize_bilinear
from fastfcn_jax.models.resnet import STAGE_SIZES, ResNet

HEADS = ("encnet", "psp", "deeplab", "fcn")
NECKS = ("jpu", "jpux", "dilated")
# The layers whose shapes follow the class count: re-initialised to fine-tune to another one (the converter's
# --reinit-classifier, config.train.reinit_classifier).
CLASSIFIER_MODULES = (
    "decode_head/classifier/conv",
    "decode_head/se_classifier",
    "auxiliary_head/classifier/conv",
)
# Whose architecture a model follows: the official FastFCN code, or mmsegmentation's FastFCN configs
# (``fastfcn_r50-d32_jpu_{psp,aspp,enc}``) and their dilated twins (``{pspnet,deeplabv3,encnet}_r50-d8``).
REFERENCES = ("fastfcn", "mmseg")
MMSEG_HEADS = ("encnet", "psp", "deeplab")
MMSEG_NECKS = ("jpu", "dilated")
# The ResNet's fields, which a Segmenter given its own backbone does not use.
RESNET_FIELDS = ("depth", "stage_sizes", "stem", "stem_width", "base_width", "output_stride")

# Sown under these exact names when ``mutable=['intermediates']`` is passed to ``apply``.
INTERMEDIATE_NAMES = ("c1", "c2", "c3", "c4", "jpu", "head", "aux_head", "enc_x", "enc_e", "enc_en")


def _keep_last(_previous: Any, value: Any) -> Any:
    return value


class Segmenter(nn.Module):
    """A FastFCN segmentation network.

    ``__call__(images [B, H, W, 3] normalised float, train)`` returns a dict with ``logits`` [B, H, W, C]
    (float32, at input size), ``aux_logits`` (when ``aux``) and ``se_logits`` [B, C] (EncNet with
    ``se_loss``). ``train=True`` uses batch statistics (pass ``mutable=['batch_stats']``) and dropout
    (pass a ``'dropout'`` rng). ``upsample_logits=False`` leaves ``logits`` and ``aux_logits`` at the heads'
    resolutions (stride 8; the auxiliary head on c3: stride 16 after a JPU), for the training loss, which
    upsamples them itself.

    With ``mutable=['intermediates']`` it sows the NHWC feature maps ``c1``..``c4``, ``jpu``, ``head``,
    ``aux_head`` (head outputs before upsampling) and, for EncNet, ``enc_x``, ``enc_e`` [B, K, D],
    ``enc_en`` [B, D]; each is stored as the array itself (not a tuple).

    ``reference='mmseg'``: mmsegmentation's variant of the same models (FASTFCN.md 2.3, 3.6), for its released
    checkpoints: ResNetV1c (the deep stem 32-32-64, ``stem_width=32``, set by the registry) whose strided
    layer3 and layer4 are also dilated (2 and 4, the first blocks at half) behind the JPU; bilinear
    resizing with ``align_corners=False`` everywhere (JPU, PSP pooling, the logits); the JPU's maps
    concatenated as [c2, c3, c4]; EncNet's first conv 3x3; mmseg's ASPP head for ``deeplab``. The heads'
    widths, the aux head and every other layer are the same. EncNet, PSP and DeepLabV3 with the JPU or the
    dilated backbone.

    ``backbone``: another network in place of the ResNet, a Flax module whose ``__call__(images)`` (or
    ``(images, train)``, where it has a ``train`` parameter) returns the four stage outputs ``(c1, c2, c3, c4)``
    (NHWC, any widths; strides 4, 8, 16, 32 for the JPU necks, as ConvNeXt or Swin give them; 4, 8, 8, 8 for
    ``neck='dilated'``; checked). Its parameters are the ``'backbone'`` group (the base learning rate; the
    neck and heads get the multiplier), and the ResNet's own fields (``depth``, ``stem``, ...) must keep their
    defaults.
    """

    num_classes: int
    head: str = "encnet"
    neck: str = "jpu"
    # Backbone: a ResNet built from these fields, or ``backbone`` (see above).
    backbone: nn.Module | None = None
    depth: int = 50
    stage_sizes: Sequence[int] | None = None
    stem: str = "deep"
    stem_width: int = 64
    base_width: int = 64
    output_stride: int | None = None
    # JPU / JPU_X.
    jpu_width: int = 512
    jpu_dilations: Sequence[int] = (1, 2, 4, 8)
    jpux_dilations: Sequence[Sequence[int]] = ((1, 2, 4), (2, 4, 8))
    jpux_groups: int = 32
    # How performance-sensitive ops are computed (same maths; see fastfcn_jax/models/op_choices.py).
    resize_implementation: str = "auto"
    pointwise_implementation: str = "dot"
    depthwise_implementation: str = "auto"
    conv_gradient_implementation: str = "auto"
    dilated_implementation: str = "auto"
    separable_implementation: str = "fused"
    jpu_input_implementation: str = "auto"
    norm_implementation: str = "standard"  # 'folded': variables from batch_norm.fold_batch_norm, inference only
    resized_implementation: str = "low_res"
    loss_logits_implementation: str = "auto"
    small_maps_implementation: str = "auto"
    depthwise_input_grad_implementation: str = "auto"
    depthwise_kernel_grad_implementation: str = "auto"
    loss_gradient_implementation: str = "compute"
    loss_upsample_implementation: str = "auto"
    max_pool_grad_implementation: str = "auto"
    max_pool_implementation: str = "window"
    jpu_depthwise_implementation: str = "branches"
    norm_statistics_implementation: str = "xla"
    # Heads.
    aux: bool = True
    se_loss: bool = True
    head_width: int = 512
    num_codes: int = 32
    aspp_rates: Sequence[int] = (12, 24, 36)
    psp_bins: Sequence[int] = (1, 2, 3, 6)
    dropout: float = 0.1
    dtype: Dtype = jnp.float32
    reference: str = "fastfcn"

    @property
    def align_corners(self) -> bool:
        """How every bilinear resize of this model interpolates (PyTorch's ``align_corners``)."""
        return self.reference != "mmseg"

    @property
    def ops(self) -> OpChoices:
        return OpChoices(
            resize=self.resize_implementation,
            pointwise=self.pointwise_implementation,
            depthwise=self.depthwise_implementation,
            conv_gradient=self.conv_gradient_implementation,
            dilated=self.dilated_implementation,
            separable=self.separable_implementation,
            jpu_input=self.jpu_input_implementation,
            norm=self.norm_implementation,
            resized=self.resized_implementation,
            loss_logits=self.loss_logits_implementation,
            small_maps=self.small_maps_implementation,
            depthwise_input_grad=self.depthwise_input_grad_implementation,
            depthwise_kernel_grad=self.depthwise_kernel_grad_implementation,
            loss_gradient=self.loss_gradient_implementation,
            loss_upsample=self.loss_upsample_implementation,
            max_pool_grad=self.max_pool_grad_implementation,
            max_pool=self.max_pool_implementation,
            jpu_depthwise=self.jpu_depthwise_implementation,
            norm_statistics=self.norm_statistics_implementation,
        )

    def _sow(self, name: str, value: jax.Array) -> None:
        self.sow("intermediates", name, value, reduce_fn=_keep_last, init_fn=lambda: None)

    @nn.compact
    def __call__(self, images: jax.Array, train: bool = False, upsample_logits: bool = True) -> dict[str, jax.Array]:
        if images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(f"images must be NHWC [B, H, W, 3], got shape {images.shape}")
        size = images.shape[1:3]
        output_stride = self.output_stride or (8 if self.neck == "dilated" else 32)
        if self.neck != "dilated" and output_stride != 32:
            raise ValueError(f"neck {self.neck!r} expects an output_stride 32 backbone, got {output_stride}")
        check_reference(self.reference, self.head, self.neck, self.stem)

        if self.backbone is None:
            c1, c2, c3, c4 = ResNet(
                stage_sizes=tuple(self.stage_sizes or _stage_sizes(self.depth)),
                stem=self.stem,
                stem_width=self.stem_width,
                base_width=self.base_width,
                output_stride=output_stride,
                # mmseg's R-50-D32: strides (1, 2, 2, 2) with dilations (1, 1, 2, 4); at output stride 8 or 16
                # its dilations are the reference's.
                dilations=(1, 1, 2, 4) if self.reference == "mmseg" and output_stride == 32 else None,
                dtype=self.dtype,
                ops=self.ops,
                name="backbone",
            )(images, train)
        else:
            c1, c2, c3, c4 = self._own_backbone_features(images, train)
        for name, value in zip(("c1", "c2", "c3", "c4"), (c1, c2, c3, c4), strict=True):
            self._sow(name, value)

        if self.neck == "jpu":
            feat = JPU(
                self.jpu_width,
                tuple(self.jpu_dilations),
                dtype=self.dtype,
                ops=self.ops,
                align_corners=self.align_corners,
                c2_first=self.reference == "mmseg",
                name="neck",
            )(c2, c3, c4, train)
            self._sow("jpu", feat)
        elif self.neck == "jpux":
            feat = JPUX(
                self.jpu_width,
                tuple(tuple(d) for d in self.jpux_dilations),
                num_groups=self.jpux_groups,
                dtype=self.dtype,
                ops=self.ops,
                name="neck",
            )(c2, c3, c4, train)
            self._sow("jpu", feat)
        elif self.neck == "dilated":
            feat = c4
        else:
            raise ValueError(f"unknown neck {self.neck!r}; expected one of {NECKS}")

        head_out = self._head()(feat, train)
        head_logits = head_out["logits"].astype(jnp.float32)
        self._sow("head", head_logits)

        def upsample(logits: jax.Array) -> jax.Array:
            # On GPUs the training step takes the heads' logits as they are (upsample_logits=False): its loss
            # resizes them without writing the full-resolution maps (OpChoices.loss_logits).
            return resize_bilinear(logits, size, self.ops.resize, self.align_corners) if upsample_logits else logits

        outputs = {"logits": upsample(head_logits)}
        for name in ("enc_x", "enc_e", "enc_en"):
            if name in head_out:
                self._sow(name, head_out[name])
        if "se_logits" in head_out:
            outputs["se_logits"] = head_out["se_logits"].astype(jnp.float32)

        if self.aux:
            aux_logits = FCNHead(
                self.num_classes, dropout=self.dropout, dtype=self.dtype, ops=self.ops, name="auxiliary_head"
            )(c3, train)["logits"].astype(jnp.float32)
            self._sow("aux_head", aux_logits)
            outputs["aux_logits"] = upsample(aux_logits)
        return outputs

    def _own_backbone_features(self, images: jax.Array, train: bool) -> tuple[jax.Array, ...]:
        if not isinstance(self.backbone, nn.Module):
            given = self.backbone
            kind = "a class: pass an instance, e.g. MyNet()" if isinstance(given, type) else type(given).__name__
            raise ValueError(
                f"backbone must be a Flax module (an instance), got {kind}; an import path 'module:Name' is for "
                "models named {head}_{neck}_custom (create_model, config.model.overrides.backbone)"
            )
        what = f"backbone {type(self.backbone).__name__}"
        resnet_fields = [
            f.name for f in dataclasses.fields(self) if f.name in RESNET_FIELDS and getattr(self, f.name) != f.default
        ]
        if resnet_fields:
            raise ValueError(
                f"{resnet_fields} configure the ResNet backbone, which {what} replaces: set them on it instead"
            )
        # Called with the training flag where its __call__ takes one (BatchNorm, dropout), else with the images.
        takes_train = "train" in inspect.signature(type(self.backbone).__call__).parameters
        features = self.backbone(images, train) if takes_train else self.backbone(images)
        if not isinstance(features, Sequence) or len(features) != 4:
            raise ValueError(f"{what} must return the four stage outputs (c1, c2, c3, c4), got {_describe(features)}")
        for name, feature in zip(("c1", "c2", "c3", "c4"), features, strict=True):
            if not isinstance(feature, jax.Array) or feature.ndim != 4 or feature.shape[0] != images.shape[0]:
                raise ValueError(
                    f"{what}: {name} must be an NHWC array of the batch's {images.shape[0]} images, "
                    f"got {_describe(feature)}"
                )
        # The strides the neck reads the maps at (the JPU resizes c3 and c4 to c2; the dilated neck's head reads
        # c4 as the dilated ResNet's): each side within a pixel of the image's over the stride (floor or ceil).
        strides = (4, 8, 16, 32) if self.neck != "dilated" else (4, 8, 8, 8)
        sizes = [tuple(int(d) for d in f.shape[1:3]) for f in features]
        expected = [tuple(side / stride for side in images.shape[1:3]) for stride in strides]
        if not all(
            abs(a - b) < 1 for size, want in zip(sizes, expected, strict=True) for a, b in zip(size, want, strict=True)
        ):
            raise ValueError(
                f"{what}: the {self.neck} neck reads c1..c4 at strides {strides} of the image, so for "
                f"{tuple(images.shape[1:3])} images at about {[tuple(round(v, 1) for v in e) for e in expected]}, "
                f"got {sizes} (NHWC: [batch, height, width, channels])"
            )
        return tuple(features)

    def _head(self) -> nn.Module:
        common = dict(dropout=self.dropout, dtype=self.dtype, ops=self.ops, name="decode_head")
        if self.head == "encnet":
            return EncNetHead(
                self.num_classes,
                width=self.head_width,
                num_codes=self.num_codes,
                # The reference's EncHead: a 1x1 conv5 after JPU, a 3x3 one on the dilated c4; mmseg's
                # bottleneck is 3x3 after either.
                conv5_kernel=3 if self.neck == "dilated" or self.reference == "mmseg" else 1,
                se_loss=self.se_loss,
                **common,
            )
        if self.head == "psp":
            return PSPHead(self.num_classes, bins=tuple(self.psp_bins), align_corners=self.align_corners, **common)
        if self.head == "deeplab" and self.reference == "mmseg":
            return MMSegASPPHead(self.num_classes, rates=tuple(self.aspp_rates), **common)
        if self.head == "deeplab":
            return DeepLabV3Head(self.num_classes, rates=tuple(self.aspp_rates), **common)
        if self.head == "fcn":
            return FCNHead(self.num_classes, **common)
        raise ValueError(f"unknown head {self.head!r}; expected one of {HEADS}")


def check_reference(reference: str, head: str, neck: str, stem: str = "deep") -> None:
    """Raises ValueError where ``reference`` does not name a design, or names one without such a model."""
    if reference not in REFERENCES:
        raise ValueError(f"reference must be one of {REFERENCES}, got {reference!r}")
    if reference == "mmseg" and (head not in MMSEG_HEADS or neck not in MMSEG_NECKS):
        raise ValueError(
            f"reference='mmseg' covers mmsegmentation's FastFCN models and their dilated twins, "
            f"{{{','.join(MMSEG_HEADS)}}}_{{{','.join(MMSEG_NECKS)}}}_*, not {head}_{neck}: it has no JPU_X, and its "
            "FCN head is another design"
        )
    if reference == "mmseg" and stem != "deep":
        raise ValueError("reference='mmseg' models have the deep stem (ResNetV1c)")


def _describe(value: Any) -> str:
    if hasattr(value, "shape"):
        return f"{type(value).__name__} of shape {tuple(value.shape)}"
    if isinstance(value, Sequence):
        return f"{type(value).__name__} of {len(value)}"
    return type(value).__name__


def _stage_sizes(depth: int) -> tuple[int, ...]:
    if depth not in STAGE_SIZES:
        raise ValueError(f"unknown ResNet depth {depth}; expected one of {sorted(STAGE_SIZES)}")
    return STAGE_SIZES[depth]

"""Where each Flax variable of a :class:`Segmenter` lives in a PyTorch state_dict.

The mapping walks the Flax variable tree (so every model variable gets exactly one source key) and
names the PyTorch module that holds it in the official FastFCN code (``pretrained.``, ``jpu.``,
``head.``, ``auxlayer.``; ``../shared/reference/FASTFCN.md`` section 7), or for ``reference='mmseg'`` models
in mmsegmentation's (``backbone.``, ``neck.``, ``decode_head.``, ``auxiliary_head.``, from mmcv's module
names: ``ConvModule`` holds ``conv`` and ``bn``), then the tensor inside it.
"""

from __future__ import annotations

import re
from collections.abc import Callable

import numpy as np

# (Flax module path regex, PyTorch module prefix template) per part of the model. Templates use the
# regex's groups (or are functions of the match). The first match wins.
_DEEP_STEM = [
    (r"backbone/stem1/conv", "pretrained.conv1.0"),
    (r"backbone/stem1/bn", "pretrained.conv1.1"),
    (r"backbone/stem2/conv", "pretrained.conv1.3"),
    (r"backbone/stem2/bn", "pretrained.conv1.4"),
    (r"backbone/stem3/conv", "pretrained.conv1.6"),
    (r"backbone/stem3/bn", "pretrained.bn1"),
]
_STANDARD_STEM = [
    (r"backbone/stem1/conv", "pretrained.conv1"),
    (r"backbone/stem1/bn", "pretrained.bn1"),
]
_BACKBONE = [
    (r"backbone/layer(\d)_(\d+)/conv(\d)/conv", r"pretrained.layer\1.\2.conv\3"),
    (r"backbone/layer(\d)_(\d+)/conv(\d)/bn", r"pretrained.layer\1.\2.bn\3"),
    (r"backbone/layer(\d)_(\d+)/downsample/conv", r"pretrained.layer\1.\2.downsample.0"),
    (r"backbone/layer(\d)_(\d+)/downsample/bn", r"pretrained.layer\1.\2.downsample.1"),
]
_SEPARABLE = [  # inside the JPU (neck/...) or a JUM unit of JPU_X (neck/jum_N/...)
    (r"neck(?P<jum>/jum_\d)?/dilation(\d)/depthwise", r"jpu\g<jum>.dilation\2.0.conv1"),
    (r"neck(?P<jum>/jum_\d)?/dilation(\d)/depthwise_norm", r"jpu\g<jum>.dilation\2.0.bn"),
    (r"neck(?P<jum>/jum_\d)?/dilation(\d)/pointwise", r"jpu\g<jum>.dilation\2.0.pointwise"),
    (r"neck(?P<jum>/jum_\d)?/dilation(\d)/pointwise_norm", r"jpu\g<jum>.dilation\2.1"),
]
_NECK = [
    (r"neck/(conv\d)/conv", r"jpu.\1.0"),
    (r"neck/(conv\d)/bn", r"jpu.\1.1"),
    (r"neck/(jum_\d)/(conv_[lh])/conv", r"jpu.\1.\2.0"),
    (r"neck/(jum_\d)/(conv_[lh])/bn", r"jpu.\1.\2.1"),
]
_FCN_LIKE = [  # FCNHead: conv5 = [conv, BN, ReLU, Dropout2d, conv]
    (r"{h}/conv5/conv", "{t}.conv5.0"),
    (r"{h}/conv5/bn", "{t}.conv5.1"),
    (r"{h}/classifier/conv", "{t}.conv5.4"),
]
_HEADS = {
    "fcn": [(p.format(h="decode_head"), t.format(t="head")) for p, t in _FCN_LIKE],
    "psp": [  # conv5 = [PyramidPooling, conv, BN, ReLU, Dropout2d, conv]
        (r"decode_head/pool(\d)/conv", r"head.conv5.0.conv\1.0"),
        (r"decode_head/pool(\d)/bn", r"head.conv5.0.conv\1.1"),
        (r"decode_head/conv5/conv", "head.conv5.1"),
        (r"decode_head/conv5/bn", "head.conv5.2"),
        (r"decode_head/classifier/conv", "head.conv5.5"),
    ],
    "deeplab": [
        (r"decode_head/aspp_(b\d)/conv", r"head.aspp.\1.0"),
        (r"decode_head/aspp_(b\d)/bn", r"head.aspp.\1.1"),
        (r"decode_head/aspp_pool/conv", "head.aspp.b4.gap.1"),
        (r"decode_head/aspp_pool/bn", "head.aspp.b4.gap.2"),
        (r"decode_head/aspp_project/conv", "head.aspp.project.0"),
        (r"decode_head/aspp_project/bn", "head.aspp.project.1"),
        (r"decode_head/block/conv", "head.block.0"),
        (r"decode_head/block/bn", "head.block.1"),
        (r"decode_head/classifier/conv", "head.block.4"),
    ],
    "encnet": [
        (r"decode_head/conv5/conv", "head.conv5.0"),
        (r"decode_head/conv5/bn", "head.conv5.1"),
        (r"decode_head/enc_conv/conv", "head.encmodule.encoding.0"),
        (r"decode_head/enc_conv/bn", "head.encmodule.encoding.1"),
        (r"decode_head/encoding", "head.encmodule.encoding.3"),
        (r"decode_head/enc_bn", "head.encmodule.encoding.4"),
        (r"decode_head/fc", "head.encmodule.fc.0"),
        (r"decode_head/se_classifier", "head.encmodule.selayer"),
        (r"decode_head/classifier/conv", "head.conv6.1"),
    ],
}
_AUX = [(p.format(h="auxiliary_head"), t.format(t="auxlayer")) for p, t in _FCN_LIKE]


def _minus_one(template: str) -> Callable[[re.Match], str]:
    """A template whose ``{i}`` is the match's group 1 less one: Flax's 1-based names, PyTorch's indices."""
    return lambda match: template.format(i=int(match[1]) - 1)


# mmsegmentation (ResNetV1c backbone, JPU neck, PSPHead / ASPPHead / EncHead, FCNHead aux).
_MMSEG_BACKBONE = [
    (r"backbone/stem1/conv", "backbone.stem.0"),
    (r"backbone/stem1/bn", "backbone.stem.1"),
    (r"backbone/stem2/conv", "backbone.stem.3"),
    (r"backbone/stem2/bn", "backbone.stem.4"),
    (r"backbone/stem3/conv", "backbone.stem.6"),
    (r"backbone/stem3/bn", "backbone.stem.7"),
    *[(pattern, template.replace("pretrained.", "backbone.")) for pattern, template in _BACKBONE],
]
_MMSEG_NECK = [  # conv_layers follow the inputs (c2, c3, c4); the Flax JPU names its convs by stage
    (r"neck/conv3/(conv|bn)", r"neck.conv_layers.0.0.\1"),
    (r"neck/conv4/(conv|bn)", r"neck.conv_layers.1.0.\1"),
    (r"neck/conv5/(conv|bn)", r"neck.conv_layers.2.0.\1"),
    (r"neck/dilation(\d)/depthwise", _minus_one("neck.dilation_layers.{i}.0.depthwise_conv.conv")),
    (r"neck/dilation(\d)/depthwise_norm", _minus_one("neck.dilation_layers.{i}.0.depthwise_conv.bn")),
    (r"neck/dilation(\d)/pointwise", _minus_one("neck.dilation_layers.{i}.0.pointwise_conv.conv")),
    (r"neck/dilation(\d)/pointwise_norm", _minus_one("neck.dilation_layers.{i}.0.pointwise_conv.bn")),
]
_MMSEG_HEADS = {
    "psp": [
        (r"decode_head/pool(\d)/(conv|bn)", lambda m: f"decode_head.psp_modules.{int(m[1]) - 1}.1.{m[2]}"),
        (r"decode_head/conv5/(conv|bn)", r"decode_head.bottleneck.\1"),
    ],
    "deeplab": [
        (r"decode_head/aspp_pool/(conv|bn)", r"decode_head.image_pool.1.\1"),
        (r"decode_head/aspp_b(\d)/(conv|bn)", r"decode_head.aspp_modules.\1.\2"),
        (r"decode_head/bottleneck/(conv|bn)", r"decode_head.bottleneck.\1"),
    ],
    "encnet": [
        (r"decode_head/conv5/(conv|bn)", r"decode_head.bottleneck.\1"),
        (r"decode_head/enc_conv/(conv|bn)", r"decode_head.enc_module.encoding_project.\1"),
        (r"decode_head/encoding", "decode_head.enc_module.encoding.0"),
        (r"decode_head/enc_bn", "decode_head.enc_module.encoding.1"),
        (r"decode_head/fc", "decode_head.enc_module.fc.0"),
        (r"decode_head/se_classifier", "decode_head.se_layer"),
    ],
}
_MMSEG_CLASSIFIERS = [
    (r"decode_head/classifier/conv", "decode_head.conv_seg"),
    (r"auxiliary_head/conv5/(conv|bn)", r"auxiliary_head.convs.0.\1"),
    (r"auxiliary_head/classifier/conv", "auxiliary_head.conv_seg"),
]

# Flax variable leaf name -> PyTorch tensor name, per kind of module.
_LEAF_NORM = {"scale": "weight", "bias": "bias", "mean": "running_mean", "var": "running_var"}

# Modules whose keys the checkpoints carry but the model does not use (mmseg's data preprocessor holds the
# normalisation, which this library does in its input pipeline).
UNUSED_SOURCE_KEY = re.compile(r"(^|\.)num_batches_tracked$|^pretrained\.fc\.|^data_preprocessor\.")


def _module_rules(head: str, stem: str, reference: str = "fastfcn") -> list[tuple[str, str | Callable]]:
    if reference == "mmseg":
        return [*_MMSEG_BACKBONE, *_MMSEG_NECK, *_MMSEG_HEADS.get(head, []), *_MMSEG_CLASSIFIERS]
    stem_rules = _DEEP_STEM if stem == "deep" else _STANDARD_STEM
    return [*_SEPARABLE, *stem_rules, *_BACKBONE, *_NECK, *_HEADS[head], *_AUX]


def torch_module(flax_module: str, head: str, stem: str = "deep", reference: str = "fastfcn") -> str:
    """PyTorch module prefix of a Flax module path in the checkpoints of ``reference``'s code
    (``'neck/conv5/conv'`` -> ``'jpu.conv5.0'``; mmseg: ``'neck.conv_layers.2.0.conv'``)."""
    for pattern, template in _module_rules(head, stem, reference):
        match = re.fullmatch(pattern, flax_module)
        if match:
            name = template(match) if callable(template) else match.expand(template)
            return name.replace("/", ".")
    raise KeyError(
        f"no PyTorch counterpart known for Flax module {flax_module!r} (head {head!r}, stem {stem!r}, "
        f"reference {reference!r})"
    )


def to_flax_layout(leaf: str, flax_module: str, value: np.ndarray) -> np.ndarray:
    """Converts one PyTorch tensor to the Flax layout of the variable ``flax_module/leaf``."""
    if leaf == "kernel":
        if value.ndim == 4:  # conv OIHW -> HWIO; depthwise [C, 1, k, k] -> [k, k, 1, C] likewise
            return np.transpose(value, (2, 3, 1, 0))
        if value.ndim == 2:  # Linear [out, in] -> [in, out]
            return value.T
    return value


def torch_key(
    collection: str, flax_path: tuple[str, ...], head: str, stem: str = "deep", reference: str = "fastfcn"
) -> tuple[str, Callable]:
    """PyTorch state_dict key of a Flax variable and the function converting its layout."""
    module, leaf = "/".join(flax_path[:-1]), flax_path[-1]
    prefix = torch_module(module, head, stem, reference)
    if collection == "batch_stats" or leaf in ("scale", "mean", "var") and not module.endswith("/encoding"):
        name = _LEAF_NORM[leaf]
    elif leaf == "kernel":
        name = "weight"
    else:  # bias, Encoding's codewords and scale
        name = leaf
    return f"{prefix}.{name}", lambda value: to_flax_layout(leaf, module, value)

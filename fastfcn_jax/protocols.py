"""The test protocols: the reference's (FastFCN ``test.py`` + ``MultiEvalModule``, FASTFCN.md section 4.2:
which scales, flip, window size and stride, and the window grid over a scaled image) and mmsegmentation's
(``mmseg``: its keep-ratio test resize, the whole image in one pass, softmax averaged over the passes). Plain
Python, imported by ``config`` (validation) and ``evaluate`` (the runner) alike: no jax, no ml_collections.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from collections.abc import Sequence
from typing import Any

# mode=eval / predict test protocols (make_protocol) and the words config.evaluation.flip takes.
PROTOCOLS = ("single_scale", "multi_scale", "whole", "mmseg", "mmseg_multi_scale")
MMSEG_PROTOCOLS = ("mmseg", "mmseg_multi_scale")
WHOLE_PROTOCOLS = ("whole", *MMSEG_PROTOCOLS)  # one pass per scaled image, no windows
FLIP_WORDS = {"true": True, "yes": True, "1": True, "false": False, "no": False, "0": False}
MULTI_SCALES = (0.5, 0.75, 1.0, 1.25, 1.5, 1.75)
CITYSCAPES_EXTRA_SCALES = (2.0, 2.25)  # the reference's test.py adds these for Cityscapes
WHOLE_MULTIPLE = 32  # 'whole' pads each side of a scaled image to this multiple (the network's stride)
# mmsegmentation's test resize, ``Resize(scale=(long, short), keep_ratio=True)``, per dataset
# (``configs/_base_/datasets/{cityscapes,ade20k,pascal_context_59,pascal_voc12,pascal_voc12_aug}.py``).
MMSEG_TEST_SCALES = {
    "cityscapes": (2048, 1024),
    "ade20k": (2048, 512),
    "pcontext": (520, 520),
    "pascal_voc": (2048, 512),
    "pascal_aug": (2048, 512),
}


@dataclasses.dataclass(frozen=True)
class Protocol:
    """How one image becomes class scores.

    Attributes:
      scales: long side of scale s is ``ceil(base_size * s)``.
      flip: add the logits of the horizontally flipped window (flipped back) before ``exp``.
      base_size: long side at scale 1 in pixels (the reference's 520).
      crop_size: window side in pixels (the reference's 480).
      stride: window stride in pixels (the reference's ``int(crop_size * 2/3)`` = 320).
      whole: one pass per scaled image instead of sliding windows, each side padded to a multiple of
        ``pad_multiple``.
      pad_multiple: ``whole``'s padding: 32 (``whole``), 1 (``mmseg``: none, as mmsegmentation tests).
      test_scale: mmsegmentation's keep-ratio test scale (long, short): at scale (ratio) ``s`` the image is
        rescaled so that it fits ``(int(long * s), int(short * s))`` (:func:`keep_ratio_size`) instead of
        having its long side at ``ceil(base_size * s)``. () for the reference's protocols.
      softmax: mmsegmentation's merge: each pass's logits (the flipped one separately) resized back to the
        image, softmaxed, averaged. False: the reference's ``exp`` of the logits (plus the flipped
        window's), averaged over overlapping windows, resized back and summed over scales.
      align_corners: how the images are rescaled and the scores resized back to them (PyTorch's bilinear
        ``align_corners``): the reference's True; the model's own convention where it has another
        (``reference='mmseg'`` models: False), as evaluation and prediction set it.
      image_resize: how the images are rescaled where that is not ``align_corners``: ``'half_pixel'`` (the mmseg
        protocols: mmsegmentation resizes images with OpenCV, half-pixel centres, whatever the model) or ''
        (as ``align_corners``).
    """

    scales: tuple[float, ...]
    flip: bool
    base_size: int
    crop_size: int
    stride: int
    whole: bool = False
    pad_multiple: int = WHOLE_MULTIPLE
    test_scale: tuple[int, ...] = ()
    softmax: bool = False
    align_corners: bool = True
    image_resize: str = ""

    @property
    def image_align_corners(self) -> bool:
        """The bilinear convention of the images' rescaling."""
        return False if self.image_resize == "half_pixel" else self.align_corners

    def long_side(self, scale: float) -> int:
        return int(math.ceil(self.base_size * scale))

    def scaled_size(self, height: int, width: int, scale: float) -> tuple[int, int]:
        """The size a ``height`` x ``width`` image is rescaled to at ``scale``."""
        if self.test_scale:
            return keep_ratio_size(height, width, self.test_scale, scale)
        return scaled_size(height, width, self.long_side(scale))

    def whole_shape(self, height: int, width: int) -> tuple[int, int]:
        """``whole``'s network input for a scaled image of ``height`` x ``width``: each side padded up to a
        multiple of ``pad_multiple``."""
        return padded_to(height, self.pad_multiple), padded_to(width, self.pad_multiple)

    def canvas_side(self, scale: float) -> int:
        """Sliding windows: side of the square canvas that holds every window grid of ``scale`` (fixed per
        protocol). ``whole`` has a canvas of each image's own shape."""
        if self.whole:
            raise ValueError("'whole' protocols have no fixed canvas: each image's scaled shape is its canvas")
        windows = window_count(self.long_side(scale), self.crop_size, self.stride)
        return (windows - 1) * self.stride + self.crop_size

    def describe(self) -> str:
        """The settings that decide the result, for messages."""
        padding = "unpadded" if self.pad_multiple == 1 else f"padded to a multiple of {self.pad_multiple}"
        if self.test_scale:
            return (
                f"test scale {self.test_scale} x ratios {self.scales}, flip {self.flip}, whole image {padding}, "
                "softmax averaged"
            )
        words = f"scales {self.scales}, flip {self.flip}, base {self.base_size}, "
        if self.whole:
            return words + f"whole image {padding}"
        return words + f"crop {self.crop_size}, stride {self.stride}"

    def canvas_pixels_bound(self, scale: float) -> int:
        """At most how many pixels one image's canvas of ``scale`` has (memory planning)."""
        if not self.whole:
            return self.canvas_side(scale) ** 2
        if self.test_scale:
            long, short = (int(side * scale) for side in (max(self.test_scale), min(self.test_scale)))
            return padded_to(long, self.pad_multiple) * padded_to(short, self.pad_multiple)
        return padded_to(self.long_side(scale), self.pad_multiple) ** 2


def make_protocol(
    name: str,
    *,
    base_size: int,
    crop_size: int,
    scales: Sequence[float] = (),
    flip: bool | str | None = None,
    stride_ratio: float = 2.0 / 3.0,
    dataset: str = "",
    test_scale: Sequence[int] = (),
    pad_multiple: int = 0,
) -> Protocol:
    """The named protocol: ``single_scale`` (scale 1, no flip), ``multi_scale`` (0.5..1.75, + 2.0, 2.25 for
    Cityscapes, with flip), ``whole``, or mmsegmentation's ``mmseg`` (ratio 1, no flip) and ``mmseg_multi_scale``
    (ratios 0.5..1.75, with flip) at ``test_scale`` (default: mmsegmentation's for ``dataset``,
    :data:`MMSEG_TEST_SCALES`); ``scales`` / ``flip`` override the protocol's defaults, ``pad_multiple`` (> 0) the
    padding of the whole-image protocols (32 for ``whole``, 1 = none for the ``mmseg`` ones)."""
    if name not in PROTOCOLS:
        raise ValueError(f"evaluation.protocol={name!r}: must be one of {PROTOCOLS}")
    if base_size <= 0 or crop_size <= 0:
        raise ValueError(f"evaluation base_size={base_size} / crop_size={crop_size} must be positive")
    if not 0 < stride_ratio <= 1:
        raise ValueError(f"evaluation.stride_ratio={stride_ratio}: must be in (0, 1]")
    if int(crop_size * stride_ratio) < 1:
        raise ValueError(
            f"evaluation.stride_ratio={stride_ratio}: the window stride int({crop_size} * {stride_ratio}) is 0 pixels"
        )
    mmseg = name in MMSEG_PROTOCOLS
    multi = name in ("multi_scale", "mmseg_multi_scale")
    options = {"test_scale": test_scale, "pad_multiple": pad_multiple}
    for option, message in option_errors(name, **options).items():
        raise ValueError(f"evaluation.{option}={options[option]}: {message}")
    if mmseg:
        test_scale = tuple(test_scale) or MMSEG_TEST_SCALES.get(dataset, ())
        if not test_scale:
            raise ValueError(
                f"evaluation.protocol={name!r} on dataset {dataset!r}: mmsegmentation has no test scale for it; "
                "give one as (long, short), e.g. --config.evaluation.test_scale='(2048, 512)'"
            )
    if not scales:
        scales = MULTI_SCALES if multi else (1.0,)
        if name == "multi_scale" and dataset == "cityscapes":
            scales = MULTI_SCALES + CITYSCAPES_EXTRA_SCALES
    if flip is None or (isinstance(flip, str) and flip.lower() == "auto"):
        flip = multi
    elif isinstance(flip, str):
        if flip.lower() not in FLIP_WORDS:
            raise ValueError(f"evaluation.flip={flip!r}: must be 'auto', 'true' or 'false'")
        flip = FLIP_WORDS[flip.lower()]
    if any(s <= 0 for s in scales):
        raise ValueError(f"evaluation.scales={tuple(scales)}: scales must be positive")
    return Protocol(
        scales=tuple(float(s) for s in scales),
        flip=bool(flip),
        base_size=int(base_size),
        crop_size=int(crop_size),
        stride=int(crop_size * stride_ratio),
        whole=name in WHOLE_PROTOCOLS,
        pad_multiple=int(pad_multiple) or (1 if mmseg else WHOLE_MULTIPLE),
        test_scale=tuple(int(side) for side in test_scale) if mmseg else (),
        softmax=mmseg,
        image_resize="half_pixel" if mmseg else "",
    )


def option_errors(name: str, test_scale: Any = (), pad_multiple: Any = 0) -> dict[str, str]:
    """What is wrong with protocol ``name``'s ``test_scale`` and ``pad_multiple`` options: {option: message}
    (config validation and :func:`make_protocol` alike)."""
    errors = {}
    if isinstance(pad_multiple, bool) or not isinstance(pad_multiple, numbers.Integral) or pad_multiple < 0:
        errors["pad_multiple"] = "must be an integer >= 0 (0 = the protocol's own)"
    elif pad_multiple and name not in WHOLE_PROTOCOLS:
        errors["pad_multiple"] = (
            f"only the whole-image protocols ({', '.join(WHOLE_PROTOCOLS)}) pad the image; {name!r} runs windows"
        )

    def positive_integer(side: Any) -> bool:
        number = isinstance(side, numbers.Real) and not isinstance(side, bool) and math.isfinite(side)
        return number and int(side) == side > 0

    if not isinstance(test_scale, Sequence) or isinstance(test_scale, str):
        errors["test_scale"] = "must be () or two positive integers (long, short), e.g. '(2048, 512)'"
    elif test_scale and (len(test_scale) != 2 or not all(map(positive_integer, test_scale))):
        errors["test_scale"] = "must be two positive integers (long, short), e.g. '(2048, 512)'"
    elif test_scale and name not in MMSEG_PROTOCOLS:
        errors["test_scale"] = (
            f"only the mmseg protocols ({', '.join(MMSEG_PROTOCOLS)}) take a test scale; {name!r} scales the long "
            "side to base_size"
        )
    return errors


def padded_to(size: int, multiple: int) -> int:
    """``size`` rounded up to a multiple of ``multiple``."""
    return -(-size // multiple) * multiple


def keep_ratio_size(height: int, width: int, test_scale: Sequence[int], ratio: float = 1.0) -> tuple[int, int]:
    """mmsegmentation's test resize at ``ratio``: mmcv's ``imrescale`` to the scale ``(int(long * ratio),
    int(short * ratio))``: the largest size whose long side fits the first and short side the second,
    ``int(side * factor + 0.5)``. The ratio multiplies the test scale as mmsegmentation 0.x's
    ``MultiScaleFlipAug(img_scale, img_ratios)``, which produced its model zoo's multi-scale numbers (1.x's
    ``TestTimeAug`` multiplies the image's own size instead)."""
    long, short = int(max(test_scale) * ratio), int(min(test_scale) * ratio)
    factor = min(long / max(height, width), short / min(height, width))
    return max(1, int(height * factor + 0.5)), max(1, int(width * factor + 0.5))


def scaled_size(height: int, width: int, long_side: int) -> tuple[int, int]:
    """The reference's resized size: long side = ``long_side``, short side ``int(short * long / long0 + 0.5)``."""
    if height > width:
        return long_side, max(1, int(1.0 * width * long_side / height + 0.5))
    return max(1, int(1.0 * height * long_side / width + 0.5)), long_side


def window_count(size: int, crop: int, stride: int) -> int:
    """Windows along one side of length ``size`` once padded to at least ``crop``: ``ceil((size-crop)/stride)+1``."""
    return int(math.ceil(1.0 * (max(size, crop) - crop) / stride)) + 1


def window_origins(height: int, width: int, crop: int, stride: int) -> list[tuple[int, int]]:
    """Top-left corners of the reference's window grid over a ``height`` x ``width`` scaled image."""
    rows, cols = window_count(height, crop, stride), window_count(width, crop, stride)
    return [(r * stride, c * stride) for r in range(rows) for c in range(cols)]

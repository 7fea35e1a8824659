"""The reference's test protocols (FastFCN ``test.py`` + ``MultiEvalModule``, FASTFCN.md section 4.2): which
scales, flip, window size and stride, and the window grid over a scaled image. Plain Python, imported by
``config`` (validation) and ``evaluate`` (the runner) alike: no jax, no ml_collections.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

# mode=eval / predict test protocols (make_protocol) and the words config.evaluation.flip takes.
PROTOCOLS = ("single_scale", "multi_scale", "whole")
FLIP_WORDS = {"true": True, "yes": True, "1": True, "false": False, "no": False, "0": False}
MULTI_SCALES = (0.5, 0.75, 1.0, 1.25, 1.5, 1.75)
CITYSCAPES_EXTRA_SCALES = (2.0, 2.25)  # the reference's test.py adds these for Cityscapes
WHOLE_MULTIPLE = 32  # 'whole' pads each side of a scaled image to this multiple (the network's stride)


@dataclasses.dataclass(frozen=True)
class Protocol:
    """How one image becomes class scores.

    Attributes:
      scales: long side of scale s is ``ceil(base_size * s)``.
      flip: add the logits of the horizontally flipped window (flipped back) before ``exp``.
      base_size: long side at scale 1 in pixels (the reference's 520).
      crop_size: window side in pixels (the reference's 480).
      stride: window stride in pixels (the reference's ``int(crop_size * 2/3)`` = 320).
      whole: one pass per scaled image instead of sliding windows, each side padded to a multiple of 32.
      align_corners: how the images are rescaled and the scores resized back to them (PyTorch's bilinear
        ``align_corners``): the reference's True; the model's own convention where it has another
        (``reference='mmseg'`` models: False), as evaluation and prediction set it.
    """

    scales: tuple[float, ...]
    flip: bool
    base_size: int
    crop_size: int
    stride: int
    whole: bool = False
    align_corners: bool = True

    def long_side(self, scale: float) -> int:
        return int(math.ceil(self.base_size * scale))

    def window_side(self, scale: float) -> int:
        """Longest side of the network input at ``scale`` (sliding windows: their side)."""
        if self.whole:
            return whole_padded(self.long_side(scale))
        return self.crop_size

    def canvas_side(self, scale: float) -> int:
        """Side of the square canvas that holds every window grid of ``scale`` (fixed per protocol)."""
        if self.whole:
            return self.window_side(scale)
        windows = window_count(self.long_side(scale), self.crop_size, self.stride)
        return (windows - 1) * self.stride + self.crop_size


def make_protocol(
    name: str,
    *,
    base_size: int,
    crop_size: int,
    scales: Sequence[float] = (),
    flip: bool | str | None = None,
    stride_ratio: float = 2.0 / 3.0,
    dataset: str = "",
) -> Protocol:
    """The named protocol: ``single_scale`` (scale 1, no flip), ``multi_scale`` (0.5..1.75, + 2.0, 2.25 for
    Cityscapes, with flip) or ``whole``; ``scales`` / ``flip`` override the protocol's defaults."""
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
    if not scales:
        scales = MULTI_SCALES if name == "multi_scale" else (1.0,)
        if name == "multi_scale" and dataset == "cityscapes":
            scales = MULTI_SCALES + CITYSCAPES_EXTRA_SCALES
    if flip is None or (isinstance(flip, str) and flip.lower() == "auto"):
        flip = name == "multi_scale"
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
        whole=name == "whole",
    )


def whole_padded(size: int) -> int:
    """A side of a scaled image as ``whole`` pads it: up to a multiple of :data:`WHOLE_MULTIPLE`."""
    return -(-size // WHOLE_MULTIPLE) * WHOLE_MULTIPLE


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

"""One rule for turning pixels into the uint8 RGB the models see, for files (prediction, dataset building)
and arrays (the Python API): no TensorFlow here, so prediction can use it without it.

- 8-bit images (RGB, grayscale, palette, RGBA, CMYK, ...): as Pillow converts them to RGB (alpha dropped);
- 16-bit images (PIL modes ``I;16*``, as Pillow opens 16-bit PNGs and TIFFs) and uint16 arrays: 0..65535
  scaled to 0..255 (65535 / 257 = 255), so that a 16-bit file and its 8-bit version look alike;
- float images and arrays (PIL mode ``F``): 0..1 when no value exceeds 1 (as matplotlib and scikit-image give
  them), else 0..255; other integers (PIL mode ``I``, int arrays) 0..255. Values outside are clipped.

Files may carry an EXIF orientation tag (phone photos): :func:`exif_orientation` reads it; prediction and
custom folder datasets use such images turned upright (``PIL.ImageOps.exif_transpose``), as photo viewers and
annotation tools show them, and the real datasets' builders as stored, as their references read them.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from PIL import Image

_SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N")
# Picture files by suffix (lower case), as folder datasets and prediction's notes recognise them.
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp")
EXIF_ORIENTATION_TAG = 0x0112


def to_rgb(image: Any) -> np.ndarray:
    """[H, W], [H, W, 1], [H, W, 3] or [H, W, 4] pixels, or a PIL image -> uint8 RGB [H, W, 3] (alpha
    dropped), by the rules of this module."""
    if isinstance(image, Image.Image):
        return pil_to_rgb(image)
    array = np.asarray(image)
    if array.ndim == 2:
        array = array[..., None]
    if array.ndim != 3 or array.shape[-1] not in (1, 3, 4) or min(array.shape[:2]) < 1:
        raise ValueError(f"expected an image [H, W], [H, W, 1], [H, W, 3] or [H, W, 4]; got shape {array.shape}")
    if array.dtype != np.uint8:
        values = array.astype(np.float64)
        if not np.isfinite(values).all():
            raise ValueError("the image has NaN or infinite pixel values")
        if array.dtype == np.uint16:
            values = values * (255.0 / 65535.0)
        elif np.issubdtype(array.dtype, np.floating) and values.max() <= 1.0:
            values = values * 255.0
        array = np.clip(np.rint(values), 0, 255).astype(np.uint8)
    if array.shape[-1] == 1:
        array = np.repeat(array, 3, axis=-1)
    return np.ascontiguousarray(array[..., :3])


def pil_to_rgb(image: Image.Image) -> np.ndarray:
    """uint8 RGB [H, W, 3] of a PIL image, by the rules of this module (Pillow's own ``convert('RGB')``
    saturates 16-bit pixels at 255 and reads a palette image's indices as gray levels only via numpy)."""
    if image.mode in _SIXTEEN_BIT_MODES:
        return to_rgb(np.clip(np.asarray(image), 0, 65535).astype(np.uint16))
    if image.mode in ("I", "F"):
        return to_rgb(np.asarray(image))
    return np.asarray(image.convert("RGB"))


def exif_orientation(image: Image.Image) -> int:
    """The EXIF orientation (1..8) of an opened image: how a viewer turns or mirrors the stored pixels to show
    them (5..8 swap width and height); 1, as stored, without a tag or with a value outside 1..8 (which
    ``PIL.ImageOps.exif_transpose`` ignores too)."""
    value = image.getexif().get(EXIF_ORIENTATION_TAG, 1)
    return value if isinstance(value, int) and 1 <= value <= 8 else 1

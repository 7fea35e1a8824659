"""Joint image + mask transforms in TensorFlow, following the reference's ``_sync_transform`` and
``_val_sync_transform`` (FastFCN ``encoding/datasets/base.py``, ``cityscapes.py``).

Images enter as uint8 [H, W, 3], labels as int32 [H, W] train ids (-1 = ignore). Every random decision is a
stateless draw from one per-example ``seed`` ([2] int), so image and mask always share it and a pipeline is
reproducible. Images are rounded to the uint8 grid after each resampling step, as PIL does.
"""

from __future__ import annotations

import math

import tensorflow as tf

# ImageNet statistics of the reference's transform.Normalize (inputs scaled to [0, 1] first).
MEAN_RGB = (0.485, 0.456, 0.406)
STDDEV_RGB = (0.229, 0.224, 0.225)
_BLUR_TAPS = 7  # Covers +-3 sigma for the reference's radius (= sigma) < 1.


def normalize(image: tf.Tensor) -> tf.Tensor:
    """uint8-valued [..., 3] -> float32 (x / 255 - mean) / std."""
    image = tf.cast(image, tf.float32) / 255.0
    return (image - tf.constant(MEAN_RGB)) / tf.constant(STDDEV_RGB)


def denormalize(image: tf.Tensor) -> tf.Tensor:
    """Inverse of :func:`normalize`, back to [0, 255] float32."""
    return (image * tf.constant(STDDEV_RGB) + tf.constant(MEAN_RGB)) * 255.0


def _resize_pair(image: tf.Tensor, label: tf.Tensor, height: tf.Tensor, width: tf.Tensor):
    """Image bilinear (antialiased when shrinking, like PIL's BILINEAR), mask nearest."""
    size = tf.stack([height, width])
    image = tf.image.resize(tf.cast(image, tf.float32), size, method="bilinear", antialias=True)
    image = tf.clip_by_value(tf.round(image), 0.0, 255.0)
    label = tf.image.resize(label[..., None], size, method="nearest")[..., 0]
    return image, label


def _short_side_size(height: tf.Tensor, width: tf.Tensor, short: tf.Tensor):
    """Output (h, w) with the short side ``short`` and the long side ``int(long * short / short_in)``."""
    long_if_tall = (height * short) // width
    long_if_wide = (width * short) // height
    # Reference train transform: `if h > w` resizes width to short; val uses `if w > h` for height. Both
    # pick the shorter side (ties give the same result), so one rule serves both.
    tall = height > width
    return tf.where(tall, long_if_tall, short), tf.where(tall, short, long_if_wide)


def _rotate_pair(image: tf.Tensor, label: tf.Tensor, degrees: tf.Tensor, pad_label: int):
    """Rotates counter-clockwise about the centre, keeping the size (PIL ``Image.rotate``); fill 0 / ignore."""
    height = tf.cast(tf.shape(image)[0], tf.float32)
    width = tf.cast(tf.shape(image)[1], tf.float32)
    angle = -degrees * math.pi / 180.0
    cos, sin = tf.cos(angle), tf.sin(angle)
    cx, cy = (width - 1) / 2, (height - 1) / 2
    # Output pixel (x, y) samples input (cos x + sin y + a, -sin x + cos y + b): PIL's inverse affine map.
    transform = tf.stack([cos, sin, cx - cos * cx - sin * cy, -sin, cos, cy + sin * cx - cos * cy, 0.0, 0.0])

    def warp(x: tf.Tensor, interpolation: str, fill: float) -> tf.Tensor:
        return tf.raw_ops.ImageProjectiveTransformV3(
            images=x[None],
            transforms=transform[None],
            output_shape=tf.shape(x)[:2],
            fill_value=fill,
            interpolation=interpolation,
            fill_mode="CONSTANT",
        )[0]

    image = tf.clip_by_value(tf.round(warp(image, "BILINEAR", 0.0)), 0.0, 255.0)
    label = warp(tf.cast(label[..., None], tf.float32), "NEAREST", float(pad_label))[..., 0]
    return image, tf.cast(label, tf.int32)


def gaussian_blur(image: tf.Tensor, sigma: tf.Tensor) -> tf.Tensor:
    """Separable Gaussian blur of [H, W, 3] float with standard deviation ``sigma`` pixels (PIL's radius)."""
    offsets = tf.range(_BLUR_TAPS, dtype=tf.float32) - (_BLUR_TAPS // 2)
    kernel = tf.exp(-(offsets**2) / (2.0 * tf.maximum(sigma, 1e-3) ** 2))
    kernel = kernel / tf.reduce_sum(kernel)
    half = _BLUR_TAPS // 2
    # PIL extends edge pixels; symmetric padding is the closest cheap equivalent.
    padded = tf.pad(image[None], [[0, 0], [half, half], [half, half], [0, 0]], mode="SYMMETRIC")
    channels = tf.shape(image)[-1]
    horizontal = tf.tile(tf.reshape(kernel, [1, _BLUR_TAPS, 1, 1]), [1, 1, channels, 1])
    vertical = tf.tile(tf.reshape(kernel, [_BLUR_TAPS, 1, 1, 1]), [1, 1, channels, 1])
    out = tf.nn.depthwise_conv2d(padded, horizontal, [1, 1, 1, 1], "VALID")
    out = tf.nn.depthwise_conv2d(out, vertical, [1, 1, 1, 1], "VALID")
    return tf.clip_by_value(tf.round(out[0]), 0.0, 255.0)


def train_transform(
    image: tf.Tensor,
    label: tf.Tensor,
    seed: tf.Tensor,
    *,
    base_size: int,
    crop_size: int,
    rotate_degrees: float = 0.0,
    pad_label: int = -1,
    blur: bool = True,
    normalise: bool = True,
) -> tuple[tf.Tensor, tf.Tensor]:
    """The reference's training augmentation with one shared random draw.

    Order (``_sync_transform``): flip p=0.5; short side ``randint(int(0.5 base), int(2.0 base))`` (image
    bilinear, mask nearest); [Cityscapes: rotate U(-d, d) degrees]; pad bottom/right to ``crop_size`` (image 0,
    mask ``pad_label``); random ``crop_size`` crop; Gaussian blur p=0.5 with radius U[0, 1); normalise.

    Args:
      image: uint8 [H, W, 3].
      label: int32 [H, W] train ids, -1 = ignore.
      seed: int32/int64 [2] stateless seed of this example.
      blur / normalise: switch off the blur or the mean/std normalisation (tests, visualisation).

    Returns:
      image float32 [crop, crop, 3] (normalised, or 0..255 when ``normalise=False``), label int32 [crop, crop].
    """
    seeds = tf.random.experimental.stateless_split(tf.cast(seed, tf.int64), 8)
    label = tf.cast(label, tf.int32)
    image = tf.cast(image, tf.float32)

    flip = tf.random.stateless_uniform([], seeds[0]) < 0.5
    image = tf.cond(flip, lambda: tf.reverse(image, [1]), lambda: image)
    label = tf.cond(flip, lambda: tf.reverse(label, [1]), lambda: label)

    short = tf.random.stateless_uniform(
        [], seeds[1], minval=int(base_size * 0.5), maxval=int(base_size * 2.0) + 1, dtype=tf.int32
    )
    height, width = tf.shape(image)[0], tf.shape(image)[1]
    out_h, out_w = _short_side_size(height, width, short)
    image, label = _resize_pair(image, label, out_h, out_w)

    if rotate_degrees:
        degrees = tf.random.stateless_uniform([], seeds[2], -rotate_degrees, rotate_degrees)
        image, label = _rotate_pair(image, label, degrees, pad_label)

    pad_h, pad_w = tf.maximum(crop_size - out_h, 0), tf.maximum(crop_size - out_w, 0)
    image = tf.pad(image, [[0, pad_h], [0, pad_w], [0, 0]], constant_values=0.0)
    label = tf.pad(label, [[0, pad_h], [0, pad_w]], constant_values=pad_label)

    height, width = tf.shape(image)[0], tf.shape(image)[1]
    x1 = tf.random.stateless_uniform([], seeds[3], 0, width - crop_size + 1, dtype=tf.int32)
    y1 = tf.random.stateless_uniform([], seeds[4], 0, height - crop_size + 1, dtype=tf.int32)
    image = image[y1 : y1 + crop_size, x1 : x1 + crop_size]
    label = label[y1 : y1 + crop_size, x1 : x1 + crop_size]

    if blur:
        do_blur = tf.random.stateless_uniform([], seeds[5]) < 0.5
        sigma = tf.random.stateless_uniform([], seeds[6])
        image = tf.cond(do_blur, lambda: gaussian_blur(image, sigma), lambda: image)

    image = tf.ensure_shape(image, [crop_size, crop_size, 3])
    label = tf.ensure_shape(label, [crop_size, crop_size])
    return (normalize(image) if normalise else image), label


def centre_crop_offset(size: tf.Tensor, crop_size: int) -> tf.Tensor:
    """``int(round((size - crop) / 2.))`` with Python's round-half-to-even, as the reference computes it."""
    excess = size - crop_size
    half = excess // 2
    # (excess / 2) is k + 0.5 when excess is odd; Python rounds that to the even one of k, k + 1.
    return tf.where((excess % 2 == 1) & (half % 2 == 1), half + 1, half)


def val_transform(
    image: tf.Tensor, label: tf.Tensor, *, crop_size: int, normalise: bool = True
) -> tuple[tf.Tensor, tf.Tensor]:
    """The reference's ``_val_sync_transform``: short side to ``crop_size``, then a centre crop.

    Args: image uint8 [H, W, 3]; label int32 [H, W]. Returns image float32 [crop, crop, 3], label int32.
    """
    height, width = tf.shape(image)[0], tf.shape(image)[1]
    out_h, out_w = _short_side_size(height, width, tf.constant(crop_size))
    image, label = _resize_pair(image, tf.cast(label, tf.int32), out_h, out_w)
    y1, x1 = centre_crop_offset(out_h, crop_size), centre_crop_offset(out_w, crop_size)
    image = tf.ensure_shape(image[y1 : y1 + crop_size, x1 : x1 + crop_size], [crop_size, crop_size, 3])
    label = tf.ensure_shape(label[y1 : y1 + crop_size, x1 : x1 + crop_size], [crop_size, crop_size])
    return (normalize(image) if normalise else image), label

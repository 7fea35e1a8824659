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
    shape = tf.shape(image)
    # As rows of W*3 values: TF's CPU kernels broadcast a [W*3] row fast and a [3] vector over the last axis
    # slowly (3.3 -> 1.2 ms for a 480x480 crop); the arithmetic is unchanged.
    rows = tf.reshape(tf.cast(image, tf.float32), [-1, shape[-2] * 3]) / 255.0
    mean, stddev = tf.tile(tf.constant(MEAN_RGB), shape[-2:-1]), tf.tile(tf.constant(STDDEV_RGB), shape[-2:-1])
    return tf.reshape((rows - mean) / stddev, shape)


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


def _resized_window(
    image: tf.Tensor,
    label: tf.Tensor,
    size: tuple[tf.Tensor, tf.Tensor],
    offset: tuple[tf.Tensor, tf.Tensor],
    window: tuple[tf.Tensor, tf.Tensor],
):
    """The ``window`` at ``offset`` of :func:`_resize_pair` to ``size``, computing only that window.

    A crop of a resized image needs only the crop's output pixels: ADE20K's training scales (short side up to
    1040) resize about 3x the crop's area on average, which made the resize the input pipeline's largest
    cost. The image is the same antialiased bilinear resampling (``tf.image.resize`` runs this op with
    translation 0; the sample positions agree up to float32 rounding, so a pixel may differ by one level
    after rounding); the mask's nearest indices are TF's own formula (``ResizeNearestNeighbor`` with half-pixel
    centres, float32), so it is exact.
    """
    in_h, in_w = tf.shape(image)[0], tf.shape(image)[1]
    out_h, out_w = size
    y1, x1 = offset
    scale = tf.cast(tf.stack([out_h, out_w]), tf.float32) / tf.cast(tf.stack([in_h, in_w]), tf.float32)
    image = tf.raw_ops.ScaleAndTranslate(
        images=tf.cast(image, tf.float32)[None],
        size=tf.stack(window),
        scale=scale,
        translation=-tf.cast(tf.stack([y1, x1]), tf.float32),
        kernel_type="triangle",
        antialias=True,
    )[0]
    image = tf.clip_by_value(tf.round(image), 0.0, 255.0)

    def nearest(start: tf.Tensor, count: tf.Tensor, in_size: tf.Tensor, out_size: tf.Tensor) -> tf.Tensor:
        step = tf.cast(in_size, tf.float32) / tf.cast(out_size, tf.float32)
        position = (tf.cast(tf.range(start, start + count), tf.float32) + 0.5) * step
        return tf.minimum(tf.cast(tf.floor(position), tf.int32), in_size - 1)

    rows = nearest(y1, window[0], in_h, out_h)
    cols = nearest(x1, window[1], in_w, out_w)
    label = tf.gather(tf.gather(label, rows), cols, axis=1)
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
    padded = tf.pad(image, [[half, half], [half, half], [0, 0]], mode="SYMMETRIC")
    height, width = tf.shape(image)[0], tf.shape(image)[1]
    # Weighted sums of shifted slices (TF's CPU depthwise convolution took 4x longer for these 7 taps), in its
    # order: along rows first, then columns (the other order rounds differently).
    rows = sum(kernel[tap] * padded[:, tap : tap + width] for tap in range(_BLUR_TAPS))
    out = sum(kernel[tap] * rows[tap : tap + height] for tap in range(_BLUR_TAPS))
    return tf.clip_by_value(tf.round(out), 0.0, 255.0)


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

    flip = tf.random.stateless_uniform([], seeds[0]) < 0.5
    image = tf.cond(flip, lambda: tf.reverse(image, [1]), lambda: image)
    label = tf.cond(flip, lambda: tf.reverse(label, [1]), lambda: label)

    short = tf.random.stateless_uniform(
        [], seeds[1], minval=int(base_size * 0.5), maxval=int(base_size * 2.0) + 1, dtype=tf.int32
    )
    out_h, out_w = _short_side_size(tf.shape(image)[0], tf.shape(image)[1], short)
    # The crop is drawn over the resized image padded bottom/right to at least crop_size.
    pad_h, pad_w = tf.maximum(crop_size - out_h, 0), tf.maximum(crop_size - out_w, 0)
    x1 = tf.random.stateless_uniform([], seeds[3], 0, out_w + pad_w - crop_size + 1, dtype=tf.int32)
    y1 = tf.random.stateless_uniform([], seeds[4], 0, out_h + pad_h - crop_size + 1, dtype=tf.int32)

    # The crop's part of the resized image: where that is smaller than the crop (y1 = x1 = 0), all of it, and
    # the rest is padding.
    window = (tf.minimum(out_h, crop_size), tf.minimum(out_w, crop_size))
    if rotate_degrees:  # rotation needs the whole resized image
        image, label = _resize_pair(image, label, out_h, out_w)
        degrees = tf.random.stateless_uniform([], seeds[2], -rotate_degrees, rotate_degrees)
        image, label = _rotate_pair(image, label, degrees, pad_label)
        image = image[y1 : y1 + window[0], x1 : x1 + window[1]]
        label = label[y1 : y1 + window[0], x1 : x1 + window[1]]
    else:  # only the window is resampled
        image, label = _resized_window(image, label, (out_h, out_w), (y1, x1), window)
    image = tf.pad(image, [[0, pad_h], [0, pad_w], [0, 0]], constant_values=0.0)
    label = tf.pad(label, [[0, pad_h], [0, pad_w]], constant_values=pad_label)

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
    y1, x1 = centre_crop_offset(out_h, crop_size), centre_crop_offset(out_w, crop_size)
    window = (tf.constant(crop_size), tf.constant(crop_size))
    image, label = _resized_window(image, tf.cast(label, tf.int32), (out_h, out_w), (y1, x1), window)
    image = tf.ensure_shape(image, [crop_size, crop_size, 3])
    label = tf.ensure_shape(label, [crop_size, crop_size])
    return (normalize(image) if normalise else image), label

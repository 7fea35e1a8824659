"""Joint image + mask transforms in TensorFlow, following the reference's ``_sync_transform`` and
``_val_sync_transform`` (FastFCN ``encoding/datasets/base.py``, ``cityscapes.py``).

Images enter as uint8 [H, W, 3] (or encoded, :func:`train_transform_encoded`: a JPEG then decodes only the
region the crop reads), labels as int32 [H, W] train ids (-1 = ignore) or raw values with the dataset's
table. Every random decision is a stateless draw from one per-example ``seed`` ([2] int), so image and mask
always share it and a pipeline is reproducible. Images are rounded to the uint8 grid after each resampling
step, as PIL does.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import tensorflow as tf

# ImageNet statistics of the reference's transform.Normalize (inputs scaled to [0, 1] first).
MEAN_RGB = (0.485, 0.456, 0.406)
STDDEV_RGB = (0.229, 0.224, 0.225)


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


# A region of the source image, rows [y, y + h) and columns [x, x + w): uint8 [h, w, 3].
RegionReader = Callable[[tf.Tensor, tf.Tensor, tf.Tensor, tf.Tensor], tf.Tensor]
# libjpeg decodes a region from the iMCU (up to 16 px) before it and upsamples chroma from the region's own edge,
# so a region's border pixels differ from a full decode by up to 8 levels; decoding this much more on each side
# and cutting it off gives the full decode's pixels exactly (checked on 4:4:4, 4:2:2, 4:2:0 and progressive).
_JPEG_REGION_MARGIN = 16


def decode_rgb(data: tf.Tensor) -> tf.Tensor:
    """Encoded image -> uint8 [H, W, 3]; JPEGs with the accurate IDCT, as PIL decodes them (the reference's
    reader, and predict's): TF's default fast IDCT differs from PIL by up to 6 levels on most pixels of a photo."""
    image = tf.cond(
        tf.io.is_jpeg(data),
        lambda: tf.io.decode_jpeg(data, channels=3, dct_method="INTEGER_ACCURATE"),
        lambda: tf.io.decode_image(data, channels=3, expand_animations=False),
    )
    image.set_shape([None, None, 3])
    return image


def array_regions(image: tf.Tensor) -> RegionReader:
    """Regions of a decoded image."""
    return lambda y, x, h, w: image[y : y + h, x : x + w]


def jpeg_regions(data: tf.Tensor, shape: tf.Tensor | None = None) -> RegionReader:
    """Regions of an encoded JPEG, decoding only (about) the region: the same pixels as :func:`decode_rgb`.
    ``shape``: the JPEG's [H, W, C] if already read (``tf.io.extract_jpeg_shape``)."""
    if shape is None:
        shape = tf.io.extract_jpeg_shape(data, output_type=tf.int32)

    def read(y: tf.Tensor, x: tf.Tensor, h: tf.Tensor, w: tf.Tensor) -> tf.Tensor:
        y0, x0 = tf.maximum(y - _JPEG_REGION_MARGIN, 0), tf.maximum(x - _JPEG_REGION_MARGIN, 0)
        y2 = tf.minimum(y + h + _JPEG_REGION_MARGIN, shape[0])
        x2 = tf.minimum(x + w + _JPEG_REGION_MARGIN, shape[1])
        window = tf.stack([y0, x0, y2 - y0, x2 - x0])
        region = tf.io.decode_and_crop_jpeg(data, window, channels=3, dct_method="INTEGER_ACCURATE")
        return tf.ensure_shape(region[y - y0 : y - y0 + h, x - x0 : x - x0 + w], [None, None, 3])

    return read


def _source_span(start: tf.Tensor, count: tf.Tensor, in_size: tf.Tensor, out_size: tf.Tensor):
    """(first, length) of the input pixels that antialiased bilinear resampling of ``in_size`` to ``out_size``
    reads for outputs [start, start + count): ``ScaleAndTranslate``'s spans (sample (x + 0.5) in / out, support
    max(in / out, 1) pixels each side), plus a pixel for float rounding, clipped to the image."""
    inverse = tf.cast(in_size, tf.float64) / tf.cast(out_size, tf.float64)
    support = tf.maximum(inverse, 1.0)
    first = tf.cast(tf.floor((tf.cast(start, tf.float64) + 0.5) * inverse - support - 0.5), tf.int32) - 1
    end = tf.cast(tf.math.ceil((tf.cast(start + count, tf.float64) - 0.5) * inverse + support - 0.5), tf.int32) + 2
    first, end = tf.clip_by_value(first, 0, in_size - 1), tf.clip_by_value(end, 1, in_size)
    return first, end - first


def _resized_window(
    read: RegionReader,
    shape: tuple[tf.Tensor, tf.Tensor],
    label: tf.Tensor,
    size: tuple[tf.Tensor, tf.Tensor],
    offset: tuple[tf.Tensor, tf.Tensor],
    window: tuple[tf.Tensor, tf.Tensor],
    flip: tf.Tensor | bool = False,
):
    """The ``window`` at ``offset`` of :func:`_resize_pair` to ``size`` of the image of ``shape`` (mirrored
    left-right first when ``flip``), computing only that window from only the source pixels it needs.

    A crop of a resized image needs only the crop's output pixels: ADE20K's training scales (short side up to
    1040) resize about 3x the crop's area on average, which made the resize the input pipeline's largest
    cost; and those pixels need only a part of the source image (``read`` decodes just that part of a JPEG).
    The image is the same antialiased bilinear resampling (``tf.image.resize`` runs this op with translation
    0 over the whole image; the sample positions agree up to float32 rounding, so a pixel may differ by one
    level after rounding); the mask's nearest indices are TF's own formula (``ResizeNearestNeighbor`` with
    half-pixel centres, float32), so it is exact. Flipping the source region instead of the whole image is
    exact too (a region of the mirrored image is the mirrored region).
    """
    in_h, in_w = shape
    out_h, out_w = size
    y1, x1 = offset
    # Source rows and columns of the (mirrored) image that the window reads; a mirrored span's columns in the
    # stored image are counted from the right.
    top, rows_read = _source_span(y1, window[0], in_h, out_h)
    left, cols_read = _source_span(x1, window[1], in_w, out_w)
    stored_left = tf.where(flip, in_w - left - cols_read, left)
    region = read(top, stored_left, rows_read, cols_read)
    region = tf.cond(tf.convert_to_tensor(flip), lambda: tf.reverse(region, [1]), lambda: region)
    scale = tf.cast(tf.stack([out_h, out_w]), tf.float32) / tf.cast(tf.stack([in_h, in_w]), tf.float32)
    origin = tf.cast(tf.stack([top, left]), tf.float32) * scale  # the region's corner in output pixels
    image = tf.raw_ops.ScaleAndTranslate(
        images=region[None],
        size=tf.stack(window),
        scale=scale,
        translation=origin - tf.cast(tf.stack([y1, x1]), tf.float32),
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
    cols = tf.where(flip, in_w - 1 - cols, cols)
    # Columns gathered as rows of the transposed mask: TF's CPU gather copies rows with memcpy and single
    # elements one by one (2.3 against 3.3 ms for a 480-column crop of a 512x683 mask).
    label = tf.transpose(tf.gather(tf.transpose(tf.gather(label, rows)), cols))
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


def gaussian_blur(image: tf.Tensor, radius: tf.Tensor) -> tf.Tensor:
    """PIL's ``ImageFilter.GaussianBlur(radius)`` of a [H, W, 3] float image on the uint8 grid, bit for bit,
    for 0 <= radius < 1 (the reference draws ``random.random()``).

    PIL approximates the Gaussian by three passes of an "extended" box blur along rows, then three along
    columns (Gwosdek et al. 2011): a box of fractional radius ``b`` chosen so that the three passes' variance
    is radius**2. Below radius 1 the box's integer part is 0, so a pass is the 3-tap filter [fw, ww, fw] / 2**24
    in PIL's fixed point, edge pixels repeated, each pass rounded to uint8. A Gaussian sampled at whole pixels
    does not match it: below radius 0.3 it leaves the image unchanged where PIL's blurs.
    """
    radius = tf.convert_to_tensor(radius, tf.float32)
    check = tf.debugging.assert_less(radius, 1.0, message="gaussian_blur: radius must be below 1")
    with tf.control_dependencies([check]):
        far, excess = _box_blur_weights(radius)
    planes = _planes(image)
    for _ in range(3):
        planes = _box_blur_rows(planes, far, excess)
    for _ in range(3):
        planes = _box_blur_columns(planes, far, excess)
    return _interleaved(planes)


def _box_blur_weights(radius: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
    """PIL's fixed-point weights of one box pass for a Gaussian ``radius`` < 1: (``fw``, ``e``) int32 with
    centre weight ``ww = 2**24 - 2 * fw - e``. Computed in float32 and float64 where PIL's C code is."""
    sigma2 = radius * radius / 3.0
    box_length = tf.cast(tf.sqrt(12.0 * tf.cast(sigma2, tf.float64) + 1.0), tf.float32)
    whole = tf.cast(tf.floor((tf.cast(box_length, tf.float64) - 1.0) / 2.0), tf.float32)  # 0 below radius 1
    fraction = (2.0 * whole + 1.0) * (whole * (whole + 1.0) - 3.0 * sigma2)
    fraction = fraction / (6.0 * (sigma2 - (whole + 1.0) * (whole + 1.0)))
    centre = tf.cast(tf.constant(2.0**24, tf.float32) / ((whole + fraction) * 2.0 + 1.0), tf.int64)  # truncated
    far = (2**24 - centre) // 2
    return tf.cast(far, tf.int32), tf.cast(2**24 - centre - 2 * far, tf.int32)


def _box_pass(centre: tf.Tensor, before: tf.Tensor, after: tf.Tensor, far: tf.Tensor, excess: tf.Tensor):
    # PIL's (ww * x + fw * (before + after) + 2**23) >> 24 with ww = 2**24 - 2 * fw - e, rewritten around x so
    # that it stays within int32: fw < 2**24 / 6 below radius 1 and |before + after - 2x| <= 510.
    update = far * (before + after - 2 * centre) - excess * centre + 2**23
    return centre + tf.bitwise.right_shift(update, 24)


# One compiled call per pass: XLA fuses a pass into each of the next one's three shifted reads, so several
# passes in one function recompute the earlier ones. On [3, H, W] planes, where a row's neighbours are
# adjacent: a 480x480 crop takes about 1.9 ms in a tf.data map, against 2.4-3.3 ms on interleaved RGB rows.
@tf.function(jit_compile=True)
def _planes(image: tf.Tensor) -> tf.Tensor:
    """[H, W, 3] float -> [3, H, W] int32."""
    return tf.transpose(tf.cast(image, tf.int32), [2, 0, 1])


@tf.function(jit_compile=True)
def _interleaved(planes: tf.Tensor) -> tf.Tensor:
    """[3, H, W] int32 -> [H, W, 3] float32."""
    return tf.cast(tf.transpose(planes, [1, 2, 0]), tf.float32)


@tf.function(jit_compile=True)
def _box_blur_rows(planes: tf.Tensor, far: tf.Tensor, excess: tf.Tensor) -> tf.Tensor:
    """One box pass along the rows of [3, H, W] planes."""
    before = tf.concat([planes[..., :1], planes[..., :-1]], -1)
    after = tf.concat([planes[..., 1:], planes[..., -1:]], -1)
    return _box_pass(planes, before, after, far, excess)


@tf.function(jit_compile=True)
def _box_blur_columns(planes: tf.Tensor, far: tf.Tensor, excess: tf.Tensor) -> tf.Tensor:
    """One box pass along the columns of [3, H, W] planes."""
    before = tf.concat([planes[:, :1], planes[:, :-1]], 1)
    after = tf.concat([planes[:, 1:], planes[:, -1:]], 1)
    return _box_pass(planes, before, after, far, excess)


@tf.function(jit_compile=True)
def _look_up(label: tf.Tensor, table: tf.Tensor) -> tf.Tensor:
    """``table[label]`` compiled: TF's CPU gather takes about 10 ns a pixel (2.5 ms for a 480x480 crop)."""
    return tf.gather(table, label)


# TF's CPU kernels: 1.3 ms for a 480x480 crop, compiled 0.6 ms (XLA's arithmetic differs from TF's kernels by one
# float32 ulp on most values).
_compiled_normalize = tf.function(normalize, jit_compile=True)


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
    label_lut: tf.Tensor | np.ndarray | None = None,
) -> tuple[tf.Tensor, tf.Tensor]:
    """The reference's training augmentation with one shared random draw.

    Order (``_sync_transform``): flip p=0.5; short side ``randint(int(0.5 base), int(2.0 base))`` (image
    bilinear, mask nearest); [Cityscapes: rotate U(-d, d) degrees]; pad bottom/right to ``crop_size`` (image 0,
    mask ``pad_label``); random ``crop_size`` crop; Gaussian blur p=0.5 with radius U[0, 1); normalise.

    Args:
      image: uint8 [H, W, 3].
      label: int32 [H, W] train ids, -1 = ignore; or, with ``label_lut``, the dataset's raw values (any
        integer dtype), mapped by ``label_lut[raw]`` after the crop (over the crop's pixels only).
      seed: int32/int64 [2] stateless seed of this example.
      blur / normalise: switch off the blur or the mean/std normalisation (tests, visualisation).
      label_lut: int32 [R], raw value -> train id (``DatasetInfo.label_lut``); raw values must be < R.

    Returns:
      image float32 [crop, crop, 3] (normalised, or 0..255 when ``normalise=False``), label int32 [crop, crop].
    """
    shape = (tf.shape(image)[0], tf.shape(image)[1])
    table, options = _crop_options(base_size, crop_size, rotate_degrees, pad_label, label_lut)
    seeds = _draws(seed)
    image, label = _padded_crop(array_regions(image), shape, label, seeds, **options)
    return _finish(image, label, seeds, crop_size=crop_size, blur=blur, normalise=normalise, table=table)


def train_transform_encoded(
    data: tf.Tensor,
    label: tf.Tensor,
    seed: tf.Tensor,
    *,
    base_size: int,
    crop_size: int,
    rotate_degrees: float = 0.0,
    pad_label: int = -1,
    blur: bool = True,
    normalise: bool = True,
    label_lut: tf.Tensor | np.ndarray | None = None,
) -> tuple[tf.Tensor, tf.Tensor]:
    """:func:`train_transform` of the image encoded in ``data`` (string scalar), decoded by
    :func:`decode_rgb`: the same pixels, but a JPEG decodes only the part the crop reads (about half of an
    ADE20K image on average)."""
    table, options = _crop_options(base_size, crop_size, rotate_degrees, pad_label, label_lut)
    seeds = _draws(seed)

    def from_jpeg() -> tuple[tf.Tensor, tf.Tensor]:
        shape = tf.io.extract_jpeg_shape(data, output_type=tf.int32)
        return _padded_crop(jpeg_regions(data, shape), (shape[0], shape[1]), label, seeds, **options)

    def decoded() -> tuple[tf.Tensor, tf.Tensor]:
        image = decode_rgb(data)
        return _padded_crop(array_regions(image), (tf.shape(image)[0], tf.shape(image)[1]), label, seeds, **options)

    image, label = tf.cond(tf.io.is_jpeg(data), from_jpeg, decoded)
    return _finish(image, label, seeds, crop_size=crop_size, blur=blur, normalise=normalise, table=table)


def _crop_options(
    base_size: int,
    crop_size: int,
    rotate_degrees: float,
    pad_label: int,
    label_lut: tf.Tensor | np.ndarray | None,
) -> tuple[tf.Tensor | None, dict]:
    """The look-up table (``label_lut`` with ``pad_label`` appended, or None) and :func:`_padded_crop`'s
    options: with a table, padding is its last entry until the look-up."""
    options = dict(base_size=base_size, crop_size=crop_size, rotate_degrees=rotate_degrees, pad_label=pad_label)
    if label_lut is None:
        return None, options
    table = tf.concat([tf.cast(label_lut, tf.int32), [pad_label]], 0)
    if table.shape[0] is None:
        raise ValueError("label_lut must have a static length (a constant table)")
    return table, {**options, "pad_label": table.shape[0] - 1, "raw_limit": table.shape[0] - 1}


def _draws(seed: tf.Tensor) -> list[tf.Tensor]:
    """The per-example seeds of the draws: 0 flip, 1 scale, 2 rotation, 3/4 crop x/y, 5/6 blur, 7 unused."""
    return tf.unstack(tf.random.experimental.stateless_split(tf.cast(seed, tf.int64), 8))


def _padded_crop(
    read: RegionReader,
    shape: tuple[tf.Tensor, tf.Tensor],
    label: tf.Tensor,
    seeds: list[tf.Tensor],
    *,
    base_size: int,
    crop_size: int,
    rotate_degrees: float,
    pad_label: int,
    raw_limit: int | None = None,
) -> tuple[tf.Tensor, tf.Tensor]:
    """:func:`train_transform` up to the blur: the flipped, resized, [rotated,] padded crop (image float32 on the
    uint8 grid). ``raw_limit``: labels are raw values that must lie in [0, raw_limit) (the look-up table's
    size; its compiled gather would clamp others silently). ``seeds``: :func:`_draws` of the example's seed."""
    height, width = shape
    message = "label height and width differ from the image height and width"
    same_size = tf.debugging.assert_equal(tf.shape(label)[:2], tf.stack([height, width]), message=message)
    # In a dataset's graph an assertion is not ordered before the ops that read the label: the mask's gathers
    # on the image's grid could fail first, with an index error that does not say why.
    with tf.control_dependencies([same_size]):
        label = tf.identity(label)

    def check_values(label: tf.Tensor) -> None:
        if raw_limit is not None:
            # No apostrophes: TF escapes them in the error it raises.
            message = f"a label value lies outside 0..{raw_limit - 1}, the raw values that the label table maps"
            tf.debugging.assert_non_negative(label, message=message)
            tf.debugging.assert_less(label, tf.cast(raw_limit, label.dtype), message=message)

    flip = tf.random.stateless_uniform([], seeds[0]) < 0.5
    short = tf.random.stateless_uniform(
        [], seeds[1], minval=int(base_size * 0.5), maxval=int(base_size * 2.0) + 1, dtype=tf.int32
    )
    out_h, out_w = _short_side_size(height, width, short)
    # The crop is drawn over the resized image padded bottom/right to at least crop_size.
    pad_h, pad_w = tf.maximum(crop_size - out_h, 0), tf.maximum(crop_size - out_w, 0)
    x1 = tf.random.stateless_uniform([], seeds[3], 0, out_w + pad_w - crop_size + 1, dtype=tf.int32)
    y1 = tf.random.stateless_uniform([], seeds[4], 0, out_h + pad_h - crop_size + 1, dtype=tf.int32)

    # The crop's part of the resized image: where that is smaller than the crop (y1 = x1 = 0), all of it, and
    # the rest is padding.
    window = (tf.minimum(out_h, crop_size), tf.minimum(out_w, crop_size))
    if rotate_degrees:  # rotation needs the whole resized image
        image, label = read(0, 0, height, width), tf.cast(label, tf.int32)
        check_values(label)
        image = tf.cond(flip, lambda: tf.reverse(image, [1]), lambda: image)
        label = tf.cond(flip, lambda: tf.reverse(label, [1]), lambda: label)
        image, label = _resize_pair(image, label, out_h, out_w)
        degrees = tf.random.stateless_uniform([], seeds[2], -rotate_degrees, rotate_degrees)
        image, label = _rotate_pair(image, label, degrees, pad_label)
        image = image[y1 : y1 + window[0], x1 : x1 + window[1]]
        label = label[y1 : y1 + window[0], x1 : x1 + window[1]]
    else:  # only the window is resampled, from only the source pixels it needs
        image, label = _resized_window(read, shape, label, (out_h, out_w), (y1, x1), window, flip)
        label = tf.cast(label, tf.int32)
        check_values(label)  # only the crop's values matter
    image = tf.pad(image, [[0, pad_h], [0, pad_w], [0, 0]], constant_values=0.0)
    label = tf.pad(label, [[0, pad_h], [0, pad_w]], constant_values=pad_label)
    return image, label


def _finish(
    image: tf.Tensor,
    label: tf.Tensor,
    seeds: list[tf.Tensor],
    *,
    crop_size: int,
    blur: bool,
    normalise: bool,
    table: tf.Tensor | None,
) -> tuple[tf.Tensor, tf.Tensor]:
    """Blur, normalisation and the label look-up of the padded crop."""
    image = tf.ensure_shape(image, [crop_size, crop_size, 3])
    label = tf.ensure_shape(label, [crop_size, crop_size])
    if table is not None:
        label = _look_up(label, table)
    if blur:
        do_blur = tf.random.stateless_uniform([], seeds[5]) < 0.5
        radius = tf.random.stateless_uniform([], seeds[6])
        image = tf.cond(do_blur, lambda: gaussian_blur(image, radius), lambda: image)
    return (_compiled_normalize(image) if normalise else image), label


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
    label = tf.cast(label, tf.int32)
    image, label = _resized_window(array_regions(image), (height, width), label, (out_h, out_w), (y1, x1), window)
    image = tf.ensure_shape(image, [crop_size, crop_size, 3])
    label = tf.ensure_shape(label, [crop_size, crop_size])
    return (normalize(image) if normalise else image), label

"""Shared pieces of the tfds builders: the example schema, validated file readers and manual-dir checks.

Every builder yields ``{'image': uint8 [H, W, 3], 'label': uint8/uint16 [H, W, 1], 'file_name': str}``. The
label is stored in the dataset's *raw* encoding (ADE PNG values, Cityscapes label ids, ...); the pipeline maps
it to train ids with the dataset's ``label_lut`` exactly as the reference does, so a builder never has to be
rebuilt when the mapping convention changes.
"""

from __future__ import annotations

import io
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds
from PIL import Image, ImageOps, UnidentifiedImageError

from fastfcn_jax.data.image_files import exif_orientation, pil_to_rgb


class DataError(ValueError):
    """A raw example is unusable; the message names the file."""


def features(label_dtype: tf.DType = tf.uint8) -> tfds.features.FeaturesDict:
    """The example schema shared by all builders."""
    return tfds.features.FeaturesDict(
        {
            "image": tfds.features.Image(shape=(None, None, 3)),
            "label": tfds.features.Image(shape=(None, None, 1), dtype=label_dtype, encoding_format="png"),
            "file_name": tfds.features.Text(),
        }
    )


def dataset_info(
    builder: tfds.core.GeneratorBasedBuilder,
    description: str | None,
    *,
    homepage: str | None = None,
    label_dtype: tf.DType = tf.uint8,
    metadata: tfds.core.Metadata | None = None,
) -> tfds.core.DatasetInfo:
    """The DatasetInfo every builder here shares: image, label mask and file name, supervised (image, label)."""
    return tfds.core.DatasetInfo(
        builder=builder,
        description=description,
        features=features(label_dtype),
        supervised_keys=("image", "label"),
        homepage=homepage,
        metadata=metadata,
    )


def require_file(path: Path, what: str) -> Path:
    """``path``, or DataError saying that a file the dataset lists is missing (not that it is corrupt)."""
    if not Path(path).is_file():
        raise DataError(
            f"missing {what} {path}: the dataset lists it but the file is not there (an incomplete download or "
            "extraction: extract the archives again)"
        )
    return Path(path)


def read_rgb(path: Path) -> tuple[bytes | np.ndarray, tuple[int, int]]:
    """Reads an image file as the reference does (PIL, converted to RGB; 16-bit and float images scaled as
    :mod:`fastfcn_jax.data.image_files` says, where PIL would saturate them; pixels as stored, an EXIF
    orientation tag ignored).

    Returns what to hand to the tfds Image feature (the original bytes when they already decode to RGB, so
    JPEGs are not re-compressed; otherwise the converted array) and the (height, width).
    """
    data, size, _ = _read_rgb(path, upright=False)
    return data, size


def read_rgb_upright(path: Path) -> tuple[bytes | np.ndarray, tuple[int, int], int]:
    """:func:`read_rgb`, but turned upright as the file's EXIF orientation tag says (as photo viewers,
    annotation tools and prediction show it).

    Returns what to hand to the tfds Image feature (the original bytes without a turn; the turned pixels
    otherwise, which the feature stores losslessly as PNG: stored JPEG bytes would decode as stored, since
    TensorFlow ignores EXIF), the upright (height, width) and the orientation applied (1: none; 5..8 swap
    height and width).
    """
    return _read_rgb(path, upright=True)


def _read_rgb(path: Path, *, upright: bool) -> tuple[bytes | np.ndarray, tuple[int, int], int]:
    try:
        data = require_file(path, "image").read_bytes()
        with Image.open(io.BytesIO(data)) as img:
            img.load()
            orientation = exif_orientation(img) if upright else 1
            fmt, mode = img.format, img.mode
            turned = img if orientation == 1 else ImageOps.exif_transpose(img)
            width, height = turned.size
            converted = None if orientation == 1 and mode == "RGB" and fmt in ("JPEG", "PNG") else pil_to_rgb(turned)
    except (OSError, UnidentifiedImageError, SyntaxError) as err:
        raise DataError(f"corrupt or unreadable image {path}: {err}") from err
    return (data if converted is None else converted), (height, width), orientation


# What to do about a file of a released dataset that is not as released.
NOT_AS_RELEASED = (
    "the released files are not like this: extract the archives again (a modified copy or a subset of your own "
    "is a folder dataset: prepare --dataset folder:NAME)"
)


def read_index_png(path: Path, *, remedy: str = NOT_AS_RELEASED) -> np.ndarray:
    """Reads a single-channel label PNG as stored indices ([H, W], uint8/uint16); ``remedy``: what to do
    about a mask that is not one (colours, say).

    PIL keeps palette ('P') indices; TensorFlow's decoder would expand them to colours.
    """
    try:
        with Image.open(require_file(path, "label")) as img:
            img.load()
            if img.mode not in ("L", "P", "I;16", "I", "1"):
                raise DataError(
                    f"label {path} has PIL mode {img.mode!r}; expected a single-channel index PNG: {remedy}"
                )
            array = np.asarray(img)
    except (OSError, UnidentifiedImageError, SyntaxError) as err:
        raise DataError(f"corrupt or unreadable label {path}: {err}") from err
    if array.dtype == np.int32:  # PIL mode 'I' (16-bit PNGs); values are checked by the caller.
        array = array.astype(np.uint16)
    return array.astype(np.uint8) if array.dtype == bool else array


def load_mat(path: Path, what: str, **kwargs) -> dict:
    """``scipy.io.loadmat(path, **kwargs)``, or DataError naming the file (scipy raises many kinds of error for
    a damaged file: MatReadError, IndexError, ValueError, ...)."""
    from scipy.io import loadmat

    require_file(path, what)
    try:
        return loadmat(path, **kwargs)
    except Exception as err:  # noqa: BLE001 - any failure to parse is a damaged file, named with its cause
        raise DataError(f"unreadable {what} {path} ({type(err).__name__}: {err}): {NOT_AS_RELEASED}") from err


# For masks of one's own data (folder datasets); a released dataset's mask is extracted again instead.
SIZE_REMEDY = "masks are per pixel of their image (resize one of them, the mask with nearest-neighbour sampling)"


def check_label(
    label: np.ndarray,
    image_size: tuple[int, int],
    *,
    valid_values: Sequence[int] | np.ndarray,
    example: str | Path,
    value_remedy: str = NOT_AS_RELEASED,
    size_remedy: str = NOT_AS_RELEASED,
) -> np.ndarray:
    """Checks a raw mask against its image; returns it as [H, W, 1] ready for the label feature.
    ``value_remedy``: what to do about values outside ``valid_values`` (appended to that error);
    ``size_remedy``: what to do about a size that differs from ``image_size`` (appended to that error); both
    by default for a released dataset."""
    if label.ndim != 2:
        raise DataError(f"{example}: label must be one channel, got shape {label.shape}")
    if label.shape != tuple(image_size):
        raise DataError(
            f"{example}: label size {label.shape[1]}x{label.shape[0]} (WxH) differs from its image "
            f"{image_size[1]}x{image_size[0]}: {size_remedy}"
        )
    bad = np.setdiff1d(np.unique(label), np.asarray(valid_values))
    if bad.size:
        raise DataError(
            f"{example}: label values {bad[:10].tolist()} are outside the dataset's encoding "
            f"(allowed: {_describe(valid_values)}): {value_remedy}"
        )
    return label[..., None]


def _describe(values: Sequence[int] | np.ndarray) -> str:
    values = sorted(int(v) for v in values)
    contiguous = values == list(range(values[0], values[0] + len(values)))
    return f"{values[0]}..{values[-1]}" if contiguous else ", ".join(map(str, values[:40]))


def require_files(
    manual_dir: Path | None,
    required: Iterable[str],
    instructions: str,
    *,
    dataset: str,
    renamed: dict[str, str] | None = None,
) -> Path:
    """Returns ``manual_dir`` or raises FileNotFoundError with the download instructions and layout.

    ``dataset``: the name ``prepare --dataset`` takes; ``renamed``: {folder the layout needs: the name its
    archive extracts to} (SBD's benchmark_RELEASE/ -> VOCaug/), named in the error when only the latter exists.
    """
    missing = list(required) if manual_dir is None else [p for p in required if not (Path(manual_dir) / p).exists()]
    if missing:
        # tfds fills in <data_dir>/downloads/manual when no manual dir is given: not a folder the user named.
        defaulted = manual_dir is None or (
            manual_dir.parts[-2:] == ("downloads", "manual") and not Path(manual_dir).exists()
        )
        if defaulted:
            where = "no manual dir given" + ("" if manual_dir is None else f"; tfds looked in {manual_dir}")
        else:
            where = f"manual_dir {manual_dir}" + ("" if Path(manual_dir).is_dir() else ", which does not exist")
            where += _manual_dir_hint(Path(manual_dir), missing, renamed or {})
        source = "--source" if dataset.startswith("folder:") else "--manual-dir"
        raise FileNotFoundError(
            f"raw files missing ({where}): {', '.join(missing)}.\n{instructions.strip()}\n"
            f"Then run: python -m fastfcn_jax.data.prepare --dataset {dataset} {source} DIR --data-dir OUT "
            "(training and evaluation prepare it themselves given --config.dataset.manual_dir=DIR)"
        )
    return Path(manual_dir)


_EXTRACT_AGAIN = (
    "The download looks partly extracted or modified: extract the archives again (a subset of your own is a "
    "folder dataset: prepare --dataset folder:NAME)."
)


def pair_files(
    images: Sequence[Path],
    masks: Sequence[Path],
    mask_of: Callable[[Path], Path],
    where: str,
    instructions: str,
    remedy: str = _EXTRACT_AGAIN,
    empty: str = "is the download extracted there?",
) -> list[tuple[Path, Path]]:
    """``(image, mask)`` for every image, or DataError naming what is unpaired (with ``remedy``, by default
    for a released dataset: an image without its mask or a mask without its image is a partly extracted
    download, not something to skip silently); no image at all names the folder searched (and ``empty``)."""
    if not images:
        raise DataError(f"no images in {where}: {empty}\n{instructions.strip()}")
    pairs = [(image, mask_of(image)) for image in images]
    lonely_images = [image for image, mask in pairs if not mask.exists()]
    lonely_masks = sorted(set(masks) - {mask for _, mask in pairs})
    problems = []
    for count, kind, examples in (
        (len(lonely_images), "image(s) without their annotation", lonely_images),
        (len(lonely_masks), "annotation(s) without their image", lonely_masks),
    ):
        if count:
            problems.append(f"{count} {kind}, e.g. " + ", ".join(str(p) for p in examples[:3]))
    if problems:
        raise DataError(f"{where}: " + "; ".join(problems) + f". {remedy}\n{instructions.strip()}")
    return pairs


def _manual_dir_hint(manual_dir: Path, missing: Sequence[str], renamed: dict[str, str]) -> str:
    """The usual slips: the folder inside the dataset's top folder given, an archive's folder not renamed or
    each archive extracted into a folder of its own, archives not extracted."""
    top = Path(missing[0]).parts[0]
    for parent in manual_dir.parents:
        if parent.name == top:
            return f"; it lies inside {parent}: give {parent.parent} (the folder holding {top}/)"
    if manual_dir.name == top:
        return f"; give its parent {manual_dir.parent} (the folder holding {top}/)"
    if not manual_dir.is_dir():
        return ""
    tops = sorted({Path(p).parts[0] for p in missing})
    hints = [
        f"rename {manual_dir / renamed[name]} to {manual_dir / name}"
        for name in tops
        if name in renamed and (manual_dir / renamed[name]).is_dir() and not (manual_dir / name).exists()
    ]
    for name in tops:
        nested = [] if (manual_dir / name).exists() else sorted(manual_dir.glob(f"*/{name}"))
        if nested:
            hints.append(f"move {nested[0]} to {manual_dir / name}")
    if hints:
        return "; " + ", and ".join(hints)
    extracted = any((manual_dir / name).exists() for name in tops)
    archives = []
    if not extracted:
        archives = sorted(p.name for p in manual_dir.iterdir() if p.is_file() and p.suffix in (".zip", ".tar", ".gz"))
    if archives:
        return f"; it holds {', '.join(archives[:3])}: extract the archives there first"
    return ""


def read_split_file(path: Path) -> list[str]:
    """One stem per line (VOC ImageSets style); blank lines dropped."""
    return [line.strip() for line in path.read_text().splitlines() if line.strip()]


def manual_dir(dl_manager: tfds.download.DownloadManager) -> Path | None:
    """The manual dir if one was given, existing or not (:func:`require_files` says which); tfds' own property
    asserts with a terse message."""
    path = dl_manager._manual_dir  # The public property raises instead of returning None.
    return None if path is None else Path(path)


def is_prepared(builder: tfds.core.DatasetBuilder) -> bool:
    """``builder.is_prepared()`` without tfds' warning for a folder that has no dataset_info.json yet (the
    normal state of a dataset about to be built; that file is the first thing tfds checks)."""
    return tf.io.gfile.exists(f"{builder.data_dir}/dataset_info.json") and builder.is_prepared()

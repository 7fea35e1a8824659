"""Custom datasets: a folder of image/mask pairs plus a class table becomes a tfds dataset.

  python -m fastfcn_jax.data.prepare --dataset folder:NAME --source DIR --data-dir OUT

then train with dataset ``folder:NAME`` (or ``folder``) and ``data_dir=OUT``. The class table is stored in
the prepared dataset's metadata, so later runs need only the data dir.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from fastfcn_jax.data.builders import common
from fastfcn_jax.data.datasets import directory
from fastfcn_jax.data.image_files import IMAGE_SUFFIXES

INSTRUCTIONS = """\
Custom folder dataset: put your data in SOURCE as
  SOURCE/classes.json                 {"names": ["road", "car", ...], "palette": [[128, 64, 128], ...],
                                       "ignore_label": 255, "base_size": 520, "crop_size": 480}
                                      (palette, ignore_label, base_size, crop_size optional)
  SOURCE/images/<split>/<stem>.jpg    (or .png, .bmp, .gif, .tif, .webp; RGB; grayscale is repeated, alpha dropped;
                                      used upright as an EXIF orientation tag says, as photo viewers and
                                      prediction show it; one image per stem, no subfolders)
  SOURCE/masks/<split>/<stem>.png     single-channel PNG (8 or 16 bit), pixel = class index 0..C-1 or
                                      ignore_label; same size as the (upright) image
with <split> among train, validation (or val, not both), test. Then run
  python -m fastfcn_jax.data.prepare --dataset folder:NAME --source SOURCE --data-dir OUT
"""
# What to do about a mask that is not single-channel class indices (colours, typically).
MASK_FORMAT = (
    "save each mask as one channel of class indices (PIL mode L, P or I;16); a mask drawn in colours becomes one "
    "by replacing each colour with its class's index (its row in classes.json's palette)"
)
# Images in other formats than JPEG and PNG are stored decoded (as PNG), as are EXIF-turned ones. Masks are PNGs:
# other pictures among them are masks saved in a lossy or unread format.
_OTHER_IMAGE_SUFFIXES = tuple(suffix for suffix in IMAGE_SUFFIXES if suffix != ".png")
_TABLE_KEYS = ("names", "palette", "colors", "ignore_label", "base_size", "crop_size")
# What EXIF orientations 5..8 (those that swap width and height) do to the stored pixels to show them.
_TURNS = {
    5: "mirror across the main diagonal",
    6: "90 degrees clockwise",
    7: "mirror across the anti-diagonal",
    8: "90 degrees anticlockwise",
}
_SPLIT_NAMES = {"train": "train", "val": "validation", "validation": "validation", "test": "test"}


def validate_class_table(table: dict[str, Any]) -> dict[str, Any]:
    """Checks a class table and fills defaults (palette from a fixed colour rule, no ignore label)."""
    if not isinstance(table, dict):
        raise ValueError('class table must be a JSON object: {"names": [...], ...}')
    unknown = sorted(set(table) - set(_TABLE_KEYS))
    if unknown:
        import difflib

        described = []
        for key in unknown:
            guess = difflib.get_close_matches(key, _TABLE_KEYS, n=1)
            described.append(f"{key!r}" + (f" (did you mean {guess[0]!r}?)" if guess else ""))
        raise ValueError(f"unknown key(s) {', '.join(described)}; a class table has {', '.join(_TABLE_KEYS)}")
    if not isinstance(table.get("names"), list) or not table["names"]:
        raise ValueError("class table needs 'names': a non-empty list of class names")
    if not all(isinstance(name, str) and name for name in table["names"]):
        raise ValueError("class table 'names' must be non-empty strings, one per class")
    repeated = sorted({name for name in table["names"] if table["names"].count(name) > 1})
    if repeated:
        raise ValueError(f"class table 'names' repeats {repeated}: each class needs a name of its own")
    for key in ("ignore_label", "base_size", "crop_size"):
        value = table.get(key)
        if value is not None and (
            isinstance(value, bool) or not isinstance(value, int) or (key != "ignore_label" and value <= 0)
        ):
            kind = "an integer" if key == "ignore_label" else "a positive integer (pixels)"
            raise ValueError(f"class table {key!r} must be {kind}, got {value!r}")
    num_classes = len(table["names"])
    palette = table.get("palette", table.get("colors"))
    if palette is None:
        palette = [[(37 * k) % 256, (101 * k) % 256, (173 * k) % 256] for k in range(num_classes)]
    if np.shape(palette) != (num_classes, 3):
        raise ValueError(f"class table 'palette' must be {num_classes} [r, g, b] rows, got shape {np.shape(palette)}")
    ignore = table.get("ignore_label")
    if ignore is not None and not (num_classes <= int(ignore) < 65536):
        raise ValueError(f"class table 'ignore_label' {ignore} must be >= the number of classes ({num_classes})")
    return {**table, "palette": np.asarray(palette).tolist(), "ignore_label": None if ignore is None else int(ignore)}


def read_class_table(source: str | Path) -> dict[str, Any]:
    path = Path(source).expanduser() / "classes.json"
    if not path.parent.is_dir():
        raise FileNotFoundError(f"source folder {path.parent} does not exist (--source / config.dataset.manual_dir)")
    if not path.exists():
        raise FileNotFoundError(f"class table {path} is missing.\n{INSTRUCTIONS}")
    try:
        return validate_class_table(json.loads(path.read_text()))
    except (json.JSONDecodeError, ValueError) as err:
        raise ValueError(f"{path}: {err}") from err


def _config_name(name: str) -> str:
    return name.split(":", 1)[1] if ":" in name else "default"


@dataclasses.dataclass(eq=False)
class FolderConfig(tfds.core.BuilderConfig):
    """One custom dataset; the config name is the NAME of ``folder:NAME``."""


class Folder(tfds.core.GeneratorBasedBuilder):
    """Image/mask pairs from a user folder (masks stored as uint16 class indices)."""

    name = "fastfcn_folder"
    VERSION = tfds.core.Version("1.1.0")
    # A folder prepared at an older version is not found at this one: prepare it again from its source.
    RELEASE_NOTES = {
        "1.0.0": "Images stored as in their files.",
        "1.1.0": "Images with an EXIF orientation tag stored turned upright, as prediction reads them.",
    }
    MANUAL_DOWNLOAD_INSTRUCTIONS = INSTRUCTIONS
    BUILDER_CONFIGS = [FolderConfig(name="default")]

    def __init__(self, *, config: FolderConfig | str | None = None, **kwargs: Any):
        # Any NAME is allowed; tfds only accepts predeclared config names when given a string.
        if isinstance(config, str):
            config = FolderConfig(name=config)
        super().__init__(config=config, **kwargs)

    def _create_builder_config(self, builder_config, version):
        # Every dataset NAME is its own config by design: tfds' "Using custom data configuration" warning
        # (logged on each builder made, a dozen times per training run) says nothing here.
        if isinstance(builder_config, FolderConfig):
            return builder_config
        return super()._create_builder_config(builder_config, version)

    def _info(self) -> tfds.core.DatasetInfo:
        return common.dataset_info(self, __doc__, metadata=tfds.core.MetadataDict(), label_dtype=tf.uint16)

    @property
    def dataset_name(self) -> str:
        """The name ``prepare --dataset`` and ``config.dataset.name`` take: ``folder`` or ``folder:NAME``."""
        return "folder" if self.builder_config.name == "default" else f"folder:{self.builder_config.name}"

    def _download_and_prepare(self, dl_manager: tfds.download.DownloadManager, download_config: Any) -> None:
        super()._download_and_prepare(dl_manager, download_config)
        turned = {split: count for split, count in getattr(self, "_turned_upright", {}).items() if count}
        if turned:
            name = self.dataset_name
            print(
                f"{name}: {sum(turned.values())} image(s) turned upright as their EXIF orientation tag says, as "
                "photo viewers, annotation tools and prediction show them, and stored so as PNG ("
                + ", ".join(f"{split} {count}" for split, count in sorted(turned.items()))
                + ")",
                flush=True,
            )

    def _split_generators(self, dl_manager: tfds.download.DownloadManager) -> dict[str, Iterator]:
        self._turned_upright: dict[str, int] = {}  # split -> images stored turned by their EXIF orientation
        source = common.require_files(
            common.manual_dir(dl_manager),
            ["classes.json", "images", "masks"],
            INSTRUCTIONS,
            dataset=self.dataset_name,
        )
        table = read_class_table(source)
        self.info.metadata["class_table"] = table
        valid = np.arange(len(table["names"]))
        if table["ignore_label"] is not None:
            valid = np.append(valid, table["ignore_label"])
        splits, folders = {}, {}
        for folder in sorted(p.name for p in (source / "images").iterdir() if p.is_dir() and not _hidden(p)):
            if folder not in _SPLIT_NAMES:
                raise ValueError(f"{source / 'images' / folder}: unknown split folder; use {sorted(_SPLIT_NAMES)}")
            split = _SPLIT_NAMES[folder]
            if split in folders:  # val and validation: one would silently replace the other
                raise common.DataError(
                    f"{source / 'images'}: both {folders[split]}/ and {folder}/ hold the {split} split: merge them "
                    "into one folder"
                )
            folders[split] = folder
            splits[split] = self._generate_examples(source, folder, valid)
        if not splits:
            raise FileNotFoundError(f"no split folders under {source / 'images'}.\n{INSTRUCTIONS}")
        masks = source / "masks"
        unread = sorted(
            p.name for p in masks.iterdir() if p.is_dir() and not _hidden(p) and p.name not in folders.values()
        )
        if unread:
            raise common.DataError(
                f"{masks}: mask folder(s) {unread} have no images/<split> folder of the same name, so their masks "
                "would not be read: add the images, or move the folders out of masks/"
            )
        return splits

    def _generate_examples(self, source: Path, folder: str, valid: np.ndarray) -> Iterator[tuple[str, dict]]:
        images_dir, masks_dir = source / "images" / folder, source / "masks" / folder
        for directory_ in (images_dir, masks_dir):
            nested = (
                sorted(p for p in directory_.iterdir() if p.is_dir() and not _hidden(p)) if directory_.is_dir() else []
            )
            if nested:
                raise common.DataError(
                    f"{directory_}: subfolders are not read ({', '.join(p.name for p in nested[:3])}): move their "
                    f"files up into {directory_.name}/ (one image per stem), or the folders out"
                )
        images = sorted(p for p in images_dir.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        by_stem: dict[str, list[Path]] = {}
        for image in images:
            by_stem.setdefault(image.stem, []).append(image)
        shared = [paths for paths in by_stem.values() if len(paths) > 1]
        if shared:
            raise common.DataError(
                f"{images_dir}: {len(shared)} stem(s) name more than one image, e.g. "
                + ", ".join(str(p) for p in shared[0])
                + f": each image is paired with masks/{folder}/<its stem>.png, so rename or remove all but one"
            )
        files = []
        if masks_dir.is_dir():
            files = sorted(p for p in masks_dir.iterdir() if p.is_file() and not p.name.startswith("."))
        # Other images (JPEG, BMP, ...) are masks saved in a lossy or unread format; other files are not masks.
        not_png = [p for p in files if p.suffix.lower() in _OTHER_IMAGE_SUFFIXES]
        if not_png:
            raise common.DataError(
                f"{masks_dir}: masks must be single-channel PNGs (a JPEG's compression changes class indices), "
                f"found {len(not_png)} other file(s), e.g. {', '.join(str(p) for p in not_png[:3])}: save them "
                "as PNG (or move them out of the folder)"
            )

        def mask_of(image: Path) -> Path:
            lower, upper = masks_dir / f"{image.stem}.png", masks_dir / f"{image.stem}.PNG"
            return upper if upper.exists() and not lower.exists() else lower

        pairs = common.pair_files(
            images,
            [p for p in files if p.suffix.lower() == ".png"],
            mask_of,
            f"{source}/images/{folder} ({', '.join(sorted(IMAGE_SUFFIXES))}) and masks/{folder}",
            INSTRUCTIONS,
            remedy=f"Every image needs masks/{folder}/<its stem>.png and every mask its image: add the missing "
            "files or remove the unpaired ones.",
            empty=f"put the split's images there ({', '.join(IMAGE_SUFFIXES)}), or remove the empty folder",
        )
        split = _SPLIT_NAMES[folder]
        self._turned_upright[split] = 0
        for image_path, mask_path in pairs:
            # Annotation tools (labelme, CVAT) label the image as shown, turned by its EXIF orientation tag, and
            # prediction turns new photos the same way: the stored pixels are the upright ones.
            image, size, orientation = common.read_rgb_upright(image_path)
            self._turned_upright[split] += orientation != 1
            mask = common.read_index_png(mask_path, remedy=MASK_FORMAT)
            label = common.check_label(
                mask,
                size,
                valid_values=valid,
                example=mask_path,
                value_remedy=f"add the classes to {source / 'classes.json'}'s names (index = position), or set "
                "the value as its ignore_label",
                size_remedy=_size_remedy(image_path, orientation, size, mask.shape),
            )
            yield image_path.stem, {"image": image, "label": label.astype(np.uint16), "file_name": image_path.name}


def _hidden(path: Path) -> bool:
    """Hidden folders (Jupyter's .ipynb_checkpoints, .git): not the user's data."""
    return path.name.startswith(".")


def _size_remedy(image: Path, orientation: int, size: tuple[int, int], mask_shape: tuple[int, ...]) -> str:
    """What to do about a mask whose size differs from its image's upright ``size`` (height, width)."""
    if orientation == 1:
        return common.SIZE_REMEDY
    stored = (size[1], size[0]) if orientation >= 5 else size  # orientations 5..8 swap width and height
    note = (
        f"the image {image} carries EXIF orientation {orientation} and is used turned upright, as photo viewers, "
        f"annotation tools and prediction show it ({stored[1]}x{stored[0]} as stored)"
    )
    if tuple(mask_shape) == stored:
        return (
            f"{note}; this mask matches the stored pixels instead: turn it the same way ({_TURNS[orientation]}), "
            "or save the image without its orientation tag"
        )
    return f"{note}; {common.SIZE_REMEDY}"


def is_prepared(name: str, data_dir: str | Path) -> bool:
    """Whether ``folder[:NAME]`` is prepared in ``data_dir``, with its class table."""
    builder = Folder(config=_config_name(name), data_dir=directory(data_dir))
    return common.is_prepared(builder) and "class_table" in builder.info.metadata


def load_class_table(name: str, data_dir: str | Path) -> dict[str, Any]:
    """The class table stored with a prepared ``folder[:NAME]`` dataset."""
    if not is_prepared(name, data_dir):
        raise FileNotFoundError(
            f"custom dataset {name!r} is not prepared in {data_dir}; run: python -m fastfcn_jax.data.prepare "
            f"--dataset {name} --source SOURCE --data-dir {data_dir}"
        )
    stored = Folder(config=_config_name(name), data_dir=directory(data_dir)).info.metadata["class_table"]
    # Keys other than a class table's were never used (a table prepared before they were refused).
    return {key: value for key, value in stored.items() if key in _TABLE_KEYS}


def info_from_source(name: str, source: str | Path):
    """DatasetInfo of a custom dataset about to be prepared from ``source``."""
    from fastfcn_jax.data.datasets import folder_info

    return folder_info(name, read_class_table(source))

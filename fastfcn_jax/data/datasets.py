"""Dataset registry: name -> :class:`DatasetInfo` (classes, palette, sizes, tfds builder, how to get the data).

Label convention of everything the pipeline yields: int32 class index in ``[0, num_classes - 1]`` and
``IGNORE_INDEX`` (-1) for ignored pixels, as FastFCN (CrossEntropy ``ignore_index=-1``). Builders store masks
in the dataset's raw encoding; ``DatasetInfo.label_lut[raw]`` is the train id, reproducing the reference's
label transform (ADE ``raw - 1``; Pascal Context ``mapped - 1``; Cityscapes labelId -> trainId; VOC 255 -> -1).

Names: ``pcontext``, ``ade20k``, ``cityscapes``, ``pascal_voc``, ``pascal_aug``, ``synthetic_shapes``, and
``folder`` / ``folder:NAME`` (custom data prepared with ``python -m fastfcn_jax.data.prepare --dataset folder``;
its class table is read back from the prepared dataset, so pass ``data_dir``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from fastfcn_jax.data.class_tables import CLASS_TABLES

IGNORE_INDEX = -1


@dataclasses.dataclass(frozen=True, eq=False)
class DatasetInfo:
    """Everything the pipeline and the trainer need to know about one dataset.

    Attributes:
      name: registry name.
      num_classes: number of trained/evaluated classes C.
      class_names: C names, index = train id.
      palette: [C, 3] uint8 colours for visualisation.
      base_size: the reference's ``base_size`` (random short side in [0.5, 2.0] x base_size).
      crop_size: square training crop and validation centre-crop size in pixels.
      builder: the tfds ``GeneratorBasedBuilder`` class.
      download_instructions: how to obtain the raw files and the folder layout the builder expects.
      label_lut: int32 [R] mapping a stored raw label value to its train id or -1.
      rotate_degrees: train-time rotation range U(-d, d) (the reference rotates Cityscapes only).
      pad_label: label written into padding when a scaled image is smaller than the crop.
      builder_kwargs: extra keyword arguments of the builder's constructor (e.g. its config).
      submission_mode: the PIL mode of its test server's label PNGs: ``'L'`` (grayscale raw values) or ``'P'``
        (palette, the form of Pascal VOC's SegmentationClass files).
    """

    name: str
    num_classes: int
    class_names: tuple[str, ...]
    palette: np.ndarray
    base_size: int
    crop_size: int
    builder: type
    download_instructions: str
    label_lut: np.ndarray
    rotate_degrees: float = 0.0
    pad_label: int = IGNORE_INDEX
    builder_kwargs: dict[str, Any] = dataclasses.field(default_factory=dict)
    submission_mode: str = "L"

    def make_builder(self, data_dir: str | Path | None):
        """Instantiates the tfds builder reading/writing under ``data_dir``."""
        return self.builder(data_dir=directory(data_dir), **self.builder_kwargs)


def directory(path: str | Path | None) -> str | None:
    """A data or raw-files folder as tfds takes it: None for none given, ``~`` expanded (as the shell does only
    for a bare word, not in ``--data-dir=~/x`` or a quoted one), a URL (``gs://...``) as it is."""
    if path is None or str(path) == "":
        return None
    return str(path) if "://" in str(path) else str(Path(path).expanduser())


def _lut(size: int, pairs: dict[int, int] | Sequence[tuple[int, int]]) -> np.ndarray:
    """A raw -> train-id table of ``size`` entries, -1 where not given."""
    lut = np.full(size, IGNORE_INDEX, np.int32)
    for raw, train in dict(pairs).items():
        lut[raw] = train
    return lut


def _palette(rows: Sequence[Sequence[int]]) -> np.ndarray:
    return np.asarray(rows, np.uint8).reshape(-1, 3)


def _ade20k() -> DatasetInfo:
    from fastfcn_jax.data.builders import ade20k

    table = CLASS_TABLES["ade20k"]
    return DatasetInfo(
        name="ade20k",
        num_classes=150,
        class_names=tuple(table["names"]),
        palette=_palette(table["palette"]),
        base_size=520,
        crop_size=480,
        builder=ade20k.Ade20k,
        download_instructions=ade20k.INSTRUCTIONS,
        # Reference: label = PNG value - 1, so 0 ("other objects") -> -1.
        label_lut=_lut(256, {k: k - 1 for k in range(1, 151)}),
    )


def _pcontext() -> DatasetInfo:
    from fastfcn_jax.data.builders import pcontext

    table = CLASS_TABLES["pcontext"]
    return DatasetInfo(
        name="pcontext",
        num_classes=59,
        class_names=tuple(table["names"]),
        palette=_palette(table["palette"]),
        base_size=520,
        crop_size=480,
        builder=pcontext.PascalContext,
        download_instructions=pcontext.INSTRUCTIONS,
        # Stored: the reference's intermediate 0..59 (459-id -> index in the sorted mapping); then - 1.
        label_lut=_lut(256, {k: k - 1 for k in range(1, 60)}),
    )


def _cityscapes() -> DatasetInfo:
    from fastfcn_jax.data.builders import cityscapes

    table = CLASS_TABLES["cityscapes"]
    id_to_train = {i: (t if t != 255 else IGNORE_INDEX) for i, t in table["id_to_train_id"].items()}
    return DatasetInfo(
        name="cityscapes",
        num_classes=19,
        class_names=tuple(table["names"]),
        palette=_palette(table["palette"]),
        # FastFCN ships no Cityscapes script; these are PyTorch-Encoding's Cityscapes experiment sizes.
        base_size=1024,
        crop_size=768,
        builder=cityscapes.Cityscapes,
        download_instructions=cityscapes.INSTRUCTIONS,
        label_lut=_lut(256, id_to_train),
        rotate_degrees=10.0,  # Reference Cityscapes._sync_transform rotates by U(-10, 10) degrees.
    )


def _voc(name: str) -> DatasetInfo:
    from fastfcn_jax.data.builders import pascal_voc

    table = CLASS_TABLES["pascal_voc"]
    return DatasetInfo(
        name=name,
        num_classes=21,
        class_names=tuple(table["names"]),
        palette=_palette(table["palette"]),
        base_size=520,
        crop_size=480,
        builder=pascal_voc.PascalVoc if name == "pascal_voc" else pascal_voc.PascalAug,
        download_instructions=pascal_voc.VOC_INSTRUCTIONS if name == "pascal_voc" else pascal_voc.AUG_INSTRUCTIONS,
        # Background is trained class 0; 255 (void) -> -1. (The reference pads VOC crops with background;
        # we pad with ignore like every other dataset, so padding never teaches "background".)
        label_lut=_lut(256, {k: k for k in range(21)}),
        submission_mode="P",  # results as VOC's own label files
    )


def _synthetic_shapes() -> DatasetInfo:
    from fastfcn_jax.data.builders import synthetic_shapes

    return DatasetInfo(
        name="synthetic_shapes",
        num_classes=len(synthetic_shapes.CLASS_NAMES),
        class_names=synthetic_shapes.CLASS_NAMES,
        palette=synthetic_shapes.PALETTE,
        base_size=128,
        crop_size=96,
        builder=synthetic_shapes.SyntheticShapes,
        download_instructions="Nothing to download: generated by `python -m fastfcn_jax.data.prepare "
        "--dataset synthetic_shapes --data-dir OUT` in seconds.",
        label_lut=_lut(256, {k: k for k in range(len(synthetic_shapes.CLASS_NAMES))}),
    )


def folder_info(name: str, table: dict[str, Any]) -> DatasetInfo:
    """DatasetInfo of a custom folder dataset from its class table (see ``builders/folder.py``)."""
    from fastfcn_jax.data.builders import folder

    table = folder.validate_class_table(table)
    num_classes = len(table["names"])
    ignore = table["ignore_label"]
    pairs = {k: k for k in range(num_classes)}
    size = max(num_classes, (ignore if ignore is not None else 0) + 1)
    config_name = name.split(":", 1)[1] if ":" in name else "default"
    return DatasetInfo(
        name=name,
        num_classes=num_classes,
        class_names=tuple(table["names"]),
        palette=_palette(table["palette"]),
        base_size=int(table.get("base_size", 520)),
        crop_size=int(table.get("crop_size", 480)),
        builder=folder.Folder,
        download_instructions=folder.INSTRUCTIONS,
        label_lut=_lut(size, pairs),
        builder_kwargs={"config": folder.FolderConfig(name=config_name)},
    )


_REGISTRY: dict[str, Callable[[], DatasetInfo]] = {
    "ade20k": _ade20k,
    "pcontext": _pcontext,
    "cityscapes": _cityscapes,
    "pascal_voc": lambda: _voc("pascal_voc"),
    "pascal_aug": lambda: _voc("pascal_aug"),
    "synthetic_shapes": _synthetic_shapes,
}


def available_datasets() -> list[str]:
    """Registered names (custom data: ``folder`` or ``folder:NAME``)."""
    return [*_REGISTRY, "folder"]


def get_dataset_info(name: str, data_dir: str | Path | None = None) -> DatasetInfo:
    """Looks up a dataset by name. ``folder[:NAME]`` needs the ``data_dir`` it was prepared into."""
    if name == "folder" or name.startswith("folder:"):
        from fastfcn_jax.data.builders import folder

        if data_dir is None:
            raise ValueError(f"dataset {name!r} needs data_dir (where `prepare --dataset folder` wrote it)")
        return folder_info(name, folder.load_class_table(name, data_dir))
    if name not in _REGISTRY:
        raise ValueError(f"unknown dataset {name!r}; available: {', '.join(available_datasets())}")
    return _REGISTRY[name]()

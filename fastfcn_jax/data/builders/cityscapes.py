"""Cityscapes fine annotations (19 train ids) from ``leftImg8bit`` + ``gtFine`` ``*_labelIds.png``.

Stored label: the raw label id 0..33 (uint8), like tfds ``cityscapes/semantic_segmentation``; the pipeline
maps it to train ids with cityscapesScripts' table (void -> -1), as the reference's ``_mask_transform``.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import tensorflow_datasets as tfds

from fastfcn_jax.data.builders import common

INSTRUCTIONS = """\
Cityscapes: register at https://www.cityscapes-dataset.com and download gtFine_trainvaltest.zip and
leftImg8bit_trainvaltest.zip; unzip both into MANUAL_DIR, giving:
  MANUAL_DIR/leftImg8bit/{train,val}/<city>/<city>_<seq>_<frame>_leftImg8bit.png
  MANUAL_DIR/gtFine/{train,val}/<city>/<city>_<seq>_<frame>_gtFine_labelIds.png   (8-bit, label ids 0..33)
"""
_SPLITS = {"train": "train", "validation": "val"}
_MAX_LABEL_ID = 33


class Cityscapes(tfds.core.GeneratorBasedBuilder):
    """Cityscapes leftImg8bit images with gtFine label ids (raw 0..33)."""

    name = "fastfcn_cityscapes"
    VERSION = tfds.core.Version("1.0.0")
    MANUAL_DOWNLOAD_INSTRUCTIONS = INSTRUCTIONS

    def _info(self) -> tfds.core.DatasetInfo:
        return common.dataset_info(self, __doc__, homepage="https://www.cityscapes-dataset.com")

    def _split_generators(self, dl_manager: tfds.download.DownloadManager) -> dict[str, Iterator]:
        required = [f"{kind}/{folder}" for folder in _SPLITS.values() for kind in ("leftImg8bit", "gtFine")]
        root = common.require_files(common.manual_dir(dl_manager), required, INSTRUCTIONS, dataset="cityscapes")
        return {split: self._generate_examples(root, folder) for split, folder in _SPLITS.items()}

    def _generate_examples(self, root: Path, folder: str) -> Iterator[tuple[str, dict]]:
        # Reference: walk leftImg8bit/<split> for *.png; mask name replaces leftImg8bit by gtFine_labelIds (it
        # skips unpaired files; here they stop the build, named).
        def mask_of(image: Path) -> Path:
            return root / "gtFine" / folder / image.parent.name / image.name.replace("leftImg8bit", "gtFine_labelIds")

        pairs = common.pair_files(
            sorted((root / "leftImg8bit" / folder).glob("*/*_leftImg8bit.png")),
            sorted((root / "gtFine" / folder).glob("*/*_gtFine_labelIds.png")),
            mask_of,
            f"{root}/leftImg8bit/{folder} and gtFine/{folder}",
            INSTRUCTIONS,
        )
        for image_path, mask_path in pairs:
            image, size = common.read_rgb(image_path)
            label = common.check_label(
                common.read_index_png(mask_path),
                size,
                valid_values=np.arange(_MAX_LABEL_ID + 1),
                example=mask_path,
            )
            key = image_path.name.removesuffix("_leftImg8bit.png")
            yield key, {"image": image, "label": label.astype(np.uint8), "file_name": image_path.name}

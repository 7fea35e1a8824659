"""ADE20K as the paper used it: SceneParsing ``ADEChallengeData2016`` (150 classes; 0 = other, ignored).

tfds ``scene_parse150`` reads a different archive (instance-challenge annotations), hence this builder.
Stored label: the annotation PNG value 0..150 as is; the pipeline maps ``v -> v - 1`` (0 -> -1).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import tensorflow_datasets as tfds

from fastfcn_jax.data.builders import common

ROOT = "ADEChallengeData2016"
INSTRUCTIONS = f"""\
ADE20K (SceneParsing ADEChallengeData2016): download
  http://data.csail.mit.edu/places/ADEchallenge/ADEChallengeData2016.zip
and unzip it into MANUAL_DIR, giving:
  MANUAL_DIR/{ROOT}/images/training/ADE_train_00000001.jpg ...     (20210 JPEGs)
  MANUAL_DIR/{ROOT}/images/validation/ADE_val_00000001.jpg ...     (2000 JPEGs)
  MANUAL_DIR/{ROOT}/annotations/training/ADE_train_00000001.png ... (8-bit PNG, 0 = other, 1..150)
  MANUAL_DIR/{ROOT}/annotations/validation/ADE_val_00000001.png ...
For the test server (optional, not part of the dataset built here): release_test.zip from the same place,
unzipped beside it (MANUAL_DIR/release_test/testing/ADE_test_00000001.jpg ..., 3352 JPEGs without labels), is
predicted with --mode=predict --config.evaluation.submission_dir=DIR (docs/evaluation.md).
"""
_SPLITS = {"train": "training", "validation": "validation"}


class Ade20k(tfds.core.GeneratorBasedBuilder):
    """ADEChallengeData2016 images with 150-class annotation PNGs (raw values 0..150)."""

    name = "fastfcn_ade20k"
    VERSION = tfds.core.Version("1.0.0")
    MANUAL_DOWNLOAD_INSTRUCTIONS = INSTRUCTIONS

    def _info(self) -> tfds.core.DatasetInfo:
        return common.dataset_info(self, __doc__, homepage="http://sceneparsing.csail.mit.edu/")

    def _split_generators(self, dl_manager: tfds.download.DownloadManager) -> dict[str, Iterator]:
        required = [f"{ROOT}/{kind}/{folder}" for folder in _SPLITS.values() for kind in ("images", "annotations")]
        root = common.require_files(common.manual_dir(dl_manager), required, INSTRUCTIONS, dataset="ade20k") / ROOT
        return {split: self._generate_examples(root, folder) for split, folder in _SPLITS.items()}

    def _generate_examples(self, root: Path, folder: str) -> Iterator[tuple[str, dict]]:
        # The reference lists the folder unsorted and skips a *.jpg without mask (with a message, then asserts the
        # split's size): here any unpaired file stops the build, naming it.
        pairs = common.pair_files(
            sorted((root / "images" / folder).glob("*.jpg")),
            sorted((root / "annotations" / folder).glob("*.png")),
            lambda image: root / "annotations" / folder / f"{image.stem}.png",
            f"{root}/images/{folder} and annotations/{folder}",
            INSTRUCTIONS,
        )
        for image_path, mask_path in pairs:
            image, size = common.read_rgb(image_path)
            label = common.check_label(
                common.read_index_png(mask_path), size, valid_values=np.arange(151), example=mask_path
            )
            yield image_path.stem, {"image": image, "label": label.astype(np.uint8), "file_name": image_path.name}

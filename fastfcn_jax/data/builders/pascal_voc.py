"""Pascal VOC 2012 segmentation (21 classes) and its SBD-augmented training set.

``pascal_voc`` splits: ``train`` (train.txt 1464), ``validation`` (val.txt 1449), ``trainval`` (2913; what the
reference's ``pascal_voc`` calls "train").
``pascal_aug`` splits: ``train`` = the usual train_aug 10582 = (VOC train U SBD train U SBD val) minus VOC val,
VOC masks where VOC has one, SBD otherwise; ``validation`` = VOC val 1449; ``sbd_trainval`` (11355) and
``sbd_val`` (2857) are the reference's ``pascal_aug`` train/val (SBD masks only).
Stored label: the class index 0..20 with 255 = void (VOC palette indices, read with PIL because TensorFlow
expands palettes to colours; SBD ``GTcls.Segmentation``); the pipeline maps 255 -> -1.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import tensorflow_datasets as tfds

from fastfcn_jax.data.builders import common

VOC_ROOT = "VOCdevkit/VOC2012"
SBD_ROOT = "VOCaug/dataset"
_VOC_LAYOUT = f"""\
  MANUAL_DIR/{VOC_ROOT}/JPEGImages/<stem>.jpg
  MANUAL_DIR/{VOC_ROOT}/SegmentationClass/<stem>.png        (palette PNG: 0..20, 255 = void)
  MANUAL_DIR/{VOC_ROOT}/ImageSets/Segmentation/{{train,val,trainval}}.txt
"""
VOC_INSTRUCTIONS = f"""\
Pascal VOC 2012: download http://host.robots.ox.ac.uk/pascal/VOC/voc2012/VOCtrainval_11-May-2012.tar and
extract it into MANUAL_DIR, giving:
{_VOC_LAYOUT}"""
AUG_INSTRUCTIONS = f"""\
Pascal VOC 2012 + SBD: extract VOCtrainval_11-May-2012.tar (see pascal_voc) into MANUAL_DIR, and the SBD
benchmark http://www.eecs.berkeley.edu/Research/Projects/CS/vision/grouping/semantic_contours/benchmark.tgz
renaming benchmark_RELEASE/ to VOCaug/, giving:
{_VOC_LAYOUT}  MANUAL_DIR/{SBD_ROOT}/img/<stem>.jpg
  MANUAL_DIR/{SBD_ROOT}/cls/<stem>.mat          (GTcls.Segmentation, 0..20)
  MANUAL_DIR/{SBD_ROOT}/{{train,val}}.txt
Splits: train (train_aug, 10582: VOC train and SBD train + val, less VOC val), validation (VOC val, 1449),
sbd_trainval and sbd_val (the reference's pascal_aug train and val: 11355 and 2857, SBD masks).
"""
_VOC_VALUES = np.append(np.arange(21), 255)


def _voc_example(root: Path, stem: str) -> dict:
    image_path = root / VOC_ROOT / "JPEGImages" / f"{stem}.jpg"
    mask_path = root / VOC_ROOT / "SegmentationClass" / f"{stem}.png"
    image, size = common.read_rgb(image_path)
    label = common.check_label(common.read_index_png(mask_path), size, valid_values=_VOC_VALUES, example=mask_path)
    return {"image": image, "label": label.astype(np.uint8), "file_name": image_path.name}


def read_sbd_mat(path: Path) -> np.ndarray:
    """``GTcls.Segmentation`` of an SBD ``cls/*.mat`` as uint8 [H, W]."""
    mat = common.load_mat(path, "SBD annotation", mat_dtype=True, squeeze_me=True, struct_as_record=False)
    try:
        return np.asarray(mat["GTcls"].Segmentation).astype(np.int64)
    except (KeyError, AttributeError, TypeError, ValueError) as err:
        raise common.DataError(f"{path} holds no GTcls.Segmentation ({err!r}): {common.NOT_AS_RELEASED}") from err


def _sbd_example(root: Path, stem: str) -> dict:
    image_path = root / SBD_ROOT / "img" / f"{stem}.jpg"
    mat_path = root / SBD_ROOT / "cls" / f"{stem}.mat"
    image, size = common.read_rgb(image_path)
    label = common.check_label(read_sbd_mat(mat_path), size, valid_values=np.arange(21), example=mat_path)
    return {"image": image, "label": label.astype(np.uint8), "file_name": image_path.name}


def _info(builder: tfds.core.GeneratorBasedBuilder) -> tfds.core.DatasetInfo:
    return common.dataset_info(builder, __doc__, homepage="http://host.robots.ox.ac.uk/pascal/VOC/voc2012/")


class PascalVoc(tfds.core.GeneratorBasedBuilder):
    """VOC2012 segmentation: JPEGs with palette-index masks (0..20, 255 = void)."""

    name = "fastfcn_pascal_voc"
    VERSION = tfds.core.Version("1.0.0")
    MANUAL_DOWNLOAD_INSTRUCTIONS = VOC_INSTRUCTIONS

    def _info(self) -> tfds.core.DatasetInfo:
        return _info(self)

    def _split_generators(self, dl_manager: tfds.download.DownloadManager) -> dict[str, Iterator]:
        lists = {"train": "train", "validation": "val", "trainval": "trainval"}
        required = [f"{VOC_ROOT}/ImageSets/Segmentation/{name}.txt" for name in lists.values()]
        root = common.require_files(common.manual_dir(dl_manager), required, VOC_INSTRUCTIONS, dataset="pascal_voc")
        split_dir = root / VOC_ROOT / "ImageSets" / "Segmentation"
        return {
            split: self._generate_examples(root, common.read_split_file(split_dir / f"{name}.txt"))
            for split, name in lists.items()
        }

    def _generate_examples(self, root: Path, stems: list[str]) -> Iterator[tuple[str, dict]]:
        for stem in stems:
            yield stem, _voc_example(root, stem)


class PascalAug(tfds.core.GeneratorBasedBuilder):
    """VOC2012 + SBD: train_aug (10582 convention), VOC val, and the reference's SBD splits."""

    name = "fastfcn_pascal_aug"
    VERSION = tfds.core.Version("1.0.0")
    MANUAL_DOWNLOAD_INSTRUCTIONS = AUG_INSTRUCTIONS

    def _info(self) -> tfds.core.DatasetInfo:
        return _info(self)

    def _split_generators(self, dl_manager: tfds.download.DownloadManager) -> dict[str, Iterator]:
        required = [
            f"{VOC_ROOT}/ImageSets/Segmentation/train.txt",
            f"{VOC_ROOT}/ImageSets/Segmentation/val.txt",
            f"{SBD_ROOT}/train.txt",
            f"{SBD_ROOT}/val.txt",
        ]
        root = common.require_files(
            common.manual_dir(dl_manager),
            required,
            AUG_INSTRUCTIONS,
            dataset="pascal_aug",
            renamed={"VOCaug": "benchmark_RELEASE"},  # SBD's archive extracts to benchmark_RELEASE/
        )
        voc_lists = root / VOC_ROOT / "ImageSets" / "Segmentation"
        voc_train = common.read_split_file(voc_lists / "train.txt")
        voc_val = common.read_split_file(voc_lists / "val.txt")
        sbd_train = common.read_split_file(root / SBD_ROOT / "train.txt")
        sbd_val = common.read_split_file(root / SBD_ROOT / "val.txt")
        excluded = set(voc_val)
        train_aug = sorted((set(voc_train) | set(sbd_train) | set(sbd_val)) - excluded)
        in_voc_train = set(voc_train)
        return {
            "train": self._generate_examples(root, [(s, s in in_voc_train) for s in train_aug]),
            "validation": self._generate_examples(root, [(s, True) for s in voc_val]),
            "sbd_trainval": self._generate_examples(root, [(s, False) for s in sbd_train + sbd_val]),
            "sbd_val": self._generate_examples(root, [(s, False) for s in sbd_val]),
        }

    def _generate_examples(self, root: Path, items: list[tuple[str, bool]]) -> Iterator[tuple[str, dict]]:
        for stem, from_voc in items:
            yield stem, (_voc_example(root, stem) if from_voc else _sbd_example(root, stem))

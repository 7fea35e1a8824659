"""Pascal Context (59 classes, background ignored) from VOC2010 JPEGs + the Context annotations.

Two annotation sources, both mapped as the reference does:
- ``trainval_merged.json`` (what FastFCN reads through the Detail API): per image, every
  ``annos_segmentation`` entry (COCO compressed RLE) paints its ``category_id`` in JSON order over zeros; the
  459-ids are then replaced by their index in the sorted 60-entry mapping (an id outside it is an error, as
  the reference asserts). Splits = the images' ``phase`` (train 4998 / val 5105).
- fallback: the original ``trainval/<stem>.mat`` (``LabelMap`` uint16 459-ids; ids outside the 59 become
  background) with VOC2010 ``ImageSets/Main/{train,val}.txt``.
Stored label: the intermediate 0..59 (uint8, 0 = background), as the reference caches it; the pipeline
subtracts 1.
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import tensorflow_datasets as tfds

from fastfcn_jax.data.builders import common
from fastfcn_jax.data.class_tables import CLASS_TABLES

ROOT = "VOCdevkit/VOC2010"
INSTRUCTIONS = f"""\
Pascal Context: download the VOC2010 trainval images
  http://host.robots.ox.ac.uk/pascal/VOC/voc2010/VOCtrainval_03-May-2010.tar
and the Context annotations used by FastFCN
  https://codalabuser.blob.core.windows.net/public/trainval_merged.json
and arrange them in MANUAL_DIR as:
  MANUAL_DIR/{ROOT}/JPEGImages/2008_000002.jpg ...
  MANUAL_DIR/{ROOT}/trainval_merged.json
Alternatively, instead of the JSON, the original release https://cs.stanford.edu/~roozbeh/pascal-context/
trainval.tar.gz unpacked as MANUAL_DIR/{ROOT}/trainval/<stem>.mat, with the VOC2010 split lists
MANUAL_DIR/{ROOT}/ImageSets/Main/train.txt and val.txt.
"""
MAPPING_459_TO_60 = np.asarray(CLASS_TABLES["pcontext"]["mapping_459_to_60"], np.int64)
_SPLITS = {"train": "train", "validation": "val"}


def decode_rle(counts: str, height: int, width: int) -> np.ndarray:
    """COCO compressed RLE (``maskApi.c`` ``rleFrString`` + ``rleDecode``) -> bool [height, width]."""
    runs: list[int] = []
    pos = 0
    while pos < len(counts):
        value, shift, more = 0, 0, True
        while more:
            char = ord(counts[pos]) - 48
            value |= (char & 0x1F) << shift
            more = bool(char & 0x20)
            pos += 1
            shift += 5
            if not more and char & 0x10:
                value |= -1 << shift  # Sign-extend the last 5-bit group.
        if len(runs) > 2:  # From the fourth count on, counts are stored as differences.
            value += runs[-2]
        runs.append(value)
    if sum(runs) != height * width or min(runs, default=0) < 0:
        raise common.DataError(f"RLE counts sum to {sum(runs)}, expected {height}x{width}")
    values = np.arange(len(runs)) % 2  # Runs alternate 0, 1, 0, ... starting with zeros.
    flat = np.repeat(values.astype(bool), runs)
    return flat.reshape(width, height).T  # Column-major (Fortran) pixel order.


def map_459_to_60(ids: np.ndarray, *, strict: bool, example: str | Path) -> np.ndarray:
    """459-ids -> intermediate label 0..59 (index in the sorted mapping).

    strict: every id must be in the mapping (the reference asserts it for the JSON masks); otherwise ids
    outside it become background 0 (the ``.mat`` release holds all 459 classes).
    """
    index = np.searchsorted(MAPPING_459_TO_60, ids)
    index = np.clip(index, 0, len(MAPPING_459_TO_60) - 1)
    known = MAPPING_459_TO_60[index] == ids
    if strict and not known.all():
        bad = np.unique(ids[~known])
        raise common.DataError(
            f"{example}: category ids {bad[:10].tolist()} are not among the 59 Pascal Context classes "
            "(ids must be 0 or in mapping_459_to_60)"
        )
    return np.where(known, index, 0).astype(np.uint8)


class PascalContext(tfds.core.GeneratorBasedBuilder):
    """Pascal Context 59 classes: VOC2010 JPEGs with intermediate labels 0..59 (0 = background)."""

    name = "fastfcn_pcontext"
    VERSION = tfds.core.Version("1.0.0")
    MANUAL_DOWNLOAD_INSTRUCTIONS = INSTRUCTIONS

    def _info(self) -> tfds.core.DatasetInfo:
        return common.dataset_info(self, __doc__, homepage="https://cs.stanford.edu/~roozbeh/pascal-context/")

    def _split_generators(self, dl_manager: tfds.download.DownloadManager) -> dict[str, Iterator]:
        manual = common.manual_dir(dl_manager)
        root = None if manual is None else manual / ROOT
        if root is not None and (root / "trainval_merged.json").exists():
            common.require_files(manual, [f"{ROOT}/JPEGImages"], INSTRUCTIONS, dataset="pcontext")
            detail = _read_detail(root / "trainval_merged.json")
            return {
                split: self._generate_examples(self._from_json(root, detail, phase)) for split, phase in _SPLITS.items()
            }
        if root is not None and (root / "trainval").is_dir():
            required = [f"{ROOT}/JPEGImages", f"{ROOT}/ImageSets/Main/train.txt", f"{ROOT}/ImageSets/Main/val.txt"]
            common.require_files(manual, required, INSTRUCTIONS, dataset="pcontext")
            return {split: self._generate_examples(self._from_mat(root, phase)) for split, phase in _SPLITS.items()}
        common.require_files(
            manual, [f"{ROOT}/JPEGImages", f"{ROOT}/trainval_merged.json"], INSTRUCTIONS, dataset="pcontext"
        )
        raise AssertionError("unreachable: require_files raises when the JSON is missing")

    def _generate_examples(self, examples: Iterator[tuple[str, dict]]) -> Iterator[tuple[str, dict]]:
        yield from examples  # The annotation source (JSON or .mat) is chosen in _split_generators.

    def _from_json(self, root: Path, detail: dict, phase: str) -> Iterator[tuple[str, dict]]:
        annotations = defaultdict(list)
        for annotation in detail["annos_segmentation"]:  # JSON order = paint order (later overwrite).
            annotations[annotation["image_id"]].append(annotation)
        images = sorted((im for im in detail["images"] if phase in im["phase"]), key=lambda im: im["file_name"])
        for record in images:
            image_path = root / "JPEGImages" / record["file_name"]
            image, (height, width) = common.read_rgb(image_path)
            ids = np.zeros((height, width), np.int64)
            for annotation in annotations[record["image_id"]]:
                rle = annotation["segmentation"]
                if tuple(rle["size"]) != (height, width):
                    raise common.DataError(
                        f"{image_path}: annotation {annotation.get('id')} of trainval_merged.json has height x width "
                        f"{rle['size'][0]}x{rle['size'][1]} but the image is {height}x{width}"
                    )
                try:
                    mask = decode_rle(rle["counts"], height, width)
                except common.DataError as err:
                    raise common.DataError(f"{record['file_name']}: annotation {annotation.get('id')}: {err}") from err
                ids[mask] = annotation["category_id"]
            label = map_459_to_60(ids, strict=True, example=record["file_name"])
            stem = Path(record["file_name"]).stem
            yield stem, {"image": image, "label": label[..., None], "file_name": record["file_name"]}

    def _from_mat(self, root: Path, phase: str) -> Iterator[tuple[str, dict]]:
        for stem in sorted(common.read_split_file(root / "ImageSets" / "Main" / f"{phase}.txt")):
            image_path = root / "JPEGImages" / f"{stem}.jpg"
            mat_path = root / "trainval" / f"{stem}.mat"
            image, size = common.read_rgb(image_path)
            mat = common.load_mat(mat_path, "Pascal Context annotation")
            try:
                ids = np.asarray(mat["LabelMap"], np.int64)
            except (KeyError, TypeError, ValueError) as err:
                raise common.DataError(f"{mat_path} holds no LabelMap ({err!r}): {common.NOT_AS_RELEASED}") from err
            common.check_label(ids, size, valid_values=np.arange(460), example=mat_path)
            label = map_459_to_60(ids, strict=False, example=mat_path)
            yield stem, {"image": image, "label": label[..., None], "file_name": image_path.name}


def _read_detail(path: Path) -> dict:
    """The Detail API's JSON, or DataError naming the file when it is truncated or not that JSON."""
    try:
        detail = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise common.DataError(
            f"{path}: not readable JSON ({error}); the download is probably incomplete: download it again."
            f"\n{INSTRUCTIONS}"
        ) from error
    missing = [key for key in ("images", "annos_segmentation") if key not in detail]
    if missing:
        raise common.DataError(f"{path}: no {', '.join(missing)} in it: not the Detail API's trainval_merged.json")
    return detail

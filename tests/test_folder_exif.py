"""Folder datasets store phone photos upright, as their EXIF orientation tag says (as prediction reads them and
annotation tools show them), so that a mask drawn on the displayed photo lines up with the stored pixels."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image, ImageOps

from fastfcn_jax.data import pipeline, prepare
from fastfcn_jax.data.builders import common, folder

tfds.disable_progress_bar()

# EXIF orientation 6: a viewer shows the stored pixels turned 90 degrees clockwise (the stored left column
# becomes the top row; width and height swap).
ROTATE_CLOCKWISE = 6
BAND = 4  # rows of class 1 at the top of the displayed photo


def _source(root: Path) -> Path:
    source = root / "src"
    (source / "images" / "train").mkdir(parents=True)
    (source / "masks" / "train").mkdir(parents=True)
    (source / "classes.json").write_text(json.dumps({"names": ["background", "band"]}))
    return source


def _write_photo(path: Path, height: int, width: int, orientation: int | None) -> None:
    """A JPEG whose *displayed* image (after ``orientation``) has a white band in its top BAND rows: stored
    pixels have it in their left BAND columns when the tag turns them clockwise."""
    stored = np.zeros((height, width, 3), np.uint8)
    if orientation == ROTATE_CLOCKWISE:
        stored[:, :BAND] = 255
    else:
        stored[:BAND] = 255
    exif = Image.Exif()
    if orientation is not None:
        exif[0x0112] = orientation
    Image.fromarray(stored).save(path, quality=95, exif=exif)


def _write_displayed_mask(path: Path, height: int, width: int) -> None:
    """The mask an annotation tool draws on the displayed ``height`` x ``width`` photo: the band is class 1."""
    mask = np.zeros((height, width), np.uint8)
    mask[:BAND] = 1
    Image.fromarray(mask, "L").save(path)


def _examples(name: str, data_dir: Path) -> dict[str, dict]:
    return {ex["file_name"]: ex for ex in pipeline.full_examples(name, data_dir=data_dir, split="train")}


def test_a_square_photo_is_stored_upright_and_lines_up_with_its_mask(tmp_path, capsys):
    source = _source(tmp_path)
    _write_photo(source / "images/train/phone.jpg", 16, 16, ROTATE_CLOCKWISE)
    _write_displayed_mask(source / "masks/train/phone.png", 16, 16)
    data_dir = tmp_path / "tfds"
    assert prepare.main(["--dataset", "folder:exif", "--source", str(source), "--data-dir", str(data_dir)]) == 0
    assert "folder:exif: 1 image(s) turned upright as their EXIF orientation tag says" in capsys.readouterr().out

    example = _examples("folder:exif", data_dir)["phone.jpg"]
    with Image.open(source / "images/train/phone.jpg") as photo:
        upright = np.asarray(ImageOps.exif_transpose(photo).convert("RGB"))  # as prediction reads it
    np.testing.assert_array_equal(example["image"], upright)  # lossless: the decoded pixels, turned
    band = np.zeros((16, 16), bool)
    band[:BAND] = True
    np.testing.assert_array_equal(example["label"] == 1, band)
    np.testing.assert_array_equal(example["image"].mean(-1) > 128, band)  # the white band is where the mask says


def test_a_non_square_photo_is_accepted_with_the_mask_of_its_displayed_size(tmp_path, capsys):
    source = _source(tmp_path)
    _write_photo(source / "images/train/phone.jpg", 24, 16, ROTATE_CLOCKWISE)  # stored 16x24 (WxH), shown 24x16
    _write_displayed_mask(source / "masks/train/phone.png", 16, 24)
    _write_photo(source / "images/train/plain.jpg", 16, 24, None)  # no tag: as stored
    _write_displayed_mask(source / "masks/train/plain.png", 16, 24)
    data_dir = tmp_path / "tfds"
    assert prepare.main(["--dataset", "folder:exif", "--source", str(source), "--data-dir", str(data_dir)]) == 0
    assert "folder:exif: 1 image(s) turned upright" in capsys.readouterr().out  # the untagged one is not counted

    for example in _examples("folder:exif", data_dir).values():
        assert example["image"].shape == (16, 24, 3)
        np.testing.assert_array_equal(example["image"].mean(-1) > 128, example["label"] == 1)
    # Only the turned photo is re-encoded (as PNG); an untagged JPEG keeps its bytes.
    builder = folder.Folder(config="exif", data_dir=str(data_dir))
    stored = {
        ex["file_name"].decode(): ex["image"]
        for ex in tfds.as_numpy(builder.as_dataset(split="train", decoders={"image": tfds.decode.SkipDecoding()}))
    }
    assert stored["plain.jpg"] == (source / "images/train/plain.jpg").read_bytes()
    assert stored["phone.jpg"].startswith(b"\x89PNG")


def test_a_photo_without_a_turn_prints_nothing_about_exif(tmp_path, capsys):
    source = _source(tmp_path)
    _write_photo(source / "images/train/plain.jpg", 16, 24, 1)  # orientation 1: as stored
    _write_displayed_mask(source / "masks/train/plain.png", 16, 24)
    assert prepare.main(["--dataset", "folder:exif", "--source", str(source), "--data-dir", str(tmp_path)]) == 0
    assert "EXIF" not in capsys.readouterr().out


def test_a_mask_of_the_stored_pixels_is_refused_naming_the_exif_orientation(tmp_path):
    source = _source(tmp_path)
    _write_photo(source / "images/train/phone.jpg", 24, 16, ROTATE_CLOCKWISE)
    _write_displayed_mask(source / "masks/train/phone.png", 24, 16)  # drawn on the stored 16x24 pixels
    with pytest.raises(common.DataError) as error:
        pipeline.prepare("folder:exif", tmp_path / "tfds", source_dir=source)
    message = str(error.value)
    assert "phone.png: label size 16x24 (WxH) differs from its image 24x16" in message
    assert "EXIF orientation 6" in message and "this mask matches the stored pixels" in message
    assert "turn it the same way (90 degrees clockwise)" in message

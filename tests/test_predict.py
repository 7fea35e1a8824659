"""Prediction: the Python API, folders of mixed images, skipped non-images, and the lazy package exports."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from fastfcn_jax import checkpointing
from fastfcn_jax.config import base_config
from fastfcn_jax.data.datasets import get_dataset_info
from fastfcn_jax.models import create_model
from tests.model_weights import calibrated_variables

NUM_CLASSES = 6  # synthetic_shapes
SIZE = 64  # base and crop size: every image is one or two 64 x 64 windows


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    model = create_model("encnet_jpu_tiny", NUM_CLASSES)
    variables = calibrated_variables(model, SIZE)  # predictions that depend on the image (tests/model_weights.py)
    directory = tmp_path_factory.mktemp("checkpoint")
    info = {"model_name": "encnet_jpu_tiny", "num_classes": NUM_CLASSES, "dataset": "synthetic_shapes"}
    checkpointing.save_variables(directory, jax.device_get(variables), info)
    return directory


@pytest.fixture(scope="module")
def predictor(checkpoint):
    from fastfcn_jax.predict import Predictor

    return Predictor.from_checkpoint(checkpoint, base_size=SIZE, crop_size=SIZE, images_per_call=3, window_batch=4)


def test_predictor_returns_one_class_index_per_pixel_for_any_mode_and_size(predictor):
    rng = np.random.default_rng(0)
    images = [
        rng.integers(0, 256, (37, 53, 3), dtype=np.uint8),  # RGB
        rng.integers(0, 256, (70, 20), dtype=np.uint8),  # grayscale
        rng.integers(0, 256, (25, 25, 4), dtype=np.uint8),  # RGBA
        rng.integers(0, 256, (9, 90, 1)).astype(np.float32),  # single channel, float 0..255
    ]
    for image in images:
        mask = predictor(image)
        assert mask.shape == image.shape[:2] and mask.dtype == np.int32
        assert mask.min() >= 0 and mask.max() < NUM_CLASSES
    # Batched prediction equals one-by-one prediction (images share device calls, not results).
    batched = predictor.predict_batch(images)
    for image, mask in zip(images, batched, strict=True):
        np.testing.assert_array_equal(mask, predictor(image))
    assert predictor.runner.compile_count == 4


def test_predictor_uses_the_checkpoints_dataset_palette_and_names(predictor):
    info = get_dataset_info("synthetic_shapes")
    np.testing.assert_array_equal(predictor.palette, info.palette)
    assert predictor.class_names == list(info.class_names)
    with pytest.raises(ValueError, match=r"\[H, W, 3\]"):
        predictor(np.zeros((4, 4, 2), np.uint8))


def test_a_predictor_rescales_images_as_its_model_resizes(tmp_path):
    # mmsegmentation's variant resizes with half-pixel centres: the protocol's image rescaling and the scores'
    # resizing back follow the model, whatever protocol object is passed in.
    from fastfcn_jax.evaluate import make_protocol
    from fastfcn_jax.predict import Predictor

    model = create_model("psp_jpu_tiny", 3, reference="mmseg")
    variables = jax.jit(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, 64, 64, 3)), train=False))()
    predictor = Predictor(
        model, variables, num_classes=3, protocol=make_protocol("single_scale", base_size=64, crop_size=64)
    )
    assert predictor.protocol.align_corners is False and predictor.runner.protocol.align_corners is False
    mask = predictor(np.zeros((30, 50, 3), np.uint8))
    assert mask.shape == (30, 50) and mask.dtype == np.int32


def test_array_value_ranges_are_read_as_their_dtypes_mean():
    from fastfcn_jax.predict import to_rgb

    pixels = np.random.default_rng(0).integers(0, 256, (5, 7, 3), dtype=np.uint8)
    np.testing.assert_array_equal(to_rgb(pixels.astype(np.float32)), pixels)  # floats in 0..255
    np.testing.assert_array_equal(to_rgb(pixels.astype(np.float32) / 255), pixels)  # floats in 0..1
    np.testing.assert_array_equal(to_rgb(pixels.astype(np.uint16) * 257), pixels)  # 16 bits
    np.testing.assert_array_equal(to_rgb(pixels.astype(np.int64)), pixels)
    with pytest.raises(ValueError, match="NaN or infinite"):
        to_rgb(np.full((4, 4, 3), np.nan))


def test_a_checkpoint_whose_variables_do_not_fit_its_model_fails_when_opened(tmp_path):
    from fastfcn_jax.predict import Predictor

    variables = jax.eval_shape(
        lambda: create_model("fcn_jpu_tiny", 4).init(jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3)))
    )
    variables = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), variables)
    # A dtype override is stored by name; what JSON cannot hold is refused before anything is written.
    info = {"model_name": "psp_jpu_tiny", "num_classes": 4, "model_overrides": {"dtype": jnp.bfloat16}}
    checkpointing.save_variables(tmp_path / "mislabelled", variables, info)
    assert checkpointing.restore_variables(tmp_path / "mislabelled")[1]["model_overrides"] == {"dtype": "bfloat16"}
    with pytest.raises(ValueError, match=r"\(psp_jpu_tiny, 4 classes\) does not fit .*missing: [a-z_]+/decode_head"):
        Predictor.from_checkpoint(tmp_path / "mislabelled")
    with pytest.raises(ValueError, match="model_overrides.fn=.* cannot be stored as JSON"):
        checkpointing.save_variables(tmp_path / "bad", variables, {**info, "model_overrides": {"fn": print}})
    assert not (tmp_path / "bad").exists()


def _write_inputs(folder):
    rng = np.random.default_rng(1)
    folder.mkdir()
    Image.fromarray(rng.integers(0, 256, (40, 56, 3), dtype=np.uint8)).save(folder / "rgb.jpg", quality=90)
    Image.fromarray(rng.integers(0, 256, (33, 47), dtype=np.uint8), mode="L").save(folder / "gray.png")
    Image.fromarray(rng.integers(0, 256, (64, 30, 4), dtype=np.uint8), mode="RGBA").save(folder / "alpha.png")
    Image.fromarray(rng.integers(0, 256, (90, 20), dtype=np.uint8), mode="L").save(folder / "gray_jpeg.jpeg")
    (folder / "notes.txt").write_text("not an image")
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    return {"rgb": (40, 56), "gray": (33, 47), "alpha": (64, 30), "gray_jpeg": (90, 20)}


def test_predicting_a_folder_writes_a_mask_and_an_overlay_per_image_and_skips_non_images(checkpoint, tmp_path, capsys):
    from fastfcn_jax.predict import run_prediction

    sizes = _write_inputs(tmp_path / "inputs")
    config = base_config()
    config.init_from = str(checkpoint)
    config.dataset.base_size = SIZE
    config.dataset.crop_size = SIZE
    written = run_prediction(config, tmp_path / "workdir", str(tmp_path / "inputs"), str(tmp_path / "out"))

    assert sorted(p.name for p in written) == sorted(f"{n}_{kind}.png" for n in sizes for kind in ("mask", "overlay"))
    palette = get_dataset_info("synthetic_shapes").palette
    for name, (height, width) in sizes.items():
        mask = Image.open(tmp_path / "out" / f"{name}_mask.png")
        assert mask.mode == "P" and mask.size == (width, height)
        assert np.asarray(mask).max() < NUM_CLASSES
        np.testing.assert_array_equal(np.asarray(mask.getpalette()[: 3 * NUM_CLASSES]).reshape(-1, 3), palette)
        overlay = Image.open(tmp_path / "out" / f"{name}_overlay.png")
        assert overlay.mode == "RGB" and overlay.size[0] > width and overlay.size[1] >= height  # legend on the right
    report = capsys.readouterr()
    assert "notes.txt" in report.err and "broken.png" in report.err
    assert "wrote 4 masks" in report.out and "skipped 2" in report.out
    # base_config's model is not the checkpoint's: the checkpoint's is used, and that is said.
    assert "holds encnet_jpu_tiny with 6 classes and predicts as such; the config's " in report.out
    assert "config.model.name=encnet_jpu_r50 is not used" in report.out


def test_same_named_inputs_never_overwrite_each_other_and_oversized_images_are_skipped(
    checkpoint, tmp_path, monkeypatch, capsys
):
    from fastfcn_jax.predict import run_prediction

    rng = np.random.default_rng(2)
    inputs = tmp_path / "inputs"
    for name in ("sub1/x.png", "sub2/x.png", "sub3/x.png", "x_png.png"):
        (inputs / name).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(inputs / name)
    Image.fromarray(rng.integers(0, 256, (100, 100, 3), dtype=np.uint8)).save(inputs / "huge.png")
    # PIL refuses images over twice MAX_IMAGE_PIXELS (a decompression bomb): here the 100x100 one.
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 4000)
    config = base_config()
    config.init_from = str(checkpoint)
    config.dataset.base_size = SIZE
    config.dataset.crop_size = SIZE
    written = run_prediction(config, tmp_path / "workdir", str(inputs / "**" / "*.png"), str(tmp_path / "out"))

    stems = ["sub1_x", "sub2_x", "sub3_x", "x_png"]  # the paths below the inputs' common folder
    assert [p.name for p in written] == [f"{stem}_{kind}.png" for stem in stems for kind in ("mask", "overlay")]
    assert all(p.is_file() for p in written)
    report = capsys.readouterr()
    assert "huge.png" in report.err and "wrote 4 masks" in report.out and "skipped 1 unreadable" in report.out
    assert "huge.png: too large for Pillow" in report.err and "downscale it first" in report.err

    # A folder: its subfolders and hidden images are not read, and that is said.
    Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(inputs / ".hidden.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)
    run_prediction(config, tmp_path / "workdir", str(inputs), str(tmp_path / "out_folder"))
    note = f"left out of {inputs}: 3 subfolder(s) (the folder is not read recursively: '{inputs}/**/*' is) and 1 hidden"
    assert note in capsys.readouterr().out

    (tmp_path / "text").mkdir()
    (tmp_path / "text" / "notes.txt").write_text("not an image")
    with pytest.raises(ValueError, match="none of the 1 input file"):
        run_prediction(config, tmp_path / "workdir", str(tmp_path / "text"), str(tmp_path / "out2"))

    # A phone's sidecar file sorts before its photo and is skipped: the photo keeps its own name.
    (tmp_path / "phone").mkdir()
    (tmp_path / "phone" / "IMG_0001.AAE").write_text("<plist/>")
    Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(tmp_path / "phone" / "IMG_0001.JPG")
    written = run_prediction(config, tmp_path / "workdir", str(tmp_path / "phone"), str(tmp_path / "out3"))
    assert [p.name for p in written] == ["IMG_0001_mask.png", "IMG_0001_overlay.png"]


def test_inputs_of_one_name_in_several_folders_are_named_by_their_path_and_listed_in_an_index(checkpoint, tmp_path):
    from fastfcn_jax.predict import run_prediction

    rng = np.random.default_rng(4)
    inputs = tmp_path / "nested"
    for name in ("a/x.jpg", "b/x.jpg", "b/c/x.jpg", "a_x.jpg", "y.jpg"):
        (inputs / name).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(inputs / name)
    (inputs / "b" / "notes.txt").write_text("not an image")
    config = base_config()
    config.init_from = str(checkpoint)
    config.dataset.base_size = config.dataset.crop_size = SIZE
    out = tmp_path / "out"
    run_prediction(config, tmp_path / "workdir", str(inputs / "**" / "*"), str(out))

    # Sorted inputs: a/x.jpg, a_x.jpg (its name taken by a/x.jpg: the suffix added), b/c/x.jpg, b/notes.txt, ...
    expected = {
        "a/x.jpg": "a_x",
        "a_x.jpg": "a_x_jpg",
        "b/c/x.jpg": "b_c_x",
        "b/x.jpg": "b_x",
        "y.jpg": "y",
    }
    index = json.loads((out / "predictions.json").read_text())
    listed = {Path(entry["input"]).relative_to(inputs).as_posix(): entry for entry in index["files"]}
    assert sorted(listed) == sorted([*expected, "b/notes.txt"])
    for name, stem in expected.items():
        assert listed[name]["mask"] == f"{stem}_mask.png" and listed[name]["overlay"] == f"{stem}_overlay.png"
        assert (out / f"{stem}_mask.png").is_file() and (out / f"{stem}_overlay.png").is_file()
    assert "not a readable image" in listed["b/notes.txt"]["skipped"] and "mask" not in listed["b/notes.txt"]
    assert index["protocol"]["base_size"] == index["protocol"]["crop_size"] == SIZE
    assert index["checkpoint"] == str(checkpoint) and index["model_name"] == "encnet_jpu_tiny"


def test_benchmark_files_keep_each_images_own_name_unless_another_input_shares_it():
    from fastfcn_jax.predict import benchmark_names, output_names

    files = [Path(p) for p in ("t/a/x.jpg", "t/b/x.jpg", "t/c/y.jpg", "t/a_x.jpg", "t/d/IMG_1.JPG", "t/d/img_1.aae")]
    names = benchmark_names(files, output_names(files))
    # y is alone: its own name; the two x share theirs: output names; a_x.jpg is alone but keeps its own name,
    # which a/x.jpg's output name would have taken; names equal but for case count as shared.
    assert names[2] == "y" and names[3] == "a_x"
    assert names[0] not in ("x", "a_x") and names[1] == "b_x" and len({n.casefold() for n in names}) == len(names)
    assert names[4] == "d_IMG_1" and names[5] != "d_IMG_1"


def test_prediction_uses_the_sizes_the_checkpoint_was_trained_at_and_says_so(checkpoint, tmp_path, capsys):
    from fastfcn_jax.predict import Predictor, run_prediction

    # synthetic_shapes' own sizes are 128 / 96; this run trained (and validated) at 48 / 32 and recorded them.
    dataset = get_dataset_info("synthetic_shapes")
    variables, info = checkpointing.restore_variables(checkpoint)
    trained = tmp_path / "trained"
    checkpointing.save_variables(trained, variables, {**info, "base_size": 48, "crop_size": 32}, step=info["step"])

    def sizes(predictor):
        return predictor.protocol.base_size, predictor.protocol.crop_size, predictor.size_sources

    predictor = Predictor.from_checkpoint(trained)
    assert (predictor.protocol.base_size, predictor.protocol.crop_size) == (48, 32)  # not the dataset's 128 / 96
    assert predictor.size_sources == ("checkpoint", "checkpoint")
    assert sizes(Predictor.from_checkpoint(trained, base_size=64, crop_size=40)) == (64, 40, ("given", "given"))
    # A checkpoint that records none (a converter's): the sizes given for that case, else its dataset's.
    assert sizes(Predictor.from_checkpoint(checkpoint)) == (dataset.base_size, dataset.crop_size, ("dataset",) * 2)
    unrecorded = Predictor.from_checkpoint(checkpoint, unrecorded_sizes=(64, 40))
    assert sizes(unrecorded) == (64, 40, ("unrecorded", "unrecorded"))

    # mode=predict with a config file's own sizes (as configs/demo.py's): the checkpoint's win, and that is said.
    (tmp_path / "inputs").mkdir()
    pixels = np.random.default_rng(5).integers(0, 256, (20, 30, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(tmp_path / "inputs" / "photo.png")
    config = base_config()
    config.init_from = str(trained)
    config.dataset.base_size, config.dataset.crop_size = SIZE, SIZE
    run_prediction(config, tmp_path / "workdir", str(tmp_path / "inputs"), str(tmp_path / "out"))
    report = capsys.readouterr().out
    assert "protocol single_scale (scales (1.0,), flip False, base 48, crop 32, stride 21; sizes recorded in" in report
    assert (
        "note: predicting at base 48 / crop 32 (sizes recorded in the checkpoint), not at config.dataset's 64 / 64; "
        "to predict at those, add --config.evaluation.base_size=64 --config.evaluation.crop_size=64"
    ) in report
    recorded = json.loads((tmp_path / "out" / "predictions.json").read_text())["protocol"]
    assert (recorded["base_size"], recorded["crop_size"], recorded["flip"]) == (48, 32, False)
    mask = np.asarray(Image.open(tmp_path / "out" / "photo_mask.png"))
    np.testing.assert_array_equal(mask, Predictor.from_checkpoint(trained)(pixels))


def test_prediction_with_mmsegmentations_protocol(checkpoint, tmp_path, capsys):
    from fastfcn_jax.predict import Predictor, run_prediction

    (tmp_path / "inputs").mkdir()
    pixels = np.random.default_rng(6).integers(0, 256, (20, 30, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(tmp_path / "inputs" / "photo.png")
    config = base_config()
    config.init_from = str(checkpoint)
    config.evaluation.protocol = "mmseg"
    with pytest.raises(ValueError, match="'mmseg' on dataset 'synthetic_shapes': mmsegmentation has no test scale"):
        run_prediction(config, tmp_path / "workdir", str(tmp_path / "inputs"), str(tmp_path / "out"))
    config.evaluation.test_scale = (64, 48)
    run_prediction(config, tmp_path / "workdir", str(tmp_path / "inputs"), str(tmp_path / "out"))
    report = capsys.readouterr().out
    assert "protocol mmseg (test scale (64, 48) x ratios (1.0,), flip False, whole image unpadded, softmax" in report
    assert "note: predicting at" not in report  # base and crop sizes play no part
    recorded = json.loads((tmp_path / "out" / "predictions.json").read_text())["protocol"]
    assert recorded["test_scale"] == [64, 48] and recorded["softmax"] and recorded["pad_multiple"] == 1
    predictor = Predictor.from_checkpoint(checkpoint, protocol="mmseg", test_scale=(64, 48))
    mask = np.asarray(Image.open(tmp_path / "out" / "photo_mask.png"))
    np.testing.assert_array_equal(mask, predictor(pixels))
    # 20 x 30 at (64, 48): factor min(64 / 30, 48 / 20) = 2.13 -> 43 x 64, the network's input unpadded.
    assert {"network_43x64"} == {k for k in predictor.runner.traces if k.startswith("network")}


def test_predicting_into_the_inputs_folder_again_leaves_out_its_own_outputs(checkpoint, tmp_path, capsys):
    from fastfcn_jax.predict import run_prediction

    sizes = _write_inputs(tmp_path / "inputs")
    config = base_config()
    config.init_from = str(checkpoint)
    config.dataset.base_size = config.dataset.crop_size = SIZE
    folder = str(tmp_path / "inputs")
    first = run_prediction(config, tmp_path / "workdir", folder, folder)
    second = run_prediction(config, tmp_path / "workdir", folder, folder)
    assert sorted(p.name for p in second) == sorted(p.name for p in first) and len(first) == 2 * len(sizes)
    assert not list((tmp_path / "inputs").glob("*_mask_mask.png"))
    report = capsys.readouterr()
    assert f"left out {2 * len(sizes) + 1} files in {folder} that an earlier prediction wrote there" in report.out
    assert "predictions.json" not in report.err  # not reported as an unreadable image either


def test_a_single_file_and_a_glob_are_accepted(checkpoint, tmp_path):
    from fastfcn_jax.predict import collect_inputs

    _write_inputs(tmp_path / "inputs")
    assert [p.name for p in collect_inputs(str(tmp_path / "inputs" / "rgb.jpg"))] == ["rgb.jpg"]
    pngs = collect_inputs(str(tmp_path / "inputs" / "*.png"))
    assert [p.name for p in pngs] == ["alpha.png", "broken.png", "gray.png"]
    with pytest.raises(FileNotFoundError, match="image file, a folder"):
        collect_inputs(str(tmp_path / "nothing_here"))


def test_overlay_legend_lists_exactly_the_classes_present(predictor):
    image = np.full((40, 60, 3), 128, np.uint8)
    mask = np.zeros((40, 60), np.int32)
    mask[:, 40:] = 3
    with_two = predictor.overlay(image, mask)
    mask[:5, :5] = 5
    with_three = predictor.overlay(image, mask)
    assert with_three.shape[0] > with_two.shape[0] or with_three.shape[1] >= with_two.shape[1]
    # The swatch of each present class appears in the legend panel, absent classes' colours do not.
    legend = with_three[:, 60:].reshape(-1, 3)
    colours = {tuple(c) for c in legend}
    for class_id in range(NUM_CLASSES):
        assert (tuple(predictor.palette[class_id]) in colours) == (class_id in (0, 3, 5))


def test_importing_the_package_is_lazy_and_exports_the_predictor():
    code = (
        "import sys, fastfcn_jax\n"
        "heavy = [m for m in ('flax', 'tensorflow', 'jax') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
        "from fastfcn_jax.predict import Predictor\n"
        "assert fastfcn_jax.Predictor is Predictor\n"
        "assert 'tensorflow' not in sys.modules\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_test_server_masks_of_unlabelled_images_are_in_the_benchmarks_own_encoding(checkpoint, tmp_path, monkeypatch):
    # ADE20K's test server takes grayscale PNGs of class + 1 (0 = "other"), named as the images: predict mode
    # writes them for a folder such as release_test/testing with config.evaluation.submission_dir.
    from fastfcn_jax.predict import run_prediction

    model = create_model("fcn_jpu_tiny", 150)
    variables = calibrated_variables(model, SIZE, seed=1)
    ade = tmp_path / "ade_checkpoint"
    checkpointing.save_variables(
        ade, jax.device_get(variables), {"model_name": "fcn_jpu_tiny", "num_classes": 150, "dataset": "ade20k"}
    )
    inputs = tmp_path / "testing"
    inputs.mkdir()
    rng = np.random.default_rng(3)
    rotated = Image.Exif()
    rotated[0x0112] = 6  # EXIF orientation "turn 90 degrees": scored as stored, so not applied here
    # One folder per group, as Cityscapes' test images (one per city): the submission is named by the images.
    for folder, name, shape in (("a", "ADE_test_00000001", (40, 56, 3)), ("b", "ADE_test_00000002", (70, 33, 3))):
        pixels = Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8))
        (inputs / folder).mkdir()
        pixels.save(inputs / folder / f"{name}.jpg", quality=90, exif=rotated)
    config = base_config()
    config.init_from = str(ade)
    config.dataset.base_size = config.dataset.crop_size = SIZE
    config.evaluation.submission_dir = str(tmp_path / "submission")
    run_prediction(config, tmp_path / "workdir", str(inputs / "*/*.jpg"), str(tmp_path / "out"))
    assert sorted(p.name for p in (tmp_path / "submission").iterdir()) == [
        "ADE_test_00000001.png",
        "ADE_test_00000002.png",
    ]
    for folder, name in (("a", "ADE_test_00000001"), ("b", "ADE_test_00000002")):
        submitted = Image.open(tmp_path / "submission" / f"{name}.png")
        classes = np.asarray(Image.open(tmp_path / "out" / f"{folder}_{name}_mask.png"))
        assert submitted.mode == "L" and submitted.size == Image.open(inputs / folder / f"{name}.jpg").size
        np.testing.assert_array_equal(np.asarray(submitted), classes + 1)

    # A checkpoint of no known dataset has no benchmark encoding: refused before any image is read.
    config.init_from = str(checkpoint)
    config.evaluation.submission_dir = str(tmp_path / "unknown")
    from fastfcn_jax import predict

    monkeypatch.setattr(predict, "_dataset_info", lambda name: None)  # e.g. a folder dataset
    with pytest.raises(ValueError, match="benchmark's label encoding is unknown"):
        run_prediction(config, tmp_path / "workdir", str(inputs / "*/*.jpg"), str(tmp_path / "out2"))
    assert not (tmp_path / "unknown").exists() and not list((tmp_path / "out2").glob("*.png"))

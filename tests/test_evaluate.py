"""Evaluation: metrics against NumPy, the reference's test protocol re-computed by a loop, compile counts,
and run_evaluation end to end on the embedded dataset."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import math
from collections.abc import Iterator
from pathlib import Path
from unittest import mock

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from PIL import Image

import fastfcn_jax
from fastfcn_jax import checkpointing, evaluate, metrics, protocols, sharding
from fastfcn_jax.config import base_config
from fastfcn_jax.models import create_model
from tests.model_weights import assert_image_dependent, calibrated_variables

NUM_CLASSES = 6
BASE, CROP = 80, 64  # small stand-ins for the reference's 520 / 480; stride int(64 * 2/3) = 42


@pytest.fixture(scope="module")
def tiny():
    """(model, variables, jitted single-batch logits) of a randomly initialised tiny EncNet+JPU."""
    model = create_model("encnet_jpu_tiny", NUM_CLASSES)
    # Freshly initialised ones are nearly constant over the pixels: no test of windows or flips could fail.
    variables = calibrated_variables(model, CROP)
    logits = jax.jit(lambda v, x: model.apply(v, x, train=False)["logits"])
    assert_image_dependent(logits(variables, np.random.default_rng(1).normal(size=(2, CROP, CROP, 3))))
    return model, variables, logits


# ----------------------------------------------------------------------------------------------------
# Metrics.


def test_metrics_match_numpy_loops_with_ignore_pixels_and_absent_classes():
    rng = np.random.default_rng(0)
    num_classes = 7  # classes 5 and 6 appear in neither labels nor predictions
    labels = rng.integers(-1, 5, size=(3, 17, 23))  # -1 = ignore
    predictions = rng.integers(0, 5, size=(3, 17, 23))
    expected = np.zeros((num_classes, num_classes), np.int64)
    for label, prediction in zip(labels.ravel(), predictions.ravel(), strict=True):
        if label != -1:
            expected[label, prediction] += 1
    confusion = metrics.confusion_matrix(labels, predictions, num_classes, ignore_label=-1)
    assert confusion.dtype == np.int64
    np.testing.assert_array_equal(confusion, expected)
    in_jit = jax.jit(metrics.batch_confusion, static_argnums=2)(jnp.asarray(labels), jnp.asarray(predictions), 7)
    np.testing.assert_array_equal(np.asarray(in_jit), expected)

    scores = metrics.segmentation_scores(confusion)
    labelled = labels != -1
    assert scores["pixel_accuracy"] == pytest.approx(np.mean(labels[labelled] == predictions[labelled]))
    ious = []
    for c in range(num_classes):
        inter = np.sum((labels == c) & (predictions == c) & labelled)
        union = np.sum(((labels == c) | (predictions == c)) & labelled)
        ious.append(inter / union if union else 0.0)
    assert scores["per_class_iou"] == pytest.approx(ious)
    assert scores["mean_iou"] == pytest.approx(np.mean(ious))  # absent classes count 0 (reference)
    assert scores["mean_iou_present"] == pytest.approx(np.mean(ious[:5]))
    assert scores["mean_iou"] == pytest.approx(scores["mean_iou_present"] * 5 / 7)


def test_pascal_context_60_class_number_is_the_59_class_mean_times_59_over_60(tmp_path):
    scores = {"pixel_accuracy": 0.8, "mean_iou": 0.5403, "mean_iou_present": 0.55, "per_class_iou": [0.5403] * 59}
    scores["mean_iou_60"] = evaluate.pcontext_60_class_miou(scores["mean_iou"])
    assert scores["mean_iou_60"] == pytest.approx(0.5313, abs=1e-4)  # README 54.03 -> paper 53.13
    table = evaluate.per_class_table(scores, [f"c{i}" for i in range(59)], np.eye(59, dtype=np.int64))
    assert "59 classes" in table and "60-class mIoU" in table and "53.13 %" in table


def test_submission_encoding_is_the_benchmarks_raw_values():
    from fastfcn_jax.data.datasets import get_dataset_info

    ade = get_dataset_info("ade20k")
    np.testing.assert_array_equal(evaluate.submission_encoding(ade.label_lut, 150), np.arange(1, 151))
    city = evaluate.submission_encoding(get_dataset_info("cityscapes").label_lut, 19)
    assert city[0] == 7 and city[1] == 8 and city[18] == 33  # road, sidewalk, bicycle label ids


def test_submission_pngs_take_each_benchmarks_form(tmp_path):
    from PIL import Image

    from fastfcn_jax.data.datasets import get_dataset_info

    raw = np.array([[0, 1], [20, 15]])
    for name in ("pascal_voc", "pascal_aug"):  # VOC's SegmentationClass form: palette PNGs, VOC's colours
        voc = get_dataset_info(name)
        evaluate.submission_image(raw, voc.submission_mode, voc.palette).save(tmp_path / f"{name}.png")
        read = Image.open(tmp_path / f"{name}.png")
        assert read.mode == "P" and np.array_equal(np.asarray(read), raw)
        assert read.getpalette()[3:6] == [128, 0, 0] and read.getpalette()[45:48] == [192, 128, 128]  # plane, person
    city = get_dataset_info("cityscapes")
    evaluate.submission_image(raw + 7, city.submission_mode, city.palette).save(tmp_path / "city.png")
    read = Image.open(tmp_path / "city.png")
    assert read.mode == "L" and np.array_equal(np.asarray(read), raw + 7)  # grayscale label ids
    # A folder dataset of 300 classes: 16-bit grey, never wrapped past 255.
    from fastfcn_jax.data.datasets import folder_info

    folder = folder_info("folder", {"names": [f"c{i}" for i in range(300)]})
    encoded = evaluate.submission_encoding(folder.label_lut, 300)[np.array([[0, 255], [256, 299]])]
    evaluate.submission_image(encoded, folder.submission_mode, folder.palette).save(tmp_path / "many.png")
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "many.png")), [[0, 255], [256, 299]])


# ----------------------------------------------------------------------------------------------------
# The protocol, written as the reference's loop (FASTFCN.md 4.2 / MultiEvalModule.forward).


def torch_resize(x: np.ndarray, height: int, width: int, align_corners: bool = True) -> np.ndarray:
    """F.interpolate(mode='bilinear', align_corners=...) of [H, W, C] as two interpolation matrices."""

    def matrix(n_in: int, n_out: int) -> np.ndarray:
        m = np.zeros((n_out, n_in))
        for i in range(n_out):
            if align_corners:
                src = i * (n_in - 1) / (n_out - 1) if n_out > 1 else 0.0
            else:
                src = max((i + 0.5) * n_in / n_out - 0.5, 0.0)
            lo = min(int(math.floor(src)), n_in - 1)
            hi = min(lo + 1, n_in - 1)
            m[i, lo] += 1 - (src - lo)
            m[i, hi] += src - lo
        return m

    return np.einsum("ah,bw,hwc->abc", matrix(x.shape[0], height), matrix(x.shape[1], width), x)


def pad_black(x: np.ndarray, height: int, width: int) -> np.ndarray:
    """Pads bottom/right to at least height x width with -mean/std."""
    pad_value = -np.array([0.485, 0.456, 0.406]) / np.array([0.229, 0.224, 0.225])
    out = np.broadcast_to(pad_value, (max(height, x.shape[0]), max(width, x.shape[1]), 3)).copy()
    out[: x.shape[0], : x.shape[1]] = x
    return out


def reference_scores(logits, image, scales, flip, base, crop, whole=False, align_corners=True):
    """Sum over scales of the resized-back averaged exp(logits), exactly as the reference's loop."""

    def infer(x):
        out = np.asarray(logits(x[None].astype(np.float32))[0], np.float64)
        if flip:
            out = out + np.asarray(logits(x[None, :, ::-1].astype(np.float32))[0], np.float64)[:, ::-1]
        return np.exp(out)

    h, w = image.shape[:2]
    stride = int(crop * 2.0 / 3.0)
    total = 0.0
    for scale in scales:
        long_size = int(math.ceil(base * scale))
        if h > w:
            height, width = long_size, int(1.0 * w * long_size / h + 0.5)
            short_size = width
        else:
            width, height = long_size, int(1.0 * h * long_size / w + 0.5)
            short_size = height
        img = torch_resize(image, height, width, align_corners)
        if whole:  # each side padded to a multiple of 32
            outputs = infer(pad_black(img, -(-height // 32) * 32, -(-width // 32) * 32))[:height, :width]
        elif long_size <= crop:
            outputs = infer(pad_black(img, crop, crop))[:height, :width]
        else:
            pad_img = pad_black(img, crop, crop) if short_size < crop else img
            ph, pw = pad_img.shape[:2]
            outputs = np.zeros((ph, pw, NUM_CLASSES))
            count = np.zeros((ph, pw, 1))
            for idh in range(int(math.ceil(1.0 * (ph - crop) / stride)) + 1):
                for idw in range(int(math.ceil(1.0 * (pw - crop) / stride)) + 1):
                    h0, w0 = idh * stride, idw * stride
                    h1, w1 = min(h0 + crop, ph), min(w0 + crop, pw)
                    output = infer(pad_black(pad_img[h0:h1, w0:w1], crop, crop))
                    outputs[h0:h1, w0:w1] += output[: h1 - h0, : w1 - w0]
                    count[h0:h1, w0:w1] += 1
            assert (count > 0).all()
            outputs = (outputs / count)[:height, :width]
        total = total + torch_resize(outputs, h, w, align_corners)
    return total


IMAGE_SIZES = [(50, 70), (90, 45), (20, 31)]  # landscape, portrait (two grids), smaller than every window


@pytest.mark.parametrize(("name", "align_corners"), [("multi_scale", True), ("whole", True), ("multi_scale", False)])
def test_protocol_with_flip_equals_the_reference_loop_on_a_tiny_model(tiny, name, align_corners):
    # align_corners=False: the rescaling of a model that resizes so (reference='mmseg'), in the same loop.
    model, variables, logits = tiny
    protocol = evaluate.make_protocol(name, base_size=BASE, crop_size=CROP, flip=True)
    protocol = dataclasses.replace(protocol, align_corners=align_corners)
    assert protocol.scales == evaluate.MULTI_SCALES if name == "multi_scale" else (1.0,)
    runner = evaluate.ProtocolRunner(
        evaluate.model_logits_fn(model), variables, NUM_CLASSES, protocol, window_batch=5, images_per_call=2
    )
    rng = np.random.default_rng(0)
    images = [rng.normal(size=(h, w, 3)).astype(np.float32) for h, w in IMAGE_SIZES]
    results = list(runner.run(images, with_scores=True))
    for image, result in zip(images, results, strict=True):
        expected = reference_scores(
            lambda x: logits(variables, x),
            image,
            protocol.scales,
            True,
            BASE,
            CROP,
            whole=protocol.whole,
            align_corners=align_corners,
        )
        assert result["scores"].shape == expected.shape
        np.testing.assert_allclose(result["scores"], expected, rtol=2e-4, atol=1e-6 * expected.max())
        top2 = np.sort(expected, axis=-1)[..., -2:]
        clear = top2[..., 1] - top2[..., 0] > 1e-3 * top2[..., 1]  # skip near-ties of the float64 loop
        np.testing.assert_array_equal(result["prediction"][clear], expected.argmax(-1)[clear])


def mmseg_size(height, width, test_scale, ratio):
    """mmcv.imrescale's size (rescale_size) for mmsegmentation 0.x's MultiScaleFlipAug scale at ``ratio``."""
    scale = (int(test_scale[0] * ratio), int(test_scale[1] * ratio))
    factor = min(max(scale) / max(height, width), min(scale) / min(height, width))
    new_w, new_h = int(width * float(factor) + 0.5), int(height * float(factor) + 0.5)
    return new_h, new_w


def mmseg_reference_scores(logits, image, ratios, flip, test_scale, align_corners=False):
    """mmsegmentation's test of one image: per ratio (and flip), the image rescaled (OpenCV: half-pixel bilinear),
    the model's logits flipped back, resized to the image (the model's ``align_corners``), softmaxed; the mean
    (SegTTAModel.merge_preds)."""

    def softmax(x):
        e = np.exp(x - x.max(-1, keepdims=True))
        return e / e.sum(-1, keepdims=True)

    h, w = image.shape[:2]
    probabilities = []
    for ratio in ratios:
        img = torch_resize(image, *mmseg_size(h, w, test_scale, ratio), align_corners=False)
        passes = [np.asarray(logits(img[None].astype(np.float32))[0], np.float64)]
        if flip:
            passes.append(np.asarray(logits(img[None, :, ::-1].astype(np.float32))[0], np.float64)[:, ::-1])
        probabilities += [softmax(torch_resize(out, h, w, align_corners=align_corners)) for out in passes]
    return sum(probabilities) / len(probabilities)


@pytest.mark.parametrize(("flip", "align_corners"), [(False, False), (True, False), (True, True)])
def test_mmseg_protocol_equals_mmsegmentations_test_loop_on_a_tiny_model(tiny, flip, align_corners):
    # align_corners: the model's; True, an official model's, whose scores are resized back so while the images
    # are still rescaled as mmsegmentation's OpenCV does (half-pixel).
    model, variables, logits = tiny
    test_scale = (96, 48)  # a stand-in for ADE20K's (2048, 512)
    protocol = evaluate.make_protocol(
        "mmseg_multi_scale", base_size=BASE, crop_size=CROP, flip=flip, scales=(0.5, 1.0, 1.75), test_scale=test_scale
    )
    protocol = dataclasses.replace(protocol, align_corners=align_corners)  # as evaluation sets it from the model
    assert protocol.image_align_corners is False
    assert protocol.whole and protocol.softmax and protocol.pad_multiple == 1 and protocol.flip == flip
    runner = evaluate.ProtocolRunner(
        evaluate.model_logits_fn(model), variables, NUM_CLASSES, protocol, window_batch=5, images_per_call=3
    )
    assert runner.images_per_call == runner.window_batch == 1  # each image with canvases of its own shapes
    rng = np.random.default_rng(4)
    sizes = [*IMAGE_SIZES, (30, 200)]  # a panorama: its long side, not its short one, meets the test scale
    images = [rng.normal(size=(h, w, 3)).astype(np.float32) for h, w in sizes]
    results = list(runner.run(images, with_scores=True))
    for image, result in zip(images, results, strict=True):
        expected = mmseg_reference_scores(
            lambda x: logits(variables, x), image, protocol.scales, flip, test_scale, align_corners
        )
        assert result["scores"].shape == expected.shape
        np.testing.assert_allclose(result["scores"], expected, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(result["scores"].sum(-1), 1.0, rtol=1e-5)  # mean probabilities
        top2 = np.sort(expected, axis=-1)[..., -2:]
        clear = top2[..., 1] - top2[..., 0] > 1e-4
        np.testing.assert_array_equal(result["prediction"][clear], expected.argmax(-1)[clear])
    # Unpadded: the network saw each scaled image at its own size, one program per shape.
    scaled = {protocol.scaled_size(h, w, s) for h, w in sizes for s in protocol.scales}
    assert {f"network_{h}x{w}" for h, w in scaled} == {k for k in runner.traces if k.startswith("network")}


@pytest.mark.parametrize(
    ("size", "test_scale", "ratio", "expected"),
    [
        ((512, 683), (2048, 512), 1.0, (512, 683)),  # ADE20K's usual image: unchanged
        ((683, 512), (2048, 512), 1.0, (683, 512)),  # portrait
        ((375, 500), (2048, 512), 1.0, (512, 683)),  # upscaled: the short side meets 512
        ((500, 2000), (2048, 512), 1.0, (512, 2048)),  # the long side meets 2048 first
        ((300, 2400), (2048, 512), 1.0, (256, 2048)),
        ((1024, 2048), (2048, 1024), 0.5, (512, 1024)),  # Cityscapes at ratio 0.5: (1024, 512)
        ((1024, 2048), (2048, 1024), 1.75, (1792, 3584)),
        ((512, 683), (2048, 512), 0.75, (384, 512)),  # int(683 * 0.75 + 0.5) = 512
        ((333, 500), (520, 520), 1.0, (346, 520)),  # mmseg's Pascal Context: long side 520
        ((301, 602), (301, 301), 1.0, (151, 301)),  # 150.5 rounds up (int(x + 0.5)), not to even (round())
    ],
)
def test_mmseg_test_resize_is_mmcvs_keep_ratio_rescale(size, test_scale, ratio, expected):
    assert evaluate.keep_ratio_size(*size, test_scale, ratio) == expected == mmseg_size(*size, test_scale, ratio)
    protocol = evaluate.make_protocol("mmseg", base_size=BASE, crop_size=CROP, test_scale=test_scale)
    assert protocol.scaled_size(*size, ratio) == expected


def test_whole_images_that_share_a_scales_shape_share_its_network_compilation(tiny):
    # At base 80, 60 x 80 and 40 x 80 both run 64 x 96 at scale 1 (padded to 32), but 128 x 160 and 96 x 160 at
    # scale 2: their canvas sets differ, the network at 64 x 96 is compiled once.
    model, variables, _ = tiny
    protocol = evaluate.make_protocol("whole", base_size=BASE, crop_size=CROP, scales=(1.0, 2.0))
    runner = evaluate.ProtocolRunner(evaluate.model_logits_fn(model), variables, NUM_CLASSES, protocol)
    images = [np.zeros((h, w, 3), np.float32) for h, w in [(60, 80), (40, 80)]]
    with backend_compilations() as compiled:
        list(runner.run(images))
    assert runner.traces["network_64x96"] == 1 and runner.traces["accumulate_64x96"] == 2
    # 3 network shapes, 4 (window, canvas set) additions, 2 canvas sets' zeros and tiles.
    assert runner.compile_count == len(compiled) == 3 + 4 + 2 + 2


def test_whole_image_protocols_let_go_of_their_programs_past_a_bound(tiny):
    # Each image size compiles its own programs; holding every one exhausted a process's memory maps on an
    # mmseg multi-scale run over many sizes. Past max_live_programs the runner drops them and goes on.
    model, variables, _ = tiny
    protocol = evaluate.make_protocol("mmseg", base_size=BASE, crop_size=CROP, test_scale=(96, 48))
    rng = np.random.default_rng(8)
    images = [rng.normal(size=(30 + 3 * i, 50, 3)).astype(np.float32) for i in range(5)] * 2  # 5 sizes, twice

    def run(**options):
        runner = evaluate.ProtocolRunner(evaluate.model_logits_fn(model), variables, NUM_CLASSES, protocol, **options)
        with backend_compilations() as compiled:
            results = list(runner.run(images, with_scores=True))
        return runner, results, len(compiled)

    unbounded, expected, compiled = run()
    assert unbounded.programs_dropped == 0 and unbounded.compile_count == compiled == 5 * 4
    bounded, results, compiled = run(max_live_programs=9)  # two sizes' 4 programs each, then a drop
    assert bounded.programs_dropped > 0 and len(bounded._programs) <= 9
    assert bounded.compile_count == compiled > 5 * 4  # sizes met again after a drop compile again
    for want, got in zip(expected, results, strict=True):
        np.testing.assert_array_equal(got["prediction"], want["prediction"])
        np.testing.assert_array_equal(got["scores"], want["scores"])


def test_mmseg_protocol_defaults_and_refusals():
    make = functools.partial(evaluate.make_protocol, base_size=520, crop_size=480)
    assert make("mmseg", dataset="ade20k").test_scale == (2048, 512)
    city = make("mmseg_multi_scale", dataset="cityscapes")
    assert city.test_scale == (2048, 1024) and city.scales == evaluate.MULTI_SCALES and city.flip  # no 2.0, 2.25
    single = make("mmseg", dataset="cityscapes")
    assert single.scales == (1.0,) and not single.flip and single.softmax and single.whole
    assert make("mmseg", dataset="folder:mine", test_scale=(640, 480)).test_scale == (640, 480)
    with pytest.raises(ValueError, match="mmsegmentation has no test scale for it; give one"):
        make("mmseg", dataset="folder:mine")
    with pytest.raises(
        ValueError, match=r"test_scale=\(2048, 512\): only the mmseg protocols \(mmseg, mmseg_multi_scale\) take"
    ):
        make("whole", dataset="ade20k", test_scale=(2048, 512))
    with pytest.raises(ValueError, match="must be two positive integers"):
        make("mmseg", dataset="ade20k", test_scale=(2048, 0))
    assert not make("whole").softmax and make("whole").pad_multiple == 32
    # Odd values are named, not crashed on (config validation shares this check).
    for test_scale in [(float("inf"), 512), (float("nan"), 512), (True, True), (2048, 512.5), "2048,512", None]:
        assert "test_scale" in protocols.option_errors("mmseg", test_scale=test_scale), test_scale
    for pad in [-1, 2.5, True, "8", None]:
        assert "pad_multiple" in protocols.option_errors("whole", pad_multiple=pad), pad
    assert not protocols.option_errors("mmseg", test_scale=(2048.0, 512.0), pad_multiple=32)
    assert not protocols.option_errors("mmseg", test_scale=tuple(np.array([2048, 512])), pad_multiple=np.int64(8))
    # Padding trades mmsegmentation's exactness for fewer compilations (one per padded size).
    padded = make("mmseg", dataset="ade20k", pad_multiple=32)
    assert padded.pad_multiple == 32 and padded.whole_shape(512, 683) == (512, 704)
    assert "whole image padded to a multiple of 32" in padded.describe()
    assert "whole image unpadded" in make("mmseg", dataset="ade20k").describe()
    with pytest.raises(
        ValueError, match="pad_multiple=32: only the whole-image protocols .* 'single_scale' runs windows"
    ):
        make("single_scale", pad_multiple=32)


def test_cityscapes_multi_scale_adds_scales_2_and_2_25():
    protocol = evaluate.make_protocol("multi_scale", base_size=BASE, crop_size=CROP, dataset="cityscapes")
    assert protocol.scales == (0.5, 0.75, 1.0, 1.25, 1.5, 1.75, 2.0, 2.25) and protocol.flip
    single = evaluate.make_protocol("single_scale", base_size=520, crop_size=480)
    assert single.scales == (1.0,) and not single.flip and single.stride == 320


def test_protocol_flip_words_and_a_zero_pixel_stride():
    make = functools.partial(evaluate.make_protocol, "single_scale", base_size=520, crop_size=480)
    assert make(flip="True").flip and not make(flip="no").flip and not make(flip="auto").flip
    with pytest.raises(ValueError, match="evaluation.flip='yes_please'"):
        make(flip="yes_please")
    with pytest.raises(ValueError, match="window stride int.480 . 0.001. is 0 pixels"):
        make(stride_ratio=0.001)


@pytest.mark.parametrize("size", [48, 64, 65, 106, 107, 130, 300])
def test_window_grid_covers_every_pixel_and_counts_the_overlaps(size):
    crop, stride = 64, 42
    padded = max(size, crop)
    origins = evaluate.window_origins(size, 20, crop, stride)
    rows = sorted({top for top, _ in origins})
    assert rows == [i * stride for i in range(len(rows))]  # one grid: fixed stride from 0
    assert rows[-1] < padded <= rows[-1] + crop  # the last window reaches the (padded) edge, none beyond it
    coverage = np.zeros(padded, int)
    for top in rows:
        coverage[top : min(top + crop, padded)] += 1
    assert coverage.min() >= 1
    expected = [sum(t <= y < t + crop for t in rows) for y in range(padded)]
    np.testing.assert_array_equal(coverage, expected)


def test_overlapping_windows_are_averaged_not_summed():
    """With constant logits every window scores exp(0) = 1; averaging makes each scale contribute exactly 1
    per pixel, whatever the overlap (summing would give 2 or 3 in overlaps)."""
    protocol = evaluate.make_protocol("multi_scale", base_size=BASE, crop_size=CROP, flip=True)

    def zeros(variables, images):
        return jnp.zeros((*images.shape[:3], NUM_CLASSES)) + 0 * images[..., :1]

    runner = evaluate.ProtocolRunner(zeros, {}, NUM_CLASSES, protocol, window_batch=4, images_per_call=3)
    images = [np.zeros((h, w, 3), np.float32) for h, w in [(70, 140), (33, 57), (150, 151)]]
    for result in runner.run(images, with_scores=True):
        np.testing.assert_allclose(result["scores"], len(protocol.scales), rtol=1e-6)


def test_window_averaging_weights_with_position_dependent_logits():
    """Logits = window-local row index: overlapping windows disagree, and the scores must be their mean."""
    protocol = evaluate.make_protocol("single_scale", base_size=BASE, crop_size=CROP)

    def row_logits(variables, images):
        rows = jnp.arange(images.shape[1], dtype=jnp.float32)[None, :, None, None] / 16
        return jnp.broadcast_to(rows, (*images.shape[:3], NUM_CLASSES))

    runner = evaluate.ProtocolRunner(row_logits, {}, NUM_CLASSES, protocol, window_batch=2, images_per_call=1)
    image = np.zeros((BASE, 40, 3), np.float32)  # portrait: long side 80 -> two windows at rows 0 and 42
    (result,) = runner.run([image], with_scores=True)
    row = np.arange(BASE)
    covering = [(row >= top) & (row < top + CROP) for top in (0, 42)]
    expected = sum(np.where(c, np.exp((row - top) / 16), 0) for c, top in zip(covering, (0, 42), strict=True))
    expected = expected / sum(covering)
    np.testing.assert_allclose(result["scores"][:, 0, 0], expected, rtol=1e-5)


def test_compile_count_stays_fixed_over_mixed_image_sizes(tiny):
    model, variables, _ = tiny
    protocol = evaluate.make_protocol("single_scale", base_size=BASE, crop_size=CROP)
    runner = evaluate.ProtocolRunner(
        evaluate.model_logits_fn(model), variables, NUM_CLASSES, protocol, window_batch=4, images_per_call=2
    )
    rng = np.random.default_rng(0)
    sizes = [(int(h), int(w)) for h, w in rng.integers(8, 300, size=(9, 2))] + [(1, 1), (400, 30)]
    images = [rng.normal(size=(h, w, 3)).astype(np.float32) for h, w in sizes]
    runner.compile_all(devices=99)  # at most the runner's devices (one)
    assert runner.compile_count == 4
    list(runner.run(images[:2]))
    after_first = runner.compile_count
    results = list(runner.run(images[2:]))
    assert [r["prediction"].shape for r in results] == sizes[2:]
    assert after_first == runner.compile_count == 4  # canvas zeros, network, adding its scores, output tile


def test_two_groups_in_flight_overlap_the_next_groups_preparation_with_the_current_one(tiny):
    model, variables, _ = tiny
    protocol = evaluate.make_protocol("single_scale", base_size=BASE, crop_size=CROP)
    rng = np.random.default_rng(3)
    images = [rng.normal(size=(h, w, 3)).astype(np.float32) for h, w in [(50, 70), (90, 45), (20, 31), (64, 64)]]

    def run(groups_in_flight):
        runner = evaluate.ProtocolRunner(
            evaluate.model_logits_fn(model), variables, NUM_CLASSES, protocol, window_batch=4, images_per_call=1,
            groups_in_flight=groups_in_flight,
        )  # fmt: skip
        events = []
        dispatch, collect = runner._dispatch_group, runner._collect_group
        runner._dispatch_group = lambda group, *a: events.append("d") or dispatch(group, *a)
        runner._collect_group = lambda pending, *a: events.append("c") or collect(pending, *a)
        return [r["prediction"] for r in runner.run(images)], "".join(events), runner.groups_in_flight

    one_by_one, events, flight = run(1)
    assert events == "dcdcdcdc" and flight == 1
    overlapped, events, flight = run(2)
    assert events == "ddcdcdcc" and flight == 2  # group i + 1 prepared and dispatched before group i is fetched
    for want, got in zip(one_by_one, overlapped, strict=True):
        np.testing.assert_array_equal(got, want)
    assert run(None)[2] == 1  # CPUs report no memory limit: one group at a time
    with pytest.raises(ValueError, match="groups_in_flight=0"):
        run(0)


@pytest.mark.parametrize("size", [(1, 1), (7, 300), (57, 40), (64, 64)])
def test_host_resize_is_the_two_tap_align_corners_formula(size):
    rng = np.random.default_rng(2)
    image = rng.normal(size=(33, 21, 3)).astype(np.float32)
    rows = evaluate.align_corners_taps(33, size[0])
    cols = evaluate.align_corners_taps(21, size[1])
    (r0, r1, fr), (c0, c1, fc) = [(lo, hi, f.astype(np.float32)) for lo, hi, f in (rows, cols)]
    upper = image[r0] * (1 - fr)[:, None, None] + image[r1] * fr[:, None, None]
    want = upper[:, c0] * (1 - fc)[None, :, None] + upper[:, c1] * fc[None, :, None]
    np.testing.assert_array_equal(evaluate.resize_image(image, *size), want)  # bit for bit: computed in place
    assert evaluate.resize_image(image, 33, 21) is image


@contextlib.contextmanager
def backend_compilations() -> Iterator[list[str]]:
    """The XLA compilations made inside the block, one entry each (the persistent cache off, so that each
    compilation is one)."""
    compiled: list[str] = []

    def count(name: str, seconds: float, **kwargs) -> None:
        compiled.append(name) if name == "/jax/core/compile/backend_compile_duration" else None

    jax.monitoring.register_event_duration_secs_listener(count)
    cache = jax.config.jax_enable_compilation_cache
    jax.config.update("jax_enable_compilation_cache", False)
    try:
        yield compiled
    finally:
        jax.config.update("jax_enable_compilation_cache", cache)
        jax.monitoring.unregister_event_duration_listener(count)


def test_whole_compiles_each_padded_shape_once_per_device_that_runs_it(tiny):
    # 'whole' feeds each scaled image at its own size, padded to multiples of 32: a program per shape and device,
    # the first images' shapes compiled ahead for every device (on host threads), the others as they come.
    model, variables, _ = tiny
    devices = jax.local_devices()[:2]
    protocol = evaluate.make_protocol("whole", base_size=BASE, crop_size=CROP)
    rng = np.random.default_rng(2)
    # At base 80: (40, 60) -> 53 x 80, padded 64 x 96; (60, 40) -> 96 x 64; (20, 60) -> 27 x 80, padded 32 x 96.
    sizes = [(40, 60), (40, 60), (60, 40), (40, 60), (20, 60)]
    images = [rng.normal(size=(h, w, 3)).astype(np.float32) for h, w in sizes]

    def runner(devices):
        return evaluate.ProtocolRunner(
            evaluate.model_logits_fn(model), variables, NUM_CLASSES, protocol, images_per_call=1, devices=devices
        )

    expected = list(runner(devices[:1]).run(images, with_scores=True))
    spread = runner(devices)
    with backend_compilations() as compiled:
        results = list(spread.run(images, with_scores=True))
    # Device 0 ran groups 1, 3, 5 (64 x 96, 96 x 64, 32 x 96), device 1 groups 2 and 4 (64 x 96): the canvas zeros,
    # the network, adding its scores and the output tile at each of those shapes, 12 + 4 programs; the first group
    # of each device compiled ahead on that device only.
    assert spread.groups_per_device == [3, 2]
    assert spread.compile_count == len(compiled) == 16
    for want, got in zip(expected, results, strict=True):
        np.testing.assert_array_equal(got["prediction"], want["prediction"])
        np.testing.assert_allclose(got["scores"], want["scores"], rtol=1e-6)


def test_groups_spread_over_devices_give_the_one_device_results_in_input_order(tiny):
    # conftest's 4 forced host devices stand in for a host's GPUs or TPU cores.
    model, variables, _ = tiny
    devices = jax.local_devices()[:3]
    assert len(devices) == 3
    protocol = evaluate.make_protocol("multi_scale", base_size=BASE, crop_size=CROP, flip=True)
    rng = np.random.default_rng(1)
    sizes = [(50, 70), (90, 45), (20, 31), (64, 64), (33, 80), (70, 20), (41, 41)]  # 4 groups of 2: one device twice
    images = [rng.normal(size=(h, w, 3)).astype(np.float32) for h, w in sizes]
    labels = [rng.integers(-1, NUM_CLASSES, size=(h, w)).astype(np.int32) for h, w in sizes]

    def runner(devices):
        return evaluate.ProtocolRunner(
            evaluate.model_logits_fn(model), variables, NUM_CLASSES, protocol, window_batch=5, images_per_call=2,
            devices=devices,
        )  # fmt: skip

    one = runner(devices[:1])
    expected = list(one.run(images, labels, with_scores=True))
    spread = runner(devices)
    # Every program compiled for each device by compile_all (on host threads), none again by the run.
    with backend_compilations() as compiled:
        spread.compile_all(with_scores=True)
        compiled_first = len(compiled)
        results = list(spread.run(images, labels, with_scores=True))
    assert compiled_first == spread.compile_count and len(compiled) == compiled_first
    assert one.groups_per_device == [4] and spread.groups_per_device == [2, 1, 1]
    assert {d for leaf in jax.tree_util.tree_leaves(spread._variables[2]) for d in leaf.devices()} == {devices[2]}
    assert [r["prediction"].shape for r in results] == sizes
    for want, got in zip(expected, results, strict=True):
        np.testing.assert_array_equal(got["prediction"], want["prediction"])
        np.testing.assert_array_equal(got["confusion"], want["confusion"])
        np.testing.assert_allclose(got["scores"], want["scores"], rtol=1e-6)
    # Each program traced once and compiled once per device, all before the first group (on host threads): the
    # calls found them compiled.
    assert spread.traces == one.traces and spread.compile_count == 3 * one.compile_count
    # An input of two groups compiles for the two devices it uses, not the third.
    few = runner(devices)
    few_results = list(few.run(images[:4], labels[:4], with_scores=True))
    assert few.groups_per_device == [1, 1, 0] and few.compile_count == 2 * one.compile_count
    assert {key[0] for key in few._compiled} == {0, 1}
    np.testing.assert_array_equal(few_results[3]["prediction"], expected[3]["prediction"])
    # Devices for eval and predict: all local ones on accelerators, one on CPU unless asked.
    assert sharding.evaluation_devices() == jax.local_devices()[:1]
    assert sharding.evaluation_devices(3) == devices
    with pytest.raises(ValueError, match=r"config.num_devices=.*: must be in \[1, 4\]"):
        sharding.evaluation_devices(5)
    with mock.patch.object(jax, "process_count", lambda: 2):  # counted over processes, as training's mesh
        assert sharding.evaluation_devices(4) == jax.local_devices()[:2]
        with pytest.raises(ValueError, match=r"config.num_devices=3: must be a multiple of the 2 processes"):
            sharding.evaluation_devices(3)
    with pytest.raises(ValueError, match="at least one device"):
        evaluate.ProtocolRunner(evaluate.model_logits_fn(model), variables, NUM_CLASSES, protocol, devices=[])


# ----------------------------------------------------------------------------------------------------
# End to end.


def synthetic_shapes_config(tmp_path) -> ml_collections.ConfigDict:
    """A base config on the synthetic_shapes dataset, prepared in ``tmp_path / 'data'``."""
    from fastfcn_jax.data import pipeline

    pipeline.prepare("synthetic_shapes", tmp_path / "data")
    config = base_config()
    config.dataset.name = "synthetic_shapes"
    config.dataset.data_dir = str(tmp_path / "data")
    return config


CHECKPOINT_INFO = {"model_name": "encnet_jpu_tiny", "num_classes": NUM_CLASSES, "dataset": "synthetic_shapes"}


def test_run_evaluation_end_to_end_on_synthetic_shapes(tiny, tmp_path, capsys):
    from fastfcn_jax.data import pipeline

    model, variables, _ = tiny
    data_dir = tmp_path / "data"
    config = synthetic_shapes_config(tmp_path)
    checkpoint = tmp_path / "checkpoint"
    checkpointing.save_variables(checkpoint, jax.device_get(variables), CHECKPOINT_INFO)
    config.init_from = str(checkpoint)
    with config.unlocked():
        config.evaluation = ml_collections.ConfigDict(
            {
                "protocol": "multi_scale",
                "scales": (0.75, 1.0),
                "base_size": BASE,
                "crop_size": CROP,
                "max_examples": 5,
                "submission_dir": str(tmp_path / "submission"),
            }
        )
    workdir = tmp_path / "workdir"
    config.model.name, config.model.num_classes = "psp_jpu_tiny", 3  # not the checkpoint's: said, not used
    result = evaluate.run_evaluation(config, workdir)
    assert (
        f"holds encnet_jpu_tiny with {NUM_CLASSES} classes and is evaluated as such; the config's "
        "config.model.name=psp_jpu_tiny and 3 classes (config.model.num_classes, 0 = the dataset's) is not used"
    ) in capsys.readouterr().out

    examples = list(pipeline.full_examples("synthetic_shapes", data_dir=data_dir, split="validation"))[:5]
    labelled = sum(int((e["label"] >= 0).sum()) for e in examples)
    out = workdir / "eval" / "validation_multi_scale_first5"  # a partial run: beside, not over, a full one
    confusion = np.load(out / "confusion.npy")
    assert confusion.dtype == np.int64 and confusion.sum() == labelled
    written = json.loads((out / "metrics.json").read_text())
    assert written["num_images"] == 5 and written["protocol_flip"] and written["compilations"] <= 4
    assert written["mean_iou"] == pytest.approx(metrics.segmentation_scores(confusion)["mean_iou"])
    assert result["mean_iou"] == written["mean_iou"]
    table = (out / "per_class_iou.md").read_text()
    assert all(name in table for name in written["per_class_iou"])
    # What the number is of, also in the table a reader may copy out of its folder.
    assert table.startswith("# synthetic_shapes validation: 5 images, multi_scale (scales (0.75, 1.0), flip True")
    assert f"encnet_jpu_tiny, checkpoint {written['checkpoint']}, step " in table
    assert written["code_version"].startswith(f"{fastfcn_jax.__version__}+") and written["code_version"] in table
    assert written["data_dir"] == str(Path(data_dir).absolute()) and written["protocol_pad_multiple"] is None
    assert Image.open(out / "confusion.png").size[0] > 6 * 10
    masks = sorted((tmp_path / "submission").iterdir())
    assert [m.stem for m in masks] == sorted(e["file_name"].rsplit(".", 1)[0] for e in examples)
    for mask, example in zip(masks, sorted(examples, key=lambda e: e["file_name"]), strict=True):
        array = np.asarray(Image.open(mask))
        assert array.shape == example["label"].shape and array.max() < NUM_CLASSES


def test_run_evaluation_with_mmsegmentations_protocol(tiny, tmp_path, capsys):
    from fastfcn_jax.data import pipeline

    _, variables, _ = tiny
    config = synthetic_shapes_config(tmp_path)
    checkpointing.save_variables(tmp_path / "checkpoint", jax.device_get(variables), CHECKPOINT_INFO)
    config.init_from = str(tmp_path / "checkpoint")
    config.evaluation.protocol = "mmseg_multi_scale"
    config.evaluation.scales = (0.5, 1.0)
    config.evaluation.test_scale = (96, 48)
    config.evaluation.max_examples = 3
    result = evaluate.run_evaluation(config, tmp_path / "workdir")
    printed = capsys.readouterr().out
    assert (
        "protocol mmseg_multi_scale (test scale (96, 48) x ratios (0.5, 1.0), flip True, whole image unpadded"
        in printed
    )
    assert "note: the checkpoint's run was trained at" not in printed
    out = tmp_path / "workdir" / "eval" / "validation_mmseg_multi_scale_first3"
    written = json.loads((out / "metrics.json").read_text())
    assert written["protocol_test_scale"] == [96, 48] and written["protocol_softmax"] and written["protocol_whole"]
    assert written["protocol_pad_multiple"] == 1 and result["mean_iou"] == written["mean_iou"]
    examples = list(pipeline.full_examples("synthetic_shapes", data_dir=tmp_path / "data", split="validation"))[:3]
    assert np.load(out / "confusion.npy").sum() == sum(int((e["label"] >= 0).sum()) for e in examples)
    # Another test scale's results are kept aside under its name.
    config.evaluation.test_scale = (128, 64)
    evaluate.run_evaluation(config, tmp_path / "workdir")
    printed = capsys.readouterr().out
    aside = f"{out}_step0_checkpoint_scales0.5-1_scale96x48"
    assert f"test scale (96, 48)) differ from this evaluation's: kept, moved to {aside}" in printed


def test_results_of_the_same_settings_are_replaced_whatever_settings_they_do_not_use(tmp_path):
    base = {"checkpoint": str(tmp_path), "step": 10, "num_images": 5, "protocol_scales": [1.0], "protocol_flip": False}
    windows = {**base, "protocol": "single_scale", "protocol_base_size": 520, "protocol_crop_size": 480}
    windows |= {"protocol_stride": 320, "protocol_whole": False}
    out = tmp_path / "eval" / "validation_single_scale"
    out.mkdir(parents=True)
    (out / "metrics.json").write_text(json.dumps(windows))  # written before test scales and padding were recorded
    current = {**windows, "protocol_test_scale": [], "protocol_pad_multiple": 32}
    assert evaluate.keep_earlier_results(out, current, tmp_path).startswith("replacing the earlier results")
    # The mmseg protocols use no base or crop size: another config.dataset.base_size is the same evaluation.
    mmseg = {**base, "protocol": "mmseg", "protocol_whole": True, "protocol_test_scale": [2048, 512]}
    mmseg |= {"protocol_pad_multiple": 1, "protocol_base_size": 520, "protocol_crop_size": 480}
    (out / "metrics.json").write_text(json.dumps(mmseg))
    moved = {**mmseg, "protocol_base_size": 1024, "protocol_crop_size": 768}
    assert evaluate.keep_earlier_results(out, moved, tmp_path).startswith("replacing the earlier results")
    # Images rescaled otherwise (mmseg protocols before they rescaled half-pixel whatever the model): another.
    resized = {**mmseg, "protocol_image_resize": "half_pixel"}
    assert "kept, moved to" in evaluate.keep_earlier_results(out, resized, tmp_path)
    out.mkdir()
    (out / "metrics.json").write_text(json.dumps(resized))
    padded = {**resized, "protocol_pad_multiple": 32}
    assert "kept, moved to" in evaluate.keep_earlier_results(out, padded, tmp_path)
    assert (tmp_path / "eval" / "validation_single_scale_step10_scale2048x512_2").is_dir()


def test_results_of_another_dataset_are_labelled_with_it_when_kept(tmp_path):
    earlier = {"dataset": "folder:six", "step": 20, "protocol": "single_scale", "checkpoint": str(tmp_path)}
    assert evaluate.results_label(earlier, tmp_path, "synthetic_shapes") == "folder-six_step20"
    assert evaluate.results_label(earlier, tmp_path, "folder:six") == "step20"


def test_a_split_the_dataset_lacks_is_named_with_how_test_images_are_predicted(tiny, tmp_path):
    _, variables, _ = tiny
    config = synthetic_shapes_config(tmp_path)
    checkpointing.save_variables(tmp_path / "checkpoint", jax.device_get(variables), CHECKPOINT_INFO)
    config.init_from = str(tmp_path / "checkpoint")
    with config.unlocked():
        config.evaluation = ml_collections.ConfigDict({"split": "test"})
    with pytest.raises(ValueError, match=r"split 'test': .*Unknown split.*unlabelled test images are predicted"):
        evaluate.run_evaluation(config, tmp_path / "workdir")
    # A checkpoint of another class count: of another dataset, named; of this one, its class table changed.
    config.evaluation.split = ""
    for dataset, hint in (("cityscapes", "--config.dataset.name=cityscapes, as the checkpoint records"),
                          ("synthetic_shapes", "its class table has changed since the model was trained")):  # fmt: skip
        info = {**CHECKPOINT_INFO, "num_classes": 19, "dataset": dataset}
        checkpointing.save_variables(tmp_path / dataset, jax.device_get(variables), info)
        config.init_from = str(tmp_path / dataset)
        with pytest.raises(ValueError, match=f"predicts 19 classes but dataset 'synthetic_shapes' has 6: .*{hint}"):
            evaluate.run_evaluation(config, tmp_path / "workdir")


def test_evaluating_another_checkpoint_or_protocol_setting_keeps_the_earlier_results(tiny, tmp_path, capsys):
    model, variables, _ = tiny
    config = synthetic_shapes_config(tmp_path)
    workdir = tmp_path / "workdir"
    checkpointing.save_variables(workdir / "checkpoints", jax.device_get(variables), CHECKPOINT_INFO, step=30)
    checkpointing.save_variables(workdir / "best", jax.device_get(variables), CHECKPOINT_INFO, step=20)
    config.model.name, config.model.num_classes = "encnet_jpu_tiny", NUM_CLASSES
    with config.unlocked():
        config.evaluation = ml_collections.ConfigDict({"base_size": CROP, "crop_size": CROP, "max_examples": 2})
    eval_dir = workdir / "eval"
    out = eval_dir / "validation_single_scale_first2"

    def metrics_in(folder):
        return json.loads((folder / "metrics.json").read_text())

    evaluate.run_evaluation(config, workdir)  # the workdir's latest checkpoint (step 30)
    evaluate.run_evaluation(config, workdir)  # the same again: replaced, and said so
    assert "replacing the earlier results in" in capsys.readouterr().out
    assert sorted(p.name for p in eval_dir.iterdir()) == [out.name]

    config.init_from = str(workdir / "best")  # docs/evaluation.md's "the best step"
    evaluate.run_evaluation(config, workdir)
    aside = eval_dir / f"{out.name}_step30_base{CROP}_crop{CROP}"
    assert f"kept, moved to {aside}" in capsys.readouterr().out
    assert metrics_in(aside)["step"] == 30 and metrics_in(aside)["checkpoint"] == str(workdir.absolute())
    assert metrics_in(out)["step"] == 20 and metrics_in(out)["checkpoint"] == str(workdir / "best")

    config.evaluation.flip = "true"  # another protocol setting of the same checkpoint
    evaluate.run_evaluation(config, workdir)
    assert f"kept, moved to {eval_dir / f'{out.name}_step20_best_base{CROP}_crop{CROP}'}" in capsys.readouterr().out
    assert metrics_in(out)["protocol_flip"] and len(list(eval_dir.iterdir())) == 3

    # A run trained at other sizes than the protocol's (config.dataset's here): evaluated at the protocol's, said.
    trained = {**CHECKPOINT_INFO, "base_size": 2 * CROP, "crop_size": CROP + 8}
    checkpointing.save_variables(tmp_path / "trained", jax.device_get(variables), trained, step=5)
    config.init_from = str(tmp_path / "trained")
    config.evaluation.base_size = config.evaluation.crop_size = 0
    config.dataset.base_size = config.dataset.crop_size = CROP
    evaluate.run_evaluation(config, workdir)
    assert (
        f"note: the checkpoint's run was trained at base {2 * CROP} / crop {CROP + 8}, this evaluation runs at base "
        f"{CROP} / crop {CROP}"
    ) in capsys.readouterr().out

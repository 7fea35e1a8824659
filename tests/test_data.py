"""Data: tfds builders on tiny files in the real on-disk formats, the joint augmentation, the pipelines.

Expected labels come from the reference's rules (DATASETS.md): ADE ``v - 1``; Pascal Context sorted
459->60 mapping then ``- 1``; Cityscapes labelId -> trainId with void -> -1; VOC 255 -> -1.
"""

from __future__ import annotations

import io
import itertools
import json
import logging
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds
from PIL import Image, ImageFilter
from scipy.io import savemat

from fastfcn_jax.data import pipeline, prepare, transforms
from fastfcn_jax.data.builders import common, synthetic_shapes
from fastfcn_jax.data.datasets import get_dataset_info

tfds.disable_progress_bar()
MEAN = np.array([0.485, 0.456, 0.406])
STD = np.array([0.229, 0.224, 0.225])


# --------------------------------------------------------------------------------------------- helpers
def _write_jpeg(path: Path, height: int, width: int, seed: int = 0) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    rgb = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(path, quality=95)


def _write_png(path: Path, array: np.ndarray, mode: str | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array, mode=mode).save(path)


def _labels_by_file(dataset: str, data_dir: Path, split: str) -> dict[str, np.ndarray]:
    return {ex["file_name"]: ex["label"] for ex in pipeline.full_examples(dataset, data_dir=data_dir, split=split)}


def _voc_palette() -> list[int]:
    """The VOC bit-interleaved colormap (DATASETS.md ``palette_rule``), 256 colours flattened."""
    palette = []
    for index in range(256):
        r = g = b = 0
        value = index
        for shift in range(8):
            r |= ((value >> 0) & 1) << (7 - shift)
            g |= ((value >> 1) & 1) << (7 - shift)
            b |= ((value >> 2) & 1) << (7 - shift)
            value >>= 3
        palette += [r, g, b]
    return palette


def _rle_encode(mask: np.ndarray) -> str:
    """COCO compressed RLE string (maskApi.c rleEncode + rleToString), written here from the spec."""
    flat = mask.T.ravel().astype(bool)  # column-major
    counts, previous, run = [], False, 0
    for value in flat:
        if value != previous:
            counts.append(run)
            run, previous = 0, value
        run += 1
    counts.append(run)
    chars = []
    for i, count in enumerate(counts):
        x = count - counts[i - 2] if i > 2 else count
        more = True
        while more:
            c = x & 0x1F
            x >>= 5
            more = (x != -1) if (c & 0x10) else (x != 0)
            chars.append(chr((c | 0x20 if more else c) + 48))
    return "".join(chars)


# --------------------------------------------------------------------------------------------- registry
def test_registry_class_tables_and_label_maps():
    expected = {"pcontext": 59, "ade20k": 150, "cityscapes": 19, "pascal_voc": 21, "pascal_aug": 21}
    for name, classes in expected.items():
        info = get_dataset_info(name)
        assert info.num_classes == classes == len(info.class_names)
        assert info.palette.shape == (classes, 3) and info.palette.dtype == np.uint8
    ade = get_dataset_info("ade20k").label_lut
    assert (ade[0], ade[5], ade[150]) == (-1, 4, 149)
    city = get_dataset_info("cityscapes").label_lut
    assert (city[7], city[0], city[26], city[33], city[255]) == (0, -1, 13, 18, -1)
    voc = get_dataset_info("pascal_voc").label_lut
    assert (voc[0], voc[20], voc[255]) == (0, 20, -1)
    assert get_dataset_info("cityscapes").rotate_degrees == 10.0
    with pytest.raises(ValueError, match="unknown dataset"):
        get_dataset_info("coco")


# --------------------------------------------------------------------------------------------- synthetic
@pytest.fixture(scope="module")
def synthetic_dir(tmp_path_factory) -> Path:
    data_dir = tmp_path_factory.mktemp("tfds")
    pipeline.prepare("synthetic_shapes", data_dir)
    return data_dir


def test_synthetic_scene_deterministic_by_seed():
    image, label = synthetic_shapes.generate_scene(0, "train", 3)
    again_image, again_label = synthetic_shapes.generate_scene(0, "train", 3)
    other_image, _ = synthetic_shapes.generate_scene(1, "train", 3)
    np.testing.assert_array_equal(image, again_image)
    np.testing.assert_array_equal(label, again_label)
    assert image.shape != other_image.shape or not np.array_equal(image, other_image)
    assert 96 <= image.shape[0] <= 192 and 96 <= image.shape[1] <= 192
    assert image.shape[:2] == label.shape and image.dtype == np.uint8


def test_synthetic_dataset_has_stated_classes_and_splits(synthetic_dir):
    info = get_dataset_info("synthetic_shapes")
    assert info.num_classes == 6 and info.class_names[0] == "background"
    assert pipeline.dataset_size("synthetic_shapes", "train", synthetic_dir) == 256
    assert pipeline.dataset_size("synthetic_shapes", "validation", synthetic_dir) == 64
    seen = np.zeros(6, bool)
    for example in pipeline.full_examples("synthetic_shapes", data_dir=synthetic_dir, split="validation"):
        values = np.unique(example["label"])
        assert values.min() >= 0 and values.max() <= 5
        seen[values] = True
        index = int(example["file_name"].split("_")[1])
        np.testing.assert_array_equal(example["image"], synthetic_shapes.generate_scene(0, "validation", index)[0])
    assert seen.all()


def test_synthetic_builds_identically_twice(tmp_path):
    config = synthetic_shapes.SyntheticShapesConfig(name="tiny", seed=7, num_train=3, num_validation=2)
    labels = []
    for run in range(2):
        builder = synthetic_shapes.SyntheticShapes(config=config, data_dir=str(tmp_path / str(run)))
        builder.download_and_prepare()
        examples = sorted(tfds.as_numpy(builder.as_dataset(split="train")), key=lambda ex: ex["file_name"])
        labels.append([ex["label"] for ex in examples])
    for first, second in zip(*labels, strict=True):
        np.testing.assert_array_equal(first, second)


# --------------------------------------------------------------------------------------------- pipeline
def test_train_batches_shapes_and_determinism(synthetic_dir):
    def first(seed):
        return next(pipeline.train_batches("synthetic_shapes", data_dir=synthetic_dir, batch_size=4, seed=seed))

    batch = first(0)
    assert batch["image"].shape == (4, 96, 96, 3) and batch["image"].dtype == np.float32
    assert batch["label"].shape == (4, 96, 96) and batch["label"].dtype == np.int32
    assert batch["label"].min() >= -1 and batch["label"].max() <= 5
    np.testing.assert_array_equal(batch["image"], first(0)["image"])
    np.testing.assert_array_equal(batch["label"], first(0)["label"])
    assert not np.array_equal(batch["image"], first(1)["image"])
    size = pipeline.dataset_size("synthetic_shapes", "train", synthetic_dir)
    with pytest.raises(ValueError, match=rf"'train' split of 'synthetic_shapes' has {size} examples, fewer than a "
                       rf"batch \({size + 1} per process\): lower config.train.batch_size"):  # fmt: skip
        pipeline.train_batches("synthetic_shapes", data_dir=synthetic_dir, batch_size=size + 1, seed=0)


def test_train_batches_can_send_uint8_images_the_step_normalises(synthetic_dir):
    def first(normalise: bool) -> dict[str, np.ndarray]:
        batches = pipeline.train_batches(
            "synthetic_shapes", data_dir=synthetic_dir, batch_size=4, seed=2, normalise=normalise
        )
        return next(batches)

    pixels, normalised = first(False), first(True)
    assert pixels["image"].dtype == np.uint8 and pixels["image"].shape == normalised["image"].shape
    np.testing.assert_array_equal(pixels["label"], normalised["label"])
    np.testing.assert_allclose((pixels["image"] / 255.0 - MEAN) / STD, normalised["image"], atol=1e-5)
    assert len(np.unique(pixels["image"])) > 50


def test_train_batches_skipped_on_resume_continue_the_same_stream(synthetic_dir):
    # A resumed run (train.py: skip_batches=start_step) sees the batches the uninterrupted run would have seen,
    # across an epoch boundary (reshuffled) and with the same augmentation draws.
    def batches(skip):
        return pipeline.train_batches(
            "synthetic_shapes", data_dir=synthetic_dir, batch_size=4, seed=3, crop_size=32, skip_batches=skip
        )

    size = pipeline.dataset_size("synthetic_shapes", "train", synthetic_dir)
    skip = size // 4 + 2  # into the second epoch
    uninterrupted = list(itertools.islice(batches(0), skip + 2))
    resumed = list(itertools.islice(batches(skip), 2))
    for want, got in zip(uninterrupted[skip:], resumed, strict=True):
        np.testing.assert_array_equal(got["image"], want["image"])
        np.testing.assert_array_equal(got["label"], want["label"])
    assert not np.array_equal(resumed[0]["image"], uninterrupted[0]["image"])
    with pytest.raises(ValueError, match="skip_batches"):
        next(batches(-1))


def _epochs_of_names(synthetic_dir, seed: int, shuffle_buffer: int, epochs: int) -> list[list[str]]:
    """The training stream's examples (by file name) in the order train_batches augments them."""
    builder = pipeline._prepared_builder(pipeline._info("synthetic_shapes", synthetic_dir), synthetic_dir)
    order = pipeline.training_order("synthetic_shapes", data_dir=synthetic_dir, shuffle_buffer=shuffle_buffer)
    ds = pipeline._shuffled_stream(builder, "train", order, seed=seed)
    names = [name.decode() for name in tfds.as_numpy(ds.take(order.examples * epochs).map(lambda e: e["file_name"]))]
    return [names[e * order.examples : (e + 1) * order.examples] for e in range(epochs)]


def test_training_order_is_a_new_permutation_of_the_split_each_epoch(synthetic_dir):
    # The reference's DataLoader(shuffle=True): every example once per epoch, a fresh uniform order each time.
    first, second = _epochs_of_names(synthetic_dir, seed=0, shuffle_buffer=0, epochs=2)
    builder = pipeline._prepared_builder(pipeline._info("synthetic_shapes", synthetic_dir), synthetic_dir)
    stored_ds = pipeline._load(builder, "train", shuffle_seed=None, cache=False).map(lambda e: e["file_name"])
    stored = [name.decode() for name in tfds.as_numpy(stored_ds)]
    assert sorted(first) == sorted(second) == sorted(stored) and len(set(first)) == len(stored)
    assert first != second
    # Not a local shuffle of the stored order: over the first epoch, positions move across the whole split
    # (a buffer of 8 moves each example by a few places at most, on average).
    where = {name: index for index, name in enumerate(stored)}
    moved = np.mean([abs(where[name] - index) for index, name in enumerate(first)])
    assert moved > len(stored) / 5
    local = _epochs_of_names(synthetic_dir, seed=0, shuffle_buffer=8, epochs=1)[0]
    assert sorted(local) == sorted(stored) and np.mean([abs(where[n] - i) for i, n in enumerate(local)]) < 16
    assert _epochs_of_names(synthetic_dir, seed=0, shuffle_buffer=0, epochs=1)[0] == first  # seeded


def test_training_order_falls_back_to_a_buffer_when_the_split_does_not_fit_in_memory(synthetic_dir, monkeypatch):
    size = pipeline.dataset_size("synthetic_shapes", "train", synthetic_dir)
    order = pipeline.training_order("synthetic_shapes", data_dir=synthetic_dir)
    assert (order.buffer, order.cached, order.exact) == (size, True, True)
    assert order.description.startswith(f"a new permutation of the split each epoch ({size} examples, ")
    monkeypatch.setattr(pipeline, "SHUFFLE_BUFFER", 16)
    monkeypatch.setattr(pipeline, "host_memory_bytes", lambda: 4 * order.encoded_bytes - 1)  # a quarter: too little
    small = pipeline.training_order("synthetic_shapes", data_dir=synthetic_dir)
    assert (small.buffer, small.exact) == (16, False)
    assert "over a quarter of this host's" in small.description
    assert f"config.dataset.shuffle_buffer={size} holds it all" in small.description
    monkeypatch.setattr(pipeline, "host_memory_bytes", lambda: 4 * order.encoded_bytes)
    assert pipeline.training_order("synthetic_shapes", data_dir=synthetic_dir).exact
    # Asked for explicitly: a buffer of that size, or all of the split whatever the memory.
    assert pipeline.training_order("synthetic_shapes", data_dir=synthetic_dir, shuffle_buffer=5).buffer == 5
    assert pipeline.training_order("synthetic_shapes", data_dir=synthetic_dir, shuffle_buffer=10**6).exact
    with pytest.raises(ValueError, match="shuffle_buffer must be >= 0"):
        pipeline.training_order("synthetic_shapes", data_dir=synthetic_dir, shuffle_buffer=-1)
    # Splits joined with "+" and sliced count their bytes too (tfds reports none for them).
    joined = pipeline.training_order("synthetic_shapes", data_dir=synthetic_dir, split="train[:50%]+validation")
    assert joined.examples == size // 2 + pipeline.dataset_size("synthetic_shapes", "validation", synthetic_dir)
    assert 0.5 * order.encoded_bytes < joined.encoded_bytes < order.encoded_bytes


def test_host_memory_is_the_lowest_limit_of_this_process_cgroup_and_its_ancestors(tmp_path):
    physical = pipeline.host_memory_bytes(tmp_path / "none", tmp_path / "none")
    assert physical is not None and physical > 2**28
    # cgroup v2, as a SLURM job with --mem: the job's folder limits, its step's says "max".
    v2 = tmp_path / "v2"
    (v2 / "slurm/job_7/step_0").mkdir(parents=True)
    (v2 / "memory.max").write_text("max\n")
    (v2 / "slurm/job_7/memory.max").write_text(f"{2**30}\n")
    (v2 / "slurm/job_7/step_0/memory.max").write_text("max\n")
    (tmp_path / "self_v2").write_text("0::/slurm/job_7/step_0\n")
    assert pipeline.host_memory_bytes(v2, tmp_path / "self_v2") == 2**30
    # cgroup v1: the memory controller's hierarchy (the others' lines are not about memory).
    v1 = tmp_path / "v1"
    (v1 / "memory/docker/abc").mkdir(parents=True)
    (v1 / "memory/docker/abc/memory.limit_in_bytes").write_text(f"{3 * 2**29}\n")
    (tmp_path / "self_v1").write_text("5:cpu,cpuacct:/docker/abc\n4:memory:/docker/abc\n0::/\n")
    assert pipeline.host_memory_bytes(v1, tmp_path / "self_v1") == 3 * 2**29


def test_eval_batches_pads_last_batch_with_invalid_examples(synthetic_dir):
    batches = list(pipeline.eval_batches("synthetic_shapes", data_dir=synthetic_dir, batch_size=10, crop_size=64))
    assert len(batches) == 7  # ceil(64 / 10)
    assert [int(b["valid"].sum()) for b in batches] == [10] * 6 + [4]
    last = batches[-1]
    assert last["image"].shape == (10, 64, 64, 3) and last["label"].shape == (10, 64, 64)
    assert (last["label"][4:] == -1).all() and (last["image"][4:] == 0).all()
    assert (last["label"][:4] >= 0).any()


# --------------------------------------------------------------------------------------------- transforms
_COLOURS = np.array([[200, 40, 40], [40, 200, 40], [40, 40, 200], [200, 200, 40], [40, 200, 200]], np.float64)


def _blocks_image(seed: int, height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """Flat-colour rectangles; the mask is decoded from the image's own pixels."""
    rng = np.random.default_rng(seed)
    image = np.empty((height, width, 3), np.uint8)
    image[:] = _COLOURS[0]
    for _ in range(6):
        y, x = rng.integers(0, height - 12), rng.integers(0, width - 12)
        h, w = rng.integers(12, 40, 2)
        image[y : y + h, x : x + w] = _COLOURS[rng.integers(len(_COLOURS))]
    return image, _decode_colours(image)


def _decode_colours(image: np.ndarray) -> np.ndarray:
    distance = ((image[..., None, :].astype(np.float64) - _COLOURS) ** 2).sum(-1)
    return distance.argmin(-1).astype(np.int32)


def _uniform_neighbourhood(label: np.ndarray, radius: int = 2) -> np.ndarray:
    """Pixels whose (2r+1)^2 neighbourhood has one label, away from region and crop borders (where bilinear
    and nearest resampling legitimately differ, e.g. rotation blends the fill into edge pixels)."""
    padded = np.pad(label, radius, constant_values=-2)
    same = np.ones(label.shape, bool)
    for dy in range(2 * radius + 1):
        for dx in range(2 * radius + 1):
            same &= padded[dy : dy + label.shape[0], dx : dx + label.shape[1]] == label
    return same


@pytest.mark.parametrize("rotate_degrees", [0.0, 10.0])
def test_augmentation_keeps_image_and_mask_aligned(rotate_degrees):
    image, label = _blocks_image(0, 70, 90)
    flipped_or_moved = set()
    for seed in range(12):
        out_image, out_label = transforms.train_transform(
            tf.constant(image),
            tf.constant(label),
            tf.constant([5, seed]),
            base_size=64,
            crop_size=48,
            rotate_degrees=rotate_degrees,
            blur=False,
        )
        pixels = out_image.numpy() * STD * 255 + MEAN * 255  # undo the normalisation by hand
        out_label = out_label.numpy()
        check = _uniform_neighbourhood(out_label) & (out_label >= 0)
        assert check.sum() > 100
        np.testing.assert_array_equal(_decode_colours(pixels)[check], out_label[check])
        flipped_or_moved.add(out_label.tobytes())
    assert len(flipped_or_moved) == 12  # every seed draws a different augmentation


def test_padding_is_image_zero_and_label_ignore():
    image = np.full((30, 40, 3), 100, np.uint8)
    label = np.full((30, 40), 2, np.int32)
    # Short side is drawn from [8, 32] < crop 48: the scaled image always needs padding.
    out_image, out_label = transforms.train_transform(
        tf.constant(image),
        tf.constant(label),
        tf.constant([0, 1]),
        base_size=16,
        crop_size=48,
        normalise=False,
        blur=False,
    )
    out_image, out_label = out_image.numpy(), out_label.numpy()
    padded = out_label == -1
    assert padded.any() and (out_label[~padded] == 2).all()
    assert (out_image[padded] == 0).all() and (out_image[~padded] == 100).all()
    # The image occupies the top-left corner: padding is bottom/right only.
    rows, cols = np.nonzero(~padded)
    assert rows.min() == 0 and cols.min() == 0


@pytest.mark.parametrize(("height", "width"), [(60, 101), (101, 60), (50, 50), (33, 80)])
def test_validation_centre_crop_matches_reference(height, width):
    crop = 40
    label = (np.arange(height * width).reshape(height, width) % 251).astype(np.uint8)
    image = np.repeat(label[..., None], 3, -1)
    out_image, out_label = transforms.val_transform(tf.constant(image), tf.constant(label, tf.int32), crop_size=crop)
    assert out_image.shape == (crop, crop, 3) and out_label.shape == (crop, crop)
    # Reference _val_sync_transform with PIL: short side to crop, NEAREST mask, int(round(...)) offsets.
    if width > height:
        oh, ow = crop, int(1.0 * width * crop / height)
    else:
        ow, oh = crop, int(1.0 * height * crop / width)
    mask = Image.fromarray(label).resize((ow, oh), Image.NEAREST)
    x1, y1 = int(round((ow - crop) / 2.0)), int(round((oh - crop) / 2.0))
    expected = np.asarray(mask.crop((x1, y1, x1 + crop, y1 + crop)))
    np.testing.assert_array_equal(out_label.numpy(), expected)


def _resize_everything_then_crop(image, label, seed, *, base_size, crop_size):
    """The reference's ``_sync_transform`` as written (flip, resize the whole image, pad, crop) with the draws
    of :func:`transforms.train_transform`, which resamples only the crop."""
    seeds = tf.random.experimental.stateless_split(tf.cast(seed, tf.int64), 8)
    if tf.random.stateless_uniform([], seeds[0]) < 0.5:
        image, label = image[:, ::-1], label[:, ::-1]
    short = tf.random.stateless_uniform(
        [], seeds[1], minval=int(base_size * 0.5), maxval=int(base_size * 2.0) + 1, dtype=tf.int32
    )
    height, width = image.shape[:2]
    out_h, out_w = (height * short // width, short) if height > width else (short, width * short // height)
    image, label = transforms._resize_pair(image, label, out_h, out_w)
    pad_h, pad_w = max(crop_size - out_h, 0), max(crop_size - out_w, 0)
    image = np.pad(image.numpy(), [(0, pad_h), (0, pad_w), (0, 0)])
    label = np.pad(label.numpy(), [(0, pad_h), (0, pad_w)], constant_values=-1)
    x1 = tf.random.stateless_uniform([], seeds[3], 0, out_w + pad_w - crop_size + 1, dtype=tf.int32)
    y1 = tf.random.stateless_uniform([], seeds[4], 0, out_h + pad_h - crop_size + 1, dtype=tf.int32)
    return image[y1 : y1 + crop_size, x1 : x1 + crop_size], label[y1 : y1 + crop_size, x1 : x1 + crop_size]


def test_train_transform_resamples_only_the_crop_as_if_it_resized_everything():
    rng = np.random.default_rng(0)
    differing = total = 0
    shrunk_below_crop = grown_past_crop = 0
    for trial in range(40):
        height, width = rng.integers(20, 130, 2)
        image = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
        label = rng.integers(-1, 20, (height, width)).astype(np.int32)
        base_size, crop_size = int(rng.integers(16, 100)), int(rng.integers(16, 90))
        seed = tf.constant([3, trial])
        expected_image, expected_label = _resize_everything_then_crop(
            tf.constant(image), tf.constant(label), seed, base_size=base_size, crop_size=crop_size
        )
        out_image, out_label = transforms.train_transform(
            tf.constant(image), tf.constant(label), seed, base_size=base_size, crop_size=crop_size,
            blur=False, normalise=False,
        )  # fmt: skip
        np.testing.assert_array_equal(out_label.numpy(), expected_label)  # nearest indices: TF's own formula
        # Bilinear sample positions computed from the crop's origin: float32 rounding, one level at most.
        error = np.abs(out_image.numpy() - expected_image)
        assert error.max() <= 1.0, trial
        differing, total = differing + (error > 0).sum(), total + error.size
        padded = (expected_label == -1).all(axis=1).any() or (expected_label == -1).all(axis=0).any()
        shrunk_below_crop += bool(padded)
        grown_past_crop += min(height, width) < crop_size and not padded
    assert differing / total < 1e-3
    assert shrunk_below_crop >= 5 and grown_past_crop >= 5  # both regimes of the window were exercised


def test_validation_image_resamples_only_the_centre_crop():
    rng = np.random.default_rng(1)
    for height, width in [(60, 101), (101, 60), (50, 50), (33, 80), (200, 150)]:
        image = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
        label = np.zeros((height, width), np.int32)
        crop = 40
        out_image, _ = transforms.val_transform(tf.constant(image), tf.constant(label), crop_size=crop, normalise=False)
        oh, ow = (crop, width * crop // height) if width > height else (height * crop // width, crop)
        whole, _ = transforms._resize_pair(tf.constant(image), tf.constant(label), oh, ow)
        y1, x1 = int(round((oh - crop) / 2.0)), int(round((ow - crop) / 2.0))
        error = np.abs(out_image.numpy() - whole.numpy()[y1 : y1 + crop, x1 : x1 + crop])
        assert error.max() <= 1.0 and (error > 0).mean() < 1e-2  # float32 rounding at .5: one level


def test_blur_equals_pils_gaussian_blur_bit_for_bit():
    # The reference's augmentation: img.filter(ImageFilter.GaussianBlur(radius=random.random())).
    rng = np.random.default_rng(0)
    radii = [0.0, 1e-7, 0.05, 0.2, 0.25, 0.5, 0.75, 0.999999] + [float(np.float32(r)) for r in rng.random(24)]
    sizes = [(1, 1), (1, 7), (9, 1), (2, 2)] + [tuple(rng.integers(3, 60, 2)) for _ in range(28)]
    blurred_any = False
    for radius, (height, width) in zip(radii, sizes, strict=True):
        image = rng.integers(0, 256, (height, width, 3)).astype(np.uint8)
        if radius > 0.5:  # smooth content too, where rounding ties are common
            image = np.cumsum(image % 3, axis=1).clip(0, 255).astype(np.uint8)
        expected = np.asarray(Image.fromarray(image).filter(ImageFilter.GaussianBlur(radius=radius)))
        out = transforms.gaussian_blur(tf.constant(image, tf.float32), tf.constant(radius)).numpy()
        np.testing.assert_array_equal(out, expected, err_msg=f"radius {radius}, size {height}x{width}")
        blurred_any |= bool((expected != image).any())
    assert blurred_any


def test_blur_refuses_a_radius_from_one():
    with pytest.raises(tf.errors.InvalidArgumentError, match="radius must be below 1"):
        transforms.gaussian_blur(tf.zeros([4, 4, 3]), tf.constant(1.0))


def test_blur_preserves_flat_regions_and_smooths_edges():
    image = np.zeros((20, 20, 3), np.float32)
    image[:, 10:] = 200
    blurred = transforms.gaussian_blur(tf.constant(image), tf.constant(0.9)).numpy()
    assert (blurred[:, :6] == 0).all() and (blurred[:, 14:] == 200).all()
    assert 0 < blurred[0, 9, 0] < 100 < blurred[0, 10, 0] < 200


def _photo(seed: int, height: int, width: int) -> np.ndarray:
    """Smooth colour fields plus noise (JPEG's chroma subsampling and IDCT matter, unlike flat colour)."""
    rng = np.random.default_rng(seed)
    coarse = rng.uniform(0, 255, (height // 8 + 2, width // 8 + 2, 3)).astype(np.uint8)
    smooth = np.asarray(Image.fromarray(coarse).resize((width, height), Image.BILINEAR), np.float32)
    return np.clip(smooth + rng.normal(0, 20, smooth.shape), 0, 255).astype(np.uint8)


def _encoded(array: np.ndarray, fmt: str, **options) -> tf.Tensor:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, fmt, **options)
    return tf.constant(buffer.getvalue())


_SEED = tf.TensorSpec([2], tf.int32)
_JPEG_KINDS = {
    "4:4:4": {"subsampling": 0},
    "4:2:2": {"subsampling": 1},
    "4:2:0": {"subsampling": 2},
    "progressive": {"progressive": True},
}


@pytest.mark.parametrize("kind", [*_JPEG_KINDS, "gray"])
def test_jpeg_regions_are_the_whole_decode_s_pixels(kind):
    # Decoding a region alone differs from the whole decode at the region's border by up to 8 levels (libjpeg
    # upsamples chroma from the region's own edge); the reader decodes a margin and cuts it off.
    rng = np.random.default_rng(0)
    photo = _photo(1, 77, 101)
    encoded = _encoded(photo[..., 0] if kind == "gray" else photo, "JPEG", quality=90, **_JPEG_KINDS.get(kind, {}))
    whole = transforms.decode_rgb(encoded).numpy()
    read = transforms.jpeg_regions(encoded)
    regions = [(0, 0, 77, 101), (76, 100, 1, 1), (5, 17, 1, 60), (16, 32, 16, 16)]
    regions += [tuple(int(v) for v in (y, x, rng.integers(1, 78 - y), rng.integers(1, 102 - x)))
                for y, x in rng.integers(0, 70, (24, 2))]  # fmt: skip
    for y, x, h, w in regions:
        np.testing.assert_array_equal(read(y, x, h, w).numpy(), whole[y : y + h, x : x + w], err_msg=str((y, x, h, w)))


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
@pytest.mark.parametrize("rotate_degrees", [0.0, 10.0])
def test_training_crop_of_encoded_image_and_raw_label_equals_the_decoded_one(fmt, rotate_degrees):
    # The pipeline's path (a JPEG decoded only where the crop reads; raw label values looked up after the
    # crop) gives exactly the crops of the whole decoded image and its train ids, padding included.
    photo = _photo(2, 90, 130)
    encoded = _encoded(photo, fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    raw = np.random.default_rng(3).integers(0, 151, (90, 130)).astype(np.uint8)
    lut = get_dataset_info("ade20k").label_lut  # 0 -> -1, k -> k - 1
    padded = 0
    for base_size in (60, 200):  # short side 30..120 (mostly smaller than the crop, padded) or 100..400
        options = dict(base_size=base_size, crop_size=96, rotate_degrees=rotate_degrees)
        # Both traced as tf.data runs them, sizes unknown (graph rewrites of known sizes may round differently).
        encoded_path = tf.function(
            lambda data, raw, seed, options=options: transforms.train_transform_encoded(
                data, raw, seed, label_lut=lut, **options
            ),
            input_signature=[tf.TensorSpec([], tf.string), tf.TensorSpec([None, None], tf.uint8), _SEED],
        )
        decoded_path = tf.function(
            lambda image, label, seed, options=options: transforms.train_transform(image, label, seed, **options),
            input_signature=[tf.TensorSpec([None, None, 3], tf.uint8), tf.TensorSpec([None, None], tf.int32), _SEED],
        )
        for seed in range(8):
            image, label = encoded_path(encoded, raw, tf.constant([7, seed]))
            want_image, want_label = decoded_path(transforms.decode_rgb(encoded), lut[raw], tf.constant([7, seed]))
            np.testing.assert_array_equal(image.numpy(), want_image.numpy())
            np.testing.assert_array_equal(label.numpy(), want_label.numpy())
            ignored = label.numpy() == -1
            padded += bool(ignored.all(axis=0).any() or ignored.all(axis=1).any())
    assert 3 <= padded <= 13  # both regimes of the window


@pytest.mark.parametrize("rotate_degrees", [0.0, 10.0])
def test_training_crop_refuses_raw_labels_outside_the_table_and_masks_of_another_size(rotate_degrees):
    # The look-up table's compiled gather would clamp an out-of-range raw value into a class or the padding's
    # entry; a mask of another size would be resampled on the image's grid. Both stop the pipeline by name.
    encoded = _encoded(_photo(4, 40, 50), "PNG")
    lut = np.array([-1, 0, 1, 2], np.int32)

    def first_crop(raw: np.ndarray) -> None:
        ds = tf.data.Dataset.from_tensors((encoded, raw)).map(
            lambda data, raw: transforms.train_transform_encoded(
                data, raw, tf.constant([0, 1]), base_size=40, crop_size=32, label_lut=lut, rotate_degrees=rotate_degrees
            )
        )
        next(iter(ds))

    first_crop(np.full((40, 50), 3, np.uint8))
    with pytest.raises(tf.errors.InvalidArgumentError, match="outside 0..3, the raw values that the label table maps"):
        first_crop(np.full((40, 50), 4, np.uint8))  # 4 would read the padding's entry
    with pytest.raises(tf.errors.InvalidArgumentError, match="outside 0..3, the raw values that the label table maps"):
        first_crop(np.full((40, 50), -2, np.int32))
    with pytest.raises(tf.errors.InvalidArgumentError, match="label height and width differ from the image height"):
        first_crop(np.zeros((50, 40), np.uint8))


# --------------------------------------------------------------------------------------------- ADE20K
def _ade_tree(root: Path, *, train_masks: dict[int, np.ndarray]) -> None:
    base = root / "ADEChallengeData2016"
    for index, mask in train_masks.items():
        _write_jpeg(base / "images/training" / f"ADE_train_{index:08d}.jpg", *mask.shape, seed=index)
        _write_png(base / "annotations/training" / f"ADE_train_{index:08d}.png", mask, "L")
    val = np.full((16, 16), 150, np.uint8)
    _write_jpeg(base / "images/validation/ADE_val_00000001.jpg", 16, 16)
    _write_png(base / "annotations/validation/ADE_val_00000001.png", val, "L")


def test_ade20k_builder_shifts_labels_and_ignores_other(tmp_path):
    mask = np.zeros((16, 24), np.uint8)
    mask[:, 8:] = 5
    mask[:, 16:] = 1
    _ade_tree(tmp_path / "raw", train_masks={1: mask, 2: np.full((12, 12), 150, np.uint8)})
    pipeline.prepare("ade20k", tmp_path / "tfds", manual_dir=tmp_path / "raw")
    labels = _labels_by_file("ade20k", tmp_path / "tfds", "train")
    assert sorted(labels) == ["ADE_train_00000001.jpg", "ADE_train_00000002.jpg"]
    first = labels["ADE_train_00000001.jpg"]
    assert (first[:, :8] == -1).all() and (first[:, 8:16] == 4).all() and (first[:, 16:] == 0).all()
    assert (labels["ADE_train_00000002.jpg"] == 149).all()
    assert pipeline.dataset_size("ade20k", "validation", tmp_path / "tfds") == 1


def test_images_decode_exactly_as_pil_reads_them(tmp_path):
    # The reference (and predict) read images with PIL, whose JPEG decoder uses the accurate IDCT; TF's default
    # fast one differs by a few levels on most pixels of a textured photo.
    _ade_tree(tmp_path / "raw", train_masks={1: np.ones((37, 53), np.uint8)})
    pipeline.prepare("ade20k", tmp_path / "tfds", manual_dir=tmp_path / "raw")
    (example,) = pipeline.full_examples("ade20k", data_dir=tmp_path / "tfds", split="train")
    path = tmp_path / "raw/ADEChallengeData2016/images/training/ADE_train_00000001.jpg"
    with Image.open(path) as image:
        np.testing.assert_array_equal(example["image"], np.asarray(image.convert("RGB")))
    fast = tf.io.decode_jpeg(path.read_bytes(), channels=3).numpy()
    assert (fast != example["image"]).any()  # the check above can tell the two decoders apart


@pytest.mark.parametrize("fault", ["image_without_mask", "mask_without_image", "empty_folder"])
def test_ade20k_unpaired_or_missing_files_stop_the_build_naming_them(tmp_path, fault):
    # The reference skips an image without mask and then fails on the split's size; a silently smaller split
    # (a partly extracted zip) would train on less data without anyone knowing.
    _ade_tree(tmp_path / "raw", train_masks={1: np.ones((8, 8), np.uint8)})
    base = tmp_path / "raw/ADEChallengeData2016"
    if fault == "image_without_mask":
        _write_jpeg(base / "images/training/ADE_train_00000003.jpg", 8, 8)
        match = "1 image.s. without their annotation, e.g. .*ADE_train_00000003.jpg"
    elif fault == "mask_without_image":
        _write_png(base / "annotations/validation/ADE_val_00000002.png", np.ones((8, 8), np.uint8), "L")
        match = "1 annotation.s. without their image, e.g. .*ADE_val_00000002.png"
    else:
        for path in (base / "images/validation").iterdir():
            path.unlink()
        match = "no images in .*images/validation"
    with pytest.raises(common.DataError, match=match):
        pipeline.prepare("ade20k", tmp_path / "tfds", manual_dir=tmp_path / "raw")


def test_prepare_reuses_a_prepared_dataset_saying_so_and_rebuilds_on_overwrite(tmp_path, capsys, caplog):
    _ade_tree(tmp_path / "raw", train_masks={1: np.ones((8, 8), np.uint8)})
    args = ["--dataset", "ade20k", "--manual-dir", str(tmp_path / "raw"), "--data-dir", str(tmp_path / "tfds")]
    with caplog.at_level(logging.WARNING):
        assert prepare.main(args) == 0
    assert "prepared in" in capsys.readouterr().out
    # A first build is not worth a warning (tfds' "Variant folder ... has no dataset_info.json").
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING and "Variant folder" in r.getMessage()]
    base = tmp_path / "raw/ADEChallengeData2016"
    _write_jpeg(base / "images/training/ADE_train_00000002.jpg", 8, 8)
    _write_png(base / "annotations/training/ADE_train_00000002.png", np.ones((8, 8), np.uint8), "L")
    assert prepare.main(args) == 0
    out = capsys.readouterr().out
    assert "already prepared" in out and "(train 1, validation 1)" in out and "--overwrite" in out
    assert prepare.main([*args, "--overwrite"]) == 0
    assert "(train 2, validation 1)" in capsys.readouterr().out
    assert pipeline.dataset_size("ade20k", "train", tmp_path / "tfds") == 2
    # A rebuild that fails (the raw files moved away) leaves the prepared copy as it was.
    (tmp_path / "raw").rename(tmp_path / "moved")
    assert prepare.main([*args, "--overwrite"]) == 1
    assert "raw files missing" in capsys.readouterr().err
    assert pipeline.dataset_size("ade20k", "train", tmp_path / "tfds") == 2


def test_ade20k_missing_files_error_gives_instructions(tmp_path):
    with pytest.raises(FileNotFoundError, match="ADEChallengeData2016.zip"):
        pipeline.prepare("ade20k", tmp_path / "tfds", manual_dir=tmp_path)
    # The two usual slips: the dataset's own top folder given, or its archive not extracted.
    _ade_tree(tmp_path / "raw", train_masks={1: np.ones((8, 8), np.uint8)})
    with pytest.raises(FileNotFoundError, match=f"give its parent {tmp_path / 'raw'} .the folder holding"):
        pipeline.prepare("ade20k", tmp_path / "tfds", manual_dir=tmp_path / "raw/ADEChallengeData2016")
    with pytest.raises(FileNotFoundError, match=f"it lies inside .*give {tmp_path / 'raw'} "):
        pipeline.prepare("ade20k", tmp_path / "tfds", manual_dir=tmp_path / "raw/ADEChallengeData2016/images")
    (tmp_path / "zipped").mkdir()
    (tmp_path / "zipped/ADEChallengeData2016.zip").write_bytes(b"PK")
    with pytest.raises(FileNotFoundError, match="it holds ADEChallengeData2016.zip: extract the archives there first"):
        pipeline.prepare("ade20k", tmp_path / "tfds", manual_dir=tmp_path / "zipped")
    # No manual dir at all: tfds' default folder is not presented as the user's; the command names the dataset.
    with pytest.raises(FileNotFoundError) as error:
        pipeline.prepare("ade20k", tmp_path / "tfds")
    message = str(error.value)
    assert "(no manual dir given; tfds looked in " in message and "which does not exist" not in message
    assert "prepare --dataset ade20k --manual-dir DIR" in message and "--config.dataset.manual_dir=DIR" in message


def test_archives_extracted_into_folders_of_their_own_or_not_renamed_are_named(tmp_path):
    # Cityscapes' two zips each extracted into a folder named after the zip.
    for kind in ("leftImg8bit", "gtFine"):
        for split in ("train", "val", "test"):
            (tmp_path / f"cs/{kind}_trainvaltest/{kind}/{split}").mkdir(parents=True)
    with pytest.raises(FileNotFoundError) as error:
        pipeline.prepare("cityscapes", tmp_path / "tfds", manual_dir=tmp_path / "cs")
    message = str(error.value)
    assert f"move {tmp_path / 'cs/gtFine_trainvaltest/gtFine'} to {tmp_path / 'cs/gtFine'}" in message
    assert f"move {tmp_path / 'cs/leftImg8bit_trainvaltest/leftImg8bit'} to {tmp_path / 'cs/leftImg8bit'}" in message
    # SBD's archive extracts to benchmark_RELEASE/, which the layout calls VOCaug/.
    _voc_tree(tmp_path / "voc", {"train": ["2007_000032"], "val": ["2007_000033"]})
    (tmp_path / "voc/benchmark_RELEASE/dataset").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match=f"rename {tmp_path / 'voc/benchmark_RELEASE'} to "):
        pipeline.prepare("pascal_aug", tmp_path / "tfds", manual_dir=tmp_path / "voc")


@pytest.mark.parametrize("fault", ["corrupt_image", "size_mismatch", "label_above_classes"])
def test_builder_errors_name_the_example(tmp_path, fault):
    _ade_tree(tmp_path / "raw", train_masks={1: np.ones((16, 16), np.uint8)})
    base = tmp_path / "raw/ADEChallengeData2016"
    bad_image = base / "images/training/ADE_train_00000002.jpg"
    bad_mask = base / "annotations/training/ADE_train_00000002.png"
    _write_jpeg(bad_image, 16, 16)
    _write_png(bad_mask, np.ones((16, 16), np.uint8), "L")
    if fault == "corrupt_image":
        bad_image.write_bytes(b"\xff\xd8 definitely not a jpeg")
        match = "ADE_train_00000002.jpg"
    elif fault == "size_mismatch":
        _write_png(bad_mask, np.ones((16, 20), np.uint8), "L")
        match = "ADE_train_00000002.png.*differs.*extract the archives again"
    else:
        _write_png(bad_mask, np.full((16, 16), 151, np.uint8), "L")
        match = "ADE_train_00000002.png.*151.*extract the archives again"
    with pytest.raises(common.DataError, match=match):
        pipeline.prepare("ade20k", tmp_path / "tfds", manual_dir=tmp_path / "raw")


# --------------------------------------------------------------------------------------------- Pascal Context
def test_rle_decoder_reads_coco_strings():
    rng = np.random.default_rng(0)
    mask = np.zeros((37, 23), bool)
    mask[3:30, 2:20] = rng.random((27, 18)) > 0.3  # many runs: exercises the difference coding
    mask[0, 0] = True  # first count 0
    from fastfcn_jax.data.builders.pcontext import decode_rle

    np.testing.assert_array_equal(decode_rle(_rle_encode(mask), 37, 23), mask)
    big = np.zeros((300, 200), bool)
    big[150:, 100:] = True  # large counts: multi-character numbers and negative differences
    np.testing.assert_array_equal(decode_rle(_rle_encode(big), 300, 200), big)


def _pcontext_json(root: Path, annotations: dict[str, list[tuple[int, np.ndarray]]], phases: dict[str, str]):
    base = root / "VOCdevkit/VOC2010"
    images, annos = [], []
    for number, (stem, objects) in enumerate(annotations.items()):
        height, width = objects[0][1].shape
        _write_jpeg(base / "JPEGImages" / f"{stem}.jpg", height, width, seed=number)
        image_id = int(stem.replace("_", ""))
        images.append(
            {"image_id": image_id, "file_name": f"{stem}.jpg", "width": width, "height": height, "phase": phases[stem]}
        )
        for category, mask in objects:
            rle = {"size": [height, width], "counts": _rle_encode(mask)}
            annos.append(
                {"id": len(annos) + 1, "image_id": image_id, "category_id": category, "segmentation": rle}
                | {"area": int(mask.sum()), "bbox": [0, 0, width, height], "iscrowd": 0, "parts": []}
            )
    detail = {
        "images": images,
        "annos_segmentation": annos,
        "annos_occlusion": [],
        "annos_boundary": [],
        "categories": [{"category_id": 2, "name": "aeroplane", "supercategory": "object", "onlysemantic": 0}],
        "parts": [],
    }
    (base / "trainval_merged.json").write_text(json.dumps(detail))


def test_pcontext_json_builder_maps_459_to_59(tmp_path):
    left = np.zeros((16, 16), bool)
    left[:, :8] = True
    top = np.zeros((16, 16), bool)
    top[:4] = True
    bottom_right = np.zeros((16, 16), bool)
    bottom_right[8:, 8:] = True
    # JSON order paints: aeroplane (2) left, then bag (9) on top rows (overwrites), wood (458) bottom right.
    objects = {"2008_000002": [(2, left), (9, top), (458, bottom_right)], "2008_000003": [(18, left)]}
    _pcontext_json(tmp_path / "raw", objects, {"2008_000002": "train", "2008_000003": "val"})
    pipeline.prepare("pcontext", tmp_path / "tfds", manual_dir=tmp_path / "raw")
    label = _labels_by_file("pcontext", tmp_path / "tfds", "train")["2008_000002.jpg"]
    assert (label[:4] == 1).all()  # bag: sorted-mapping index 2, minus 1
    assert (label[4:, :8] == 0).all()  # aeroplane: index 1 -> 0
    assert (label[8:, 8:] == 58).all()  # wood: the last of the 59 classes
    assert (label[4:8, 8:] == -1).all()  # unlabelled background -> ignored
    val = _labels_by_file("pcontext", tmp_path / "tfds", "validation")["2008_000003.jpg"]
    assert (val[:, :8] == 2).all() and (val[:, 8:] == -1).all()  # bed


def test_pcontext_json_rejects_ids_outside_the_59(tmp_path):
    everything = np.ones((8, 8), bool)
    _pcontext_json(tmp_path / "raw", {"2008_000002": [(1, everything)]}, {"2008_000002": "train"})
    with pytest.raises(common.DataError, match="2008_000002.jpg.*1"):
        pipeline.prepare("pcontext", tmp_path / "tfds", manual_dir=tmp_path / "raw")


def test_pcontext_truncated_json_is_named_with_what_to_do(tmp_path):
    everything = np.ones((8, 8), bool)
    _pcontext_json(tmp_path / "raw", {"2008_000002": [(2, everything)]}, {"2008_000002": "train"})
    path = tmp_path / "raw/VOCdevkit/VOC2010/trainval_merged.json"
    path.write_text(path.read_text()[:50])  # an interrupted download
    with pytest.raises(common.DataError, match="trainval_merged.json: not readable JSON.*download it again"):
        pipeline.prepare("pcontext", tmp_path / "tfds", manual_dir=tmp_path / "raw")


def test_pcontext_mat_builder_maps_459_to_59(tmp_path):
    base = tmp_path / "raw/VOCdevkit/VOC2010"
    label_map = np.zeros((12, 12), np.uint16)
    label_map[:, 4:8] = 2  # aeroplane -> 0
    label_map[:, 8:] = 1  # accordion: not among the 59 -> background -> -1
    label_map[0, 0] = 458  # wood -> 58
    for number, stem in enumerate(["2008_000002", "2008_000003"]):
        _write_jpeg(base / "JPEGImages" / f"{stem}.jpg", 12, 12, seed=number)
        (base / "trainval").mkdir(parents=True, exist_ok=True)
        savemat(base / "trainval" / f"{stem}.mat", {"LabelMap": label_map})
    (base / "ImageSets/Main").mkdir(parents=True)
    (base / "ImageSets/Main/train.txt").write_text("2008_000002\n")
    (base / "ImageSets/Main/val.txt").write_text("2008_000003\n")
    pipeline.prepare("pcontext", tmp_path / "tfds", manual_dir=tmp_path / "raw")
    label = _labels_by_file("pcontext", tmp_path / "tfds", "train")["2008_000002.jpg"]
    assert label[0, 0] == 58 and (label[1:, :4] == -1).all()
    assert (label[:, 4:8] == 0).all() and (label[:, 8:] == -1).all()
    # A damaged annotation (scipy raises its own error kinds for these) is named, with what to do.
    mat = base / "trainval/2008_000003.mat"
    mat.write_bytes(mat.read_bytes()[:100])
    with pytest.raises(common.DataError, match=r"unreadable Pascal Context annotation .*2008_000003.mat .*extract the"):
        pipeline.prepare("pcontext", tmp_path / "tfds2", manual_dir=tmp_path / "raw")


# --------------------------------------------------------------------------------------------- Cityscapes
def test_cityscapes_builder_maps_label_ids_to_train_ids(tmp_path):
    raw = tmp_path / "raw"
    ids = np.array([[7, 0, 1, 4], [26, 33, 8, 11]], np.uint8).repeat(4, 0).repeat(4, 1)  # 8 x 16
    for split, city in [("train", "aachen"), ("val", "frankfurt")]:
        stem = f"{city}_000000_000019"
        rgb = np.random.default_rng(0).integers(0, 256, (8, 16, 3), dtype=np.uint8)
        _write_png(raw / "leftImg8bit" / split / city / f"{stem}_leftImg8bit.png", rgb)
        _write_png(raw / "gtFine" / split / city / f"{stem}_gtFine_labelIds.png", ids, "L")
    pipeline.prepare("cityscapes", tmp_path / "tfds", manual_dir=raw)
    label = _labels_by_file("cityscapes", tmp_path / "tfds", "train")["aachen_000000_000019_leftImg8bit.png"]
    # cityscapesScripts: road 7 -> 0, unlabeled 0 / ego 1 / static 4 -> ignore, car 26 -> 13, bicycle 33 -> 18,
    # sidewalk 8 -> 1, building 11 -> 2.
    np.testing.assert_array_equal(label[::4, ::4], [[0, -1, -1, -1], [13, 18, 1, 2]])


def _cityscapes_pair_per_split(raw: Path, label_id: int) -> None:
    """One 4x8 black image per split whose annotation is all ``label_id``."""
    for split, city in [("train", "aachen"), ("val", "frankfurt")]:
        stem = f"{city}_000000_000019"
        _write_png(raw / "leftImg8bit" / split / city / f"{stem}_leftImg8bit.png", np.zeros((4, 8, 3), np.uint8))
        ids = np.full((4, 8), label_id, np.uint8)
        _write_png(raw / "gtFine" / split / city / f"{stem}_gtFine_labelIds.png", ids, "L")


def test_cityscapes_image_without_its_annotation_stops_the_build(tmp_path):
    raw = tmp_path / "raw"
    _cityscapes_pair_per_split(raw, 7)
    _write_png(raw / "leftImg8bit/train/aachen/aachen_000001_000019_leftImg8bit.png", np.zeros((4, 8, 3), np.uint8))
    with pytest.raises(common.DataError, match="without their annotation, e.g. .*aachen_000001_000019_leftImg8bit"):
        pipeline.prepare("cityscapes", tmp_path / "tfds", manual_dir=raw)


def test_cityscapes_rejects_label_ids_above_33(tmp_path):
    raw = tmp_path / "raw"
    _cityscapes_pair_per_split(raw, 34)
    with pytest.raises(common.DataError, match="aachen_000000_000019_gtFine_labelIds.png"):
        pipeline.prepare("cityscapes", tmp_path / "tfds", manual_dir=raw)


# --------------------------------------------------------------------------------------------- Pascal VOC
def _voc_tree(raw: Path, stems: dict[str, list[str]]) -> np.ndarray:
    base = raw / "VOCdevkit/VOC2012"
    mask = np.zeros((10, 10), np.uint8)
    mask[:, 5:] = 15  # person
    mask[:, 4] = 255  # void outline
    for number, stem in enumerate(sorted({s for group in stems.values() for s in group})):
        _write_jpeg(base / "JPEGImages" / f"{stem}.jpg", 10, 10, seed=number)
        png = Image.fromarray(mask, "P")
        png.putpalette(_voc_palette())
        (base / "SegmentationClass").mkdir(parents=True, exist_ok=True)
        png.save(base / "SegmentationClass" / f"{stem}.png")
    (base / "ImageSets/Segmentation").mkdir(parents=True, exist_ok=True)
    for name, group in stems.items():
        (base / "ImageSets/Segmentation" / f"{name}.txt").write_text("".join(f"{s}\n" for s in group))
    return mask


def test_pascal_voc_builder_reads_palette_indices(tmp_path):
    voc = {"train": ["2007_000032"], "val": ["2007_000033"], "trainval": ["2007_000032", "2007_000033"]}
    _voc_tree(tmp_path / "raw", voc)
    pipeline.prepare("pascal_voc", tmp_path / "tfds", manual_dir=tmp_path / "raw")
    label = _labels_by_file("pascal_voc", tmp_path / "tfds", "train")["2007_000032.jpg"]
    assert (label[:, :4] == 0).all() and (label[:, 4] == -1).all() and (label[:, 5:] == 15).all()
    assert pipeline.dataset_size("pascal_voc", "trainval", tmp_path / "tfds") == 2


def test_a_file_the_split_lists_but_the_download_lacks_is_named_as_missing(tmp_path):
    voc = {"train": ["2007_000032"], "val": ["2007_000033"], "trainval": ["2007_000032", "2007_000033"]}
    _voc_tree(tmp_path / "raw", voc)
    (tmp_path / "raw/VOCdevkit/VOC2012/JPEGImages/2007_000033.jpg").unlink()
    with pytest.raises(common.DataError, match="missing image .*2007_000033.jpg: the dataset lists it"):
        pipeline.prepare("pascal_voc", tmp_path / "tfds", manual_dir=tmp_path / "raw")


def test_pascal_aug_builder_combines_voc_and_sbd(tmp_path):
    raw = tmp_path / "raw"
    _voc_tree(raw, {"train": ["2007_000032"], "val": ["2007_000033"]})
    sbd = raw / "VOCaug/dataset"
    segmentation = np.full((10, 10), 3, np.uint8)
    segmentation[0] = 20
    for number, stem in enumerate(["2008_000001", "2008_000002", "2007_000033"]):
        _write_jpeg(sbd / "img" / f"{stem}.jpg", 10, 10, seed=number)
        (sbd / "cls").mkdir(parents=True, exist_ok=True)
        boundaries = np.empty((20, 1), object)
        boundaries[:] = [[np.zeros((10, 10), np.uint8)]]
        savemat(sbd / "cls" / f"{stem}.mat", {"GTcls": {"Segmentation": segmentation, "Boundaries": boundaries}})
    (sbd / "train.txt").write_text("2008_000001\n2007_000033\n")
    (sbd / "val.txt").write_text("2008_000002\n")
    pipeline.prepare("pascal_aug", tmp_path / "tfds", manual_dir=raw)
    train = _labels_by_file("pascal_aug", tmp_path / "tfds", "train")
    # train_aug = (VOC train U SBD train U SBD val) - VOC val; VOC masks where VOC has the image.
    assert sorted(train) == ["2007_000032.jpg", "2008_000001.jpg", "2008_000002.jpg"]
    assert (train["2007_000032.jpg"][:, 4] == -1).all()
    assert (train["2008_000001.jpg"][0] == 20).all() and (train["2008_000001.jpg"][1:] == 3).all()
    assert pipeline.dataset_size("pascal_aug", "sbd_trainval", tmp_path / "tfds") == 3
    (sbd / "cls/2008_000002.mat").write_text("garbage\n")
    with pytest.raises(common.DataError, match=r"unreadable SBD annotation .*2008_000002.mat .*extract the archives"):
        pipeline.prepare("pascal_aug", tmp_path / "tfds2", manual_dir=raw)
    savemat(sbd / "cls/2008_000002.mat", {"Segmentation": segmentation})  # readable, not SBD's structure
    with pytest.raises(common.DataError, match=r"2008_000002.mat holds no GTcls.Segmentation"):
        pipeline.prepare("pascal_aug", tmp_path / "tfds3", manual_dir=raw)


def test_16_bit_float_and_palette_images_read_alike_for_datasets_prediction_and_arrays(tmp_path):
    # One rule (fastfcn_jax.data.image_files): 16 bits scaled by 255/65535, floats in 0..1, a palette's colours.
    from PIL import Image

    from fastfcn_jax.predict import load_image, to_rgb

    gray = np.random.default_rng(0).integers(0, 256, (6, 9), dtype=np.uint8)
    expected = np.repeat(gray[..., None], 3, -1)
    Image.fromarray(gray.astype(np.uint16) * 257).save(tmp_path / "gray16.png")
    Image.fromarray(gray.astype(np.uint16) * 4).save(tmp_path / "dim16.png")  # a dark 16-bit picture stays dark
    Image.fromarray(gray.astype(np.float32) / 255).save(tmp_path / "float.tif")
    palette = Image.fromarray(gray % 4, "P")
    palette.putpalette([0, 0, 0, 250, 0, 0, 0, 250, 0, 0, 0, 250])
    palette.save(tmp_path / "palette.png")
    coloured = np.asarray(palette.convert("RGB"))
    for name, want in [("gray16.png", expected), ("float.tif", expected), ("palette.png", coloured)]:
        stored, size = common.read_rgb(tmp_path / name)  # the dataset builders' reader
        assert size == (6, 9)
        np.testing.assert_array_equal(stored, want, err_msg=name)
        np.testing.assert_array_equal(load_image(tmp_path / name), want, err_msg=name)  # prediction's
        with Image.open(tmp_path / name) as image:
            np.testing.assert_array_equal(to_rgb(image), want, err_msg=name)  # the Python API's, a PIL image
    np.testing.assert_array_equal(to_rgb(gray.astype(np.uint16) * 257), expected)  # and an array
    # 32-bit integer pixels (PIL mode I) are 0..255 values, as integer arrays are.
    np.testing.assert_array_equal(to_rgb(Image.fromarray(gray.astype(np.int32))), expected)
    dim = np.rint(gray.astype(np.float64) * 4 * 255 / 65535)
    np.testing.assert_array_equal(common.read_rgb(tmp_path / "dim16.png")[0][..., 0], dim)
    np.testing.assert_array_equal(load_image(tmp_path / "dim16.png")[..., 0], dim)


# --------------------------------------------------------------------------------------------- folder
def test_custom_folder_round_trip(tmp_path):
    source = tmp_path / "mydata"
    table = {"names": ["sky", "grass", "cow"], "palette": [[0, 0, 255], [0, 255, 0], [90, 60, 30]], "ignore_label": 255}
    source.mkdir()
    (source / "classes.json").write_text(json.dumps(table))
    mask = np.array([[0, 1, 2, 255]], np.uint8).repeat(16, 0).repeat(4, 1)  # 16 x 16
    for split in ("train", "val"):
        for index in range(2):
            _write_jpeg(source / "images" / split / f"img{index}.jpg", 16, 16, seed=index)
            _write_png(source / "masks" / split / f"img{index}.png", mask, "L")
    assert (
        prepare.main(["--dataset", "folder:cows", "--source", str(source), "--data-dir", str(tmp_path / "tfds")]) == 0
    )
    info = get_dataset_info("folder:cows", data_dir=tmp_path / "tfds")
    assert info.class_names == ("sky", "grass", "cow") and info.num_classes == 3
    np.testing.assert_array_equal(info.palette, table["palette"])
    labels = _labels_by_file("folder:cows", tmp_path / "tfds", "validation")
    assert sorted(labels) == ["img0.jpg", "img1.jpg"]
    np.testing.assert_array_equal(labels["img0.jpg"][0, ::4], [0, 1, 2, -1])
    batch = next(pipeline.train_batches("folder:cows", data_dir=tmp_path / "tfds", batch_size=2, seed=0, crop_size=8))
    assert batch["label"].shape == (2, 8, 8) and set(np.unique(batch["label"])) <= {-1, 0, 1, 2}
    # Training and evaluation prepare it again without the source folder: its class table is stored with it.
    assert pipeline.prepare("folder:cows", tmp_path / "tfds").is_prepared()
    with pytest.raises(FileNotFoundError, match=r"(?s)not prepared in .*tfds.*config.dataset.manual_dir"):
        pipeline.prepare("folder:horses", tmp_path / "tfds")


def test_custom_folder_mask_without_its_image_stops_the_build(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"source folder .*nowhere does not exist"):
        pipeline.prepare("folder:pairs", tmp_path / "tfds", source_dir=tmp_path / "nowhere")
    source = tmp_path / "src"
    (source / "classes.json").parent.mkdir(parents=True)
    (source / "classes.json").write_text(json.dumps({"names": ["a", "b"]}))
    _write_jpeg(source / "images/train/x.jpg", 8, 8)
    _write_png(source / "masks/train/x.png", np.zeros((8, 8), np.uint8), "L")
    _write_png(source / "masks/train/y.png", np.zeros((8, 8), np.uint8), "L")
    with pytest.raises(common.DataError, match="1 annotation.s. without their image, e.g. .*y.png") as error:
        pipeline.prepare("folder:pairs", tmp_path / "tfds", source_dir=source)
    # Your own data: the remedy is about the pairs, not about extracting a download again.
    assert "add the missing files or remove the unpaired ones" in str(error.value)
    assert "download" not in str(error.value) and "archives" not in str(error.value)
    (source / "masks/train/y.png").rename(source / "masks/train/y.jpg")  # a mask saved as JPEG
    (source / "masks/train/Thumbs.db").write_bytes(b"not a mask")  # other files are not masks: left alone
    (source / "masks/train/x.png").rename(source / "masks/train/x.PNG")  # an upper-case suffix is a PNG
    with pytest.raises(common.DataError, match=r"masks must be single-channel PNGs.*y.jpg: save them as PNG"):
        pipeline.prepare("folder:pairs", tmp_path / "tfds", source_dir=source)
    (source / "masks/train/y.jpg").unlink()
    pipeline.prepare("folder:pairs", tmp_path / "tfds", source_dir=source)
    assert pipeline.dataset_size(get_dataset_info("folder:pairs", tmp_path / "tfds"), "train", tmp_path / "tfds") == 1


def test_custom_folder_refuses_what_it_would_otherwise_drop_or_misread(tmp_path, monkeypatch):
    source = tmp_path / "src"
    source.mkdir()
    table = {"names": ["a", "b"], "ignore_label": 255}
    (source / "classes.json").write_text(json.dumps(table))
    mask = np.zeros((8, 8), np.uint8)

    def build(message: str, error: type[Exception] = common.DataError) -> None:
        with pytest.raises(error, match=message):
            pipeline.prepare("folder:odd", tmp_path / "tfds", source_dir=source)
        assert not (tmp_path / "tfds" / "fastfcn_folder").exists() or not folder.is_prepared(
            "folder:odd", tmp_path / "tfds"
        )

    from fastfcn_jax.data.builders import folder

    _write_jpeg(source / "images/train/x.jpg", 8, 8)
    _write_png(source / "images/train/x.png", np.zeros((8, 8, 3), np.uint8), "RGB")  # two images, one mask
    _write_png(source / "masks/train/x.png", mask, "L")
    build(r"1 stem.s. name more than one image, e.g. .*x.jpg, .*x.png: .* rename or remove all but one")
    (source / "images/train/x.png").unlink()
    _write_jpeg(source / "images/val/v.jpg", 8, 8)
    _write_png(source / "masks/val/v.png", mask, "L")
    _write_jpeg(source / "images/validation/w.jpg", 8, 8)
    _write_png(source / "masks/validation/w.png", mask, "L")
    build(r"both val/ and validation/ hold the validation split: merge them")
    for name in ("w.jpg",):
        (source / "images/validation" / name).rename(source / "images/val" / name)
    (source / "masks/validation/w.png").rename(source / "masks/val/w.png")
    (source / "images/validation").rmdir()
    build(r"mask folder.s. \['validation'\] have no images/<split> folder")
    (source / "masks/validation").rmdir()
    _write_jpeg(source / "images/train/sub/y.jpg", 8, 8)
    build(r"images/train: subfolders are not read \(sub\): move their files up")
    (source / "images/train/sub/y.jpg").rename(source / "images/train/y.bmp")  # BMP: read, stored decoded
    (source / "images/train/sub").rmdir()
    (source / "images/train/.ipynb_checkpoints").mkdir()  # Jupyter's: not the user's data
    _write_png(source / "masks/train/y.png", mask, "L")
    (source / "images/test").mkdir()
    (source / "masks/test").mkdir()
    build(r"no images in .*images/test .*: put the split's images there .*or remove the empty folder")
    (source / "images/test").rmdir()
    (source / "masks/test").rmdir()
    # Written as '--data-dir=~/tfds' (no shell expansion): the home folder's, not a folder named '~'.
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    (tmp_path / "home").mkdir()
    monkeypatch.chdir(tmp_path)
    pipeline.prepare("folder:odd", "~/tfds", source_dir="~/../src")
    assert not (tmp_path / "~").exists()
    info = get_dataset_info("folder:odd", "~/tfds")
    assert (
        pipeline.dataset_size(info, "train", "~/tfds") == 2 and pipeline.dataset_size(info, "validation", "~/tfds") == 2
    )
    labels = _labels_by_file("folder:odd", tmp_path / "home" / "tfds", "train")
    assert sorted(labels) == ["x.jpg", "y.bmp"]


@pytest.mark.parametrize(
    "table, message",
    [
        ({"names": ["a"], "crop-size": 48}, r"unknown key.s. 'crop-size' \(did you mean 'crop_size'\?\)"),
        ({"names": ["a"], "colours": [[0, 0, 0]]}, r"'colours' \(did you mean 'colors'\?\)"),
        ({"names": ["a"], "ignore_lable": 255}, r"'ignore_lable' \(did you mean 'ignore_label'\?\)"),
        ({"names": ["a"], "crop_size": "48px"}, r"'crop_size' must be a positive integer \(pixels\), got '48px'"),
        ({"names": ["a"], "base_size": -5}, r"'base_size' must be a positive integer"),
        ({"names": ["a"], "ignore_label": "void"}, r"'ignore_label' must be an integer, got 'void'"),
        ({"names": ["a", "a"]}, r"'names' repeats \['a'\]"),
        ({"names": ["a", 3]}, r"'names' must be non-empty strings"),
        (["a", "b"], r"must be a JSON object"),
    ],
)
def test_class_table_mistakes_name_the_key(tmp_path, table, message):
    from fastfcn_jax.data.builders import folder

    (tmp_path / "classes.json").write_text(json.dumps(table))
    with pytest.raises(ValueError, match=r"classes.json: .*" + message):
        folder.read_class_table(tmp_path)


def test_a_manual_dir_that_does_not_exist_is_named_as_such(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"manual_dir .*no_such_raw, which does not exist"):
        pipeline.prepare("ade20k", tmp_path / "tfds", manual_dir=tmp_path / "no_such_raw")


def test_custom_folder_rejects_unknown_class_index(tmp_path):
    source = tmp_path / "mydata"
    source.mkdir()
    (source / "classes.json").write_text(json.dumps({"names": ["a", "b"], "ignore_label": 255}))
    _write_jpeg(source / "images/train/x.jpg", 8, 8)
    _write_png(source / "masks/train/x.png", np.full((8, 8), 2, np.uint8), "L")
    with pytest.raises(common.DataError, match=r"x.png: label values \[2\].*: add the classes to .*classes.json"):
        pipeline.prepare("folder:bad", tmp_path / "tfds", source_dir=source)
    _write_png(source / "masks/train/x.png", np.zeros((6, 8), np.uint8), "L")
    with pytest.raises(common.DataError, match=r"x.png: label size 8x6 .WxH. differs from its image 8x8: masks are"):
        pipeline.prepare("folder:bad", tmp_path / "tfds", source_dir=source)
    _write_png(source / "masks/train/x.png", np.zeros((8, 8, 3), np.uint8), "RGB")  # drawn in colours
    with pytest.raises(common.DataError, match=r"mode 'RGB'.*replacing each colour with its class's index"):
        pipeline.prepare("folder:bad", tmp_path / "tfds", source_dir=source)


def test_each_process_reads_its_own_shard(synthetic_dir, monkeypatch):
    import jax

    monkeypatch.setattr(jax, "process_count", lambda: 3)
    seen, counts = [], []
    for index in range(3):
        monkeypatch.setattr(jax, "process_index", lambda index=index: index)
        batches = list(pipeline.eval_batches("synthetic_shapes", data_dir=synthetic_dir, batch_size=8, crop_size=32))
        counts.append(len(batches))
        seen += [b["label"][i].tobytes() for b in batches for i in np.nonzero(b["valid"])[0]]
    assert counts == [3, 3, 3]  # 22/21/21 examples: every process runs the same number of eval steps
    assert len(seen) == 64 and len(set(seen)) == 64  # disjoint shards covering the split

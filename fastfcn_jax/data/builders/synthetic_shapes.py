"""``synthetic_shapes``: procedurally generated segmentation scenes that need no download.

Each scene is a textured, illumination-graded background with 2-6 overlapping shapes (ellipses, rotated
rectangles, triangles, star polygons) painted in order, plus pixel noise. Shape does not determine the class:
each class has its own colour *and* texture statistics (smooth, dotted, striped, checked, grainy) with
per-instance colour jitter. Two classes share a hue, so colour alone is not enough (a per-pixel colour
classifier reaches about 0.77 mIoU at full resolution); a tiny EncNet+JPU reaches about 0.82 validation mIoU
in 600 CPU steps (configs/demo.py). Image sizes vary (96..192 px per side).

Labels: 0 = background (a trained class, like VOC), 1..5 the shape classes; no ignored pixels.
Deterministic: example ``i`` of a split depends only on (seed, split, i).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

import numpy as np
import tensorflow_datasets as tfds

from fastfcn_jax.data.builders import common

CLASS_NAMES = ("background", "smooth_orange", "dotted_green", "striped_orange", "checked_red", "grainy_purple")
# Mean colour of each class (RGB); instances jitter around it. smooth_orange and striped_orange share a hue
# on purpose: only texture separates them, so colour alone does not solve the task.
_BASE_COLOURS = np.array(
    [[128, 122, 112], [215, 140, 60], [70, 160, 80], [205, 135, 65], [200, 70, 60], [140, 70, 165]],
    np.float32,
)
PALETTE = np.array([[0, 0, 0], [250, 160, 40], [40, 170, 60], [40, 90, 220], [220, 50, 40], [150, 50, 180]], np.uint8)
MIN_SIZE, MAX_SIZE = 96, 192
_SPLIT_IDS = {"train": 0, "validation": 1}


def _texture(kind: int, yy: np.ndarray, xx: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Additive brightness pattern [H, W] of a class's texture."""
    if kind == 1:  # smooth
        return np.zeros_like(yy)
    if kind == 2:  # dotted: bright dots on a grid
        period = rng.uniform(6, 11)
        oy, ox = rng.uniform(0, period, 2)
        dy = (yy + oy) % period - period / 2
        dx = (xx + ox) % period - period / 2
        return np.where(dy**2 + dx**2 < (period * 0.3) ** 2, 55.0, -10.0)
    if kind == 3:  # striped at a random orientation
        period, theta = rng.uniform(8, 14), rng.uniform(0, np.pi)
        phase = (xx * np.cos(theta) + yy * np.sin(theta)) * 2 * np.pi / period
        return 45.0 * np.sign(np.sin(phase))
    if kind == 4:  # checked
        period = rng.uniform(6, 12)
        return np.where((np.floor(yy / period) + np.floor(xx / period)) % 2 == 0, 40.0, -40.0)
    if kind == 5:  # grainy: heavy per-pixel noise
        return rng.normal(0.0, 38.0, yy.shape)
    raise ValueError(kind)


def _shape_mask(yy: np.ndarray, xx: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Boolean [H, W] of one random shape."""
    height, width = yy.shape
    short = min(height, width)
    cy, cx = rng.uniform(0, height), rng.uniform(0, width)
    ry, rx = rng.uniform(0.12, 0.4, 2) * short
    theta = rng.uniform(0, np.pi)
    # Coordinates in the shape's rotated frame.
    u = (xx - cx) * np.cos(theta) + (yy - cy) * np.sin(theta)
    v = -(xx - cx) * np.sin(theta) + (yy - cy) * np.cos(theta)
    kind = rng.integers(4)
    if kind == 0:  # ellipse
        return (u / rx) ** 2 + (v / ry) ** 2 < 1
    if kind == 1:  # rotated rectangle
        return (np.abs(u) < rx) & (np.abs(v) < ry)
    if kind == 2:  # triangle: intersection of three half-planes
        angles = theta + np.array([0, 2, 4]) * np.pi / 3
        inside = np.ones_like(u, bool)
        for angle in angles:
            inside &= (xx - cx) * np.cos(angle) + (yy - cy) * np.sin(angle) < 0.5 * rx
        return inside
    # star-like polygon: radius modulated with angle
    radius = np.hypot(u, v)
    spikes = rng.integers(3, 7)
    return radius < rx * (0.65 + 0.35 * np.cos(spikes * np.arctan2(v, u)))


def generate_scene(seed: int, split: str, index: int) -> tuple[np.ndarray, np.ndarray]:
    """One scene: (image uint8 [H, W, 3], label uint8 [H, W] with values 0..5)."""
    rng = np.random.default_rng([seed, _SPLIT_IDS[split], index])
    height, width = rng.integers(MIN_SIZE, MAX_SIZE + 1, 2)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)

    # Background: desaturated colour with a smooth gradient and low-frequency blobs.
    base = _BASE_COLOURS[0] + rng.uniform(-35, 35, 3)
    gradient = rng.uniform(-0.4, 0.4, (2, 1, 1)) * np.stack([yy, xx])
    blobs = 18 * np.sin(xx / rng.uniform(15, 40) + rng.uniform(0, 6)) * np.cos(yy / rng.uniform(15, 40))
    image = base + (gradient.sum(0) + blobs)[..., None]
    label = np.zeros((height, width), np.uint8)

    for _ in range(rng.integers(2, 7)):
        cls = int(rng.integers(1, len(CLASS_NAMES)))
        mask = _shape_mask(yy, xx, rng)
        colour = _BASE_COLOURS[cls] * rng.uniform(0.8, 1.15) + rng.uniform(-22, 22, 3)
        pattern = colour + _texture(cls, yy, xx, rng)[..., None]
        image = np.where(mask[..., None], pattern, image)
        label[mask] = cls

    # Global illumination gradient and sensor noise shared by all classes.
    light = 1 + rng.uniform(-0.2, 0.2) * (xx / width - 0.5) + rng.uniform(-0.2, 0.2) * (yy / height - 0.5)
    image = image * light[..., None] + rng.normal(0, 10, image.shape)
    return np.clip(np.round(image), 0, 255).astype(np.uint8), label


@dataclasses.dataclass(eq=False)
class SyntheticShapesConfig(tfds.core.BuilderConfig):
    """How many scenes to generate per split, from which seed."""

    seed: int = 0
    num_train: int = 256
    num_validation: int = 64


class SyntheticShapes(tfds.core.GeneratorBasedBuilder):
    """Procedural shapes-and-textures scenes (6 classes incl. background); builds in seconds."""

    name = "fastfcn_synthetic_shapes"
    VERSION = tfds.core.Version("1.1.0")
    RELEASE_NOTES = {"1.0.0": "Initial release.", "1.1.0": "Two classes share a hue; only texture separates them."}
    BUILDER_CONFIGS = [SyntheticShapesConfig(name="default", description="seed 0, 256 train / 64 validation")]

    def _info(self) -> tfds.core.DatasetInfo:
        return common.dataset_info(self, __doc__)

    def _split_generators(self, dl_manager: tfds.download.DownloadManager) -> dict[str, Iterator]:
        del dl_manager  # Nothing to download.
        config = self.builder_config
        return {
            "train": self._generate_examples("train", config.num_train),
            "validation": self._generate_examples("validation", config.num_validation),
        }

    def _generate_examples(self, split: str, count: int) -> Iterator[tuple[str, dict]]:
        for index in range(count):
            image, label = generate_scene(self.builder_config.seed, split, index)
            name = f"{split}_{index:05d}"
            yield name, {"image": image, "label": label[..., None], "file_name": name}

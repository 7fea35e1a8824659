"""Pictures of label maps: palette colouring, overlays and image | label | prediction panels."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], np.float32)


def denormalize(image: np.ndarray) -> np.ndarray:
    """ImageNet-normalised float [H, W, 3] -> uint8 RGB."""
    return np.clip((image * IMAGENET_STD + IMAGENET_MEAN) * 255.0 + 0.5, 0, 255).astype(np.uint8)


def colorize(mask: np.ndarray, palette: np.ndarray) -> np.ndarray:
    """Class indices [H, W] -> uint8 RGB [H, W, 3] with ``palette`` [C, 3]; ignored (-1) pixels are black."""
    palette = np.asarray(palette, np.uint8)
    table = np.concatenate([palette, np.zeros((1, 3), np.uint8)])  # index -1 -> the appended black row
    index = np.where((mask >= 0) & (mask < len(palette)), mask, -1)
    return table[index]


def overlay(image: np.ndarray, mask: np.ndarray, palette: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """uint8 RGB image blended with the coloured mask (ignored pixels keep the image)."""
    coloured = colorize(mask, palette).astype(np.float32)
    blended = (1 - alpha) * image.astype(np.float32) + alpha * coloured
    blended = np.where((mask >= 0)[..., None], blended, image)
    return np.clip(blended + 0.5, 0, 255).astype(np.uint8)


def save_panels(
    directory: str | Path,
    images: np.ndarray,
    labels: np.ndarray,
    predictions: np.ndarray,
    palette: np.ndarray,
    names: Sequence[str] | None = None,
) -> list[Path]:
    """Writes one PNG per example: normalised image | ground truth | prediction, side by side."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(len(images)):
        panel = np.concatenate(
            [denormalize(images[i]), colorize(labels[i], palette), colorize(predictions[i], palette)], axis=1
        )
        path = directory / f"{names[i] if names else f'example_{i:03d}'}.png"
        Image.fromarray(panel).save(path)
        paths.append(path)
    return paths

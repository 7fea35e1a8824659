"""Pictures of label maps: palette colouring, overlays and image | label | prediction panels."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from fastfcn_jax.normalization import IMAGENET_MEAN, IMAGENET_STD


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


def palette_png(indices: np.ndarray, palette: np.ndarray) -> Image.Image:
    """``indices`` (< 256) as a palette-mode image: pixel value = index, shown in ``palette``'s colours (the form of
    Pascal VOC's label files)."""
    image = Image.fromarray(np.asarray(indices).astype(np.uint8), mode="P")
    colours = np.zeros((256, 3), np.uint8)
    colours[: len(palette)] = np.asarray(palette, np.uint8)[:256]
    image.putpalette(colours.ravel().tolist())
    return image


def default_palette(num_classes: int) -> np.ndarray:
    """[C, 3] uint8 colours for a checkpoint without a dataset palette (the PASCAL VOC bit pattern)."""
    palette = np.zeros((num_classes, 3), np.uint8)
    for index in range(num_classes):
        value, colour = index, [0, 0, 0]
        for shift in range(7, -1, -1):
            for channel in range(3):
                colour[channel] |= ((value >> channel) & 1) << shift
            value >>= 3
        palette[index] = colour
    return palette


def _font(size: int):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1 has one fixed-size bitmap font
        return ImageFont.load_default()


def add_legend(
    image: np.ndarray, class_ids: Sequence[int], class_names: Sequence[str], palette: np.ndarray
) -> np.ndarray:
    """uint8 RGB [H, W, 3] with a white legend panel on the right: a colour swatch and the name per class."""
    from PIL import ImageDraw

    font_size = int(np.clip(image.shape[0] // 24, 11, 18))
    row = font_size + 6
    font = _font(font_size)
    labels = [class_names[i] if i < len(class_names) else f"class {i}" for i in class_ids]
    text_width = max((int(font.getlength(text)) for text in labels), default=0)
    width = row + 12 + text_width
    height = max(image.shape[0], 8 + row * len(labels))
    canvas = Image.new("RGB", (image.shape[1] + width, height), (255, 255, 255))
    canvas.paste(Image.fromarray(image), (0, 0))
    draw = ImageDraw.Draw(canvas)
    x = image.shape[1] + 6
    for n, (class_id, text) in enumerate(zip(class_ids, labels, strict=True)):
        y = 4 + n * row
        colour = tuple(int(c) for c in np.asarray(palette, np.uint8)[class_id])
        draw.rectangle([x, y, x + font_size, y + font_size], fill=colour, outline=(0, 0, 0))
        draw.text((x + font_size + 6, y), text, fill=(0, 0, 0), font=font)
    return np.asarray(canvas)


def confusion_image(confusion: np.ndarray, class_names: Sequence[str], max_side: int = 900) -> np.ndarray:
    """uint8 RGB heat map of the row-normalised confusion matrix (row = label, column = prediction).

    A cell's darkness is the fraction of that label's pixels predicted as the column's class; class names are
    written along the rows when they fit (up to about 60 classes).
    """
    from PIL import ImageDraw

    confusion = np.asarray(confusion, np.float64)
    num_classes = len(confusion)
    rows = confusion / np.maximum(confusion.sum(axis=1, keepdims=True), 1)
    cell = int(np.clip(max_side // max(num_classes, 1), 2, 40))
    font = _font(max(min(cell - 2, 14), 8))
    with_names = cell >= 9
    margin = max((int(font.getlength(n)) for n in class_names), default=0) + 8 if with_names else 0
    # White -> dark blue.
    shade = np.array([255.0, 255.0, 255.0]) * (1 - rows[..., None]) + np.array([8.0, 48.0, 107.0]) * rows[..., None]
    grid = np.kron(shade, np.ones((cell, cell, 1))).astype(np.uint8)
    title, title_font = "rows: label, columns: prediction (row-normalised)", _font(12)
    top = 22
    width = max(margin + grid.shape[1] + 4, int(title_font.getlength(title)) + 8)
    canvas = Image.new("RGB", (width, top + grid.shape[0] + 4), (255, 255, 255))
    canvas.paste(Image.fromarray(grid), (margin, top))
    draw = ImageDraw.Draw(canvas)
    draw.text((4, 4), title, fill=(0, 0, 0), font=title_font)
    if with_names:
        for i, name in enumerate(class_names[:num_classes]):
            draw.text((2, top + i * cell + max(cell - font.size, 0) // 2), name, fill=(0, 0, 0), font=font)
    return np.asarray(canvas)

"""The reference's input normalisation (``ToTensor`` then ``Normalize`` with the ImageNet statistics), for the
train step (the training pipeline sends uint8 images), exports and pictures."""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], np.float32)


def normalize_uint8(
    images: jax.Array, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD
) -> jax.Array:
    """uint8 (or 0..255 float) RGB ``[..., 3]`` -> ImageNet-normalised float32, as the training pipeline."""
    return (images.astype(jnp.float32) / 255.0 - jnp.asarray(mean, jnp.float32)) / jnp.asarray(std, jnp.float32)

"""Weights for tests that compare eval-mode outputs: a fresh init's outputs hardly depend on the image.

With the reference's initialisation and running statistics of 0 / 1, eval-mode activations shrink layer by
layer, and a tiny model's logits come out nearly the same at every pixel and for every image (0.01-0.1% of
their spread varies with the image): a comparison of such outputs cannot see a wrong flip, window, resize or
layer. :func:`calibrated_variables` gives BatchNorms the statistics of real activations instead.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


def calibrated_variables(model: Any, image_size: int, *, seed: int = 0, rounds: int = 50) -> dict[str, Any]:
    """A fresh init of ``model`` whose running statistics are those of its own activations on random images
    (training-mode updates of one batch repeated until the running averages converge); NumPy leaves."""
    images = jnp.asarray(np.random.default_rng(seed).normal(size=(4, image_size, image_size, 3)), jnp.float32)
    variables = jax.jit(lambda x: model.init(jax.random.PRNGKey(seed), x, train=False))(images[:1])
    update = jax.jit(
        lambda v, x: model.apply(v, x, train=True, mutable=["batch_stats"], rngs={"dropout": jax.random.PRNGKey(0)})[1]
    )
    for _ in range(rounds):
        variables = {**variables, "batch_stats": update(variables, images)["batch_stats"]}
    return jax.tree_util.tree_map(np.asarray, jax.device_get(variables))


def assert_image_dependent(logits: np.ndarray) -> None:
    """``logits`` [N >= 2, H, W, C] vary over the pixels of each image and between images."""
    logits = np.asarray(logits)
    spread = logits.std()
    assert logits.std(axis=(1, 2)).min() > 0.1 * spread, "logits nearly constant over the pixels"
    assert np.abs(logits[0] - logits[1]).max() > 0.5 * spread, "logits nearly independent of the image"

"""The reference's optimiser: SGD (momentum 0.9, coupled weight decay) with a per-iteration poly schedule
and 10x learning rate for the JPU, the head and the auxiliary head (FastFCN ``train.py``,
``utils/lr_scheduler.py``; the JPU group's 10x is commit d82ae16, "fix #2")."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import optax

# Top-level parameter groups of a Segmenter; everything but the backbone gets the multiplier.
BACKBONE_GROUP = "backbone"
NEW_LAYERS_GROUP = "new_layers"


def scaled_learning_rate(lr_per_16: float, batch_size: int) -> float:
    """The reference's ``lr = lrs[dataset] / 16 * batch_size``."""
    return lr_per_16 * batch_size / 16.0


def poly_schedule(base_lr: float, total_steps: int, power: float = 0.9) -> optax.Schedule:
    """lr(t) = base_lr * (1 - t / T) ** power, stepped every iteration, no warm-up."""
    if total_steps < 1:
        raise ValueError(f"total_steps must be positive, got {total_steps}")
    return optax.polynomial_schedule(init_value=base_lr, end_value=0.0, power=power, transition_steps=total_steps)


def parameter_groups(params: Any) -> Any:
    """Labels each parameter ``'backbone'`` or ``'new_layers'`` (neck, heads) by its top-level module."""
    return {
        name: jax.tree_util.tree_map(lambda _, n=name: BACKBONE_GROUP if n == "backbone" else NEW_LAYERS_GROUP, sub)
        for name, sub in params.items()
    }


def make_optimizer(
    schedule: Callable[[Any], Any],
    *,
    momentum: float = 0.9,
    weight_decay: float = 1e-4,
    new_layers_lr_multiplier: float = 10.0,
) -> optax.GradientTransformation:
    """PyTorch SGD: d = g + wd * p (coupled decay, also on BN and biases); buf = momentum * buf + d;
    p -= lr_group * buf with lr_group = schedule(step) x (1 for the backbone, 10 for the new layers)."""
    return optax.chain(
        optax.add_decayed_weights(weight_decay),
        optax.trace(decay=momentum, nesterov=False),
        optax.multi_transform(
            {
                BACKBONE_GROUP: optax.scale_by_learning_rate(schedule),
                NEW_LAYERS_GROUP: optax.scale_by_learning_rate(lambda step: new_layers_lr_multiplier * schedule(step)),
            },
            parameter_groups,
        ),
    )

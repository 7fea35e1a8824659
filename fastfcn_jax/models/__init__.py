"""FastFCN networks in Flax linen (NHWC). TensorFlow-free: safe to import on any accelerator image."""

from fastfcn_jax.models.registry import available_models, create_model, model_config, model_from_config
from fastfcn_jax.models.segmenter import INTERMEDIATE_NAMES, Segmenter

__all__ = [
    "INTERMEDIATE_NAMES",
    "Segmenter",
    "available_models",
    "create_model",
    "model_config",
    "model_from_config",
]

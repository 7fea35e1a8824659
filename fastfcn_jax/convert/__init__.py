"""PyTorch -> Flax weight conversion (official FastFCN checkpoints and ImageNet ResNets)."""

from fastfcn_jax.convert.converter import (
    SOURCES,
    ConversionError,
    ConversionReport,
    convert_state_dict,
    convert_with_report,
)

__all__ = ["SOURCES", "ConversionError", "ConversionReport", "convert_state_dict", "convert_with_report"]

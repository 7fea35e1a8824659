"""PyTorch -> Flax weight conversion (official FastFCN checkpoints and ImageNet ResNets).

``python -m fastfcn_jax.convert --help`` converts a file into a checkpoint directory; see docs/converting.md.
"""

from fastfcn_jax.convert.converter import (
    BACKBONE_SOURCES,
    SOURCES,
    ConversionError,
    ConversionReport,
    convert_state_dict,
    convert_with_report,
)
from fastfcn_jax.convert.readers import CheckpointReadError, UnsafeCheckpointError, load_state_dict

__all__ = [
    "BACKBONE_SOURCES",
    "SOURCES",
    "CheckpointReadError",
    "ConversionError",
    "ConversionReport",
    "UnsafeCheckpointError",
    "convert_state_dict",
    "convert_with_report",
    "load_state_dict",
]

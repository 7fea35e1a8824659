"""Segmentation heads of FastFCN: FCN, PSP, DeepLabV3 (ASPP) and EncNet; mmsegmentation's ASPP head."""

from fastfcn_jax.models.heads.aspp import DeepLabV3Head, MMSegASPPHead
from fastfcn_jax.models.heads.encnet import EncNetHead, Encoding
from fastfcn_jax.models.heads.fcn import FCNHead
from fastfcn_jax.models.heads.psp import PSPHead

__all__ = ["DeepLabV3Head", "EncNetHead", "Encoding", "FCNHead", "MMSegASPPHead", "PSPHead"]

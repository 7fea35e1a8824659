r"""encnet_jpu_r50 on ADE20K with the paper's recipe.

Expected: ADE20K val, 150 classes: 42.75 mIoU multi-scale + flip (official README).

Recipe (FastFCN scripts): batch 16 over all devices, SGD momentum 0.9, weight decay 1e-4, poly LR (power 0.9)
from 0.01 per 16 images, 10x LR for JPU/head/aux, 120 epochs, base size 520, crop 480,
aux weight 0.2, SE weight 0.2.

Launch (after preparing the dataset and converting ImageNet weights to ~/resnet50s, README steps 1-2;
one conversion serves every ResNet-50 config: only its backbone is used):

    python -m fastfcn_jax.main --config configs/ade20k_encnet_jpu_r50.py \
        --workdir ~/runs/ade20k_encnet_jpu_r50 \
        --config.init_from=~/resnet50s

Evaluate with the protocol of the expected number (multi-scale + flip; docs/evaluation.md):

    python -m fastfcn_jax.main --config configs/ade20k_encnet_jpu_r50.py \
        --workdir ~/runs/ade20k_encnet_jpu_r50 --mode=eval \
        --config.evaluation.protocol=multi_scale
"""

import ml_collections

from fastfcn_jax.config import paper_config


def get_config() -> ml_collections.ConfigDict:
    return paper_config("ade20k", "encnet_jpu_r50", aux_weight=0.2)

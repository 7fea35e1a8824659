r"""encnet_dilated_r101 on ADE20K with the paper's recipe.

Expected: Dilated baseline. ADE20K val, 150 classes: 44.65 mIoU multi-scale + flip.

Recipe (FastFCN scripts): batch 16 over all devices, SGD momentum 0.9, weight decay 1e-4, poly LR (power 0.9)
from 0.01 per 16 images, 10x LR for JPU/head/aux, 120 epochs, aux weight 0.2, SE weight 0.2, base size 640,
crop 576 (this baseline's sizes, FastFCN README note; its JPU twin uses 520/480).

Launch (after preparing the dataset and converting ImageNet weights to ~/resnet101s, README steps 1-2;
one conversion serves every ResNet-101 config: only its backbone is used):

    python -m fastfcn_jax.main --config configs/ade20k_encnet_dilated_r101.py \
        --workdir ~/runs/ade20k_encnet_dilated_r101 \
        --config.init_from=~/resnet101s

Evaluate with the protocol of the expected number (multi-scale + flip; docs/evaluation.md):

    python -m fastfcn_jax.main --config configs/ade20k_encnet_dilated_r101.py \
        --workdir ~/runs/ade20k_encnet_dilated_r101 --mode=eval \
        --config.evaluation.protocol=multi_scale
"""

import ml_collections

from fastfcn_jax.config import paper_config


def get_config() -> ml_collections.ConfigDict:
    config = paper_config("ade20k", "encnet_dilated_r101", aux_weight=0.2)
    # The 44.65 baseline was trained (and tested) at 640/576 (FASTFCN.md section 4.1, FastFCN README note).
    config.dataset.base_size = 640
    config.dataset.crop_size = 576
    return config

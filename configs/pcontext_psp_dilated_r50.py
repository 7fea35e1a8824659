r"""psp_dilated_r50 on Pascal Context with the paper's recipe.

Expected: Dilated baseline. Pascal Context val, 59 classes: 50.58 mIoU single scale.

Recipe (FastFCN scripts): batch 16 over all devices, SGD momentum 0.9, weight decay 1e-4, poly LR (power 0.9)
from 0.001 per 16 images, 10x LR for JPU/head/aux, 80 epochs, base size 520, crop 480,
aux weight 0.4.

Launch (after preparing the dataset and converting ImageNet weights to ~/resnet50s, README steps 1-2;
one conversion serves every ResNet-50 config: only its backbone is used):

    python -m fastfcn_jax.main --config configs/pcontext_psp_dilated_r50.py \
        --workdir ~/runs/pcontext_psp_dilated_r50 \
        --config.init_from=~/resnet50s

Evaluate with the protocol of the expected number (single scale; docs/evaluation.md):

    python -m fastfcn_jax.main --config configs/pcontext_psp_dilated_r50.py \
        --workdir ~/runs/pcontext_psp_dilated_r50 --mode=eval
"""

import ml_collections

from fastfcn_jax.config import paper_config


def get_config() -> ml_collections.ConfigDict:
    return paper_config("pcontext", "psp_dilated_r50", aux_weight=0.4)

r"""encnet_jpu_r101 on Pascal Context with the paper's recipe.

Expected: Pascal Context val, 59 classes: 54.03 mIoU multi-scale + flip (53.13 with background, x59/60).

Recipe (FastFCN scripts): batch 16 over all devices, SGD momentum 0.9, weight decay 1e-4, poly LR (power 0.9)
from 0.001 per 16 images, 10x LR for JPU/head/aux, 80 epochs, base size 520, crop 480,
aux weight 0.2, SE weight 0.2.

Launch (after preparing the dataset and converting ImageNet weights to ~/resnet101s, README steps 1-2;
one conversion serves every ResNet-101 config: only its backbone is used):

    python -m fastfcn_jax.main --config configs/pcontext_encnet_jpu_r101.py \
        --workdir ~/runs/pcontext_encnet_jpu_r101 \
        --config.init_from=~/resnet101s

Evaluate with the protocol of the expected number (multi-scale + flip; docs/evaluation.md):

    python -m fastfcn_jax.main --config configs/pcontext_encnet_jpu_r101.py \
        --workdir ~/runs/pcontext_encnet_jpu_r101 --mode=eval \
        --config.evaluation.protocol=multi_scale
"""

import ml_collections

from fastfcn_jax.config import paper_config


def get_config() -> ml_collections.ConfigDict:
    return paper_config("pcontext", "encnet_jpu_r101", aux_weight=0.2)

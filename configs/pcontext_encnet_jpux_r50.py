r"""encnet_jpux_r50 on Pascal Context with the paper's recipe.

Expected: no reference number for ResNet-50. The only figure for JPU_X is a user's 55.12 mIoU multi-scale
(59 classes, FastFCN issue #73) for EncNet+JPU_X with an unstated backbone; 1.1 above the official ResNet-101
JPU's 54.03, it is most likely ResNet-101 (--config.model.name=encnet_jpux_r101).

Recipe (FastFCN scripts): batch 16 over all devices, SGD momentum 0.9, weight decay 1e-4, poly LR (power 0.9)
from 0.001 per 16 images, 10x LR for JPU/head/aux, 80 epochs, base size 520, crop 480,
aux weight 0.2, SE weight 0.2.

Launch (after preparing the dataset and converting ImageNet weights to ~/resnet50s, README steps 1-2;
one conversion serves every ResNet-50 config: only its backbone is used):

    python -m fastfcn_jax.main --config configs/pcontext_encnet_jpux_r50.py \
        --workdir ~/runs/pcontext_encnet_jpux_r50 \
        --config.init_from=~/resnet50s

Evaluate with the protocol of that user's number (multi-scale + flip; docs/evaluation.md):

    python -m fastfcn_jax.main --config configs/pcontext_encnet_jpux_r50.py \
        --workdir ~/runs/pcontext_encnet_jpux_r50 --mode=eval \
        --config.evaluation.protocol=multi_scale
"""

import ml_collections

from fastfcn_jax.config import paper_config


def get_config() -> ml_collections.ConfigDict:
    return paper_config("pcontext", "encnet_jpux_r50", aux_weight=0.2)

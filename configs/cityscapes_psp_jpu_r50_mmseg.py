r"""psp_jpu_r50 in mmsegmentation's design on Cityscapes: its released weights, evaluated or fine-tuned.

Expected: Cityscapes val, 19 classes: 79.26 mIoU single scale (mmsegmentation's model zoo,
``fastfcn_r50-d32_jpu_psp_4xb2-80k_cityscapes-512x1024``, tested by mmsegmentation on the whole 2048x1024
image in one pass; its DeepLabV3 and EncNet twins 79.12 and 77.97: convert them with ``--model
deeplab_jpu_r50`` / ``encnet_jpu_r50``; evaluation runs the model the checkpoint names). The model is
``reference='mmseg'`` (README "mmsegmentation's FastFCN models"). Not reproduced here (no dataset).

Recipe of a fine-tune (the official FastFCN code's Cityscapes defaults; mmsegmentation trained these weights
with its own: 80k iterations of batch 8, 512x1024 crops, LR 0.01, weight decay 5e-4): batch 16 over all
devices, SGD momentum 0.9, weight decay 1e-4, poly LR (power 0.9) from 0.01 per 16 images, 10x LR for
JPU/head/aux, 240 epochs, base size 1024, crop 768, aux weight 0.4. It starts from the converted weights
(``init_from`` is required); for the EncNet twin add ``--config.model.name=encnet_jpu_r50
--config.train.se_weight=0.2``, for DeepLabV3 ``--config.model.name=deeplab_jpu_r50``.

Convert the released weights (docs/converting.md), then evaluate with the protocol of the expected number,
mmsegmentation's own test and this config's default (``mmseg``: each 2048x1024 image at its own size in one
pass; for its "ms+flip" numbers, 80.86 here, add ``--config.evaluation.protocol=mmseg_multi_scale``;
docs/evaluation.md):

    python -m fastfcn_jax.convert --model psp_jpu_r50 --num-classes 19 --from mmseg --class-names cityscapes \
        fastfcn_r50-d32_jpu_psp_512x1024_80k_cityscapes_20210928_053722-57749bed.pth \
        --out ~/weights/psp_jpu_r50_mmseg_cityscapes
    python -m fastfcn_jax.main --config configs/cityscapes_psp_jpu_r50_mmseg.py \
        --workdir ~/runs/cityscapes_psp_jpu_r50_mmseg_eval --mode=eval \
        --config.init_from=~/weights/psp_jpu_r50_mmseg_cityscapes

Fine-tune:

    python -m fastfcn_jax.main --config configs/cityscapes_psp_jpu_r50_mmseg.py \
        --workdir ~/runs/cityscapes_psp_jpu_r50_mmseg \
        --config.init_from=~/weights/psp_jpu_r50_mmseg_cityscapes
"""

import ml_collections

from fastfcn_jax.config import paper_config


def get_config() -> ml_collections.ConfigDict:
    config = paper_config("cityscapes", "psp_jpu_r50", aux_weight=0.4, requires_init_from=True)
    config.model.overrides.reference = "mmseg"
    config.evaluation.protocol = "mmseg"  # mmsegmentation's test, at its Cityscapes scale (2048, 1024)
    return config

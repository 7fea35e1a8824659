r"""encnet_jpu_r101 fine-tuned on ADE20K train+val for the test server (the paper's ADE20K test entry).

Expected: ADE20K test, 150 classes: final score 0.5584 = (pixAcc + mIoU) / 2, multi-scale + flip, scored by
the benchmark's server (FastFCN README: 55.84; the dilated EncNet R101's 55.67).

Recipe (FastFCN README, `--ft`): start from the weights of configs/ade20k_encnet_jpu_r101.py and train 20
more epochs on train + validation (22210 images) from 0.001 per 16 images, a fresh poly schedule (power 0.9)
and optimizer; otherwise that config's recipe (batch 16, SGD momentum 0.9, weight decay 1e-4, 10x LR for
JPU/head/aux, base size 520, crop 480, aux weight 0.2, SE weight 0.2). Validation images are in the training
set, so no validation runs during training and the final validation score means nothing.

Launch (after training configs/ade20k_encnet_jpu_r101.py into ~/runs/ade20k_encnet_jpu_r101):

    python -m fastfcn_jax.main --config configs/ade20k_encnet_jpu_r101_trainval.py \
        --workdir ~/runs/ade20k_encnet_jpu_r101_trainval \
        --config.init_from=~/runs/ade20k_encnet_jpu_r101

Predict with the protocol of the expected number (multi-scale + flip, as the README's ADE20K numbers): the
3352 unlabelled test images (release_test.zip unzipped beside ADEChallengeData2016, see
`python -m fastfcn_jax.data.prepare --dataset ade20k --instructions`) into the server's encoding (class + 1),
then zip the folder for the server:

    python -m fastfcn_jax.main --config configs/ade20k_encnet_jpu_r101_trainval.py \
        --workdir ~/runs/ade20k_encnet_jpu_r101_trainval --mode=predict \
        --inputs ~/raw/ade20k/release_test/testing --config.evaluation.protocol=multi_scale \
        --config.evaluation.submission_dir=~/ade20k_submission
"""

import ml_collections

from fastfcn_jax.config import paper_config


def get_config() -> ml_collections.ConfigDict:
    config = paper_config("ade20k", "encnet_jpu_r101", aux_weight=0.2, lr_per_16=0.001, epochs=20)
    config.dataset.train_split = "train+validation"
    config.train.eval_every = 0  # the validation images are training images here
    # --config.init_from= names the train-split run (not set here: in eval and predict modes init_from would
    # take the place of this run's own weights).
    config.train.requires_init_from = True
    return config

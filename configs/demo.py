"""Demo: a reduced-width EncNet+JPU trained on the embedded synthetic_shapes dataset, on a laptop CPU.

    python -m fastfcn_jax.main --config configs/demo.py --workdir /tmp/fastfcn_demo

Builds the embedded dataset (seconds, no download), trains for a few minutes, evaluates on its validation
split (mIoU printed and written to WORKDIR/metrics.json), saves a checkpoint. Same recipe as the paper
(SGD + poly, 10x LR for the new layers, aux and SE losses), scaled down.
"""

import ml_collections

from fastfcn_jax.config import base_config


def get_config() -> ml_collections.ConfigDict:
    config = base_config()
    config.seed = 0
    config.model.name = "encnet_jpu_tiny"
    config.dataset.name = "synthetic_shapes"
    config.dataset.base_size = 128
    config.dataset.crop_size = 96
    config.train.batch_size = 16
    config.train.epochs = 0
    config.train.num_steps = 600
    config.train.lr_per_16 = 0.05  # from scratch, tiny model: higher than the paper's fine-tuning LR
    config.train.log_every = 50
    config.train.eval_every = 200
    config.train.checkpoint_every = 200
    return config

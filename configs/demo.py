"""Demo: a tiny EncNet+JPU on small random images; runs on a laptop CPU in seconds.

    python -m fastfcn_jax.main --config configs/demo.py --workdir /tmp/fastfcn_demo

Prints the model's parameter table, output shapes and forward time, and writes summary.json.
Swap in a full model with --config.model.name=encnet_jpu_r50 --config.model.num_classes=150.
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.mode = "summary"
    config.seed = 0
    config.model = ml_collections.ConfigDict(
        {"name": "encnet_jpu_tiny", "num_classes": 6, "overrides": {"dtype": "float32", "aux": True}}
    )
    config.image_size = (128, 128)
    config.batch_size = 2
    return config

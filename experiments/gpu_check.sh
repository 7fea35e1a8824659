#!/usr/bin/env bash
# The GPU check, in one short command (about 5 minutes on an H100/H200), from the source tree with only jax,
# flax, optax, orbax and numpy importable (no TensorFlow, no ml_collections):
#
#   bash experiments/gpu_check.sh [OUT_DIR]
#
# 1. parity with the official PyTorch outputs at float32 / highest precision (TF32 must not leak in);
# 2. forward latency at 512x512, batch 1, dilated vs JPU for EncNet, PSP and DeepLabV3, in bfloat16 and
#    float32, with XLA FLOPs, achieved FLOP/s and the measured matmul peak;
# 3. the training step (bfloat16) at batch 2, 256x256 and 480x480, and at batch 16, 480x480 (the paper's
#    per-step batch), for EncNet+JPU and its dilated twin.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${1:-${OUT:-/tmp/fastfcn_gpu_check}}"
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export XLA_PYTHON_CLIENT_PREALLOCATE=false

python -c "import jax; print(jax.devices())"
python -c "import sys, fastfcn_jax.benchmark, fastfcn_jax.train; bad = [m for m in ('tensorflow', 'ml_collections') if m in sys.modules]; assert not bad, bad"

python experiments/parity_check.py | tee "$OUT/parity.txt"

MODELS=encnet_jpu_r50,encnet_dilated_r50,psp_jpu_r50,psp_dilated_r50,deeplab_jpu_r50,deeplab_dilated_r50
python experiments/benchmark.py --dtype bfloat16 --models "$MODELS" --warmup 5 --repeats 30 \
    --train-models encnet_jpu_r50,encnet_dilated_r50 --train-sizes 256,480 --train-batch-size 2 \
    --output "$OUT/bf16.json" --no-print-json | tee "$OUT/bf16.md"
python experiments/benchmark.py --dtype bfloat16 --models encnet_jpu_r50 --warmup 3 --repeats 10 \
    --train-models encnet_jpu_r50 --train-sizes 480 --train-batch-size 16 \
    --output "$OUT/bf16_b16.json" --no-print-json | tee "$OUT/bf16_b16.md"
python experiments/benchmark.py --dtype float32 --models "$MODELS" --warmup 5 --repeats 20 \
    --output "$OUT/fp32.json" --no-print-json | tee "$OUT/fp32.md"

#!/usr/bin/env bash
# The GPU check, in one short command (about 5 minutes on an H100/H200), from the source tree with only jax,
# flax, optax and numpy importable (no TensorFlow, no ml_collections):
#
#   bash experiments/gpu_check.sh [OUT_DIR]          # GPU_CHECK_QUICK=1: tiny models, a CPU smoke test
#   GPU_CHECK_STAGES=diagnose,forward bash experiments/gpu_check.sh   # only these stages, in this order
#   GPU_CHECK_DEADLINE=500 ...   # seconds for the whole check: each stage's limit is cut to what is left, and a
#                                # stage with under 30 s left is skipped (a lease's call must end in time to
#                                # bring its files back)
#   GPU_CHECK_B16_MODELS=encnet_jpu_r50,encnet_dilated_r50 ...   # the models of forward_b16 (default: all six)
#   GPU_CHECK_TRAIN_OPS=depthwise_kernel_grad=pallas ...   # op choices of diagnose_train's profiled step
#   GPU_CHECK_VARIANTS="default depthwise=pallas,..."      # train_variants' variants (default: the list below)
#
# Stages (GPU_CHECK_STAGES, default forward,train,parity), each with its own time limit; a failing
# stage does not stop the others (device time is scarce: one run must bring back as much as it can). Before
# them: the environment, and that TensorFlow / ml_collections stay off the model and benchmark import path.
#   forward      latency at 512x512, batch 1, dilated vs JPU for EncNet, PSP and DeepLabV3 in bfloat16, with
#                FLOPs, achieved FLOP/s and the measured bf16 matmul peak;
#   forward_constant  EncNet's pair at batch 1 as exported: weights compiled into the program, BatchNorms
#                folded into the convolutions (at batch 1 the GPU is bound by kernel count);
#   forward_b16  the same at batch 16 (throughput; at batch 1 an H200 is launch-bound);
#   train        the bf16 training step of EncNet+JPU and its dilated twin at batch 2, 256x256 (the reference
#                figure's shape), then EncNet+JPU at batch 16, 480x480 (the paper's per-step batch and crop);
#   train_flags  today's default train step (b16, 480x480) under XLA flag sets (GPU_CHECK_XLA_FLAG_SETS, ';'
#                between sets; default: Triton GEMM fusion for any matmul, then cuBLAS for every matmul);
#   parity       parity with the official PyTorch outputs at float32 / highest precision (no TF32 leak);
#   pallas_check the Pallas (Triton) depthwise and loss kernels against the XLA forms, and the loss kernel's
#                time under several block shapes (experiments/pallas_check.py);
#   ops          the OpChoices implementations compared on EncNet+JPU (bf16 forward, batch 1);
#   train_variants  the bf16 train step at batch 16, 480x480 under each op choice of its backward pass
#                (experiments/train_variants.py: one process, variants timed in turn) and its dilated twin;
#   train_ops    the bf16 train step at batch 16, 480x480 with jpu_input=fused (the CPU form; GPUs default to
#                padded), separable=split and loss_logits=upsampled (the CPU form; GPUs default to the loss
#                upsampling the heads' logits itself);
#   fp32         float32 forward of the EncNet pair;
#   eval         --mode=eval's test protocol (ADE20K multi-scale + flip, bf16): images/s and the host's share
#                (experiments/eval_speed.py);
#   diagnose     experiments/gpu_diagnose.py: where the forward time goes (prefix timings, op variants and
#                a kernel profile at batch 16), into OUT_DIR/diagnose; then the EncNet pair at batch 16
#                with XLA's Triton GEMM fusion off;
#   diagnose_train  the same kernel/scope profile for one EncNet+JPU training step (batch 16, 480x480).
# Markdown tables go to stdout and OUT_DIR/log.txt, the JSON results to OUT_DIR/results.tgz.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT_DIR="${1:-${OUT:-/tmp/fastfcn_gpu_check}}"
mkdir -p "$OUT_DIR"
WORK="$(mktemp -d)"
PY="${PYTHON:-python3}"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
export XLA_PYTHON_CLIENT_PREALLOCATE=false
# Stages that compile the same program (train's batch-16 step, diagnose_train's, train_variants' default: about
# 45 s each on an H200) load it from JAX's persistent cache after the first.
export JAX_COMPILATION_CACHE_DIR="${JAX_COMPILATION_CACHE_DIR:-$(mktemp -d)}"  # not in $WORK: kept out of results.tgz
LOG="$OUT_DIR/log.txt"
: >"$LOG"
QUICK=()
[[ -n "${GPU_CHECK_QUICK:-}" ]] && QUICK=(--quick --warmup 1 --repeats 2)
FAILED=()

DEADLINE="${GPU_CHECK_DEADLINE:-}"
stage() {  # stage NAME SECONDS COMMAND...
    local name=$1 limit=$2
    shift 2
    if [[ -n $DEADLINE ]]; then
        local left=$((DEADLINE - SECONDS))
        if ((left < 30)); then
            echo "=== $name: skipped, ${left}s left of GPU_CHECK_DEADLINE=$DEADLINE" | tee -a "$LOG"
            FAILED+=("$name(skipped)")
            return
        fi
        ((limit > left)) && limit=$left
    fi
    echo "=== $name (limit ${limit}s) $(date -u +%T)" | tee -a "$LOG"
    if [[ $1 == bench ]]; then  # bench OUTPUT_NAME BENCHMARK_ARGS...: experiments/benchmark.py, JSON kept
        local output=$2
        shift 2
        set -- "$PY" experiments/benchmark.py --no-print-json --output "$WORK/$output.json" "$@" "${QUICK[@]}"
    fi
    local start=$SECONDS
    timeout -k 10 "$limit" "$@" 2>&1 | tee -a "$LOG"
    local rc=${PIPESTATUS[0]}
    echo "=== $name: rc $rc in $((SECONDS - start))s" | tee -a "$LOG"
    [[ $rc -eq 0 ]] || FAILED+=("$name")
    tar czf "$OUT_DIR/results.tgz" -C "$WORK" . 2>/dev/null
}

stage environment 60 "$PY" -c "
import sys, jax, flax, optax, numpy
print('python', sys.version.split()[0], 'jax', jax.__version__, 'flax', flax.__version__, 'optax', optax.__version__,
      'numpy', numpy.__version__)
print(jax.devices())
import fastfcn_jax.benchmark, fastfcn_jax.train
bad = [m for m in ('tensorflow', 'ml_collections') if m in sys.modules]
assert not bad, f'imported on the benchmark path: {bad}'
"
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.max.sm,power.limit \
    --format=csv | tee -a "$LOG"
# A jax whose CUDA plugin did not load runs everything on the CPU, quietly: the lease would buy CPU numbers.
# (Not when the deadline already skipped the environment stage: every stage is skipped alike.)
if [[ -z "${GPU_CHECK_QUICK:-}" && " ${FAILED[*]} " != *" environment(skipped) "* ]] &&
    ! "$PY" -c "import jax, sys; sys.exit(jax.default_backend() != 'gpu')"; then
    echo "=== no GPU: jax's backend is $("$PY" -c 'import jax; print(jax.default_backend())') (is the CUDA plugin" \
        "installed and loading?); stopping here (GPU_CHECK_QUICK=1 runs the stages on a CPU)" | tee -a "$LOG"
    exit 2
fi

PAIRS=encnet_jpu_r50,encnet_dilated_r50,psp_jpu_r50,psp_dilated_r50,deeplab_jpu_r50,deeplab_dilated_r50
STAGES="${GPU_CHECK_STAGES:-forward,train,parity}"
for name in ${STAGES//,/ }; do
    case $name in
    forward) stage forward_bf16 150 bench forward_bf16 --dtype bfloat16 --models "$PAIRS" --warmup 5 --repeats 30 ;;
    forward_constant)  # as exported: weights compiled in, BatchNorms folded into the convolutions (fewer kernels)
        stage forward_constant 90 bench forward_constant --dtype bfloat16 --models encnet_jpu_r50,encnet_dilated_r50 \
            --no-peak --warmup 5 --repeats 30 --constant-weights --ops norm=folded ;;
    forward_b16)  # throughput: at batch 1 an H200 is launch-bound (~2.5 ms for every model)
        stage forward_bf16_b16 150 bench forward_bf16_b16 --dtype bfloat16 --models "${GPU_CHECK_B16_MODELS:-$PAIRS}" \
            --batch-size 16 \
            --no-peak --warmup 3 --repeats 10 ;;
    train)
        stage train_bf16 200 bench train_bf16 --dtype bfloat16 --models= --warmup 3 --repeats 10 \
            --train-models encnet_jpu_r50,encnet_dilated_r50 --train-sizes 256 --train-batch-size 2
        stage train_bf16_b16 120 bench train_bf16_b16 --dtype bfloat16 --models= --no-peak \
            --warmup 3 --repeats 10 --train-models encnet_jpu_r50 --train-sizes 480 --train-batch-size 16 ;;
    ops)
        for ops in jpu_input=fused depthwise=grouped resize=matmul pointwise=conv separable=split; do
            stage "ops_${ops/=/_}" 60 bench "ops_${ops/=/_}" --dtype bfloat16 --models encnet_jpu_r50 --no-peak \
                --warmup 5 --repeats 30 --ops "$ops"
        done ;;
    train_ops)  # the b16 480x480 train step under the op variants that could fix the JPU path on GPUs
        for ops in jpu_input=fused separable=split loss_logits=upsampled; do
            stage "train_ops_${ops/=/_}" 150 bench "train_ops_${ops/=/_}" --dtype bfloat16 --models= --no-peak \
                --warmup 3 --repeats 10 --train-models encnet_jpu_r50 --train-sizes 480 --train-batch-size 16 \
                --ops "$ops"
        done ;;
    train_variants)  # the b16 480x480 train step under each op choice of its backward, one process. Each
        # variant's compile takes 20-75 s on an H200: most telling first, each row printed as soon as it is
        # measured. Sessions 7 and 9 measured the XLA forms and the Pallas depthwise and loss kernels (now
        # the GPU default; docs/performance.md); these are BatchNorm's sums as a Pallas kernel (session 9,
        # not yet timed) and session 9's default, which padded the JPU input once (session 11 dropped the pad
        # under the Pallas kernels: 2.8 GB less traffic per step, compile-only), against today's default.
        VARIANTS=(${GPU_CHECK_VARIANTS:-default norm_statistics=pallas jpu_input=padded})
        stage train_variants 330 "$PY" experiments/train_variants.py --output "$WORK/train_variants.json" \
            "${VARIANTS[@]/#/--variant=}" ${GPU_CHECK_QUICK:+--quick} ;;
    train_flags)  # today's default b16 480x480 step under XLA flag sets that change fusion, a process each
        # (XLA_FLAGS are read once per process). GPU_CHECK_XLA_FLAG_SETS: sets separated by ';'. The first
        # lets XLA fuse any matmul into a Triton GEMM, with elementwise producers (a BatchNorm's normalization
        # and ReLU) as its prologue, the autotuner keeping cuBLAS where that is faster: the fusion of
        # BatchNorm into the next 1x1 convolution that the session-9 profile asks for. Compile-only with
        # jaxlib 0.10.2 aborts on it (triton_tiling_propagation.cc), so it is untested before a GPU session.
        IFS=';' read -r -a FLAG_SETS <<<"${GPU_CHECK_XLA_FLAG_SETS:---xla_gpu_triton_gemm_any=true;--xla_gpu_enable_triton_gemm=false}"
        for flags in "${FLAG_SETS[@]}"; do
            label=$(echo "$flags" | tr -c 'A-Za-z0-9\n' _ | sed 's/^_*//;s/_*$//')
            stage "train_flags_$label" 200 env XLA_FLAGS="${XLA_FLAGS:-} $flags" "$PY" experiments/train_variants.py \
                --output "$WORK/train_flags_$label.json" --variant=default ${GPU_CHECK_QUICK:+--quick}
        done ;;
    parity) stage parity_fp32 120 "$PY" experiments/parity_check.py ;;
    pallas_check)  # the Pallas kernels' values against the XLA forms, at the training step's shapes
        stage pallas_check 120 "$PY" experiments/pallas_check.py ${GPU_CHECK_QUICK:+--quick} ;;
    fp32)
        stage forward_fp32 90 bench forward_fp32 --dtype float32 --models encnet_jpu_r50,encnet_dilated_r50 \
            --warmup 5 --repeats 20 ;;
    diagnose)
        stage diagnose 240 "$PY" experiments/gpu_diagnose.py --output-dir "$OUT_DIR/diagnose" \
            ${GPU_CHECK_QUICK:+--quick}
        # Does XLA's Triton GEMM fusion (which can pull producers such as the depthwise taps into a matmul)
        # help or hurt the JPU path?
        stage diagnose_no_triton 120 env XLA_FLAGS="${XLA_FLAGS:-} --xla_gpu_enable_triton_gemm=false" \
            "$PY" experiments/benchmark.py --no-print-json --output "$WORK/diagnose_no_triton.json" \
            --dtype bfloat16 --models encnet_jpu_r50,encnet_dilated_r50 --batch-size 16 --no-peak --warmup 3 \
            --repeats 10 "${QUICK[@]}" ;;
    eval)  # --mode=eval's protocol: ADE20K multi-scale + flip (18 windows per 512x683 image), bf16, and the host's share
        if [[ -n "${GPU_CHECK_QUICK:-}" ]]; then
            EVAL_ARGS=(--model fcn_jpu_tiny --num-classes 5 --image-size 40,60 --base-size 48 --crop-size 32 --images 2)
        else
            EVAL_ARGS=(--model encnet_jpu_r50 --dtype bfloat16 --images 16)
        fi
        stage eval_multi_scale 150 "$PY" experiments/eval_speed.py "${EVAL_ARGS[@]}" --json ;;
    diagnose_train)  # one EncNet+JPU training step at batch 16, 480x480, profiled per kernel and scope
        stage diagnose_train 200 "$PY" experiments/gpu_diagnose.py --output-dir "$OUT_DIR/diagnose" --no-forward \
            --train-profile encnet_jpu_r50 --train-ops "${GPU_CHECK_TRAIN_OPS:-}" ${GPU_CHECK_QUICK:+--quick} ;;
    *) echo "unknown stage $name (forward, forward_constant, forward_b16, train, train_variants, train_flags, train_ops, ops, parity," \
           "pallas_check, fp32, eval, diagnose, diagnose_train)" \
           | tee -a "$LOG"
       FAILED+=("$name") ;;
    esac
done

echo "failed stages: ${FAILED[*]:-none}" | tee -a "$LOG"
[[ ${#FAILED[@]} -eq 0 ]]

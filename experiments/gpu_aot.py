"""Compile a model for an NVIDIA GPU on a machine without one and estimate where its time goes.

XLA can compile for a GPU it does not have (a compile-only topology built from a target description):
the program gets XLA:GPU's real fusions, cuDNN/cuBLAS calls and kernels, only without autotuning. This
script compiles the forward pass or the training step that way and prints, per model scope and per kernel,
the bytes moved and FLOPs done and the roofline time ``max(bytes / bandwidth, flops / peak)``
(:mod:`fastfcn_jax.roofline`): a floor for each kernel, so the sum is a floor for the step, and formulations
can be compared before GPU time is spent (GPU time is rare for this project).

Needs jax with the CUDA plugin, no GPU (about 5 GB of wheels; Python 3.11 gets jax 0.10.2):

    python3 -m venv /tmp/gpuaot && /tmp/gpuaot/bin/pip install "jax[cuda12]==0.10.2" flax optax
    PYTHONPATH=. /tmp/gpuaot/bin/python experiments/gpu_aot.py --model encnet_jpu_r50 --batch-size 16
    PYTHONPATH=. /tmp/gpuaot/bin/python experiments/gpu_aot.py --train --size 480 --no-triton-gemm

``--hlo-out`` keeps the optimized HLO; ``XLA_FLAGS=--xla_dump_to=DIR`` also dumps each kernel's PTX.
Op choices: ``'auto'`` resolves for a GPU (``op_choices.target_backend('gpu')``), not for the CPU the script
runs on, unless ``--ops`` says otherwise. Without autotuning the
GEMM tile sizes are XLA's defaults, so compare bytes and fusion structure, not GEMM efficiency.
The jaxlib 0.10.2 compiler aborts on one Triton GEMM fusion of the EncNet+JPU training step
(``triton_tiling_propagation.cc``); ``--no-triton-gemm`` (cuBLAS for every matmul) avoids it.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

# Target descriptions of the lent GPUs (the roofline ceilings are fastfcn_jax.roofline.GPU_CEILINGS).
GPUS = {
    "h100": dict(memory=84929347584, memory_bandwidth=3352320000000, name="NVIDIA H100 80GB HBM3"),
    "h200": dict(memory=150754820096, memory_bandwidth=4800000000000, name="NVIDIA H200"),
}

_TARGET = """gpu_device_info {{
  threads_per_block_limit: 1024
  threads_per_warp: 32
  shared_memory_per_block: 49152
  shared_memory_per_core: 233472
  threads_per_core_limit: 2048
  core_count: 132
  fpus_per_core: 128
  block_dim_limit_x: 2147483647
  block_dim_limit_y: 65535
  block_dim_limit_z: 65535
  memory_bandwidth: {memory_bandwidth}
  l2_cache_size: 52428800
  clock_rate_ghz: 1.98
  device_memory_size: {memory}
  shared_memory_per_block_optin: 232448
  cuda_compute_capability {{
    major: 9
  }}
  registers_per_core_limit: 65536
  registers_per_block_limit: 65536
}}
runtime_version {{
  major: 12
  minor: 8
}}
platform_name: "CUDA"
dnn_version_info {{
  major: 9
  minor: 7
}}
device_description_str: "{name}"
"""


def _parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="encnet_jpu_r50")
    parser.add_argument("--num-classes", type=int, default=150)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--size", type=int, default=512, help="square input size (the paper's crop is 480)")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--train", action="store_true", help="the training step instead of the forward pass")
    parser.add_argument("--ops", default="", help="op choices, e.g. depthwise=grouped,separable=split")
    parser.add_argument("--gpu", choices=sorted(GPUS), default="h200")
    parser.add_argument("--no-triton-gemm", action="store_true", help="cuBLAS for every matmul")
    parser.add_argument("--depth", type=int, default=2, help="scope parts to group kernels by")
    parser.add_argument("--top", type=int, default=20, help="kernels to list")
    parser.add_argument("--hlo-out", default=None, help="write the optimized HLO text here")
    return parser.parse_args(argv)


def compile_for_gpu(args: argparse.Namespace) -> str:
    """The optimized HLO text of the forward pass or training step compiled for ``args.gpu``."""
    from jax.experimental.topologies import get_topology_desc

    from fastfcn_jax import aot
    from fastfcn_jax.models.op_choices import parse_ops

    gpu = GPUS[args.gpu]
    aot.require_compiler("cuda")
    topology = get_topology_desc(args.gpu, "cuda", target_config=_TARGET.format(**gpu), topology="1x1x1")
    lowered = aot.lower(
        args.model,
        topology.devices,
        backend="gpu",
        num_classes=args.num_classes,
        batch_size=args.batch_size,
        size=args.size,
        dtype=args.dtype,
        ops=parse_ops(args.ops),
        train=args.train,
    )
    start = time.perf_counter()
    text = lowered.compile().as_text()
    print(f"compiled for {gpu['name']} in {time.perf_counter() - start:.1f} s (no autotuning)", file=sys.stderr)
    return text


def main(argv: list[str] | None = None) -> None:
    args = _parse_args(sys.argv[1:] if argv is None else argv)
    if args.no_triton_gemm:
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_gpu_enable_triton_gemm=false").strip()
    os.environ.setdefault("JAX_PLATFORMS", "cpu")  # compile-only: no GPU runtime is started

    from fastfcn_jax import aot, roofline

    try:
        text = compile_for_gpu(args)
    except aot.MissingCompilerError as error:
        sys.exit(f"error: {error}")
    if args.hlo_out:
        with open(args.hlo_out, "w") as f:
            f.write(text)
    peak, bandwidth = roofline.GPU_CEILINGS[args.gpu]
    found = roofline.kernels(text, peak_flops=peak, bandwidth=bandwidth)
    what = "train step" if args.train else "forward"
    print(
        f"{args.model} {what}, batch {args.batch_size}, {args.size}x{args.size}, {args.dtype}, ops "
        f"{args.ops or 'auto (for a GPU)'}, roofline at "
        f"{peak / 1e12:.0f} TFLOP/s and {bandwidth / 1e12:.1f} TB/s ({args.gpu})"
    )
    print(roofline.format_report(found, depth=args.depth, top=args.top))


if __name__ == "__main__":
    main()

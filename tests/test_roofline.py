"""The HLO roofline reader: kernels, bytes and FLOPs of an optimized program (fastfcn_jax/roofline.py)."""

from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp
import pytest

from fastfcn_jax import roofline

# Lines in the form XLA:GPU writes them (from a compile-only H100 build of the EncNet+JPU training step,
# shortened): a Triton GEMM fusion, the three cuDNN convolution kinds and a cuBLAS matmul.
GPU_HLO = (Path(__file__).parent / "fixtures" / "gpu_hlo_excerpt.txt").read_text()


def _by_name(found):
    return {k.name: k for k in found}


def test_library_calls_and_gemm_fusions_count_two_flops_per_multiply_add():
    found = _by_name(roofline.kernels(GPU_HLO, peak_flops=1e15, bandwidth=1e12))
    assert set(found) == {
        "cudnn-conv-bw-input.25",
        "cudnn-conv-bw-filter.43",
        "cudnn-conv.45",
        "custom-call.282",
        "gemm_fusion_dot.1",
    }
    # Backward input of a 3x3 2048->512 conv at 15x15: the forward's 2 * 16*15*15*512 * 3*3*2048.
    assert found["cudnn-conv-bw-input.25"].flops == 2 * 16 * 15 * 15 * 512 * 9 * 2048
    # Backward filter of a 3x3 512->512 conv at 60x60 (the kernel is the result).
    assert found["cudnn-conv-bw-filter.43"].flops == 2 * 16 * 60 * 60 * 512 * 9 * 512
    assert found["cudnn-conv.45"].flops == 2 * 16 * 60 * 60 * 512 * 9 * 512
    assert found["custom-call.282"].flops == 2 * 230400 * 256 * 128
    assert found["custom-call.282"].kind == "cublas"
    assert found["gemm_fusion_dot.1"].flops == 2 * 64 * 16 * 32
    assert found["gemm_fusion_dot.1"].kind == "__triton_nested_gemm_fusion"
    # Bytes: operands plus results (a tuple result counts every element).
    assert found["custom-call.282"].bytes == 2 * (230400 * 128 + 128 * 256 + 230400 * 256) + 4194304
    assert found["gemm_fusion_dot.1"].scope == "decode_head/dot_general"
    assert found["cudnn-conv-bw-input.25"].scope == "transpose(jvp(Segmenter))/neck/conv5/conv/conv_general_dilated"


def test_roofline_time_is_the_larger_of_memory_and_compute_time():
    found = _by_name(roofline.kernels(GPU_HLO, peak_flops=1e15, bandwidth=1e12))
    conv = found["cudnn-conv-bw-filter.43"]
    assert conv.seconds == pytest.approx(max(conv.bytes / 1e12, conv.flops / 1e15))
    assert conv.bound == "compute"
    matmul = found["custom-call.282"]
    assert matmul.bound == "memory" and matmul.seconds == pytest.approx(matmul.bytes / 1e12)


def test_scopes_group_forward_and_backward_apart():
    found = roofline.kernels(GPU_HLO, peak_flops=1e15, bandwidth=1e12)
    rows = {row["scope"]: row for row in roofline.by_scope(found, depth=2)}
    assert rows["transpose(jvp(Segmenter))/neck"]["kernels"] == 2
    assert rows["neck/conv3"]["kernels"] == 1
    assert sum(row["flops"] for row in rows.values()) == sum(k.flops for k in found)
    report = roofline.format_report(found, depth=2, top=3)
    assert "TOTAL" in report and "cudnn-conv-bw-filter.43" in report


def test_reads_a_program_xla_compiled_here():
    def f(a, b):
        return jnp.tanh(a @ b) + 1.0

    a = jnp.ones((128, 64), jnp.float32)
    b = jnp.ones((64, 32), jnp.float32)
    text = jax.jit(f).lower(a, b).compile().as_text()
    found = roofline.kernels(text, peak_flops=1e12, bandwidth=1e11)
    assert found, text
    assert sum(k.flops for k in found) == 2 * 128 * 64 * 32
    # At least the inputs are read and the output written once.
    assert sum(k.bytes for k in found) >= 4 * (128 * 64 + 64 * 32 + 128 * 32)


def test_rejects_text_without_an_entry_computation():
    with pytest.raises(ValueError, match="ENTRY"):
        roofline.kernels("HloModule empty\n", peak_flops=1.0, bandwidth=1.0)


# A small program (3x3 conv 64->128, ReLU, spatial sum) compiled by libtpu for a compile-only TPU v5e
# (experiments/tpu_aot.py's route), stack-frame tables removed: prefetches, a convolution fusion in the
# TPU's tiled layout, and the compiler's estimated cycles on each kernel.
TPU_HLO = (Path(__file__).parent / "fixtures" / "tpu_hlo_excerpt.txt").read_text()
TPU_CYCLES = {
    "copy_bitcast_fusion": 5526,
    "pad": 5806,
    "slice.2": 3299,
    "fusion.1": 9698,
    "fusion.8": 8440,
    "copy.4": 4801,
    "slice_reduce_fusion": 5334,
}


def test_tpu_kernels_carry_the_compilers_cycle_estimates():
    found = _by_name(roofline.kernels(TPU_HLO, peak_flops=197e12, bandwidth=819e9, clock_hz=1.5e9))
    # HBM <-> on-chip prefetches (copy-start / copy-done) are not kernels: their reader counts the bytes.
    assert set(found) == set(TPU_CYCLES)
    for name, cycles in TPU_CYCLES.items():
        assert found[name].estimated_seconds == pytest.approx(cycles / 1.5e9)
    # The convolution over the TPU's padded tiling (output [32,16,5,128] for 2x32x32): 9 x 64 inputs each.
    assert found["fusion.8"].flops == 2 * 32 * 16 * 5 * 128 * 9 * 64
    assert found["fusion.8"].kind == "kOutput"
    assert roofline.estimated_total(list(found.values())) == pytest.approx(sum(TPU_CYCLES.values()) / 1.5e9)
    report = roofline.format_report(list(found.values()), top=2)
    assert "estimate ms" in report and "top 2 kernels by estimated time" in report
    # The two largest estimates, not the two largest roofline times, are listed.
    listed = report.split("by estimated time:")[1]
    assert "fusion.1" in listed and "fusion.8" in listed and "pad" not in listed


def test_without_a_clock_there_is_no_estimate():
    found = roofline.kernels(TPU_HLO, peak_flops=197e12, bandwidth=819e9)
    assert all(k.estimated_seconds is None for k in found)
    assert roofline.estimated_total(found) is None
    assert "estimate ms" not in roofline.format_report(found)
    assert roofline.estimated_total(roofline.kernels(GPU_HLO, peak_flops=1e15, bandwidth=1e12, clock_hz=1e9)) is None

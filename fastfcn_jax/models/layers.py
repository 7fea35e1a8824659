"""Building blocks shared by the backbone, the JPU neck and the heads.

Everything here reproduces a PyTorch operation of the reference code exactly (same padding, same
interpolation and pooling index formulas, same normalisation statistics), with NHWC tensors.

Dtype policy: parameters and normalisation statistics are float32 (``param_dtype``); convolutions and
matmuls run in ``dtype`` (bfloat16 on accelerators); normalisation is computed in float32 and cast back.

Performance choices: the same maths in a form each backend runs well. All of them live in
:class:`OpChoices`, which every module takes as ``ops``, so each can be switched for comparison
(``create_model(..., resize_implementation='matmul')``); ``'auto'`` picks per backend at trace time: JAX's
default backend, or the one named by :func:`target_backend` (exports and compiles for another machine).

- Bilinear resize: ``'gather'`` (two taps and a lerp per axis) on CPU/GPU, ``'matmul'`` (small interpolation
  matrices by ``einsum``) on TPU, whose MXU prefers matmuls to gathers. On XLA:CPU the matmul form cost
  4-20x more (the final 64->512 upsample of 150 classes: about 480 ms vs 90 ms). The gather form's gradient
  is its own K-tap gather (custom VJP) rather than autodiff's scatter-add, which is serial on XLA:CPU and
  atomic (non-deterministic) on GPUs; EncNet+JPU R50 train step at batch 2, 256x256: 2.12 -> 2.08 s.
- 1x1 convolution: ``'dot'``, a matmul over channels after the stride's subsampling. XLA:CPU ran some 1x1
  convolutions far below matmul speed (2048->512 at 64x64: 33 GFLOP/s vs about 160 as a dot).
- Depthwise 3x3 (JPU): ``'shifted'``, nine shifted multiply-adds. ``feature_group_count`` convolutions ran at
  about 0.3 GFLOP/s on XLA:CPU and their kernel gradient runs as a dense convolution. Its gradient is a
  custom VJP: the input gradient as the same shifted form with the kernel flipped, one fused pass, where
  autodiff built nine padded copies of the incoming gradient (EncNet+JPU R50 train step at batch 2,
  256x256 on XLA:CPU: 1.93 -> 1.70 s). Its kernel gradient is one sum over the stacked taps on GPUs (fewer
  passes over the activations on XLA:GPU) and nine sums elsewhere (the stacked form was slower on XLA:CPU,
  and the TPU compiler writes the stack out in float32: EncNet+JPU R50 train step at batch 16, 480x480,
  compile-only v5e estimate 280 -> 218 ms with nine sums).
- Dilated 3x3 convolutions whose taps mostly read padding (ASPP rates 12/24/36 on 64x64): ``'valid_taps'`` on
  CPU, one matmul per tap over the pixels it reads. XLA:CPU ran rate 36 at about 100 GFLOP/s; DeepLabV3+JPU R50
  at 512x512 went from 1511 to 949 ms.
- Stride-1 kxk convolutions over small maps (``small_maps``; at most ``SMALL_MAP_PIXELS`` = 256 output
  pixels over the batch: the JPU's conv5 and the last backbone stage on 16x16 maps at 512x512):
  ``'per_tap'`` on CPU, the same one-matmul-per-tap form as ``'valid_taps'``. XLA:CPU's convolution ran
  3x3 2048->512 on 16x16 at 113 GFLOP/s, the per-tap matmuls at 159 (512->512: 229 vs 254); EncNet+JPU R50
  at 512x512: 670 -> 653 and 696 -> 667 ms (two runs, each alternating the two forms), its train step at
  batch 2, 256x256 not slower (1.82 / 1.79 s).
- Separable convolutions (JPU): ``'fused'`` lets XLA fuse the depthwise taps (and their norm) into the
  pointwise matmul's operand, as XLA:CPU does well; ``'split'`` materialises the depthwise output first (an
  optimization barrier). A candidate for GPUs, where the JPU path ran far below the hardware (H200, batch 16:
  EncNet+JPU 21.4 ms vs 15.9 ms for the dilated model with 2.3x its FLOPs in session 2, 11.5 vs 15.2 ms
  after sessions 3-5; see docs/performance.md); not measured there yet, so no ``'auto'``.
- JPU input (``jpu_input``): ``'fused'`` lets XLA fuse the concatenation of the three resized maps and each
  branch's zero padding into the depthwise taps, as XLA:CPU does well; ``'padded'`` writes the concatenation
  padded once by the largest dilation (an optimization barrier) and the four branches slice it in place.
  XLA:GPU otherwise builds one kernel for all four branches in which each of the 36 taps chooses among the
  three inputs and tests the padding bounds: 3231 PTX instructions with branches and scalar 16-bit loads,
  690 straight-line ones from the padded array (compile-only H200 build, ``experiments/gpu_aot.py``), for
  one extra write and read of the padded features (about 0.15 ms at batch 16, 512x512). ``'auto'``: padded
  on GPUs for XLA's depthwise forms; fused where all three depthwise forms are the per-branch Pallas kernels
  (GPU training), which mask the border themselves, so that the padded copy and the padded input gradients
  would only be traffic (compile-only H200 train step, batch 16, 480x480: 64.15 -> 61.38 GB).
- BatchNorm at inference (``norm``): ``'folded'`` multiplies each BatchNorm's ``scale / sqrt(var + eps)`` into
  the kernel of the convolution before it and keeps only the shift, so the network runs convolutions with a
  bias (which XLA fuses into the convolution or matmul) instead of a separate normalisation pass after each.
  The variables must be transformed by :func:`fold_batch_norm`; evaluation only. ``'standard'`` is the
  default and the only choice for training.
- A convolution over a concatenation that includes upsampled pooled maps (PSP's 3x3 conv over the input and
  its four pyramid levels, DeepLabV3's projection over its image-pooling branch), ``resized``:
  ``'low_res'`` applies the kernel's taps to the pooled maps at their own size (1x1 to 6x6) and resizes the
  products (:func:`conv_of_resized`; resizing and a tap's channel mixing commute), ``'upsampled'`` resizes
  first and convolves the concatenation as the reference does. Half of the multiply-adds of PSP's head
  (77 of 155 GFLOPs at 512x512, on every backend) operated on interpolated copies of 50 pooled pixels;
  PSP+JPU R50 at 512x512 on XLA:CPU: 1385 -> 1124 ms, its dilated twin 1763 -> 1448 ms.
- The logits the training loss receives (``loss_logits``): ``'upsampled'`` (the model's output at image size,
  as in evaluation) or ``'head'`` (at the heads' stride 8; :func:`fastfcn_jax.losses.cross_entropy` then
  upsamples them inside a custom-gradient loss that never writes the full-resolution logits: one
  reduction pass for log-sum-exp and the label's logit, the resize recomputed in the backward pass).
  ``'auto'``: ``'head'`` on GPUs, where the EncNet+JPU training step at batch 16, 480x480 moves 78 instead of
  88 GB (compile-only H200 estimate, roofline 25.4 -> 23.2 ms), and on TPUs (compile-only v5e estimate of the
  same step: 218 -> 191 ms, 11.2 -> 9.9 GiB per chip); ``'upsampled'`` on CPU, where the fused loss ran
  1.2-2x slower (XLA:CPU's variadic reduction and the recomputation). ``loss_gradient``: ``'compute'`` (the
  default) rounds that loss's full-resolution gradient to the model's compute dtype before resizing it
  back, so a bfloat16 step writes it in bfloat16 (compile-only H200: 80.4 -> 76.0 GB per EncNet+JPU step
  at batch 16, 480x480; the H200 had spent 2.4 ms writing it in float32); ``'float32'`` keeps it wide.
  ``loss_upsample``: ``'fused'`` (XLA; the 2-D resize recomputed inside the log-sum-exp reduction and the
  gradient written at full resolution for the resize's adjoint: about 6.7 ms of the H200's 37.9 ms step)
  or ``'pallas'``: the width resized at the logits' height, then one Pallas kernel
  (``fastfcn_jax.upsampled_loss_pallas``) for the height, the log-sum-exp and the gradient, which never
  writes a full-resolution array (H200: one head's loss and gradient 4.72 -> 2.00 ms, the step 43.2 -> 38.8
  ms alone). ``'auto'``: the kernel where :func:`pallas_for_auto`, else fused.
- The shifted depthwise conv's backward pass (``depthwise_input_grad``, ``depthwise_kernel_grad``): the
  JPU's four branches read one padded input, so their input gradients are added; XLA:GPU fused the four
  9-tap input-gradient correlations and the sum into one kernel of 236 registers per thread at 12.5%
  occupancy, 7.7 ms of the 48.6 ms EncNet+JPU step on an H200 (batch 16, 480x480). ``'materialized'``
  writes each branch's gradient first (an optimization barrier; ``'auto'`` on GPUs: the H200's step went
  from 57.2 to 50.7 ms), ``'fused'`` leaves the fusion to XLA (CPU, TPU). The kernel gradient is
  ``'stacked'`` (one reduction over the nine stacked taps, taps major; ``'auto'``: GPUs, where it ran at a
  tenth of its roofline), ``'stacked_minor'`` (taps as the minor dimension: no faster on the H200) or
  ``'per_tap'`` (nine sums; CPU, TPU). ``'pallas'``, for both and for the forward (``depthwise``): Triton
  kernels (``depthwise_pallas``) that read each element once, 43.4 -> 37.9 ms per H200 step at batch 16;
  33.2 ms with the loss kernel (session 9, which checked their values on the H200). ``'auto'`` takes them
  where :func:`pallas_for_auto` (GPUs; the forward in training only). Over several devices every
  Pallas kernel runs on each device's examples (``shard_map``, :func:`fastfcn_jax.sharding.over_batch`)
  when traced with the mesh as context (:func:`fastfcn_jax.sharding.with_mesh`: the training loop, the
  compile-only builds); otherwise XLA would gather the batch onto every device, and tracing warns.
- The JPU's depthwise convs with every depthwise form ``'pallas'`` and the input padded once
  (``jpu_depthwise``): ``'branches'`` (three kernels per branch, as the H200 timed in session 7) or
  ``'joint'`` (:func:`depthwise_joint`: one kernel per pass serves the four branches, reading the padded
  input once and writing one summed input gradient instead of four that XLA then adds). Compile-only H200
  (EncNet+JPU R50 train step at batch 16, 480x480, all Pallas kernels): 64.1 -> 60.2 GB, roofline 19.9 ->
  19.0 ms; but ptxas gives the joint kernels 174 (forward) and 255 registers with spills (gradients)
  against 71 / 128 / 176 per branch, and on the H200 the step took 37.3 ms against 34.3 per branch.
- The stem's max-pool gradient (``max_pool_grad``): ``'taps'`` (:func:`max_pool`: each window's first
  maximum found from its nine taps, the gradient summed per phase of the input, fused elementwise) or ``'select'``
  (autodiff's select-and-scatter; the same values, ties included). XLA:CPU, batch 2, 256x256 stem output
  (128 channels): 60 -> 12 ms for the pool's backward; compile-only H200 (EncNet+JPU R50 train step at
  batch 16, 480x480): a 1.01 GB scatter kernel (measured 0.76 ms in session 7) becomes part of a 0.41 GB
  fusion, 65.6 -> 64.3 GB per step; measured on the H200, 34.11 ms per step with taps, 34.54 with select.
  ``'auto'``: taps, but select on TPUs, whose compiler runs the scatter natively (compile-only v5e estimate
  of that step: 185.6 ms with select, 190.5 with taps).
- The stem's max-pool (``max_pool``): ``'window'`` (XLA's ``reduce_window``, as ``nn.max_pool``) or
  ``'taps'`` (the elementwise maximum of the window's nine strided slices of the input padded with -inf; the
  same values, max being exact). jax2onnx turns a ``reduce_window`` over NHWC into an ONNX MaxPool with a
  4-D window, which ONNX Runtime refuses, so the ONNX export traces ``'taps'``; 'taps' takes the
  ``max_pool_grad='taps'`` gradient.
- A training BatchNorm's per-channel sums (``norm_statistics``): ``'xla'`` (reductions XLA fuses with their
  producers) or ``'pallas'`` (``batch_norm_pallas``: one Triton kernel for the forward's two moments and one
  for the backward's ``sum(dy)`` and ``sum(dy * x)``, behind custom VJPs with the same formulas). On the
  H200 XLA's reductions ran at 3-20x their memory roofline: 6.5 of the 33.5 ms of kernels in the
  EncNet+JPU R50 step at batch 16, 480x480, against a 1.7 ms roofline. Opt-in until a GPU has timed it
  (``experiments/pallas_check.py``, ``gpu_check.sh``'s ``train_variants``).
- Gradient of kxk convolutions: ``'im2col'`` on CPU (the vjp of one matmul over k*k shifted views), XLA's
  backward convolutions elsewhere. The forward pass is XLA's convolution either way. XLA:CPU's backward
  convolutions ran 1.5-4x slower than the matmul form (e.g. 3x3 2048->512 on 8x8, batch 2: 152 vs 36 ms);
  the EncNet+JPU R50 train step at batch 2, 256x256 went from 2.19 to 2.03 s.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import functools
import warnings
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from fastfcn_jax import sharding
from fastfcn_jax.models import batch_norm_pallas, depthwise_pallas

Dtype = Any

# Convolutions over at most this many output pixels (batch x height x width) run per tap on CPU.
SMALL_MAP_PIXELS = 256

# PyTorch BatchNorm defaults (momentum 0.1 in PyTorch's convention is 0.9 in Flax's).
BN_MOMENTUM = 0.9
NORM_EPSILON = 1e-5


# ----------------------------------------------------------------------------------------------------
# Resampling as small interpolation matrices (exact, static-shape, MXU/tensor-core friendly).


@functools.lru_cache(maxsize=512)
def align_corners_matrix(in_size: int, out_size: int) -> np.ndarray:
    """[out_size, in_size] matrix of PyTorch's 1-D linear interpolation with ``align_corners=True``.

    PyTorch maps output index ``i`` to source ``i * (in - 1) / (out - 1)`` (0 when ``out == 1``) and
    interpolates between ``floor(src)`` and ``min(floor(src) + 1, in - 1)``.
    """
    if in_size < 1 or out_size < 1:
        raise ValueError(f"sizes must be positive, got in_size={in_size}, out_size={out_size}")
    matrix = np.zeros((out_size, in_size), np.float64)
    scale = (in_size - 1) / (out_size - 1) if out_size > 1 else 0.0
    for i in range(out_size):
        src = i * scale
        lo = min(int(np.floor(src)), in_size - 1)
        hi = min(lo + 1, in_size - 1)
        frac = src - lo
        matrix[i, lo] += 1.0 - frac
        matrix[i, hi] += frac
    matrix.setflags(write=False)
    return matrix


@functools.lru_cache(maxsize=512)
def adaptive_pool_matrix(in_size: int, out_size: int) -> np.ndarray:
    """[out_size, in_size] averaging matrix of PyTorch's 1-D adaptive average pooling.

    Bin ``i`` averages the half-open range ``[floor(i * in / out), ceil((i + 1) * in / out))``.
    """
    if in_size < 1 or out_size < 1:
        raise ValueError(f"sizes must be positive, got in_size={in_size}, out_size={out_size}")
    matrix = np.zeros((out_size, in_size), np.float64)
    for i in range(out_size):
        start = (i * in_size) // out_size
        end = -((-(i + 1) * in_size) // out_size)  # ceil division
        matrix[i, start:end] = 1.0 / (end - start)
    matrix.setflags(write=False)
    return matrix


@dataclasses.dataclass(frozen=True)
class OpChoices:
    """How the performance-sensitive ops are computed (see the module docstring); never changes results
    beyond float rounding."""

    resize: str = "auto"  # 'gather' | 'matmul' | 'auto'
    pointwise: str = "dot"  # 'dot' | 'conv'
    # 'shifted' | 'grouped' | 'pallas' (shifted, its forward a Pallas kernel: GPUs) | 'auto' (pallas when
    # training where pallas_for_auto(), else shifted)
    depthwise: str = "auto"
    conv_gradient: str = "auto"  # 'im2col' | 'xla' | 'auto' (im2col on CPU)
    dilated: str = "auto"  # 'valid_taps' | 'conv' | 'auto' (valid taps on CPU when padding is >= 20% of the work)
    small_maps: str = "auto"  # 'per_tap' | 'conv' | 'auto' (kxk convs over <= 256 pixels: per-tap matmuls on CPU)
    separable: str = "fused"  # 'fused' | 'split' (JPU: depthwise output materialised before the pointwise matmul)
    jpu_input: str = "auto"  # 'fused' | 'padded' | 'auto' (JPU: padded concatenation materialised; padded on GPU)
    norm: str = "standard"  # 'standard' | 'folded' (inference: BatchNorm folded into the conv before it)
    resized: str = "low_res"  # 'low_res' | 'upsampled' (a conv over upsampled pooled maps: taps at their resolution)
    loss_logits: str = "auto"  # 'upsampled' | 'head' | 'auto' (training: the loss upsamples; head on GPU/TPU)
    # The shifted depthwise conv's input gradient: 'fused' (XLA may fuse the four JPU branches' gradients into
    # one kernel) | 'materialized' (each branch's written first) | 'pallas' (a Pallas kernel for GPUs,
    # see depthwise_pallas) | 'auto' (pallas where pallas_for_auto(), else materialized on GPU, fused elsewhere).
    depthwise_input_grad: str = "auto"
    # 'stacked' | 'stacked_minor' | 'per_tap' | 'pallas' (as above) | 'auto' (pallas where pallas_for_auto(),
    # else stacked on GPU, per_tap elsewhere)
    depthwise_kernel_grad: str = "auto"
    loss_gradient: str = "compute"  # the head-logits loss's gradient: 'compute' (model's dtype) | 'float32'
    # How that loss upsamples the heads' logits: 'fused' (XLA: the 2-D resize recomputed inside its passes)
    # | 'pallas' (the width resized at the logits' height, the rest one Pallas kernel: GPUs) | 'auto' (pallas
    # where pallas_for_auto(), else fused)
    loss_upsample: str = "auto"
    # The JPU's depthwise convs with every form 'pallas' and the input padded once: 'branches' (three kernels
    # per branch) | 'joint' (one kernel per pass for the four branches: layers.depthwise_joint)
    jpu_depthwise: str = "branches"
    # The stem's max-pool gradient: 'taps' (a fused gather) | 'select' (autodiff's) | 'auto' (select on TPU)
    max_pool_grad: str = "auto"
    # The stem's max-pool itself: 'window' (XLA's reduce_window) | 'taps' (the maximum of its nine strided
    # slices, for converters without an NHWC pooling window: the ONNX export)
    max_pool: str = "window"
    # Training BatchNorms' per-channel sums (forward moments, backward sum(dy) and sum(dy * x)): 'xla' |
    # 'pallas' (one Pallas kernel: batch_norm_pallas; GPUs)
    norm_statistics: str = "xla"

    def __post_init__(self) -> None:
        for field, allowed in (
            ("resize", ("gather", "matmul", "auto")),
            ("pointwise", ("dot", "conv")),
            ("depthwise", ("shifted", "grouped", "pallas", "auto")),
            ("conv_gradient", ("im2col", "xla", "auto")),
            ("dilated", ("valid_taps", "conv", "auto")),
            ("small_maps", ("per_tap", "conv", "auto")),
            ("separable", ("fused", "split")),
            ("jpu_input", ("fused", "padded", "auto")),
            ("norm", ("standard", "folded")),
            ("resized", ("low_res", "upsampled")),
            ("loss_logits", ("upsampled", "head", "auto")),
            ("depthwise_input_grad", ("fused", "materialized", "pallas", "auto")),
            ("depthwise_kernel_grad", ("stacked", "stacked_minor", "per_tap", "pallas", "auto")),
            ("loss_gradient", ("compute", "float32")),
            ("loss_upsample", ("fused", "pallas", "auto")),
            ("max_pool_grad", ("taps", "select", "auto")),
            ("max_pool", ("window", "taps")),
            ("jpu_depthwise", ("branches", "joint")),
            ("norm_statistics", ("xla", "pallas")),
        ):
            if getattr(self, field) not in allowed:
                raise ValueError(f"{field}_implementation must be one of {allowed}, got {getattr(self, field)!r}")


DEFAULT_OPS = OpChoices()


def parse_ops(text: str) -> dict[str, str]:
    """``'depthwise=grouped,resize=matmul'`` -> ``{'depthwise': 'grouped', 'resize': 'matmul'}`` ('' -> {})."""
    pairs = [pair.strip() for pair in text.split(",") if pair.strip()]
    if not all(pair.count("=") == 1 for pair in pairs):
        raise ValueError(f"expected OP=CHOICE[,OP=CHOICE...], got {text!r}")
    return dict(pair.split("=") for pair in pairs)


def op_overrides(ops: Mapping[str, str] | None) -> dict[str, str]:
    """``{'depthwise': 'grouped'}`` -> ``{'depthwise_implementation': 'grouped'}``, rejecting unknown ops."""
    known = {f.name for f in dataclasses.fields(OpChoices)}
    unknown = set(ops or {}) - known
    if unknown:
        raise ValueError(f"unknown op(s) {sorted(unknown)}; known: {sorted(known)}")
    overrides = {f"{op}_implementation": choice for op, choice in (ops or {}).items()}
    OpChoices(**dict(ops or {}))  # validates the choices
    return overrides


BACKENDS = ("cpu", "gpu", "tpu")
_TARGET_BACKEND: contextvars.ContextVar[str | None] = contextvars.ContextVar("fastfcn_target_backend", default=None)


@contextlib.contextmanager
def target_backend(name: str | None) -> Iterator[None]:
    """Within the block, ``'auto'`` op choices resolve for backend ``name`` ('cpu', 'gpu' or 'tpu') instead
    of the one JAX runs on: for programs traced here and run elsewhere (an export for GPUs made on a CPU
    machine, ``experiments/gpu_aot.py``). ``None`` restores the default. Trace inside the block, and trace a
    function not traced before: ``jit`` caches a function's trace without regard to this setting."""
    if name is not None and name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; expected one of {BACKENDS}")
    token = _TARGET_BACKEND.set(name)
    try:
        yield
    finally:
        _TARGET_BACKEND.reset(token)


def backend() -> str:
    """The backend op choices are made for: :func:`target_backend`'s, else JAX's default backend."""
    return _TARGET_BACKEND.get() or jax.default_backend()


_XLA_FORMS: contextvars.ContextVar[bool] = contextvars.ContextVar("fastfcn_xla_forms", default=False)
# The XLA form each Pallas choice stands in for: the same maths and the same multiply-adds.
_XLA_FORM_OF_PALLAS = {
    "depthwise": "shifted",
    "depthwise_input_grad": "materialized",
    "depthwise_kernel_grad": "stacked",
    "loss_upsample": "fused",
    "norm_statistics": "xla",
}


@contextlib.contextmanager
def xla_forms() -> Iterator[None]:
    """Within the block, op choices that name a Pallas kernel (explicitly or through ``'auto'``) trace as
    their XLA forms of the same maths: for counting a program's FLOPs on its CPU lowering, which a Pallas
    GPU kernel does not have (and XLA's cost analysis does not see into). Trace a function not traced
    before, as for :func:`target_backend`."""
    token = _XLA_FORMS.set(True)
    try:
        yield
    finally:
        _XLA_FORMS.reset(token)


def unless_xla_forms(op: str, choice: str) -> str:
    """``choice`` for ``op``, or the XLA form of a Pallas choice inside :func:`xla_forms`."""
    return _XLA_FORM_OF_PALLAS[op] if choice == "pallas" and _XLA_FORMS.get() else choice


def choose(choice: str, *, tpu: str, other: str, gpu: str | None = None) -> str:
    """Resolves an ``'auto'`` implementation choice for the backend being traced for (``gpu`` defaults to
    ``other``)."""
    if choice != "auto":
        return choice
    name = backend()
    if name == "tpu":
        return tpu
    return gpu if gpu is not None and name == "gpu" else other


def pallas_for_auto() -> bool:
    """Whether ``'auto'`` picks the Pallas kernels (``depthwise*``, ``loss_upsample``): when tracing for a
    GPU of the kind they were checked and timed on (session 9, an H200: the EncNet+JPU R50 train step at
    batch 16, 480x480 from 43.2 to 33.2 ms; :func:`_checked_gpu`), and when each kernel runs on its device's
    examples: one device, or a data mesh as context (:func:`fastfcn_jax.sharding.with_mesh`, as the training
    loop does). Otherwise XLA would replicate the kernels' operands on every device, so the XLA forms are
    taken."""
    if backend() != "gpu" or not _checked_gpu():
        return False
    return jax.device_count() == 1 or sharding.has_data_mesh()


def _checked_gpu() -> bool:
    """An NVIDIA GPU of compute capability 8.0 or later (Triton's bfloat16), where the kernels were checked
    on a 9.0; not ROCm. Traced for a GPU from another machine (:func:`target_backend`): assumed so."""
    if jax.default_backend() != "gpu":
        return True
    device = jax.devices()[0]
    if "rocm" in str(getattr(device.client, "platform_version", "")).lower():
        return False
    try:
        return float(getattr(device, "compute_capability", "9.0")) >= 8.0
    except (TypeError, ValueError):
        return False


def choose_pallas(op: str, choice: str, otherwise: str) -> str:
    """Resolves ``op``'s ``'auto'`` to ``'pallas'`` where :func:`pallas_for_auto`, else to ``otherwise``;
    inside :func:`xla_forms` a Pallas choice becomes its XLA form."""
    if choice == "auto":
        choice = "pallas" if pallas_for_auto() else otherwise
    return unless_xla_forms(op, choice)


def exact_dtype(dtype: Dtype) -> Dtype:
    """The dtype resampling is computed in: float32, or float64 for float64 inputs (exactness tests)."""
    return jnp.promote_types(dtype, jnp.float32)


def _apply_separable(x: jax.Array, rows: np.ndarray, cols: np.ndarray) -> jax.Array:
    """Applies a [H', H] matrix along axis 1 and a [W', W] matrix along axis 2 of an NHWC array.

    In float32 (:func:`exact_dtype`) at full precision whatever ``x``'s dtype (a bfloat16 1/3 is 0.334; TPU
    matmuls default to bfloat16 passes), cast back at the end.
    """
    dtype, exact, hp = x.dtype, exact_dtype(x.dtype), jax.lax.Precision.HIGHEST
    x = jnp.einsum("oh,bhwc->bowc", jnp.asarray(rows, exact), x.astype(exact), precision=hp)
    return jnp.einsum("pw,bowc->bopc", jnp.asarray(cols, exact), x, precision=hp).astype(dtype)


@functools.lru_cache(maxsize=512)
def align_corners_taps(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(lower index, upper index, upper weight) per output index: the two non-zero entries of each row
    of :func:`align_corners_matrix`."""
    matrix = align_corners_matrix(in_size, out_size)
    scale = (in_size - 1) / (out_size - 1) if out_size > 1 else 0.0
    lower = np.minimum(np.floor(np.arange(out_size) * scale).astype(np.int32), in_size - 1)
    upper = np.minimum(lower + 1, in_size - 1)
    weight = np.where(upper > lower, matrix[np.arange(out_size), upper], 0.0)
    return lower, upper, weight


@functools.lru_cache(maxsize=512)
def align_corners_adjoint_taps(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray]:
    """(output indices [in, K], weights [in, K]): the non-zero entries of each *column* of
    :func:`align_corners_matrix`, padded with weight 0, so the adjoint of a resize is a K-tap gather."""
    matrix = align_corners_matrix(in_size, out_size)
    columns = [np.flatnonzero(matrix[:, i]) for i in range(in_size)]
    taps = max(1, max(len(c) for c in columns))
    indices = np.zeros((in_size, taps), np.int32)
    weights = np.zeros((in_size, taps), np.float64)
    for i, rows in enumerate(columns):
        indices[i, : len(rows)] = rows
        weights[i, : len(rows)] = matrix[rows, i]
    return indices, weights


def _taken(x: jax.Array, indices: np.ndarray, axis: int) -> jax.Array:
    # Indices are in range by construction: 'clip' gathers without the bounds select of the default mode.
    return jnp.take(x, jnp.asarray(indices), axis=axis, mode="clip")


def _along(values: np.ndarray, axis: int, ndim: int, dtype: Dtype) -> jax.Array:
    shape = [1] * ndim
    shape[axis] = values.shape[0]
    return jnp.asarray(values, dtype).reshape(shape)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2))
def _lerp_axis(x: jax.Array, axis: int, out_size: int) -> jax.Array:
    lower, upper, weight = align_corners_taps(x.shape[axis], out_size)
    exact = exact_dtype(x.dtype)
    low = _taken(x, lower, axis).astype(exact)
    high = _taken(x, upper, axis).astype(exact)
    # Lerp in float32 (exact weights), stored back in x's dtype.
    return (low + (high - low) * _along(weight, axis, x.ndim, exact)).astype(x.dtype)


def _lerp_axis_fwd(x: jax.Array, axis: int, out_size: int) -> tuple[jax.Array, jax.Array]:
    # An empty array is the residual: its shape and dtype carry the input size and dtype, and nothing else.
    return _lerp_axis(x, axis, out_size), jnp.zeros((x.shape[axis], 0), x.dtype)


def _lerp_axis_bwd(axis: int, out_size: int, residual: jax.Array, grad: jax.Array) -> tuple[jax.Array]:
    # The gradient of a gather is a scatter-add: serial on CPU (about 30 ms per final upsample of a batch 2,
    # 256x256 train step) and atomic, hence non-deterministic, on GPU. Each input index receives from a
    # short contiguous run of outputs, so the adjoint is a K-tap gather (K ~ 2 x the upsampling factor).
    in_size, dtype = residual.shape[0], residual.dtype
    indices, weights = align_corners_adjoint_taps(in_size, out_size)
    grad = grad.astype(exact_dtype(dtype))
    total = None
    for k in range(indices.shape[1]):
        term = _taken(grad, indices[:, k], axis) * _along(weights[:, k], axis, grad.ndim, grad.dtype)
        total = term if total is None else total + term
    return (total.astype(dtype),)


_lerp_axis.defvjp(_lerp_axis_fwd, _lerp_axis_bwd)


def resize_bilinear(x: jax.Array, size: Sequence[int], implementation: str = "auto") -> jax.Array:
    """Bilinear resize of ``x`` [B, H, W, C] to ``size`` (H', W') with PyTorch ``align_corners=True``.

    This is the interpolation of every resize in the reference (JPU, PSP and ASPP pooling branches, the
    final upsampling and the test-time rescaling); ``jax.image.resize`` uses half-pixel centres instead.
    Works for any sizes, up or down, including 1-pixel inputs and outputs. ``implementation``:
    ``'gather'``, ``'matmul'`` or ``'auto'`` (see the module docstring).
    """
    out_h, out_w = int(size[0]), int(size[1])
    in_h, in_w = x.shape[1], x.shape[2]
    if (in_h, in_w) == (out_h, out_w):
        return x
    implementation = choose(implementation, tpu="matmul", other="gather")
    if implementation == "matmul":
        return _apply_separable(x, align_corners_matrix(in_h, out_h), align_corners_matrix(in_w, out_w))
    if implementation != "gather":
        raise ValueError(f"unknown resize implementation {implementation!r}; expected 'gather', 'matmul' or 'auto'")
    # The smaller intermediate first: resize the axis that grows least before the other.
    if out_h * in_w <= in_h * out_w:
        return _lerp_axis(_lerp_axis(x, 1, out_h), 2, out_w)
    return _lerp_axis(_lerp_axis(x, 2, out_w), 1, out_h)


def adaptive_avg_pool(x: jax.Array, size: int | Sequence[int]) -> jax.Array:
    """PyTorch ``AdaptiveAvgPool2d(size)`` on ``x`` [B, H, W, C] -> [B, size_h, size_w, C]."""
    out_h, out_w = (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
    in_h, in_w = x.shape[1], x.shape[2]
    return _apply_separable(x, adaptive_pool_matrix(in_h, out_h), adaptive_pool_matrix(in_w, out_w))


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2, 3, 4))
def max_pool(x: jax.Array, window: int, stride: int, padding: int, forward: str = "window") -> jax.Array:
    """PyTorch ``MaxPool2d(window, stride, padding)`` on ``x`` [B, H, W, C] (padding never selected), whose
    gradient goes to the first maximum of each window in row-major order, as autodiff's (and PyTorch's);
    only windows holding a NaN (the loss is NaN anyway) or nothing but -inf may send theirs elsewhere.

    The gradient is computed as a gather (``OpChoices.max_pool_grad='taps'``): each window's first maximum
    tap, then each phase of the input sums the taps that reach it, all elementwise and fused by XLA, where
    autodiff's select-and-scatter visits every window again with a scatter (H200: 0.76 ms for the ResNet
    stem's pool at batch 16, 480x480, four times its memory roofline). ``forward``: ``OpChoices.max_pool``."""
    return _max_pool_forward(x, window, stride, padding, forward)


def _max_pool_forward(x: jax.Array, window: int, stride: int, padding: int, forward: str) -> jax.Array:
    if forward == "taps":
        out_shape = (x.shape[0], *((n + 2 * padding - window) // stride + 1 for n in x.shape[1:3]))
        return functools.reduce(jnp.maximum, (tap for _, tap in _max_pool_taps(x, out_shape, window, stride, padding)))
    return nn.max_pool(x, (window, window), strides=(stride, stride), padding=((padding, padding),) * 2)


def _max_pool_taps(x: jax.Array, out_shape: Sequence[int], window: int, stride: int, padding: int):
    """Tap (a, b) of every window: x[:, s*p - pad + a, s*q - pad + b], -inf outside ``x``."""
    padded = jnp.pad(x, ((0, 0), (padding, padding), (padding, padding), (0, 0)), constant_values=-jnp.inf)
    rows, cols = out_shape[1], out_shape[2]
    for a in range(window):
        for b in range(window):
            yield (a, b), padded[:, a : a + stride * (rows - 1) + 1 : stride, b : b + stride * (cols - 1) + 1 : stride]


def _max_pool_fwd(x, window, stride, padding, forward):
    return _max_pool_forward(x, window, stride, padding, forward), x


def _max_pool_bwd(window, stride, padding, forward, x, grad):
    # Each window's first maximum tap in row-major order (a later tap wins only if strictly greater), found
    # from x alone, so the pooled output need not be kept for the backward pass. XLA:GPU writes this index
    # array for the fused placement below to read: int8, a quarter of int32's bytes.
    index_dtype = jnp.int8 if window * window < 128 else jnp.int32
    first, best = None, None
    for (a, b), tap in _max_pool_taps(x, grad.shape, window, stride, padding):
        if first is None:
            first, best = jnp.zeros(grad.shape, index_dtype), tap
        else:
            better = tap > best
            first, best = (
                jnp.where(better, jnp.asarray(a * window + b, index_dtype), first),
                jnp.where(better, tap, best),
            )
    # Input row s*m + r is tap a of window m + (r + pad - a) / s for the taps with (r + pad - a) % s == 0
    # (columns alike): each of the s*s phases of the input sums only the taps that reach it (ResNet's stem,
    # 3x3 stride 2: 1, 2, 2 and 4 of the 9), and the phases interleave by a reshape. On the H200 the form that
    # placed all nine taps by strided pads evaluated nine selects per input element: 0.86 ms, 6.6x its
    # memory roofline. Terms are added in tap order, as there, so the values are the same.
    batch, height, width, channels = x.shape
    rows, cols = -(-height // stride), -(-width // stride)
    zero = jnp.zeros((), grad.dtype)

    def window_at(chosen: jax.Array, dr: int, dc: int) -> jax.Array:
        # [B, rows, cols, C]: chosen[:, m + dr, n + dc], zero outside (negative padding crops).
        h, w = chosen.shape[1], chosen.shape[2]
        return jax.lax.pad(chosen, zero, ((0, 0, 0), (-dr, rows - h + dr, 0), (-dc, cols - w + dc, 0), (0, 0, 0)))

    phases = []
    for r in range(stride):
        row_phases = []
        for c in range(stride):
            total = None
            for a in range(window):
                for b in range(window):
                    if (r + padding - a) % stride or (c + padding - b) % stride:
                        continue
                    chosen = jnp.where(first == a * window + b, grad, zero)
                    term = window_at(chosen, (r + padding - a) // stride, (c + padding - b) // stride)
                    total = term if total is None else total + term
            row_phases.append(jnp.zeros((batch, rows, cols, channels), grad.dtype) if total is None else total)
        phases.append(jnp.stack(row_phases, axis=3))  # [B, rows, cols, s (column phase), C]
    placed = jnp.stack(phases, axis=2).reshape(batch, rows * stride, cols * stride, channels)
    return (placed[:, :height, :width],)


max_pool.defvjp(_max_pool_fwd, _max_pool_bwd)


@functools.lru_cache(maxsize=512)
def shifted_resize_matrices(in_size: int, out_size: int, kernel_size: int) -> np.ndarray:
    """[k, out_size, in_size]: for each tap ``t`` of a stride-1 'same' kxk convolution, the align-corners
    matrix with its rows moved by ``t - k // 2`` and zero rows where the tap reads the convolution's zero
    padding. Row ``y`` of tap ``t`` interpolates the pixel that output ``y`` reads through that tap."""
    matrix = align_corners_matrix(in_size, out_size)
    half = kernel_size // 2
    out = np.zeros((kernel_size, out_size, in_size), np.float64)
    for t in range(kernel_size):
        src = np.arange(out_size) + t - half
        valid = (src >= 0) & (src < out_size)
        out[t, valid] = matrix[src[valid]]
    out.setflags(write=False)
    return out


def conv_of_resized(inputs: Sequence[jax.Array], kernel: jax.Array, size: Sequence[int], dtype: Dtype) -> jax.Array:
    """``conv(concat([resize_bilinear(p, size) for p in inputs]), kernel)`` (stride 1, 'same' zero padding),
    without upsampling: [B, H, W, out] in float32 (float64 for float64 ``dtype``).

    Resizing acts on each channel alone and a convolution tap mixes channels of one pixel, so the two
    commute: each tap's matrix is applied to the small pooled maps (PSP's 1x1 to 6x6) and the products are
    resized, by matrices shifted by the tap's offset whose zero rows are the convolution's padding. PSP's
    3x3 conv over its four pyramid levels (half of that conv's multiply-adds, 77 GFLOPs at 512x512) becomes
    0.4 GFLOPs. The tap products run in ``dtype`` (accumulated in float32), the resizing in float32 at full
    precision.
    """
    out_h, out_w = int(size[0]), int(size[1])
    k, hp = kernel.shape[0], jax.lax.Precision.HIGHEST
    exact = exact_dtype(dtype)
    rows, parts, start = [], [], 0
    for p in inputs:
        batch, in_h, in_w, channels = p.shape
        # One [pixels, C] x [C, out] product per tap, batched over the taps: the HWIO kernel is read in
        # place (an einsum to [pixels, k*k*out] transposed it first: 21 vs 14 ms on XLA:CPU for PSP R50).
        pixels = jnp.broadcast_to(p.astype(dtype).reshape(1, -1, channels), (k * k, batch * in_h * in_w, channels))
        taps = jax.lax.dot_general(
            pixels,
            kernel[:, :, start : start + channels].astype(dtype).reshape(k * k, channels, -1),
            (((2,), (1,)), ((0,), (0,))),
            preferred_element_type=exact,
        ).reshape(k, k, batch, in_h, in_w, -1)
        start += channels
        cols = jnp.asarray(shifted_resize_matrices(in_w, out_w, k), exact)
        part = jnp.einsum("jxc,ijbaco->biaxo", cols, taps, precision=hp)  # [B, k, in_h, W, out]
        parts.append(part.reshape(batch, k * in_h, out_w, part.shape[-1]))
        rows.append(shifted_resize_matrices(in_h, out_h, k).transpose(1, 0, 2).reshape(out_h, k * in_h))
    if start != kernel.shape[2]:
        raise ValueError(f"kernel has {kernel.shape[2]} input channels, the resized inputs {start}")
    rows_matrix = jnp.asarray(np.concatenate(rows, axis=1), exact)
    return jnp.einsum("yr,brxo->byxo", rows_matrix, jnp.concatenate(parts, axis=1), precision=hp)


# ----------------------------------------------------------------------------------------------------
# Normalisation.


class BatchNorm(nn.Module):
    """BatchNorm with PyTorch semantics: eps 1e-5, momentum 0.1, running variance updated unbiased.

    Statistics are computed in float32 over every axis but ``feature_axis`` (under ``jax.jit`` with a
    batch-sharded input this is the global batch, i.e. the reference's SyncBN). The running variance is
    updated with the unbiased batch variance and the batch is normalised with the biased one, as
    PyTorch and the reference's SyncBN do. Variables are named as Flax's ``nn.BatchNorm`` names them
    (params ``scale``/``bias``, batch_stats ``mean``/``var``).
    """

    use_running_average: bool | None = None
    feature_axis: int = -1
    momentum: float = BN_MOMENTUM
    epsilon: float = NORM_EPSILON
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32
    folded: bool = False  # inference only: the conv before carries the scale, ``bias`` the whole shift
    statistics: str = "xla"  # OpChoices.norm_statistics: 'xla' | 'pallas' (training, channels last)

    @nn.compact
    def __call__(self, x: jax.Array, use_running_average: bool | None = None) -> jax.Array:
        use_running_average = nn.merge_param("use_running_average", self.use_running_average, use_running_average)
        if self.folded and not use_running_average:
            raise ValueError(
                f"BatchNorm {self.name!r} is folded into its convolution (norm_implementation='folded'), which "
                "only evaluates; train with norm_implementation='standard'"
            )
        axis = self.feature_axis % x.ndim
        features = x.shape[axis]
        reduce_axes = tuple(a for a in range(x.ndim) if a != axis)
        stat_shape = [1] * x.ndim
        stat_shape[axis] = features

        ra_mean = self.variable("batch_stats", "mean", lambda: jnp.zeros((features,), jnp.float32))
        ra_var = self.variable("batch_stats", "var", lambda: jnp.ones((features,), jnp.float32))
        scale = self.param("scale", nn.initializers.ones, (features,), self.param_dtype)
        bias = self.param("bias", nn.initializers.zeros, (features,), self.param_dtype)

        wide = exact_dtype(x.dtype)  # float32 (float64 in exactness tests)
        x32 = x.astype(wide)
        if self.folded:
            return (x32 + bias.astype(wide).reshape(stat_shape)).astype(self.dtype or x.dtype)
        statistics = unless_xla_forms("norm_statistics", self.statistics)
        if statistics not in ("xla", "pallas"):
            raise ValueError(f"unknown BatchNorm statistics {self.statistics!r}; expected 'xla' or 'pallas'")
        if use_running_average:
            mean, var = ra_mean.value, ra_var.value
        else:
            # Both moments in one pass over x (the two-pass form reads a training batch's activations twice;
            # XLA fuses the two sums into one reduction), about the running mean so that E[d^2] - E[d]^2
            # does not cancel when |mean| >> std (the shifted-data algorithm; exact for any shift).
            shift = jax.lax.stop_gradient(ra_mean.value).reshape(stat_shape)
            count = int(np.prod([x.shape[a] for a in reduce_axes]))
            if statistics == "pallas" and axis == x.ndim - 1:
                y, mean, var = _pallas_batch_norm(
                    x, scale, bias, shift.reshape(-1), self.epsilon, jnp.dtype(self.dtype or x.dtype).name
                )
            else:
                y = None
                centred = x32 - shift
                mean_centred = jnp.mean(centred, axis=reduce_axes)
                var = jnp.maximum(jnp.mean(jnp.square(centred), axis=reduce_axes) - jnp.square(mean_centred), 0.0)
                mean = mean_centred + shift.reshape(-1)
            if not self.is_initializing():
                unbiased = var * (count / max(count - 1, 1))
                ra_mean.value = self.momentum * ra_mean.value + (1.0 - self.momentum) * mean
                ra_var.value = self.momentum * ra_var.value + (1.0 - self.momentum) * unbiased
            if y is not None:
                return y

        multiplier = scale.astype(wide) * jax.lax.rsqrt(var + self.epsilon)
        offset = bias.astype(wide) - mean * multiplier
        y = x32 * multiplier.reshape(stat_shape) + offset.reshape(stat_shape)
        return y.astype(self.dtype or x.dtype)


def _channel_sums(u: jax.Array, u_shift: jax.Array, v: jax.Array | None = None, v_shift: jax.Array | None = None):
    """:func:`batch_norm_pallas.channel_sums` over the rows of channels-last ``u`` (and ``v``), on each
    device's part of the batch, added over the devices."""
    interpret = pallas_interpret()
    channels = u.shape[-1]

    def local(u, *v):
        v = (v[0].reshape(-1, channels), v_shift) if v else ()
        # The interpreter runs programs one after another: one per channel block (tests).
        programs = 1 if interpret else batch_norm_pallas.TARGET_PROGRAMS
        return batch_norm_pallas.channel_sums(
            u.reshape(-1, channels), u_shift, *v, programs=programs, interpret=interpret
        )

    args = (u,) if v is None else (u, v)
    return sharding.over_batch(local, *args, batched=(True,) * len(args), summed=(True, True))


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _pallas_batch_norm(
    x: jax.Array, scale: jax.Array, bias: jax.Array, shift: jax.Array, epsilon: float, out_dtype: str
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """A training BatchNorm of channels-last ``x`` with :class:`BatchNorm`'s formulas: (output in
    ``out_dtype``, batch mean, biased batch variance). The forward's moments about ``shift`` and the
    backward's ``sum(dy)``, ``sum(dy * x)`` are Pallas kernels; everything else is elementwise, in float32
    (float64 for float64 inputs), and the input gradient is rounded to ``x``'s dtype once."""
    return _pallas_batch_norm_fwd(x, scale, bias, shift, epsilon, out_dtype)[0]


def _pallas_batch_norm_fwd(x, scale, bias, shift, epsilon, out_dtype):
    wide = exact_dtype(x.dtype)
    count = x.size // x.shape[-1]
    sums, squares = _channel_sums(x, shift)
    mean_centred = sums / count
    raw_var = squares / count - jnp.square(mean_centred)
    var = jnp.maximum(raw_var, 0.0)
    mean = mean_centred + shift
    rstd = jax.lax.rsqrt(var + epsilon)
    multiplier = scale.astype(wide) * rstd
    offset = bias.astype(wide) - mean * multiplier
    y = (x.astype(wide) * multiplier + offset).astype(out_dtype)
    return (y, mean, var), (x, scale, bias, shift, mean_centred, raw_var, mean, rstd, multiplier)


def _pallas_batch_norm_bwd(epsilon, out_dtype, residuals, cotangents):
    # Autodiff of the forward above, step by step, with its two per-channel sums in one Pallas kernel. The
    # shift (the running mean) is a constant of the step: no gradient.
    x, scale, bias, shift, mean_centred, raw_var, mean, rstd, multiplier = residuals
    grad_y, grad_mean, grad_var = cotangents
    wide, count = multiplier.dtype, x.size // x.shape[-1]
    zeros = jnp.zeros(x.shape[-1:], wide)
    sum_dy, sum_dy_x = _channel_sums(grad_y, zeros, x, zeros)
    # y = x * multiplier + bias - mean * multiplier, multiplier = scale * rstd, rstd = (var + eps)^-1/2
    grad_multiplier = sum_dy_x - mean * sum_dy
    grad_rstd = grad_multiplier * scale.astype(wide)
    grad_var = grad_var + jnp.where(raw_var > 0.0, -0.5 * grad_rstd * rstd**3, 0.0)
    grad_mean = grad_mean - multiplier * sum_dy
    # mean = sums / count + shift, var = squares / count - (sums / count)^2, both sums over x - shift.
    grad_sums = (grad_mean - 2.0 * mean_centred * grad_var) / count
    grad_squares = grad_var / count
    grad_x = grad_y.astype(wide) * multiplier + grad_sums + 2.0 * grad_squares * (x.astype(wide) - shift)
    grad_scale, grad_bias = (grad_multiplier * rstd).astype(scale.dtype), sum_dy.astype(bias.dtype)
    return grad_x.astype(x.dtype), grad_scale, grad_bias, jnp.zeros_like(shift)


_pallas_batch_norm.defvjp(_pallas_batch_norm_fwd, _pallas_batch_norm_bwd)


_FROZEN_BATCH_NORM: contextvars.ContextVar[bool] = contextvars.ContextVar("fastfcn_frozen_batch_norm", default=False)


@contextlib.contextmanager
def frozen_batch_norm(frozen: bool = True) -> Iterator[None]:
    """Within the block (trace inside it), training BatchNorms normalise with their running statistics and
    leave them unchanged, while their scale and bias still train: the reference author's remedy when a device
    holds too few images for batch statistics (FastFCN issue #19, one 12 GB GPU). GroupNorm is unaffected."""
    token = _FROZEN_BATCH_NORM.set(bool(frozen))
    try:
        yield
    finally:
        _FROZEN_BATCH_NORM.reset(token)


def uses_running_statistics(train: bool) -> bool:
    """Whether a BatchNorm normalises with its running statistics: in inference, or frozen in training."""
    return not train or _FROZEN_BATCH_NORM.get()


def make_norm(
    kind: str,
    *,
    train: bool,
    dtype: Dtype,
    num_groups: int = 32,
    folded: bool = False,
    statistics: str = "xla",
    name: str | None = None,
):
    """A normalisation layer by name: ``'batch'`` (PyTorch BatchNorm) or ``'group'`` (GroupNorm, eps 1e-5).
    ``folded``: a BatchNorm whose scale is in the preceding convolution (see :func:`fold_batch_norm`);
    ``statistics``: how a training BatchNorm sums (``OpChoices.norm_statistics``)."""
    if kind == "batch":
        running = uses_running_statistics(train)
        return BatchNorm(use_running_average=running, dtype=dtype, folded=folded, statistics=statistics, name=name)
    if kind == "group":
        # Two-pass variance, as PyTorch computes it.
        return nn.GroupNorm(
            num_groups=num_groups,
            epsilon=NORM_EPSILON,
            dtype=dtype,
            param_dtype=jnp.float32,
            use_fast_variance=False,
            name=name,
        )
    raise ValueError(f"unknown norm {kind!r}; expected 'batch' or 'group'")


# The (convolution, BatchNorm) sibling pairs that fold_batch_norm folds: ConvBNReLU's and SeparableConv's.
FOLDABLE_PAIRS = (("conv", "bn"), ("depthwise", "depthwise_norm"), ("pointwise", "pointwise_norm"))


def fold_batch_norm(variables: Any, epsilon: float = NORM_EPSILON, keep: Sequence[str] = ()) -> dict[str, Any]:
    """Variables for ``norm_implementation='folded'``: each BatchNorm that follows a convolution is folded in.

    ``bn(conv(x, W)) = conv(x, W * m) + (bias - mean * m)`` with ``m = scale / sqrt(var + eps)`` per output
    channel: the kernel takes ``m`` along its last (output) axis, the BatchNorm's ``bias`` the shift, its
    ``scale``, ``mean`` and ``var`` become 1, 0, 1 (unused). Computed in float64, stored in the variables'
    dtypes. GroupNorms (no running statistics) and BatchNorms without a convolution sibling (EncNet's
    codeword BatchNorm) are left as they are, and so does the model built with ``'folded'``. ``keep``: top-level
    modules left as they are (another backbone, whose own layers ``'folded'`` does not reach).
    """
    params, stats = variables["params"], variables.get("batch_stats", {})

    def fold(params_node: Any, stats_node: Any) -> Any:
        if not isinstance(params_node, Mapping):
            return params_node
        out = {
            key: fold(value, stats_node.get(key, {}) if isinstance(stats_node, Mapping) else {})
            for key, value in params_node.items()
        }
        for conv_name, norm_name in FOLDABLE_PAIRS:
            norm_stats = stats_node.get(norm_name) if isinstance(stats_node, Mapping) else None
            if conv_name not in out or norm_name not in out or not norm_stats:
                continue
            conv, norm = dict(out[conv_name]), dict(out[norm_name])
            if "bias" in conv:
                raise ValueError(f"cannot fold {norm_name!r} into {conv_name!r}: the convolution has a bias")
            scale = np.asarray(norm["scale"], np.float64)
            multiplier = scale / np.sqrt(np.asarray(norm_stats["var"], np.float64) + epsilon)
            shift = np.asarray(norm["bias"], np.float64) - np.asarray(norm_stats["mean"], np.float64) * multiplier
            kernel = np.asarray(conv["kernel"])
            conv["kernel"] = (kernel.astype(np.float64) * multiplier).astype(kernel.dtype)
            norm["scale"] = np.ones_like(np.asarray(norm["scale"]))
            norm["bias"] = shift.astype(np.asarray(norm["bias"]).dtype)
            out[conv_name], out[norm_name] = conv, norm
        return out

    def reset_stats(params_node: Any, stats_node: Any) -> Any:
        if not isinstance(stats_node, Mapping):
            return stats_node
        out = {
            key: reset_stats(params_node.get(key, {}) if isinstance(params_node, Mapping) else {}, value)
            for key, value in stats_node.items()
        }
        for conv_name, norm_name in FOLDABLE_PAIRS:
            if isinstance(params_node, Mapping) and conv_name in params_node and norm_name in out:
                out[norm_name] = {
                    "mean": np.zeros_like(np.asarray(out[norm_name]["mean"])),
                    "var": np.ones_like(np.asarray(out[norm_name]["var"])),
                }
        return out

    folded = dict(variables)
    kept_params, kept_stats = ({k: v for k, v in tree.items() if k in keep} for tree in (params, stats))
    params, stats = ({k: v for k, v in tree.items() if k not in keep} for tree in (params, stats))
    folded["params"] = {**fold(params, stats), **kept_params}
    if "batch_stats" in variables:
        folded["batch_stats"] = {**reset_stats(params, stats), **kept_stats}
    return folded


# ----------------------------------------------------------------------------------------------------
# Convolutions.


def conv_kernel_init(out_features: int, kernel_size: int):
    """Reference ResNet init: normal(0, sqrt(2 / (k * k * out_channels)))."""
    return nn.initializers.normal(stddev=float(np.sqrt(2.0 / (kernel_size * kernel_size * out_features))))


def torch_default_kernel_init():
    """PyTorch's default Conv2d/Linear weight init (kaiming-uniform, a=sqrt(5)): U(+-1/sqrt(fan_in))."""
    return nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


def torch_default_bias_init(fan_in: int):
    """PyTorch's default Conv2d/Linear bias init: U(+-1/sqrt(fan_in))."""
    bound = 1.0 / float(np.sqrt(max(fan_in, 1)))

    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


def _conv_xla(x: jax.Array, kernel: jax.Array, stride: int, dilation: int) -> jax.Array:
    pad = dilation * (kernel.shape[0] - 1) // 2
    return jax.lax.conv_general_dilated(
        x,
        kernel,
        window_strides=(stride, stride),
        padding=((pad, pad), (pad, pad)),
        rhs_dilation=(dilation, dilation),
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
    )


def _conv_im2col(x: jax.Array, kernel: jax.Array, stride: int, dilation: int) -> jax.Array:
    """The same convolution as one matmul over k*k shifted (strided) views: [B, Ho, Wo, k*k*C] x [k*k*C, O]."""
    k = kernel.shape[0]
    pad = dilation * (k - 1) // 2
    height, width = x.shape[1], x.shape[2]
    out_h = (height + 2 * pad - dilation * (k - 1) - 1) // stride + 1
    out_w = (width + 2 * pad - dilation * (k - 1) - 1) // stride + 1
    padded = jnp.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    views = [
        padded[:, i * dilation : i * dilation + stride * (out_h - 1) + 1 : stride,
               j * dilation : j * dilation + stride * (out_w - 1) + 1 : stride, :]
        for i in range(k)
        for j in range(k)
    ]  # fmt: skip
    patches = jnp.concatenate(views, axis=-1)
    return jnp.einsum("bhwk,ko->bhwo", patches, kernel.reshape(-1, kernel.shape[-1]))


def _valid_tap_fraction(height: int, width: int, kernel_size: int, dilation: int) -> float:
    """Share of a stride-1 kxk conv's multiply-adds that touch real pixels rather than zero padding."""

    def axis(n: int) -> float:
        half = kernel_size // 2
        return sum(max(n - abs(t - half) * dilation, 0) for t in range(kernel_size)) / n

    return axis(height) * axis(width) / kernel_size**2


def _conv_valid_taps(x: jax.Array, kernel: jax.Array, dilation: int) -> jax.Array:
    """A stride-1 'same' kxk conv as one matmul per tap over only the pixels the tap reads inside the image.

    For large dilations (ASPP rates 24 and 36 on a 64x64 map) most taps read padding: skipping it does the
    same sums with a fraction of the multiply-adds (61% fewer at rate 36).
    """
    k = kernel.shape[0]
    height, width = x.shape[1], x.shape[2]
    out = None
    for i in range(k):
        for j in range(k):
            dy, dx = (i - k // 2) * dilation, (j - k // 2) * dilation
            y0, y1 = max(0, -dy), min(height, height - dy)
            x0, x1 = max(0, -dx), min(width, width - dx)
            if y0 >= y1 or x0 >= x1:
                continue
            # Summed in float32, as a convolution accumulates, whatever the compute dtype.
            part = jnp.einsum(
                "bhwc,co->bhwo",
                x[:, y0 + dy : y1 + dy, x0 + dx : x1 + dx, :],
                kernel[i, j],
                preferred_element_type=exact_dtype(x.dtype),
            )
            part = jnp.pad(part, ((0, 0), (y0, height - y1), (x0, width - x1), (0, 0)))
            out = part if out is None else out + part
    return out.astype(x.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _conv_im2col_grad(x: jax.Array, kernel: jax.Array, stride: int, dilation: int) -> jax.Array:
    """XLA's convolution forward; the gradient of the im2col matmul form backward (same maths)."""
    return _conv_xla(x, kernel, stride, dilation)


def _conv_im2col_grad_fwd(x, kernel, stride, dilation):
    return _conv_xla(x, kernel, stride, dilation), (x, kernel)


def _conv_im2col_grad_bwd(stride, dilation, residuals, grad):
    x, kernel = residuals
    _, vjp = jax.vjp(lambda x, kernel: _conv_im2col(x, kernel, stride, dilation), x, kernel)
    return vjp(grad)


_conv_im2col_grad.defvjp(_conv_im2col_grad_fwd, _conv_im2col_grad_bwd)


class Conv2D(nn.Module):
    """Square convolution with PyTorch's symmetric padding ``dilation * (k - 1) // 2`` on both sides.

    Flax's ``'SAME'`` would pad a stride-2 conv asymmetrically on even sizes, which breaks parity.
    Variables as ``nn.Conv``'s: ``kernel`` [k, k, in, out] (float32) and optional ``bias`` [out].
    A 1x1 kernel runs as a matmul over channels (``pointwise_implementation='dot'``, see the module
    docstring); ``'conv'`` forces the convolution op. Larger kernels run XLA's convolution forward;
    ``conv_gradient='im2col'`` computes their gradient as the im2col matmul's instead of XLA's backward
    convolutions.
    """

    features: int
    kernel_size: int = 3
    stride: int = 1
    dilation: int = 1
    use_bias: bool = False
    dtype: Dtype = jnp.float32
    kernel_init: Any = None
    pointwise_implementation: str = "dot"
    conv_gradient: str = "auto"
    dilated_implementation: str = "auto"
    resized_implementation: str = "low_res"
    resize_implementation: str = "auto"
    small_maps_implementation: str = "auto"

    def _per_tap(self, batch: int, height: int, width: int) -> bool:
        choice = choose(self.small_maps_implementation, tpu="conv", gpu="conv", other="per_tap")
        # A symbolic batch (an export for any batch size) is judged by one image, as served.
        pixels = height * width * (batch if isinstance(batch, int) else 1)
        if self.kernel_size % 2 == 0:  # the per-tap form keeps the size: 'same' convs only
            return False
        small = self.kernel_size > 1 and isinstance(pixels, int) and pixels <= SMALL_MAP_PIXELS
        return (small and choice == "per_tap") or self._valid_taps(height, width)

    def _valid_taps(self, height: int, width: int) -> bool:
        if self.dilated_implementation == "conv" or self.dilation == 1:
            return False
        if self.dilated_implementation == "valid_taps":
            return True
        # 'auto': on CPU, when at least a fifth of the multiply-adds would read padding.
        fraction = _valid_tap_fraction(height, width, self.kernel_size, self.dilation)
        return backend() == "cpu" and fraction < 0.8

    @nn.compact
    def __call__(self, x: jax.Array, resized: Sequence[jax.Array] = ()) -> jax.Array:
        """Convolves ``x``, or with ``resized`` the concatenation ``[x, *resized]`` where each of ``resized``
        is first resized to ``x``'s height and width (align corners): PSP's pyramid levels, ASPP's pooling
        branch. The kernel spans all the channels either way."""
        k, in_features = self.kernel_size, x.shape[-1] + sum(r.shape[-1] for r in resized)
        kernel = self.param(
            "kernel",
            self.kernel_init or torch_default_kernel_init(),
            (k, k, in_features, self.features),
            jnp.float32,
        )
        if resized and (self.stride != 1 or self.dilation != 1 or k % 2 == 0):
            raise ValueError("resized inputs need a stride-1, undilated convolution of odd size")
        if resized and self.resized_implementation == "upsampled":
            size = x.shape[1:3]
            x = jnp.concatenate([x, *(resize_bilinear(r, size, self.resize_implementation) for r in resized)], -1)
            resized = ()
        x = x.astype(self.dtype)
        kernel = kernel.astype(self.dtype)
        y = self._conv(x, kernel[:, :, : x.shape[-1]])
        if resized:
            y = y + conv_of_resized(resized, kernel[:, :, x.shape[-1] :], x.shape[1:3], self.dtype).astype(self.dtype)
        if self.use_bias:
            bias = self.param("bias", torch_default_bias_init(in_features * k * k), (self.features,), jnp.float32)
            y = y + bias.astype(self.dtype)
        return y

    def _conv(self, x: jax.Array, kernel: jax.Array) -> jax.Array:
        if self.kernel_size == 1 and self.pointwise_implementation == "dot":
            if self.stride > 1:  # PyTorch's 1x1 stride-s conv without padding reads every s-th pixel
                x = x[:, :: self.stride, :: self.stride, :]
            return jnp.einsum("bhwc,co->bhwo", x, kernel[0, 0])
        if self.stride == 1 and self._per_tap(*x.shape[:3]):
            return _conv_valid_taps(x, kernel, self.dilation)
        if self.conv_gradient == "im2col" or (self.conv_gradient == "auto" and backend() == "cpu"):
            return _conv_im2col_grad(x, kernel, self.stride, self.dilation)
        return _conv_xla(x, kernel, self.stride, self.dilation)


def conv2d(
    features: int,
    kernel_size: int,
    *,
    stride: int = 1,
    dilation: int = 1,
    use_bias: bool = False,
    dtype: Dtype = jnp.float32,
    kernel_init=None,
    ops: OpChoices = DEFAULT_OPS,
    name: str | None = None,
) -> Conv2D:
    """A :class:`Conv2D` (PyTorch padding; PyTorch's default init unless ``kernel_init`` is given)."""
    return Conv2D(
        features,
        kernel_size,
        stride=stride,
        dilation=dilation,
        use_bias=use_bias,
        dtype=dtype,
        kernel_init=kernel_init,
        pointwise_implementation=ops.pointwise,
        conv_gradient=ops.conv_gradient,
        dilated_implementation=ops.dilated,
        resized_implementation=ops.resized,
        resize_implementation=ops.resize,
        small_maps_implementation=ops.small_maps,
        name=name,
    )


class ConvBNReLU(nn.Module):
    """Conv (no bias, symmetric padding) -> norm -> optional ReLU. Submodules ``conv`` and ``bn``.

    ``resized``: maps to resize to ``x``'s size and concatenate after it before the conv (see
    :meth:`Conv2D.__call__`)."""

    features: int
    kernel_size: int = 3
    stride: int = 1
    dilation: int = 1
    relu: bool = True
    norm: str = "batch"
    num_groups: int = 32
    dtype: Dtype = jnp.float32
    kernel_init: Any = None
    ops: OpChoices = DEFAULT_OPS

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False, resized: Sequence[jax.Array] = ()) -> jax.Array:
        x = conv2d(
            self.features,
            self.kernel_size,
            stride=self.stride,
            dilation=self.dilation,
            dtype=self.dtype,
            kernel_init=self.kernel_init,
            ops=self.ops,
            name="conv",
        )(x, resized)
        folded = self.ops.norm == "folded"
        x = make_norm(
            self.norm,
            train=train,
            dtype=self.dtype,
            num_groups=self.num_groups,
            folded=folded,
            statistics=self.ops.norm_statistics,
            name="bn",
        )(x)
        return nn.relu(x) if self.relu else x


class DepthwiseConv(nn.Module):
    """Depthwise 3x3 (or kxk) dilated convolution, stride 1, padding ``dilation * (k - 1) // 2``.

    The kernel has Flax's depthwise layout [k, k, 1, C]. It is computed as k*k shifted multiply-adds
    (``implementation='shifted'``): on XLA:CPU ``feature_group_count`` convolutions are very slow (and
    their kernel gradient runs as a dense conv), while the shifted form is exact and fuses well on every
    backend. ``implementation='grouped'`` uses ``lax.conv_general_dilated`` with ``feature_group_count``;
    ``'pallas'`` is the shifted form with its forward as a Pallas kernel (:mod:`depthwise_pallas`; GPUs, and
    Pallas's interpreter elsewhere); ``'auto'`` (the default) is ``'pallas'`` when training where
    :func:`pallas_for_auto`, else ``'shifted'``. ``input_grad`` and ``kernel_grad`` pick the backward's forms
    (:func:`depthwise_forms`). ``margin`` > 0 says ``x`` already carries that many zero rows and
    columns on each side (at least the padding): the output is then ``x``'s size less ``2 * margin``, the taps
    read the margin in place of padding, and the input gradient covers the whole padded array.
    """

    kernel_size: int = 3
    dilation: int = 1
    dtype: Dtype = jnp.float32
    implementation: str = "auto"  # OpChoices.depthwise
    margin: int = 0
    input_grad: str = "auto"  # OpChoices.depthwise_input_grad
    kernel_grad: str = "auto"  # OpChoices.depthwise_kernel_grad

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool = False, kernel_only: bool = False) -> jax.Array:
        """The convolution of ``x``; with ``kernel_only``, the kernel in the compute dtype (for
        :func:`depthwise_joint`, which convolves several branches' kernels at once). ``train`` only picks the
        forward's form (:func:`depthwise_forms`)."""
        channels = x.shape[-1]
        k, d = self.kernel_size, self.dilation
        kernel = self.param(
            "kernel",
            nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform", in_axis=(0, 1, 2), out_axis=3),
            (k, k, 1, channels),
            jnp.float32,
        )
        kernel = kernel.astype(self.dtype)
        if kernel_only:
            return kernel
        x = x.astype(self.dtype)
        pad = d * (k - 1) // 2
        if self.margin and self.margin < pad:
            raise ValueError(f"a margin of {self.margin} is less than the padding {pad} of dilation {d}")
        if self.implementation == "grouped":
            if self.margin:
                skip = self.margin - pad
                x = x[:, skip : x.shape[1] - skip, skip : x.shape[2] - skip, :]
            return jax.lax.conv_general_dilated(
                x,
                kernel,
                window_strides=(1, 1),
                padding=((0, 0), (0, 0)) if self.margin else ((pad, pad), (pad, pad)),
                rhs_dilation=(d, d),
                dimension_numbers=("NHWC", "HWIO", "NHWC"),
                feature_group_count=channels,
            )
        if self.implementation not in ("shifted", "pallas", "auto"):
            raise ValueError(f"unknown depthwise implementation {self.implementation!r}")
        forms = depthwise_forms(self.implementation, self.input_grad, self.kernel_grad, train=train)
        return _depthwise_shifted(x, kernel, d, self.margin, forms)


def depthwise_forms(forward: str, input_grad: str, kernel_grad: str, *, train: bool) -> tuple[str, str, str]:
    """(forward, input gradient, kernel gradient) forms of the shifted depthwise conv for the backend traced
    for (``OpChoices`` ``depthwise``, ``depthwise_input_grad``, ``depthwise_kernel_grad``). ``'auto'`` takes
    the Pallas kernels where :func:`pallas_for_auto`; the forward's only when ``train``: its speed-up was
    timed in the training step (H200, session 7: 38.7 -> 37.9 ms), while inference keeps XLA's one fused
    kernel for the JPU's four branches (at batch 1 a GPU is bound by the number of kernels)."""
    OpChoices(depthwise=forward, depthwise_input_grad=input_grad, depthwise_kernel_grad=kernel_grad)  # validates
    if forward == "auto" and not train:
        forward = "shifted"
    return (
        choose_pallas("depthwise", forward, "shifted"),
        choose_pallas(
            "depthwise_input_grad", input_grad, choose("auto", tpu="fused", other="fused", gpu="materialized")
        ),
        choose_pallas(
            "depthwise_kernel_grad", kernel_grad, choose("auto", tpu="per_tap", other="per_tap", gpu="stacked")
        ),
    )


def _shifted_views(x: jax.Array, kernel_size: int, dilation: int, margin: int = 0) -> list[jax.Array]:
    """The k*k views of ``x`` zero-padded by ``dilation * (k - 1) // 2`` that a stride-1 'same' conv reads,
    tap (i, j) at index ``i * k + j``. With ``margin`` > 0, ``x`` is already padded by ``margin`` (>= the
    padding) and is sliced in place."""
    pad = dilation * (kernel_size - 1) // 2
    if margin:
        padded, skip = x, margin - pad
        height, width = x.shape[1] - 2 * margin, x.shape[2] - 2 * margin
    else:
        padded, skip = jnp.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0))), 0
        height, width = x.shape[1], x.shape[2]
    return [
        padded[
            :, skip + i * dilation : skip + i * dilation + height, skip + j * dilation : skip + j * dilation + width, :
        ]
        for i in range(kernel_size)
        for j in range(kernel_size)
    ]


def _shifted_taps(x: jax.Array, kernel: jax.Array, dilation: int, margin: int = 0) -> jax.Array:
    """sum_ij x_padded[h + i*d, w + j*d] * kernel[i, j] in float32: a stride-1 'same' depthwise conv."""
    k = kernel.shape[0]
    out = None
    for index, view in enumerate(_shifted_views(x, k, dilation, margin)):
        # Products and sums in float32 as a convolution accumulates; XLA fuses the taps into one pass.
        term = view.astype(jnp.float32) * kernel[index // k, index % k, 0].astype(jnp.float32)
        out = term if out is None else out + term
    return out


def pallas_interpret() -> bool:
    """Pallas kernels compile for GPUs (Triton); elsewhere they run in Pallas's interpreter.

    Traced for several GPUs, the kernels need the training mesh as context (:func:`fastfcn_jax.sharding.with_mesh`,
    as the training loop does) to run on each device's part of the batch (:func:`fastfcn_jax.sharding.over_batch`);
    without it XLA replicates their operands on every device, which this warns about."""
    if backend() == "gpu" and jax.device_count() > 1 and not sharding.has_data_mesh():
        warnings.warn(
            f"a Pallas kernel traced with {jax.device_count()} devices and no data-parallel mesh: if the program "
            "runs over several devices, XLA does not split the kernel over the batch but replicates its operands "
            "on every device; trace it with the mesh (fastfcn_jax.sharding.with_mesh, as the training loop "
            "does), or use the XLA forms (depthwise=shifted, depthwise_input_grad=materialized, "
            "depthwise_kernel_grad=stacked, loss_upsample=fused, norm_statistics=xla)",
            stacklevel=2,
        )
    return backend() != "gpu"


def _pallas_terms(kernel_size: int, dilations: tuple[int, ...], sign: int, margin: int):
    # (branch, dilation, offset): offset = padding - margin for the forward and the kernel gradient,
    # padding + margin for the input gradient (sign +1).
    return tuple((b, d, d * (kernel_size - 1) // 2 + sign * margin) for b, d in enumerate(dilations))


def _pallas_forward(x: jax.Array, kernels: jax.Array, dilations: tuple[int, ...], margin: int) -> tuple[jax.Array, ...]:
    """Each branch's depthwise conv of ``x`` (kernels [B, k, k, C]), one Pallas kernel for all branches, on
    each device's part of the batch."""
    k, interpret = kernels.shape[1], pallas_interpret()
    terms = tuple((0, b, d, offset, b) for b, d, offset in _pallas_terms(k, dilations, -1, margin))
    size = (x.shape[1] - 2 * margin, x.shape[2] - 2 * margin)
    return sharding.over_batch(
        lambda x, kernels: depthwise_pallas.correlate_terms(
            (x,), kernels, terms=terms, outputs=len(dilations), out_size=size, interpret=interpret
        ),
        x,
        kernels,
        batched=(True, False),
        summed=(False,) * len(dilations),
    )


def _pallas_input_gradient(
    x: jax.Array, kernels: jax.Array, dilations: tuple[int, ...], margin: int, grads: Sequence[jax.Array]
) -> jax.Array:
    """The sum of the branches' input gradients (their outputs' gradients correlated with the flipped
    kernels), one Pallas kernel."""
    k, interpret = kernels.shape[1], pallas_interpret()
    terms = tuple((b, b, d, offset, 0) for b, d, offset in _pallas_terms(k, dilations, 1, margin))
    (grad_x,) = sharding.over_batch(
        lambda flipped, *grads: depthwise_pallas.correlate_terms(
            grads, flipped, terms=terms, outputs=1, out_size=x.shape[1:3], out_dtype=x.dtype, interpret=interpret
        ),
        kernels[:, ::-1, ::-1],
        *grads,
        batched=(False,) + (True,) * len(grads),
        summed=(False,),
    )
    return grad_x


def _pallas_kernel_gradients(
    x: jax.Array, kernel_size: int, dilations: tuple[int, ...], margin: int, grads: Sequence[jax.Array]
) -> jax.Array:
    """[B, k*k, C] float32: each branch's kernel gradient, one Pallas kernel."""
    interpret, terms = pallas_interpret(), _pallas_terms(kernel_size, dilations, -1, margin)
    (taps,) = sharding.over_batch(
        lambda x, *grads: (
            depthwise_pallas.kernel_gradient_terms(x, grads, terms=terms, kernel_size=kernel_size, interpret=interpret),
        ),
        x,
        *grads,
        batched=(True,) * (len(grads) + 1),
        summed=(True,),
    )
    return taps


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _depthwise_shifted(
    x: jax.Array,
    kernel: jax.Array,
    dilation: int,
    margin: int = 0,
    forms: tuple[str, str, str] = ("shifted", "fused", "per_tap"),
) -> jax.Array:
    """``forms``: (forward, input gradient, kernel gradient) implementations, as in :class:`OpChoices`."""
    if forms[0] == "pallas":
        return _pallas_forward(x, kernel[None, :, :, 0], (dilation,), margin)[0]
    return _shifted_taps(x, kernel, dilation, margin).astype(x.dtype)


def _depthwise_shifted_fwd(
    x: jax.Array, kernel: jax.Array, dilation: int, margin: int, forms: tuple[str, str, str]
) -> tuple[jax.Array, tuple]:
    return _depthwise_shifted(x, kernel, dilation, margin, forms), (x, kernel)


def _tap_gradients(views: list[jax.Array], grad: jax.Array, *, form: str) -> jax.Array:
    """[k*k, C] kernel gradient of a depthwise conv: sum over B, H, W of each tap's view times ``grad``.

    ``form`` (``OpChoices.depthwise_kernel_grad``): ``'per_tap'``, ``'stacked'`` or ``'stacked_minor'``."""
    grad32 = grad.astype(jnp.float32)
    views = [view.astype(jnp.float32) for view in views]
    if form == "stacked_minor":
        # The taps as the minor dimension of one reduction to [C, k*k]: the threads of a warp that share a
        # channel read the same gradient element. With the taps major ('stacked') XLA:GPU gave each tap its
        # own thread blocks, which re-read the float32 gradient from memory once per tap: on an H200 two
        # branches' kernel gradients took 2.4 ms for 1 GB of unique traffic (batch 16, 480x480), about what
        # nine reads of the gradient cost. Not yet measured on a GPU.
        return jnp.sum(jnp.stack(views, axis=-1) * grad32[..., None], (0, 1, 2)).T
    if form == "per_tap":
        # XLA:CPU: nine reductions beat one over a stacked [k*k, B, H, W, C] operand by about 6% of the
        # EncNet+JPU R50 train step (batch 2, 256x256: 1.75 vs 1.86 s). The TPU compiler writes the stack
        # out in float32 (nine in-place updates, then four 10 ms reductions for the JPU at batch 16,
        # 480x480); nine sums take its EncNet+JPU train-step estimate from 280 to 218 ms
        # (experiments/tpu_aot.py, v5e).
        return jnp.stack([jnp.sum(view * grad32, (0, 1, 2)) for view in views])
    # XLA:GPU splits nine separate sums into several reduction kernels that each re-read x and the gradient;
    # one reduction over the stacked taps reads them once by the compile-only H200 estimate
    # (experiments/gpu_aot.py: the JPU's backward traffic at batch 16, 480x480 fell from 24.3 to 17.2 GB),
    # but on the H200 it ran at a tenth of that estimate's speed (see 'stacked_minor' above).
    return jnp.sum(jnp.stack(views) * grad32, (1, 2, 3))


def _depthwise_shifted_bwd(
    dilation: int, margin: int, forms: tuple[str, str, str], residuals: tuple, grad: jax.Array
) -> tuple[jax.Array, jax.Array]:
    _, input_grad, kernel_grad = forms
    x, kernel = residuals
    k = kernel.shape[0]
    if input_grad == "pallas":
        grad_x = _pallas_input_gradient(x, kernel[None, :, :, 0], (dilation,), margin, (grad,))
    else:
        grad_x = _xla_input_gradient(x, kernel, dilation, margin, grad, input_grad)
    if kernel_grad == "pallas":
        taps = _pallas_kernel_gradients(x, k, (dilation,), margin, (grad,))[0]
    else:
        taps = _tap_gradients(_shifted_views(x, k, dilation, margin), grad, form=kernel_grad)
    return grad_x, taps.reshape(kernel.shape).astype(kernel.dtype)


def _xla_input_gradient(
    x: jax.Array, kernel: jax.Array, dilation: int, margin: int, grad: jax.Array, form: str
) -> jax.Array:
    # Autodiff would transpose each tap's slice into a pad: nine padded copies of the incoming gradient,
    # summed (about 25 ms each on XLA:CPU for the JPU at batch 2, 256x256). The input gradient of a
    # stride-1 'same' correlation is the same correlation with the kernel flipped: one fused pass. For a
    # pre-padded input it is that correlation over the gradient padded by the margin (the whole array).
    grad_in = jnp.pad(grad, ((0, 0), (margin, margin), (margin, margin), (0, 0))) if margin else grad
    grad_x = _shifted_taps(grad_in, kernel[::-1, ::-1], dilation).astype(x.dtype)
    if form == "materialized":
        # XLA:GPU fused the four JPU branches' input gradients (added where their input is shared) into one
        # 36-tap kernel of 236 registers per thread at 12.5% occupancy: 7.7 ms of the EncNet+JPU R50 train
        # step at batch 16, 480x480 on an H200, for about 1.7 GB of traffic (0.4 ms at 4.3 TB/s).
        grad_x = jax.lax.optimization_barrier(grad_x)
    return grad_x


_depthwise_shifted.defvjp(_depthwise_shifted_fwd, _depthwise_shifted_bwd)


def depthwise_joint(
    x: jax.Array, kernels: Sequence[jax.Array], dilations: Sequence[int], margin: int
) -> tuple[jax.Array, ...]:
    """The depthwise convs of several branches over one input padded by ``margin`` (the JPU's), each
    kernel [k, k, 1, C] at its dilation, as Pallas kernels that serve all branches at once: one forward
    reads ``x`` once for every branch, one backward kernel writes the sum of the branches' input gradients
    (no per-branch gradient written and added) and one reads ``x`` once for all kernel gradients. For the
    all-Pallas forms (``depthwise``, ``depthwise_input_grad``, ``depthwise_kernel_grad`` = ``'pallas'``)."""
    return _depthwise_joint(x, jnp.stack([k[:, :, 0] for k in kernels]), tuple(dilations), margin)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _depthwise_joint(
    x: jax.Array, kernels: jax.Array, dilations: tuple[int, ...], margin: int
) -> tuple[jax.Array, ...]:
    return _pallas_forward(x, kernels, dilations, margin)


def _depthwise_joint_fwd(x, kernels, dilations, margin):
    return _depthwise_joint(x, kernels, dilations, margin), (x, kernels)


def _depthwise_joint_bwd(dilations, margin, residuals, grads):
    x, kernels = residuals
    grad_x = _pallas_input_gradient(x, kernels, dilations, margin, grads)
    taps = _pallas_kernel_gradients(x, kernels.shape[1], dilations, margin, grads)
    return grad_x, taps.reshape(kernels.shape).astype(kernels.dtype)


_depthwise_joint.defvjp(_depthwise_joint_fwd, _depthwise_joint_bwd)


class SeparableConv(nn.Module):
    """The reference's JPU branch: depthwise dilated conv -> norm -> pointwise 1x1 -> norm -> ReLU.

    There is no ReLU between the depthwise norm and the pointwise conv. Submodules: ``depthwise``,
    ``depthwise_norm``, ``pointwise``, ``pointwise_norm``. ``norm`` is ``'batch'`` (JPU) or ``'group'``
    (JPU_X's JUM units).
    """

    features: int
    dilation: int = 1
    kernel_size: int = 3
    norm: str = "batch"
    num_groups: int = 32
    dtype: Dtype = jnp.float32
    ops: OpChoices = DEFAULT_OPS
    margin: int = 0  # the input is already zero-padded by this much (see DepthwiseConv)

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False, *, stage: str = "all") -> jax.Array:
        """The branch on ``x``. ``stage`` (the JPU's joint depthwise, :func:`depthwise_joint`): ``'kernel'``
        returns the depthwise kernel only, ``'rest'`` takes ``x`` as the depthwise conv's output and applies
        the rest; ``'all'``: everything."""
        if stage not in ("all", "kernel", "rest"):
            raise ValueError(f"unknown stage {stage!r}; expected 'all', 'kernel' or 'rest'")
        if stage != "rest":
            x = DepthwiseConv(
                self.kernel_size,
                self.dilation,
                dtype=self.dtype,
                implementation=self.ops.depthwise,
                margin=self.margin,
                input_grad=self.ops.depthwise_input_grad,
                kernel_grad=self.ops.depthwise_kernel_grad,
                name="depthwise",
            )(x, train=train, kernel_only=stage == "kernel")
            if stage == "kernel":
                return x
        norm = functools.partial(
            make_norm,
            self.norm,
            train=train,
            dtype=self.dtype,
            num_groups=self.num_groups,
            folded=self.ops.norm == "folded",
            statistics=self.ops.norm_statistics,
        )
        x = norm(name="depthwise_norm")(x)
        if self.ops.separable == "split":
            # Keeps XLA from pulling the nine depthwise taps into the pointwise matmul's operand, where a
            # tiled GEMM would recompute them for every output tile.
            x = jax.lax.optimization_barrier(x)
        x = conv2d(self.features, 1, dtype=self.dtype, ops=self.ops, name="pointwise")(x)
        x = norm(name="pointwise_norm")(x)
        return nn.relu(x)


def channel_dropout(rate: float, *, train: bool, name: str | None = None) -> nn.Dropout:
    """PyTorch ``Dropout2d``: drops whole channels per example (mask broadcast over H and W)."""
    return nn.Dropout(rate=rate, broadcast_dims=(1, 2), deterministic=not train, name=name)


class Classifier(nn.Module):
    """Channel dropout then a 1x1 conv with bias to ``num_classes`` (the heads' last layers), in float32."""

    num_classes: int
    dropout: float = 0.1
    ops: OpChoices = DEFAULT_OPS

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        x = channel_dropout(self.dropout, train=train)(x)
        # The logits are computed in float32 whatever the compute dtype: the last layer is cheap (C outputs)
        # and the loss and argmax see full-precision values.
        return conv2d(self.num_classes, 1, use_bias=True, dtype=jnp.float32, ops=self.ops, name="conv")(x)

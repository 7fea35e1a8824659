"""How the performance-sensitive ops are computed (:class:`OpChoices`) and the backend they are chosen for.

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
- Stride-1 kxk convolutions over small maps (``small_maps``; at most ``layers.SMALL_MAP_PIXELS`` = 256 output
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
  The variables must be transformed by :func:`batch_norm.fold_batch_norm`; evaluation only. ``'standard'`` is the
  default and the only choice for training.
- A convolution over a concatenation that includes upsampled pooled maps (PSP's 3x3 conv over the input and
  its four pyramid levels, DeepLabV3's projection over its image-pooling branch), ``resized``:
  ``'low_res'`` applies the kernel's taps to the pooled maps at their own size (1x1 to 6x6) and resizes the
  products (:func:`resize.conv_of_resized`; resizing and a tap's channel mixing commute), ``'upsampled'`` resizes
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
  ``'joint'`` (:func:`depthwise.depthwise_joint`: one kernel per pass serves the four branches, reading the padded
  input once and writing one summed input gradient instead of four that XLA then adds). Compile-only H200
  (EncNet+JPU R50 train step at batch 16, 480x480, all Pallas kernels): 64.1 -> 60.2 GB, roofline 19.9 ->
  19.0 ms; but ptxas gives the joint kernels 174 (forward) and 255 registers with spills (gradients)
  against 71 / 128 / 176 per branch, and on the H200 the step took 37.3 ms against 34.3 per branch.
- The stem's max-pool gradient (``max_pool_grad``): ``'taps'`` (:func:`layers.max_pool`: each window's first
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
import warnings
from collections.abc import Iterator, Mapping

import jax

from fastfcn_jax import sharding


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
    # per branch) | 'joint' (one kernel per pass for the four branches: depthwise.depthwise_joint)
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

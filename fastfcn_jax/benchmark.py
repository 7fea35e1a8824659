"""Forward-pass latency and XLA-counted FLOPs of FastFCN models, dilated and JPU backbones side by side.

Reproduces the paper's speed comparison (FastFCN Table 1: dilated FCN vs. JPU) in JAX: every model is
timed in inference mode (``train=False``) on random weights and a fixed random input, and its FLOPs are
taken from XLA's cost analysis of the compiled forward pass. Each ``X_jpu_S`` / ``X_jpux_S`` model is
paired with ``X_dilated_S`` when both are benchmarked, giving the speed-up (dilated latency / JPU latency)
and the FLOP ratio.

TensorFlow-free on purpose (only jax, flax, numpy and :mod:`fastfcn_jax.models`), so it runs on a bare
accelerator image.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Mapping, Sequence
from datetime import datetime, timezone
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np

from fastfcn_jax import sharding
from fastfcn_jax.models import create_model
from fastfcn_jax.models.batch_norm import fold_batch_norm
from fastfcn_jax.models.op_choices import op_overrides, xla_forms
from fastfcn_jax.summary import count_parameters

DEFAULT_MODELS = (
    "encnet_jpu_r50",
    "encnet_dilated_r50",
    "psp_jpu_r50",
    "psp_dilated_r50",
    "deeplab_jpu_r50",
    "deeplab_dilated_r50",
)
JPU_NECKS = ("jpu", "jpux")

# Distinct keys so the input does not depend on how many models were initialised before it.
_INPUT_SEED = 0
_PARAM_SEED = 1


def _split_name(name: str) -> tuple[str, str, str]:
    head, neck, size = name.split("_")
    return head, neck, size


def tiny_variant(name: str) -> str:
    """``'encnet_jpu_r50'`` -> ``'encnet_jpu_tiny'``: the same head and neck at the tiny test size."""
    head, neck, _ = _split_name(name)
    return f"{head}_{neck}_tiny"


def xla_flops(computation: Any) -> float | None:
    """FLOPs from XLA's cost analysis of a ``jax.stages.Lowered`` (or ``Compiled``), or ``None`` if there is none.

    Pass the *lowered* computation: its HLO is the program as traced, before the backend rewrites it. A
    compiled GPU program hides its convolutions in cuDNN custom calls that the analysis does not count
    (seen on an H200, jax 0.11.2: EncNet+JPU R50 counted 27 of its 133 GFLOPs, 1.6 with 1x1 convs as convs),
    which made achieved FLOP/s meaningless there. ``cost_analysis()`` returns a dict in recent jax and a
    list with one dict per device program in older ones; it may also be ``None`` or lack ``'flops'``.
    XLA counts a multiply-add as two FLOPs.
    """
    analysis = computation.cost_analysis()
    if isinstance(analysis, Sequence):
        analysis = analysis[0] if analysis else None
    if not isinstance(analysis, Mapping) or "flops" not in analysis:
        return None
    flops = float(analysis["flops"])
    # Some backends report -1 for "unknown".
    return flops if flops >= 0 else None


def environment() -> dict[str, Any]:
    """Software and device facts that make a timing reproducible."""
    device = jax.devices()[0]
    return {
        "backend": jax.default_backend(),
        "device_kind": device.device_kind,
        "device_count": jax.device_count(),
        "jax_version": jax.__version__,
        "jaxlib_version": _jaxlib_version(),
        "flax_version": flax.__version__,
        "numpy_version": np.__version__,
        "python_version": platform.python_version(),
        "platform": platform.platform(),
        "host_cpu": host_cpu(),
        # With a persistent compilation cache a "compile" may be a load from it (JAX_COMPILATION_CACHE_DIR).
        "compilation_cache": jax.config.jax_compilation_cache_dir,
        "timestamp": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def host_cpu(cpuinfo: str = "/proc/cpuinfo") -> str:
    """``'AMD EPYC, 2 cores, avx2'``: the host CPU's model, usable cores and widest vector extension.

    On a CPU backend this is the device; JAX calls every CPU ``'cpu'``. Two machines of this project's own
    kind differed 2.5x in matmul speed (an AVX-512 Xeon, an AVX2 EPYC), so a CPU timing without it is not
    reproducible."""
    model, flags = platform.processor() or platform.machine(), set()
    try:
        with open(cpuinfo) as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "model name" and value.strip():
                    model = value.strip()
                elif key.strip() == "flags":
                    flags = set(value.split())
                    break
    except OSError:
        pass
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    vector = next((v for v in ("avx512f", "avx2", "avx") if v in flags), None)
    return ", ".join(str(part) for part in (model, f"{cores} cores", vector) if part)


def describe_device(env: Mapping[str, Any]) -> str:
    """``'NVIDIA H200 (gpu), jax 0.11.2'`` or, on CPUs, ``'AMD EPYC, 2 cores, avx2 (cpu), jax 0.10.2'``."""
    device = (env.get("host_cpu") or env["device_kind"]) if env["backend"] == "cpu" else env["device_kind"]
    return f"{device} ({env['backend']}), jax {env['jax_version']}"


def _jaxlib_version() -> str | None:
    try:
        import jaxlib

        return jaxlib.__version__
    except (ImportError, AttributeError):
        return None


def synthetic_variables(model: Any, images: jax.Array, seed: int = _PARAM_SEED) -> dict[str, Any]:
    """Variables of ``model``'s shapes filled without running ``model.init``.

    Jitting ``model.init`` compiles the whole forward a second time (10-15 s per R50 model on an H200,
    more than the forward's own compilation); timings do not depend on the values as long as they are
    finite, so kernels are drawn with variance 1/fan_in (activations stay O(1) through the eval-mode BN),
    scales and variances are 1, biases and means 0.
    """
    shapes = jax.eval_shape(functools.partial(model.init, train=False), jax.random.PRNGKey(seed), images)
    leaves, treedef = jax.tree_util.tree_flatten_with_path(shapes)
    keys = jax.random.split(jax.random.PRNGKey(seed), len(leaves))
    values = []
    for key, (path, leaf) in zip(keys, leaves, strict=True):
        name = str(getattr(path[-1], "key", path[-1]))
        if name in ("scale", "var"):
            value = jnp.ones(leaf.shape, leaf.dtype)
        elif name in ("bias", "mean") or not leaf.shape:
            value = jnp.zeros(leaf.shape, leaf.dtype)
        else:
            fan_in = max(1, math.prod(leaf.shape[:-1]))
            value = (jax.random.normal(key, leaf.shape, jnp.float32) / math.sqrt(fan_in)).astype(leaf.dtype)
        values.append(value)
    return jax.tree_util.tree_unflatten(treedef, values)


@dataclasses.dataclass
class CompiledForward:
    """A registered model's compiled forward pass with its inputs (see :func:`compile_forward`)."""

    info: dict[str, Any]  # name, settings, parameter count, FLOPs, compile time
    compiled: Any
    arguments: tuple

    def run(self) -> Any:
        return self.compiled(*self.arguments)


def compile_forward(
    name: str,
    *,
    num_classes: int = 150,
    image_size: tuple[int, int] = (512, 512),
    batch_size: int = 1,
    dtype: str = "float32",
    aux: bool = True,
    ops: Mapping[str, str] | None = None,
    until: str | None = None,
    constant_weights: bool = False,
) -> CompiledForward:
    """Compiles ``model.apply(variables, images, train=False)`` for one registered model, on random
    weights and a fixed random input (the options as :func:`benchmark_model`'s)."""
    height, width = (int(s) for s in image_size)
    model = create_model(name, num_classes, dtype=dtype, aux=aux, **op_overrides(ops))
    images = jax.random.normal(jax.random.PRNGKey(_INPUT_SEED), (batch_size, height, width, 3), jnp.float32)
    variables = synthetic_variables(model, images)
    if model.ops.norm == "folded":
        variables = fold_batch_norm(variables)

    # By default the variables are an argument rather than a closure, so XLA cannot constant-fold the
    # weights: the program measured is the one training and evaluation run (constant_weights: as exported).
    apply: Any = functools.partial(model.apply, train=False)
    if until is not None:
        sown = jax.eval_shape(functools.partial(model.apply, train=False, mutable=["intermediates"]), variables, images)
        available = sorted(sown[1]["intermediates"])
        if until not in available:
            raise ValueError(f"{name} has no feature map {until!r} to stop at; it has {available}")

        def forward_until(variables: Any, images: jax.Array) -> jax.Array:
            _, state = model.apply(variables, images, train=False, mutable=["intermediates"])
            return state["intermediates"][until]

        apply = forward_until
    start = time.perf_counter()
    # FLOPs of the program with the weights as arguments: closed over as constants, the weights' own
    # arithmetic (casts, folded scales) would run at trace time and drop out of the count.
    counted, counted_arguments = apply, (variables, images)
    if constant_weights:
        # Concrete arrays closed over by the jitted function become constants of the program.
        apply = functools.partial(apply, variables)
        arguments: tuple = (images,)
    else:
        arguments = (variables, images)
    lowered = jax.jit(apply).lower(*arguments)
    compiled = lowered.compile()
    compile_s = time.perf_counter() - start
    head, neck, size = _split_name(name)
    info = {
        "name": name,
        "head": head,
        "neck": neck,
        "size": size,
        "num_classes": num_classes,
        "image_size": [height, width],
        "batch_size": batch_size,
        "dtype": dtype,
        "aux": aux,
        "ops": dict(ops or {}),
        "until": until,
        "constant_weights": constant_weights,
        "params": count_parameters(variables["params"]),
        "flops": _flops(counted, counted_arguments, lowered, compiled),
        "compile_s": compile_s,
    }
    return CompiledForward(info, compiled, arguments)


def _forward_result(forward: CompiledForward, times_ms: Sequence[float], warmup: int, interleaved: bool) -> dict:
    median_ms = statistics.median(times_ms)
    return {
        **forward.info,
        "latency_ms": {
            "median": median_ms,
            "mean": statistics.fmean(times_ms),
            "min": min(times_ms),
            "max": max(times_ms),
            "runs": list(times_ms),
        },
        "images_per_s": forward.info["batch_size"] * 1e3 / median_ms,
        "warmup": warmup,
        "repeats": len(times_ms),
        "interleaved": interleaved,
    }


def _check_runs(warmup: int, repeats: int) -> None:
    if warmup < 0 or repeats < 1:
        raise ValueError(f"need warmup >= 0 and repeats >= 1, got warmup={warmup}, repeats={repeats}")


def benchmark_model(name: str, *, warmup: int = 2, repeats: int = 5, **options: Any) -> dict[str, Any]:
    """Times ``model.apply(variables, images, train=False)`` for one registered model.

    Options (:func:`compile_forward`): ``num_classes``, ``image_size``, ``batch_size``, ``dtype``, ``aux``;
    ``ops`` chooses op implementations (``{'depthwise': 'grouped'}`` sets the model's
    ``depthwise_implementation``; see :class:`fastfcn_jax.models.op_choices.OpChoices`). ``until`` times only
    the network up to one sown feature map (``'c4'``: the backbone; ``'jpu'``: backbone and neck;
    ``'head'``: all but the final upsampling): XLA drops everything the map does not depend on, so
    differences between such runs locate where the time goes. ``constant_weights`` compiles the weights
    into the program, as a deployment does (``export_stablehlo(embed_params=True)``): XLA then folds the
    BatchNorm parameter arithmetic and the weights' dtype and layout conversions at compile time instead of
    running them as kernels on every call (a third of EncNet+JPU R50's kernels at batch 1 on a GPU, which is
    bound by kernel count there). Returns a JSON-ready
    dict: latency statistics in milliseconds (median over ``repeats`` runs after ``warmup`` untimed ones),
    XLA FLOPs, compile time, parameter count and the settings used.
    """
    _check_runs(warmup, repeats)
    forward = compile_forward(name, **options)
    return _forward_result(forward, time_calls(forward.run, (), warmup, repeats), warmup, False)


def benchmark_models_interleaved(
    names: Sequence[str], *, warmup: int = 2, repeats: int = 5, log: bool = False, **options: Any
) -> dict[str, dict[str, Any]]:
    """:func:`benchmark_model` for several models, timed in turn: all are compiled and warmed up, then
    each round runs every model once untimed and once timed. A machine whose speed drifts over minutes (a
    shared CPU, a GPU's clocks) then slows all models alike, so the dilated/JPU ratios hold up better than
    when one model's runs follow the other's (on this project's 2-core CPU the EncNet R50 pair measured
    1.99x one after the other, 1.86x in turn, 2.00x in turn with the untimed runs). The untimed run makes
    each timed one follow a run of the same model, as in serving: a run right after another model's was up
    to 10% slower on XLA:CPU in some rounds. Holds every model's weights and program at once."""
    _check_runs(warmup, repeats)
    forwards = {}
    for name in dict.fromkeys(names):
        if log:
            print(f"compiling {name} ...", file=sys.stderr, flush=True)
        forwards[name] = compile_forward(name, **options)
        for _ in range(warmup):
            jax.block_until_ready(forwards[name].run())
    times: dict[str, list[float]] = {name: [] for name in forwards}
    for round_ in range(repeats):
        for name, forward in forwards.items():
            times[name] += time_calls(forward.run, (), warmup=1, repeats=1)
        if log:
            print(
                f"  round {round_ + 1}/{repeats}: " + ", ".join(f"{n} {t[-1]:.1f} ms" for n, t in times.items()),
                file=sys.stderr,
                flush=True,
            )
    return {name: _forward_result(forward, times[name], warmup, True) for name, forward in forwards.items()}


def _flops(fn: Any, arguments: tuple, lowered: Any, compiled: Any) -> float | None:
    """The FLOPs of the program ``fn`` (the Python function, not jitted) traces, counted on its lowering for
    the CPU: on an H200 with jax 0.11.2 the GPU lowering's cost analysis counted what the compiled program
    does outside cuDNN (EncNet+JPU R50 train step at batch 16, 480x480: 705 of its about 5600 GFLOPs), so
    the count would depend on the backend. Pallas kernels are counted as their XLA forms (they have no CPU
    lowering, and the analysis does not see into them). A failed CPU lowering is reported on stderr (the
    fallbacks, the program's own lowering and then its compiled form, undercount on GPUs)."""
    # Shapes only: the arguments' placement on an accelerator must not pin the lowering to it.
    shapes = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), arguments)

    def trace_anew() -> Any:
        # A new function object: jit's trace cache would otherwise hand back the program traced with its
        # Pallas kernels, whatever the xla_forms() setting.
        return jax.jit(lambda *args: fn(*args))

    attempts = (
        ("lowering_platforms=('cpu',)", lambda: trace_anew().trace(*shapes).lower(lowering_platforms=("cpu",))),
        ("default_device(cpu)", lambda: _lower_on_cpu_device(trace_anew(), shapes)),
    )
    flops = None
    for name, lower in attempts:
        try:
            with xla_forms():
                flops = xla_flops(lower())
        except Exception as error:  # noqa: BLE001 - e.g. arguments sharded over accelerator devices
            print(f"FLOP count: CPU lowering by {name} failed: {type(error).__name__}: {error}"[:400], file=sys.stderr)
            continue
        if flops is not None:
            return flops
    if flops is None:
        flops = xla_flops(lowered)
    return flops if flops is not None else xla_flops(compiled)


def _lower_on_cpu_device(jitted: Any, shapes: tuple) -> Any:
    with jax.default_device(jax.devices("cpu")[0]):
        return jitted.lower(*shapes)


def time_calls(fn: Any, args: tuple, warmup: int, repeats: int) -> list[float]:
    """Milliseconds of each of ``repeats`` calls of ``fn(*args)`` (waited for), after ``warmup`` untimed ones."""
    for _ in range(warmup):
        jax.block_until_ready(fn(*args))
    times_ms = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times_ms.append((time.perf_counter() - start) * 1e3)
    return times_ms


def matmul_peak(dtype: str = "float32", size: int = 4096, repeats: int = 5) -> dict[str, Any]:
    """The machine's own matmul speed in ``dtype``: a [size, size] x [size, size] product, best of ``repeats``.

    The reference point for "achieved FLOP/s as a fraction of peak". On CPU a 2048 matmul already saturates
    the cores; accelerators need larger products to reach their peak.
    """
    a = jax.random.normal(jax.random.PRNGKey(0), (size, size), jnp.float32).astype(dtype)
    compiled = jax.jit(lambda x: x @ x).lower(a).compile()
    times_ms = time_calls(compiled, (a,), warmup=2, repeats=repeats)
    best_s = min(times_ms) / 1e3
    return {"dtype": dtype, "size": size, "gflops_per_s": 2.0 * size**3 / best_s / 1e9, "best_ms": min(times_ms)}


@dataclasses.dataclass
class CompiledTrainStep:
    """A compiled training step with its inputs: ``run(state)`` takes one step and returns the new state
    (the state is donated: thread it through)."""

    lowered: Any
    compiled: Any
    compile_s: float
    state: Any
    batch: dict[str, jax.Array]
    rng: jax.Array
    flops: float | None = None  # of the program as traced (see _flops)

    def run(self, state: Any) -> Any:
        return self.compiled(state, self.batch, self.rng)[0]

    def timed_steps(self, state: Any, warmup: int, repeats: int) -> tuple[Any, list[float]]:
        """(the state after ``warmup + repeats`` steps from ``state``, each timed step's milliseconds)."""
        for _ in range(warmup):
            state = jax.block_until_ready(self.run(state))
        times_ms = []
        for _ in range(repeats):
            start = time.perf_counter()
            state = jax.block_until_ready(self.run(state))
            times_ms.append((time.perf_counter() - start) * 1e3)
        return state, times_ms

    def back_to_back_ms(self, state: Any, steps: int) -> tuple[Any, float]:
        """(the state after ``steps`` more steps, milliseconds per step) with the steps dispatched back to back
        and one wait at the end, as the training loop runs them (it syncs once per log interval): the host's
        dispatch of step n+1 overlaps the device's step n, which :meth:`timed_steps` (one wait per step)
        adds to every step (H200, EncNet+JPU R50 at batch 16, 480x480: 43 ms of kernels, 51 ms per waited
        step)."""
        state = jax.block_until_ready(state)
        start = time.perf_counter()
        for _ in range(steps):
            state = self.run(state)
        state = jax.block_until_ready(state)
        return state, (time.perf_counter() - start) * 1e3 / steps


def recipe_train_step(model: Any, name: str) -> tuple[Any, Any]:
    """(optimizer, train_step) of the paper's recipe for model ``name``: SGD with the poly schedule and the 10x
    new-layer rate, aux loss weight 0.2 and, for EncNet, the SE loss (0.2)."""
    from fastfcn_jax import optim
    from fastfcn_jax.train import make_train_step

    optimizer = optim.make_optimizer(optim.poly_schedule(0.01, 1000))
    step = make_train_step(model, optimizer, aux_weight=0.2, se_weight=0.2 if name.startswith("encnet") else 0.0)
    return optimizer, step


def compile_train_step(
    name: str,
    *,
    num_classes: int = 150,
    image_size: tuple[int, int] = (256, 256),
    batch_size: int = 2,
    dtype: str = "float32",
    ops: Mapping[str, str] | None = None,
) -> CompiledTrainStep:
    """The jitted training step of :mod:`fastfcn_jax.train` (forward, backward, SGD update, BN statistics;
    aux and SE losses as the paper's recipe) for a registered model, compiled with the state donated, on
    random images and labels."""
    from fastfcn_jax.train import TrainState

    height, width = (int(s) for s in image_size)
    model = create_model(name, num_classes, dtype=dtype, **op_overrides(ops))
    optimizer, step = recipe_train_step(model, name)
    key = jax.random.PRNGKey(_INPUT_SEED)
    batch = {
        "image": jax.random.normal(key, (batch_size, height, width, 3), jnp.float32),
        "label": jax.random.randint(key, (batch_size, height, width), -1, num_classes, jnp.int32),
    }
    variables = synthetic_variables(model, batch["image"][:1])
    state = TrainState(
        step=jnp.zeros((), jnp.int32),
        params=variables["params"],
        batch_stats=variables["batch_stats"],
        opt_state=jax.jit(optimizer.init)(variables["params"]),
    )
    rng = jax.random.PRNGKey(2)
    start = time.perf_counter()
    # Traced with a one-device mesh as the training loop traces it, so 'auto' op choices resolve as there
    # (op_choices.pallas_for_auto) on a host with several devices too.
    jitted = jax.jit(sharding.with_mesh(step, sharding.make_mesh(1)), donate_argnums=0)
    lowered = jitted.lower(state, batch, rng)
    compiled = lowered.compile()
    compile_s = time.perf_counter() - start
    flops = _flops(step, (state, batch, rng), lowered, compiled)
    return CompiledTrainStep(lowered, compiled, compile_s, state, batch, rng, flops)


def benchmark_train_step(
    name: str,
    *,
    num_classes: int = 150,
    image_size: tuple[int, int] = (256, 256),
    batch_size: int = 2,
    warmup: int = 2,
    repeats: int = 5,
    dtype: str = "float32",
    ops: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """Times :func:`compile_train_step`'s step, as :mod:`fastfcn_jax.train` runs it."""
    height, width = (int(s) for s in image_size)
    step = compile_train_step(
        name, num_classes=num_classes, image_size=image_size, batch_size=batch_size, dtype=dtype, ops=ops
    )
    state, times_ms = step.timed_steps(step.state, warmup, repeats)
    median_ms = statistics.median(times_ms)
    _, back_to_back_ms = step.back_to_back_ms(state, repeats)
    return {
        "name": name,
        "kind": "train_step",
        "ops": dict(ops or {}),
        "num_classes": num_classes,
        "image_size": [height, width],
        "batch_size": batch_size,
        "dtype": dtype,
        "aux": True,  # the recipe's losses: main, aux (and EncNet's SE), whatever the forward settings say
        "warmup": warmup,
        "repeats": repeats,
        "flops": step.flops,
        "compile_s": step.compile_s,
        "latency_ms": {"median": median_ms, "min": min(times_ms), "max": max(times_ms), "runs": times_ms},
        "images_per_s": batch_size * 1e3 / median_ms,
        "back_to_back_ms": back_to_back_ms,
        "back_to_back_images_per_s": batch_size * 1e3 / back_to_back_ms,
    }


def benchmark_input_pipeline(
    dataset: str,
    *,
    data_dir: str | None,
    batch_size: int = 16,
    crop_size: int | None = None,
    batches: int = 20,
    warmup: int = 3,
) -> dict[str, Any]:
    """Images/s of the training input pipeline (decode, augment, batch on the host CPU) for ``dataset``.

    Imports TensorFlow (lazily): not for the TensorFlow-free accelerator path. The dataset must be prepared
    (``python -m fastfcn_jax.data.prepare``); ``synthetic_shapes`` is built on the fly.
    """
    from fastfcn_jax.data import pipeline

    if dataset == "synthetic_shapes":
        pipeline.prepare(dataset, data_dir)
    iterator = pipeline.train_batches(  # as training reads it: uint8 images, normalised by the step
        dataset, data_dir=data_dir, batch_size=batch_size, seed=0, crop_size=crop_size, normalise=False
    )
    for _ in range(warmup):
        next(iterator)
    start = time.perf_counter()
    for _ in range(batches):
        batch = next(iterator)
    seconds = time.perf_counter() - start
    return {
        "dataset": dataset,
        "batch_size": batch_size,
        "crop_size": list(batch["image"].shape[1:3]),
        "batches": batches,
        "images_per_s": batches * batch_size / seconds,
    }


def benchmark_evaluation(
    name: str,
    *,
    protocol: str = "multi_scale",
    num_classes: int = 150,
    image_size: tuple[int, int] = (512, 683),
    base_size: int = 520,
    crop_size: int = 480,
    images: int = 8,
    dtype: str = "float32",
    window_batch: int = 8,
    images_per_call: int = 4,
    devices: Sequence[Any] | None = None,
    dataset: str = "",
) -> dict[str, Any]:
    """Images/s of ``--mode=eval``'s test protocol (``evaluate.ProtocolRunner``: windows, flip, every scale,
    the resize back, argmax, confusion) on random weights and random images of one size, over ``devices``
    (None: ``sharding.evaluation_devices()``), after compiling; and the host's share: its preparation of one
    image (resize to every scale, windows, the network's input batches) alone. Defaults: ADE20K's typical image
    at its multi-scale protocol."""
    from fastfcn_jax import evaluate

    height, width = (int(s) for s in image_size)
    model = create_model(name, num_classes, dtype=dtype)
    variables = synthetic_variables(model, jnp.zeros((1, crop_size, crop_size, 3), jnp.float32))
    settings = evaluate.make_protocol(protocol, base_size=base_size, crop_size=crop_size, dataset=dataset)
    devices = list(devices) if devices is not None else sharding.evaluation_devices()
    runner = evaluate.ProtocolRunner(
        evaluate.model_logits_fn(model),
        variables,
        num_classes,
        settings,
        window_batch=window_batch,
        images_per_call=images_per_call,
        devices=devices,
    )
    rng = np.random.default_rng(_INPUT_SEED)
    pictures = [rng.normal(size=(height, width, 3)).astype(np.float32) for _ in range(max(images, 1))]
    start = time.perf_counter()
    runner.compile_all()
    list(runner.run(pictures[: len(devices) * images_per_call]))  # every device's first group: warm
    warm_s = time.perf_counter() - start
    start = time.perf_counter()
    for _ in runner.run(pictures):
        pass
    seconds = time.perf_counter() - start
    start = time.perf_counter()  # the host's share of one image: its scales, windows and batches
    windows = list(runner._windows(0, runner._scaled(pictures[:1])[0]))
    for _ in runner._batches(windows):
        pass
    host_s = time.perf_counter() - start
    return {
        "name": name,
        "protocol": protocol,
        "scales": list(settings.scales),
        "flip": settings.flip,
        "image_size": [height, width],
        "base_size": base_size,
        "crop_size": crop_size,
        "dtype": dtype,
        "devices": len(devices),
        "images": len(pictures),
        "windows_per_image": len(windows),
        "images_per_s": len(pictures) / seconds,
        "host_ms_per_image": 1e3 * host_s,
        "compile_and_warmup_s": warm_s,
        "compilations": runner.compile_count,
    }


def format_evaluation(result: Mapping[str, Any]) -> str:
    """One markdown table row set for :func:`benchmark_evaluation`'s result."""
    scales = ", ".join(f"{s:g}" for s in result["scales"]) + (", flip" if result["flip"] else "")
    return "\n".join(
        [
            "| model | protocol | image | windows / image | devices | images/s | host ms / image |",
            "|---|---|---|---:|---:|---:|---:|",
            f"| {result['name']} ({result['dtype']}) | {result['protocol']} ({scales})"
            f" | {result['image_size'][0]}x{result['image_size'][1]} | {result['windows_per_image']} | "
            f"{result['devices']} | {result['images_per_s']:.2f} | {result['host_ms_per_image']:.0f} |",
        ]
    )


def _ratio(numerator: float | None, denominator: float | None) -> float | None:
    if numerator is None or not denominator:
        return None
    return numerator / denominator


def compare_pairs(models: Mapping[str, Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Pairs every benchmarked ``X_jpu_S`` (and ``X_jpux_S``) with ``X_dilated_S``.

    ``speedup`` is dilated latency / JPU latency and ``flop_ratio`` dilated FLOPs / JPU FLOPs, so values
    above 1 mean the JPU model is faster / cheaper.
    """
    pairs = []
    for name, fast in models.items():
        head, neck, size = _split_name(name)
        dilated = models.get(f"{head}_dilated_{size}")
        if neck not in JPU_NECKS or dilated is None:
            continue
        pairs.append(
            {
                "head": head,
                "size": size,
                "jpu": name,
                "dilated": dilated["name"],
                "jpu_latency_ms": fast["latency_ms"]["median"],
                "dilated_latency_ms": dilated["latency_ms"]["median"],
                "speedup": _ratio(dilated["latency_ms"]["median"], fast["latency_ms"]["median"]),
                "jpu_flops": fast["flops"],
                "dilated_flops": dilated["flops"],
                "flop_ratio": _ratio(dilated["flops"], fast["flops"]),
            }
        )
    return pairs


def run_benchmark(
    names: Sequence[str],
    *,
    log: bool = True,
    peak: bool = True,
    train_names: Sequence[str] = (),
    train_sizes: Sequence[tuple[int, int]] = ((256, 256),),
    train_batch_size: int = 2,
    interleave: bool = True,
    **kwargs: Any,
) -> dict[str, Any]:
    """Benchmarks each model in ``names`` (``kwargs`` go to :func:`benchmark_model`) and pairs them.

    With ``interleave`` (and more than one model) the forward passes are timed in turn, round by round
    (:func:`benchmark_models_interleaved`), otherwise one model after the other.
    With ``peak`` also measures the machine's matmul speed in the same dtype, so achieved FLOP/s read as a
    fraction of it; ``train_names`` are also timed as training steps at each of ``train_sizes`` with
    ``train_batch_size`` images. Returns ``{'environment', 'settings', 'peak', 'models': {name: result},
    'pairs': [...], 'train_steps': [...]}``. Progress goes to stderr when ``log`` so that stdout can carry
    the JSON.
    """
    names, train_names = list(dict.fromkeys(names)), list(dict.fromkeys(train_names))
    if not names and not train_names:
        raise ValueError("no models to benchmark")
    defaults = {
        key: parameter.default
        for function in (benchmark_model, compile_forward)
        for key, parameter in inspect.signature(function).parameters.items()
        if parameter.default is not inspect.Parameter.empty
    }
    unknown = set(kwargs) - set(defaults)
    if unknown:
        raise TypeError(f"unknown benchmark option(s) {sorted(unknown)}; known: {sorted(defaults)}")
    settings = {**defaults, **kwargs}
    settings = {
        "num_classes": settings["num_classes"],
        "image_size": [int(s) for s in settings["image_size"]],
        "batch_size": settings["batch_size"],
        "dtype": settings["dtype"],
        "aux": settings["aux"],
        "ops": dict(settings["ops"] or {}),
        "until": settings["until"],
        "constant_weights": settings["constant_weights"],
        "warmup": settings["warmup"],
        "repeats": settings["repeats"],
        "interleaved": bool(interleave and len(names) > 1),
    }
    _check_runs(settings["warmup"], settings["repeats"])
    if train_names and settings["ops"].get("norm") == "folded":  # found at the train step's trace otherwise
        raise ValueError("ops norm=folded folds inference BatchNorms: it cannot time train steps (train_names)")
    for name in [*names, *train_names]:
        # Fail before spending minutes on the models that precede a typo.
        create_model(name, settings["num_classes"], **op_overrides(settings["ops"]))
    models: dict[str, dict[str, Any]] = {}
    if interleave and len(names) > 1:
        models = benchmark_models_interleaved(names, log=log, **kwargs)
    else:
        for name in names:
            if log:
                print(f"benchmarking {name} ...", file=sys.stderr, flush=True)
            models[name] = benchmark_model(name, **kwargs)
            if log:
                median, compile_s = models[name]["latency_ms"]["median"], models[name]["compile_s"]
                print(f"  {median:.1f} ms, compile {compile_s:.1f} s", file=sys.stderr, flush=True)
    train_steps = []
    for name in train_names:
        for size in train_sizes:
            if log:
                print(f"benchmarking the train step of {name} at {size} ...", file=sys.stderr, flush=True)
            train_steps.append(
                benchmark_train_step(
                    name,
                    num_classes=settings["num_classes"],
                    image_size=size,
                    batch_size=train_batch_size,
                    warmup=settings["warmup"],
                    repeats=settings["repeats"],
                    dtype=settings["dtype"],
                    ops=settings["ops"],
                )
            )
    peak_result = (
        matmul_peak(settings["dtype"], size=2048 if jax.default_backend() == "cpu" else 8192) if peak else None
    )
    for result in [*models.values(), *train_steps]:
        achieved = None if result["flops"] is None else result["flops"] / (result["latency_ms"]["median"] / 1e3) / 1e9
        result["achieved_gflops_per_s"] = achieved
        result["fraction_of_peak"] = _ratio(achieved, peak_result["gflops_per_s"]) if peak_result else None
    for result in train_steps:
        achieved = None if result["flops"] is None else result["flops"] / (result["back_to_back_ms"] / 1e3) / 1e9
        result["back_to_back_gflops_per_s"] = achieved
        result["back_to_back_fraction_of_peak"] = _ratio(achieved, peak_result["gflops_per_s"]) if peak_result else None
    return {
        "environment": environment(),
        "settings": settings,
        "peak": peak_result,
        "models": models,
        "pairs": compare_pairs(models),
        "train_steps": train_steps,
    }


def _fmt(value: float | None, spec: str, suffix: str = "") -> str:
    return "n/a" if value is None else format(value, spec) + suffix


def _gflops(flops: float | None) -> str:
    if flops is None:
        return "n/a"
    gflops = flops / 1e9
    # Tiny test models are well under 1 GFLOP; a fixed one decimal would print them all as 0.0.
    return f"{gflops:.1f}" if gflops >= 10 else f"{gflops:.3g}"


def _ms(value: float) -> str:
    # Accelerator latencies are a few milliseconds: one decimal would hide the differences.
    return f"{value:.2f}" if value < 10 else f"{value:.1f}"


def format_table(results: Mapping[str, Any]) -> str:
    """Markdown tables of per-model results and dilated-vs-JPU pairs, with a one-line header."""
    env, settings = results["environment"], results["settings"]
    height, width = settings["image_size"]
    # Train steps take their own sizes and batch (their rows say which) and always the recipe's aux head.
    shape = f"{height}x{width}, batch {settings['batch_size']}, " if results["models"] else "train steps only, "
    aux = settings["aux"] if results["models"] else True
    lines = [
        f"{describe_device(env)}; {shape}{settings['num_classes']} classes, {settings['dtype']}, "
        f"aux {'on' if aux else 'off'}; median of {settings['repeats']} runs "
        f"after {settings['warmup']} warm-up"
        + ("; models timed in turn, round by round" if settings.get("interleaved") else "")
        + (f"; ops {', '.join(f'{k}={v}' for k, v in settings['ops'].items())}" if settings.get("ops") else "")
        + (f"; forward only up to {settings['until']}" if settings.get("until") else "")
        + ("; weights compiled in as constants" if settings.get("constant_weights") else "")
        + ("; compile times may be loads from a compilation cache" if env.get("compilation_cache") else ""),
    ]
    peak = results.get("peak")
    if peak:
        lines.append(f"matmul peak ({peak['dtype']}, {peak['size']}^3): {peak['gflops_per_s']:.1f} GFLOP/s")
    if results["models"]:
        lines += [
            "",
            "| model | params (M) | GFLOPs | latency (ms) | img/s | GFLOP/s | of peak | compile (s) |",
            "|---|---:|---:|---:|---:|---:|---:|---:|",
        ]
    for result in results["models"].values():
        lines.append(
            f"| {result['name']} | {result['params'] / 1e6:.1f} | {_gflops(result['flops'])} "
            f"| {_ms(result['latency_ms']['median'])} | {result['images_per_s']:.2f} "
            f"| {_fmt(result.get('achieved_gflops_per_s'), '.1f')} | {_fmt(result.get('fraction_of_peak'), '.0%')} "
            f"| {result['compile_s']:.1f} |"
        )
    if results["pairs"]:
        lines += [
            "",
            "| pair | dilated (ms) | JPU (ms) | speed-up | dilated GFLOPs | JPU GFLOPs | FLOP ratio |",
            "|---|---:|---:|---:|---:|---:|---:|",
        ]
        for pair in results["pairs"]:
            lines.append(
                f"| {pair['jpu']} vs {pair['dilated']} | {_ms(pair['dilated_latency_ms'])} "
                f"| {_ms(pair['jpu_latency_ms'])} | {_fmt(pair['speedup'], '.2f', 'x')} "
                f"| {_gflops(pair['dilated_flops'])} | {_gflops(pair['jpu_flops'])} "
                f"| {_fmt(pair['flop_ratio'], '.2f', 'x')} |"
            )
    if results.get("input_pipeline"):
        pipe = results["input_pipeline"]
        height, width = pipe["crop_size"]
        lines += [
            "",
            f"input pipeline ({pipe['dataset']}, {height}x{width} crops, batch {pipe['batch_size']}): "
            f"{pipe['images_per_s']:.1f} images/s on the host",
        ]
    if results.get("train_steps"):
        lines += [
            "",
            "| train step | size | batch | GFLOPs | latency (ms) | img/s | GFLOP/s | of peak "
            "| back to back (ms) | img/s | of peak |",
            "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for result in results["train_steps"]:
            height, width = result["image_size"]
            lines.append(
                f"| {result['name']} | {height}x{width} | {result['batch_size']} | {_gflops(result['flops'])} "
                f"| {_ms(result['latency_ms']['median'])} | {result['images_per_s']:.2f} "
                f"| {_fmt(result.get('achieved_gflops_per_s'), '.1f')} "
                f"| {_fmt(result.get('fraction_of_peak'), '.0%')} "
                f"| {_ms(result['back_to_back_ms'])} | {result['back_to_back_images_per_s']:.2f} "
                f"| {_fmt(result.get('back_to_back_fraction_of_peak'), '.0%')} |"
            )
    return "\n".join(lines)

"""Where does a model's forward time go on this accelerator? Prefix timings, op variants and a kernel profile.

    python experiments/gpu_diagnose.py --output-dir /tmp/diag            # batch 16, 512x512, bfloat16
    python experiments/gpu_diagnose.py --quick --output-dir /tmp/diag    # tiny models on CPU: a smoke test

Why it exists: on an H200 (jax 0.11.2, bf16, batch 16) EncNet+JPU R50 took 21.4 ms per batch against 15.9 ms
for its dilated twin, which does 2.3x its FLOPs; at batch 1 both took ~2.5 ms. This script measures, in one
process (device time is scarce):

1. the forward up to ``c4`` (backbone), ``jpu`` (+ neck), ``head`` (all but the final upsampling) and the
   whole network, for the JPU model and its dilated twin: the differences give each part's time;
2. the JPU part under each alternative op implementation (``OpChoices``);
3. a profiler trace of one forward of each model, summarised here as GPU time per kernel and per
   model scope (backbone / neck / decode_head / ...), plus the optimized HLO of the JPU forward.

Tables go to stdout; ``diagnose.json`` and ``diagnose_traces.tgz`` (the traces and the optimized HLO) to
``--output-dir``. ``--no-forward --train-profile encnet_jpu_r50`` profiles a training step instead (batch 16,
480x480; backward ops scoped ``grad <module>``), into ``diagnose_train.json`` and ``diagnose_train_traces.tgz``.
Needs only jax, flax and numpy.
"""

from __future__ import annotations

import argparse
import collections
import functools
import gzip
import json
import re
import sys
import tarfile
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from fastfcn_jax import roofline  # noqa: E402
from fastfcn_jax.benchmark import (  # noqa: E402
    benchmark_model,
    compile_train_step,
    describe_device,
    environment,
    synthetic_variables,
    tiny_variant,
)
from fastfcn_jax.models import create_model  # noqa: E402
from fastfcn_jax.models.op_choices import op_overrides, parse_ops  # noqa: E402

JPU, DILATED = "encnet_jpu_r50", "encnet_dilated_r50"
# (model, until, ops): prefixes of both models, then the JPU prefix under each alternative op.
RUNS: list[tuple[str, str | None, dict[str, str]]] = [
    (JPU, "c4", {}),
    (JPU, "jpu", {}),
    (JPU, "head", {}),
    (JPU, None, {}),
    (DILATED, "c4", {}),
    (DILATED, "head", {}),
    (DILATED, None, {}),
    (JPU, "jpu", {"jpu_input": "fused"}),
    (JPU, None, {"jpu_input": "fused"}),
    (JPU, "jpu", {"depthwise": "grouped"}),
    (JPU, "jpu", {"resize": "matmul"}),
    (JPU, "jpu", {"pointwise": "conv"}),
    (JPU, "jpu", {"separable": "split"}),
    (JPU, None, {"separable": "split"}),
]


def hlo_scopes(hlo_text: str) -> dict[str, str]:
    """Instruction name -> model scope (``backbone/layer3_0``, ``neck/dilation2``, ...) from optimized HLO.

    Flax names each op after its module path (``op_name="jit(apply)/Segmenter/neck/..."``); the profiler's
    events only name the HLO instruction, so this map attributes device time to parts of the model.
    """
    scopes = {}
    for match in re.finditer(r"^\s*(?:ROOT )?%?([\w.\-]+) = .*?metadata=\{op_name=\"([^\"]+)\"", hlo_text, re.M):
        parts = match.group(2).split("/")
        path = [p for p in parts if p and not re.fullmatch(r"\w+\(.*\)", p)]
        if path and path[0] == "Segmenter":
            path = path[1:]
        scope = "/".join(path[:2]) if path else match.group(2)
        # Backward ops carry the transpose of the forward's scope (``transpose(jvp(Segmenter))/neck/...``).
        scopes[match.group(1)] = ("grad " + scope) if any(p.startswith("transpose(") for p in parts) else scope
    return scopes


def summarize_trace(
    trace_dir: Path,
    iterations: int,
    scopes: dict[str, str],
    top: int = 25,
    estimates: list[roofline.Kernel] | None = None,
) -> dict[str, Any]:
    """Device time per kernel and per model scope from a ``jax.profiler.trace`` directory, in ms per iteration.

    Uses the accelerator's kernel events where the trace has them, else (CPU) the XLA thunks' events. With
    ``estimates`` (:func:`fastfcn_jax.roofline.kernels` of the same program) also the HLO instructions whose
    measured time lies furthest above their roofline time: the kernels worth rewriting.
    """
    (path,) = sorted(trace_dir.glob("**/*.trace.json.gz"))[-1:]
    with gzip.open(path) as f:
        events = json.load(f)["traceEvents"]
    names = {e["pid"]: e["args"]["name"] for e in events if e.get("ph") == "M" and e.get("name") == "process_name"}
    device_pids = {pid for pid, name in names.items() if "GPU" in name or "TPU" in name or "/device:" in name}
    timed = [e for e in events if e.get("ph") == "X" and "dur" in e]
    kernels = [e for e in timed if e.get("pid") in device_pids] or [e for e in timed if "hlo_op" in e.get("args", {})]
    by_kernel: dict[str, float] = collections.Counter()
    by_scope: dict[str, float] = collections.Counter()
    by_op: dict[str, float] = collections.Counter()
    # Inside a CUDA command buffer (XLA:GPU's default on jax 0.11) an event's hlo_op names the buffer; its
    # kernel name is the fusion's HLO name with '_' for '.' ('loop_add_fusion_5' for 'loop_add_fusion.5').
    underscored = {name.replace(".", "_"): name for name in scopes}
    for event in kernels:
        op = event.get("args", {}).get("hlo_op", "")
        if op not in scopes and event["name"] in underscored:
            op = underscored[event["name"]]
        scope = scopes.get(op, "(unattributed)")
        by_kernel[f"{scope} | {op} | {event['name'][:60]}"] += event["dur"] / 1e3 / iterations
        by_scope[scope] += event["dur"] / 1e3 / iterations
        by_op[op] += event["dur"] / 1e3 / iterations
    above = {}
    if estimates is not None:
        rows = []
        for kernel in estimates:
            if kernel.name in by_op:
                measured, floor = by_op[kernel.name], kernel.seconds * 1e3
                rows.append((measured - floor, kernel, measured, floor))
        for excess, kernel, measured, floor in sorted(rows, key=lambda row: -row[0])[:top]:
            above[kernel.name] = {
                "scope": kernel.scope,
                "kind": kernel.kind,
                "measured_ms": measured,
                "roofline_ms": floor,
                "excess_ms": excess,
                "bytes": kernel.bytes,
                "flops": kernel.flops,
            }
    return {
        "trace": str(path),
        "processes": sorted(names.values()),
        "device_events": len(kernels),
        "example_args": [e.get("args", {}) for e in kernels[:2]],
        "device_ms_per_iteration": sum(by_scope.values()),
        "by_scope_ms": dict(sorted(by_scope.items(), key=lambda kv: -kv[1])),
        "top_kernels_ms": dict(sorted(by_kernel.items(), key=lambda kv: -kv[1])[:top]),
        "roofline_ms": sum(k.seconds for k in estimates) * 1e3 if estimates is not None else None,
        "above_roofline": above,
    }


def _profile(
    label: str,
    hlo_text: str,
    step: Any,
    state: Any,
    trace_root: Path,
    iterations: int,
    ceilings: tuple[float, float] | None = None,
) -> dict:
    """Warms ``step`` (state -> state) up, traces ``iterations`` calls and summarises them per kernel and
    scope; the optimized HLO goes beside the trace as ``hlo_<label>.txt.gz``. ``ceilings`` (peak FLOP/s,
    bytes/s; default: the measured ones of a lent H100/H200, none elsewhere) add each kernel's roofline."""
    trace_root.mkdir(parents=True, exist_ok=True)
    with gzip.open(trace_root / f"hlo_{label}.txt.gz", "wt") as f:
        f.write(hlo_text)
    for _ in range(2):
        state = jax.block_until_ready(step(state))
    with jax.profiler.trace(str(trace_root / label)):
        for _ in range(iterations):
            state = jax.block_until_ready(step(state))
    ceilings = ceilings or roofline.ceilings_for(jax.devices()[0].device_kind)
    estimates = None
    if ceilings is not None:
        estimates = roofline.kernels(hlo_text, peak_flops=ceilings[0], bandwidth=ceilings[1])
    return summarize_trace(trace_root / label, iterations, hlo_scopes(hlo_text), estimates=estimates)


def profile_forward(
    name: str,
    batch: int,
    size: int,
    dtype: str,
    trace_root: Path,
    iterations: int = 3,
    ops: dict[str, str] | None = None,
    ceilings: tuple[float, float] | None = None,
) -> dict:
    """Device time per kernel and model scope of one forward pass (see :func:`summarize_trace`)."""
    model = create_model(name, 150, dtype=dtype, **op_overrides(ops))
    images = jax.random.normal(jax.random.PRNGKey(0), (batch, size, size, 3), jnp.float32)
    variables = synthetic_variables(model, images)
    compiled = jax.jit(functools.partial(model.apply, train=False)).lower(variables, images).compile()
    run = lambda _: compiled(variables, images)  # noqa: E731
    return _profile(name, compiled.as_text(), run, None, trace_root, iterations, ceilings)


def profile_train_step(
    name: str,
    batch: int,
    size: int,
    dtype: str,
    trace_root: Path,
    iterations: int = 2,
    ceilings: tuple[float, float] | None = None,
    ops: dict[str, str] | None = None,
) -> dict:
    """Like :func:`profile_forward` for one training step (backward ops are scoped ``grad <module>``), under
    op choices ``ops`` (``OpChoices`` fields; the defaults where absent)."""
    step = compile_train_step(name, image_size=(size, size), batch_size=batch, dtype=dtype, ops=ops)
    return _profile(f"train_{name}", step.compiled.as_text(), step.run, step.state, trace_root, iterations, ceilings)


def _print_profile(title: str, summary: dict) -> None:
    print(
        f"\n## {title}: {summary['device_ms_per_iteration']:.2f} ms of device time per iteration "
        f"({summary['device_events']} events; processes {summary['processes']})"
    )
    print("example event args:", json.dumps(summary["example_args"])[:600])
    for scope, ms in list(summary["by_scope_ms"].items())[:20]:
        print(f"  {ms:8.3f} ms  {scope}")
    print("  top kernels:")
    for kernel, ms in summary["top_kernels_ms"].items():
        print(f"  {ms:8.3f} ms  {kernel}")
    if summary.get("roofline_ms") is not None:
        print(f"  roofline of the whole program: {summary['roofline_ms']:.2f} ms; furthest above their roofline:")
        for name, row in summary["above_roofline"].items():
            print(
                f"  {row['measured_ms']:8.3f} ms measured, {row['roofline_ms']:7.3f} ms roofline "
                f"({row['bytes'] / 1e6:.0f} MB, {row['flops'] / 1e9:.1f} GFLOP) {row['kind'][:16]} {name} "
                f"{row['scope'][:70]}"
            )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output-dir", type=Path, default=Path(tempfile.mkdtemp(prefix="fastfcn_diag_")))
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--dtype", default="bfloat16", choices=("float32", "bfloat16", "float16"))
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--quick", action="store_true", help="tiny models, 64x64, batch 2 (smoke test)")
    parser.add_argument("--no-profile", dest="profile", action="store_false", help="no forward profiles")
    parser.add_argument("--no-forward", dest="forward", action="store_false", help="skip the forward timings")
    parser.add_argument("--train-profile", default="", help="comma-separated models whose train step to profile")
    parser.add_argument("--train-batch-size", type=int, default=16)
    parser.add_argument("--train-size", type=int, default=480)
    parser.add_argument("--train-ops", default="", help="op choices of the profiled train step, OP=CHOICE,...")
    args = parser.parse_args(argv)
    rename = tiny_variant if args.quick else (lambda n: n)
    batch, size = (2, 64) if args.quick else (args.batch_size, args.size)
    args.output_dir.mkdir(parents=True, exist_ok=True)
    env = environment()
    device = describe_device(env)
    print(f"{device}; batch {batch}, {size}x{size}, {args.dtype}")
    if args.forward:
        print("| model | until | ops | GFLOPs | median ms | min ms |\n|---|---|---|---:|---:|---:|", flush=True)
    rows = []
    for name, until, ops in RUNS if args.forward else []:
        result = benchmark_model(
            rename(name), image_size=(size, size), batch_size=batch, dtype=args.dtype, ops=ops, until=until,
            warmup=3, repeats=args.repeats,
        )  # fmt: skip
        rows.append(result)
        ops_text = ",".join(f"{k}={v}" for k, v in ops.items()) or "default"
        print(
            f"| {result['name']} | {until or 'logits'} | {ops_text} | {result['flops'] / 1e9:.4g} "
            f"| {result['latency_ms']['median']:.2f} | {result['latency_ms']['min']:.2f} |",
            flush=True,
        )
    # Few files (a device run brings back 8 at most): one JSON and one archive per invocation.
    stem = "diagnose" if args.forward else "diagnose_train"
    report_path = args.output_dir / f"{stem}.json"
    report: dict[str, Any] = {"environment": env, "runs": rows, "profiles": {}}
    report_path.write_text(json.dumps(report, indent=1))
    # Traces nest several folders deep: kept in a temporary folder and handed back as one archive.
    trace_root = Path(tempfile.mkdtemp(prefix="fastfcn_traces_"))
    if args.profile and args.forward:
        for name in (JPU, DILATED):
            summary = profile_forward(rename(name), batch, size, args.dtype, trace_root)
            report["profiles"][rename(name)] = summary
            _print_profile(f"{rename(name)} forward", summary)
            report_path.write_text(json.dumps(report, indent=1))
    for name in [n.strip() for n in args.train_profile.split(",") if n.strip()]:
        train_batch, train_size = (2, 64) if args.quick else (args.train_batch_size, args.train_size)
        summary = profile_train_step(
            rename(name), train_batch, train_size, args.dtype, trace_root, ops=parse_ops(args.train_ops)
        )
        report["profiles"][f"train_{rename(name)}"] = summary
        _print_profile(f"{rename(name)} train step, batch {train_batch}, {train_size}x{train_size}", summary)
        report_path.write_text(json.dumps(report, indent=1))
    if report["profiles"]:
        with tarfile.open(args.output_dir / f"{stem}_traces.tgz", "w:gz") as tar:
            tar.add(trace_root, arcname="traces")
    return 0


if __name__ == "__main__":
    sys.exit(main())

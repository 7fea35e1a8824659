"""A per-kernel roofline estimate of an optimized XLA program, read from its HLO text.

Every top-level instruction of the entry computation that is not free (parameters, bitcasts, tuples) is
one kernel launch: a fusion, a library call (cuDNN convolution, cuBLAS matmul) or a lone op. Its bytes are
its operands plus its results; its FLOPs those of the matmuls and convolutions inside it (2 per
multiply-add). Its roofline time is ``max(bytes / bandwidth, flops / peak)``: what it would take at the
hardware's limit, so ``sum(time)`` is a floor for the program and the kernels furthest above their
estimate are where time is lost.

Used by ``experiments/gpu_aot.py``, which compiles a model for an NVIDIA GPU on a machine without one
(XLA's compile-only GPU topology), so the fusions XLA:GPU makes and the traffic they cause can be read
before a GPU is available, and by ``experiments/tpu_aot.py`` for TPUs, whose compiler also writes its own
cost model's estimate into each kernel's backend config (``estimated_cycles``): with the core clock that is
:attr:`Kernel.estimated_seconds`. Reads any backend's HLO text (CPU programs have no library calls).
"""

from __future__ import annotations

import collections
import dataclasses
import math
import re
from collections.abc import Iterable, Sequence

# Roofline ceilings (bf16 matmul FLOP/s, copy bandwidth counting bytes read and written) measured on the
# lent machines: the H200's matmul peak by this project's benchmark (docs/performance.md), its copy
# bandwidth and both H100 figures by the device notes of this workplace.
GPU_CEILINGS = {"h100": (798e12, 3.0e12), "h200": (684e12, 4.3e12)}


def ceilings_for(device_kind: str) -> tuple[float, float] | None:
    """(peak FLOP/s, bandwidth bytes/s) for a device kind such as 'NVIDIA H200', or None if unknown."""
    kind = device_kind.lower()
    for name, ceilings in GPU_CEILINGS.items():
        if name in kind:
            return ceilings
    return None


_BYTES = {
    "pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2,
    "s32": 4, "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16,
}  # fmt: skip
_SHAPE = re.compile(r"\b(" + "|".join(_BYTES) + r")\[([0-9,]*)\]")
_INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%(\S+) = (.+?) ([a-z][a-z0-9-]*)\((.*)$")
_OPERAND = re.compile(r"%([\w.\-]+)")
_FREE_OPS = frozenset(
    {"parameter", "constant", "bitcast", "get-tuple-element", "tuple", "after-all", "partition-id", "replica-id"}
    # TPU prefetches between HBM and on-chip memory, overlapped with compute: the kernel that reads the
    # prefetched operand counts its bytes.
    | {"copy-start", "copy-done", "slice-start", "slice-done"}
)
_CYCLES = re.compile(r'"estimated_cycles":"(\d+)"')


@dataclasses.dataclass(frozen=True)
class Instruction:
    name: str
    type: str  # result type text, e.g. 'bf16[16,64,64,512]{3,2,1,0}' or a tuple of such
    op: str
    text: str  # the whole line

    def operands(self) -> list[str]:
        # Operands come before the first '), ' that closes the argument list; attributes follow.
        head = self.text.split(f" {self.op}(", 1)[1]
        return _OPERAND.findall(head.split("), ", 1)[0])


@dataclasses.dataclass(frozen=True)
class Kernel:
    """One launch of the program with its roofline estimate."""

    name: str
    kind: str  # fusion kind ('kLoop', 'kInput', '__triton_gemm', ...), 'cudnn', 'cublas' or the op name
    scope: str  # the model scope from the op_name metadata, e.g. 'neck/dilation1/depthwise'
    bytes: int
    flops: int
    seconds: float
    bound: str  # 'memory' or 'compute'
    estimated_seconds: float | None = None  # the TPU compiler's cost model (estimated cycles / clock)


def shapes(type_text: str) -> list[tuple[str, list[int]]]:
    """``[(dtype, dims), ...]`` of every array in an HLO type (a tuple lists each element)."""
    return [(dtype, [int(d) for d in dims.split(",") if d]) for dtype, dims in _SHAPE.findall(type_text)]


def type_bytes(type_text: str) -> int:
    return sum(_BYTES[dtype] * math.prod(dims) for dtype, dims in shapes(type_text))


def parse_computations(hlo_text: str) -> dict[str, list[Instruction]]:
    """The computations of an HLO module text by name; the entry computation under ``'ENTRY'``."""
    computations: dict[str, list[Instruction]] = {}
    current: list[Instruction] | None = None
    for line in hlo_text.splitlines():
        if line.startswith("ENTRY"):
            current = computations["ENTRY"] = []
        elif line.startswith("%") and line.rstrip().endswith("{"):
            current = computations[line.split()[0][1:]] = []
        elif line.startswith("}"):
            current = None
        elif current is not None:
            match = _INSTRUCTION.match(line)
            if match:
                current.append(Instruction(match.group(1), match.group(2), match.group(3), line))
    if "ENTRY" not in computations:
        raise ValueError("no ENTRY computation in the HLO text")
    return computations


def _first_shape(type_text: str) -> list[int]:
    found = shapes(type_text)
    if not found:
        raise ValueError(f"no array shape in {type_text!r}")
    return found[0][1]


def _dot_flops(instruction: Instruction, table: dict[str, Instruction], contracting: Sequence[int]) -> int:
    lhs = _first_shape(table[instruction.operands()[0]].type)
    return 2 * math.prod(_first_shape(instruction.type)) * math.prod(lhs[d] for d in contracting)


def _hlo_dot_flops(instruction: Instruction, table: dict[str, Instruction]) -> int:
    found = re.search(r"lhs_contracting_dims=\{([0-9,]*)\}", instruction.text)
    contracting = [int(d) for d in found.group(1).split(",") if d] if found else []
    return _dot_flops(instruction, table, contracting)


def _cublas_flops(instruction: Instruction, table: dict[str, Instruction]) -> int:
    found = re.search(r'"lhs_contracting_dimensions":\[([^\]]*)\]', instruction.text)
    contracting = [int(d.strip('"')) for d in found.group(1).split(",") if d.strip('"')] if found else []
    return _dot_flops(instruction, table, contracting)


def _convolution_flops(instruction: Instruction, table: dict[str, Instruction]) -> int:
    """2 x (forward output elements) x (kernel elements per output feature), for every convolution kind:
    the dim_labels are the forward convolution's, and the operands play its roles by kind."""
    labels = re.search(r"dim_labels=(\w+)_(\w+)->(\w+)", instruction.text)
    if labels is None:
        return 0
    operands = [_first_shape(table[name].type) for name in instruction.operands() if name in table]
    result = _first_shape(instruction.type)
    if "BackwardInput" in instruction.text:
        kernel, output = operands[1], operands[0]
    elif "BackwardFilter" in instruction.text:
        kernel, output = result, operands[1]
    else:
        kernel, output = operands[1], result
    per_output = math.prod(size for size, label in zip(kernel, labels.group(2), strict=True) if label != "o")
    return 2 * math.prod(output) * per_output


def _computation_flops(
    name: str, computations: dict[str, list[Instruction]], seen: frozenset[str] = frozenset()
) -> int:
    """FLOPs of the dots and convolutions in a computation and the computations it calls."""
    if name not in computations or name in seen:
        return 0
    instructions = computations[name]
    table = {i.name: i for i in instructions}
    total = 0
    for instruction in instructions:
        if instruction.op == "dot":
            total += _hlo_dot_flops(instruction, table)
        elif instruction.op == "convolution":
            total += _convolution_flops(instruction, table)
        for called in re.findall(r"calls=%([\w.\-]+)", instruction.text):
            total += _computation_flops(called, computations, seen | {name})
    return total


def _scope(instruction: Instruction) -> str:
    found = re.search(r'op_name="([^"]*)"', instruction.text)
    if not found:
        return "?"
    parts = [p for p in found.group(1).split("/") if p and not p.startswith("jit(")]
    return "/".join(p for p in parts if p != "Segmenter") or "?"


def kernels(hlo_text: str, *, peak_flops: float, bandwidth: float, clock_hz: float | None = None) -> list[Kernel]:
    """The kernels of an optimized HLO module with their bytes, FLOPs and roofline time (in order); with
    ``clock_hz``, also the compiler's estimate of each kernel that carries ``estimated_cycles`` (TPU)."""
    computations = parse_computations(hlo_text)
    entry = computations["ENTRY"]
    table = {i.name: i for i in entry}
    result = []
    for instruction in entry:
        if instruction.op in _FREE_OPS:
            continue
        operand_bytes = sum(type_bytes(table[name].type) for name in instruction.operands() if name in table)
        total_bytes = operand_bytes + type_bytes(instruction.type)
        target = re.search(r'custom_call_target="([^"]*)"', instruction.text)
        if target and "cudnn" in target.group(1) and "conv" in target.group(1).lower():
            kind, flops = "cudnn", _convolution_flops(instruction, table)
        elif target and "cublas" in target.group(1):
            kind, flops = "cublas", _cublas_flops(instruction, table)
        elif instruction.op == "dot":
            kind, flops = "dot", _hlo_dot_flops(instruction, table)
        elif instruction.op == "convolution":
            kind, flops = "convolution", _convolution_flops(instruction, table)
        else:
            fusion_kind = re.search(r'"kind":"(\w+)"', instruction.text) or re.search(r"kind=(k\w+)", instruction.text)
            kind = fusion_kind.group(1) if fusion_kind else instruction.op
            called = re.findall(r"calls=%([\w.\-]+)", instruction.text)
            flops = sum(_computation_flops(name, computations) for name in called)
        memory_s, compute_s = total_bytes / bandwidth, flops / peak_flops
        cycles = _CYCLES.search(instruction.text) if clock_hz else None
        result.append(
            Kernel(
                name=instruction.name,
                kind=kind,
                scope=_scope(instruction),
                bytes=total_bytes,
                flops=flops,
                seconds=max(memory_s, compute_s),
                bound="compute" if compute_s > memory_s else "memory",
                estimated_seconds=int(cycles.group(1)) / clock_hz if cycles and clock_hz else None,
            )
        )
    return result


def by_scope(found: Iterable[Kernel], depth: int = 2) -> list[dict[str, object]]:
    """Kernels, bytes, FLOPs, roofline seconds and estimated seconds (0 where no kernel has an estimate)
    summed per scope prefix of ``depth`` parts, largest first.

    Autodiff's prefixes (``jvp(...)``, ``transpose(...)``) stay in front, so forward and backward appear
    apart: ``transpose(jvp(Segmenter))/neck`` is the neck's backward pass.
    """
    totals: dict[str, list[float]] = collections.defaultdict(lambda: [0, 0, 0, 0.0, 0.0])
    for kernel in found:
        row = totals["/".join(kernel.scope.split("/")[:depth])]
        row[0] += 1
        row[1] += kernel.bytes
        row[2] += kernel.flops
        row[3] += kernel.seconds
        row[4] += kernel.estimated_seconds or 0.0
    rows = [
        {"scope": scope, "kernels": int(n), "bytes": int(b), "flops": int(f), "seconds": s, "estimated_seconds": e}
        for scope, (n, b, f, s, e) in totals.items()
    ]
    return sorted(rows, key=lambda row: -max(row["seconds"], row["estimated_seconds"]))


def estimated_total(found: Sequence[Kernel]) -> float | None:
    """The compiler's estimate for the whole program (the sum over kernels), or None without estimates."""
    estimates = [k.estimated_seconds for k in found if k.estimated_seconds is not None]
    return sum(estimates) if estimates else None


def format_report(found: Sequence[Kernel], *, depth: int = 2, top: int = 20) -> str:
    """A plain-text table per scope, the total, and the ``top`` kernels by time (the compiler's estimate
    where there is one, else the roofline)."""
    estimated = estimated_total(found) is not None
    extra = f" {'estimate ms':>11s}" if estimated else ""
    lines = [f"{'scope':52s} {'kernels':>7s} {'GB':>8s} {'GFLOP':>9s} {'roofline ms':>11s}{extra}"]
    for row in by_scope(found, depth):
        extra = f" {row['estimated_seconds'] * 1e3:11.3f}" if estimated else ""
        lines.append(
            f"{str(row['scope'])[:52]:52s} {row['kernels']:7d} {row['bytes'] / 1e9:8.2f} "
            f"{row['flops'] / 1e9:9.1f} {row['seconds'] * 1e3:11.3f}{extra}"
        )
    total_s = sum(k.seconds for k in found)
    extra = f" {estimated_total(found) * 1e3:11.3f}" if estimated else ""
    lines.append(
        f"{'TOTAL':52s} {len(found):7d} {sum(k.bytes for k in found) / 1e9:8.2f} "
        f"{sum(k.flops for k in found) / 1e9:9.1f} {total_s * 1e3:11.3f}{extra}"
    )
    if top:

        def time_of(k: Kernel) -> float:
            return k.estimated_seconds if estimated and k.estimated_seconds is not None else k.seconds

        lines.append("")
        lines.append(f"top {top} kernels by {'estimated' if estimated else 'roofline'} time:")
        for k in sorted(found, key=lambda k: -time_of(k))[:top]:
            lines.append(
                f"{time_of(k) * 1e3:8.3f} ms {k.bound:7s} {k.bytes / 1e6:9.1f} MB {k.flops / 1e9:8.1f} GF "
                f"{k.kind[:18]:18s} {k.name[:32]:32s} {k.scope[:90]}"
            )
    return "\n".join(lines)

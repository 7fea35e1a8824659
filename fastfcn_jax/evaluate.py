"""Evaluation with the reference's test protocol (FastFCN ``test.py`` + ``MultiEvalModule``, FASTFCN.md §4.2).

Per image and scale ``s``: resize (align-corners bilinear) so the long side is ``ceil(base_size * s)``; pad
bottom/right to at least ``crop_size`` with the normalised-black value; run ``crop_size`` windows at stride
``int(crop_size * 2/3)``; per window ``exp(logits [+ logits of the flipped window, flipped back])``;
overlapping windows averaged; the result resized back (align-corners) to the image and summed over scales;
argmax at the end. ``whole`` runs each scaled image in one pass instead of windows (cheaper, not the paper's).
``mmseg`` / ``mmseg_multi_scale`` are mmsegmentation's test: its keep-ratio resize, each scaled image whole and
unpadded, each pass's logits (the flipped one separately) resized back to the image and softmaxed, averaged.

With windows, shapes never depend on the image size, so the number of compilations is fixed by the protocol,
not by the data: the network always sees ``[window_batch, crop, crop, 3]``; every scale has one square canvas
(big enough for its largest window grid) per image slot; resizing back happens in fixed ``TILE`` x ``TILE``
output tiles through per-row/column gather tables computed on the host. ``whole`` feeds each scaled image at
its own size (each side padded to a multiple of 32; ``mmseg``: not padded), one image per group with canvases
of its own shapes: the programs compile once per distinct (padded) image shape (a dataset of one image size,
as Cityscapes, compiles each once).
"""

from __future__ import annotations

import collections
import dataclasses
import itertools
import json
import os
import re
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from fastfcn_jax import code_version, metrics, sharding, visualize
from fastfcn_jax.models import resize
from fastfcn_jax.protocols import (  # noqa: F401 - re-exported: evaluate.make_protocol and friends
    CITYSCAPES_EXTRA_SCALES,
    FLIP_WORDS,
    MMSEG_PROTOCOLS,
    MMSEG_TEST_SCALES,
    MULTI_SCALES,
    PROTOCOLS,
    WHOLE_MULTIPLE,
    Protocol,
    keep_ratio_size,
    make_protocol,
    scaled_size,
    window_count,
    window_origins,
)

TILE = 256  # output tile side of the resize-back / argmax / confusion step
# The whole-image protocols compile per image size; past this many programs held, the runner drops its compiled
# programs (XLA:CPU maps about 130 memory regions per program of an R50 model, and a process may hold 65530:
# an mmseg multi-scale run over many image sizes died with "LLVM compilation error: Cannot allocate memory").
MAX_LIVE_PROGRAMS = 192

LogitsFn = Callable[[Any, jax.Array], jax.Array]


# ----------------------------------------------------------------------------------------------------
# Host-side planning (pure NumPy; the tests re-derive all of it from the reference loop).


def align_corners_taps(
    in_size: int, out_size: int, align_corners: bool = True
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """PyTorch's bilinear interpolation as two taps: (lo, hi, frac), each [out_size]: output ``i`` reads
    ``(1 - frac) * x[lo] + frac * x[hi]`` (:func:`fastfcn_jax.models.resize.align_corners_taps`)."""
    lo, hi, frac = resize.align_corners_taps(in_size, out_size, align_corners)
    return lo, hi, frac.astype(np.float32)


def resize_image(image: np.ndarray, height: int, width: int, align_corners: bool = True) -> np.ndarray:
    """Bilinear resize of a float [H, W, C] image on the host (2 taps per axis), PyTorch's ``align_corners``."""
    if image.shape[:2] == (height, width):
        return image
    image = np.asarray(image, np.float32)
    lo, hi, frac = align_corners_taps(image.shape[0], height, align_corners)
    frac = frac.astype(np.float32)[:, None, None]
    # lo * (1 - f) + hi * f computed in place: the same values, 2.4x faster than with its temporaries.
    rows = image[lo]
    rows *= 1 - frac
    upper = image[hi]
    upper *= frac
    rows += upper
    lo, hi, frac = align_corners_taps(image.shape[1], width, align_corners)
    frac = frac.astype(np.float32)[None, :, None]
    out = rows[:, lo]
    out *= 1 - frac
    right = rows[:, hi]
    right *= frac
    out += right
    return out


def normalize(image: np.ndarray) -> np.ndarray:
    """uint8 RGB [H, W, 3] -> float32 ``(x / 255 - mean) / std`` (the reference's ToTensor + Normalize)."""
    return ((image.astype(np.float32) / 255.0 - visualize.IMAGENET_MEAN) / visualize.IMAGENET_STD).astype(np.float32)


# Normalised black: the reference pads with -mean / std.
PAD_VALUE = (-visualize.IMAGENET_MEAN / visualize.IMAGENET_STD).astype(np.float32)


@dataclasses.dataclass
class _Window:
    slot: int
    scale_index: int
    top: int
    left: int
    pixels: np.ndarray  # [side, side, 3]


# ----------------------------------------------------------------------------------------------------
# The runner.


class ProtocolRunner:
    """Runs a :class:`Protocol` over images with a logits function, with a data-independent compile count
    (``whole``: one per padded image shape)

    Args:
      logits_fn: ``logits_fn(variables, images [N, h, w, 3]) -> logits [N, h, w, C]`` (traced under jit).
      variables: passed through to ``logits_fn``.
      num_classes: C.
      protocol: the test protocol.
      window_batch: windows per network call (the network sees twice as many with flip); ``whole``: 1.
      images_per_call: images whose windows share network calls; device memory holds this many canvases,
        about ``images_per_call * sum_s canvas_side(s)**2 * (C + 1) * 4`` bytes (twice with ``softmax`` and
        flip: the flipped passes have their own). ``whole``: 1, each image with canvases of its own shapes.
      devices: where the network runs: each group of ``images_per_call`` images goes to the next device in
        turn, with its own copy of ``variables`` (the reference's MultiEvalModule spreads its images over the
        GPUs alike). None: ``variables``' device, or the default one.
      groups_in_flight: groups dispatched per device before the oldest is fetched; None: 2 where two groups'
        canvases take at most a quarter of each device's memory (the host prepares the next group while the
        device runs one), else 1 (and on CPUs, which report no memory limit).
      max_live_programs: the whole-image protocols drop every compiled program when a group would take more
        than this many (sizes met again compile again, or come from JAX's persistent compilation cache).
    """

    def __init__(
        self,
        logits_fn: LogitsFn,
        variables: Any,
        num_classes: int,
        protocol: Protocol,
        *,
        window_batch: int = 8,
        images_per_call: int = 4,
        devices: Sequence[jax.Device] | None = None,
        groups_in_flight: int | None = None,
        max_live_programs: int = MAX_LIVE_PROGRAMS,
    ) -> None:
        if window_batch < 1 or images_per_call < 1:
            raise ValueError(f"window_batch={window_batch} and images_per_call={images_per_call} must be >= 1")
        if groups_in_flight is not None and groups_in_flight < 1:
            raise ValueError(f"groups_in_flight={groups_in_flight} must be >= 1 (None: as the device memory allows)")
        self.logits_fn = logits_fn
        if devices is None:
            placed = {
                d
                for leaf in jax.tree_util.tree_leaves(variables)
                if isinstance(leaf, jax.Array)
                for d in leaf.devices()
            }
            devices = list(placed) if len(placed) == 1 else jax.local_devices()[:1]
        self.devices = list(devices)
        if not self.devices:
            raise ValueError("ProtocolRunner needs at least one device (devices=None: the default one)")
        self._variables = [jax.device_put(variables, device) for device in self.devices]
        self.groups_per_device = [0] * len(self.devices)  # image groups each device has run
        self.num_classes = num_classes
        self.protocol = protocol
        # 'whole' has one window per image and scale, of the image's own (padded) shape: one per call and one
        # image per group, its canvases of its own shapes (canvases as large as any image would be mostly
        # padding: mmseg's ADE20K test scale allows 2048 x 512 and 512 x 2048).
        self.window_batch = 1 if protocol.whole else window_batch
        self.images_per_call = 1 if protocol.whole else images_per_call
        self.traces: collections.Counter[str] = collections.Counter()
        # Canvases per scale: softmax keeps the flipped passes apart (each is softmaxed at the image's size).
        self.passes = 2 if protocol.softmax and protocol.flip else 1
        self.canvas_shapes = (
            None if protocol.whole else tuple((side, side) for side in map(protocol.canvas_side, protocol.scales))
        )
        # Two groups per device when their canvases fit in a quarter of its memory: the host then prepares the
        # next group while the device runs the current one (with one, each waits for the other).
        pixels = self.passes * sum(map(protocol.canvas_pixels_bound, protocol.scales))
        canvas_bytes = self.images_per_call * pixels * (num_classes + 1) * 4
        if groups_in_flight is None:
            limits = [(device.memory_stats() or {}).get("bytes_limit", 0) for device in self.devices]
            groups_in_flight = 2 if all(2 * canvas_bytes <= limit / 4 for limit in limits) else 1
        self.groups_in_flight = groups_in_flight  # per device
        # Each device's canvases are made there; the other steps run where their canvases are.
        self._zeros = [
            jax.jit(self._zeros_body, static_argnums=0, out_shardings=jax.sharding.SingleDeviceSharding(device))
            for device in self.devices
        ]
        # The network is a program of its own per window shape; adding its scores to the canvases is another
        # (cheap) one per window shape and canvas set: 'whole' images that share a scale's shape but not their
        # other scales' share the network's compilation.
        self._network = jax.jit(self._network_body)
        # The canvases are updated in place (donated; CPUs too: one window added to a 1.6 GB canvas took 75 ms
        # there, 521 ms with a new copy of the canvas).
        self._accumulate = jax.jit(self._accumulate_body, donate_argnums=(0, 1))
        self._tile = jax.jit(self._tile_body, static_argnames="with_scores")
        # (device index, program, window shape or None, canvas shapes or None): compiled ahead (_compile) and
        # compiled or run (compile_count)
        self._compiled: set[tuple[int, str, Any, Any]] = set()
        self._programs: set[tuple[int, str, Any, Any]] = set()
        self.max_live_programs = max_live_programs
        self.programs_dropped = 0  # compiled programs the runner let go of (max_live_programs)

    def compile_all(
        self, with_scores: bool = False, devices: int | None = None, images: Sequence[np.ndarray] = ()
    ) -> None:
        """Compiles every program for the first ``devices`` devices (None: all) at once, on host threads (XLA
        compiles without holding the GIL), where each device would otherwise compile its own in turn as its
        first group arrives. The jitted calls then find them compiled. ``whole`` windows and canvases take
        their image's shapes: those of ``images`` are compiled (other shapes compile as they come; :meth:`run`
        compiles each device's first group's on that device)."""
        count = len(self.devices[:devices])
        plans = {self._plan(image.shape[:2]) for image in images} if self.protocol.whole else {self._plan(None)}
        self._compile(with_scores, {index: plans for index in range(count)})

    def _compile(self, with_scores: bool, plans: Mapping[int, Iterable[tuple[tuple, tuple]]]) -> None:
        """Compiles, per device index, the programs of its (canvas shapes, window shapes) plans, the devices on
        host threads at once."""
        batch, g, c = self.window_batch, self.images_per_call, self.num_classes

        def host(shape: tuple[int, ...], dtype: Any) -> jax.ShapeDtypeStruct:
            return jax.ShapeDtypeStruct(shape, dtype)  # NumPy inputs: uncommitted, as the calls pass them

        def programs(index: int) -> set[tuple[int, str, Any, Any]]:
            return {
                key for canvases, windows in plans[index] for key in self._keys(index, canvases, windows, with_scores)
            }

        def compile_for(index: int) -> None:
            on = jax.sharding.SingleDeviceSharding(self.devices[index])
            for _, name, window, canvases in sorted(programs(index) - self._compiled, key=str):
                if canvases is not None:
                    arrays = (
                        tuple(jax.ShapeDtypeStruct((g, *shape, c), jnp.float32, sharding=on) for shape in canvases),
                        tuple(jax.ShapeDtypeStruct((g, *shape), jnp.float32, sharding=on) for shape in canvases),
                    )
                if name == "zeros":
                    self._zeros[index].lower(canvases).compile()
                elif name == "network":
                    self._network.lower(self._variables[index], host((batch, *window, 3), np.float32)).compile()
                elif name == "accumulate":
                    passes = tuple(
                        jax.ShapeDtypeStruct((batch, *window, c), jnp.float32, sharding=on) for _ in range(self.passes)
                    )
                    fields = [host((batch,), np.int32) for _ in _FIELDS]
                    self._accumulate.lower(*arrays, passes, *fields, host((batch,), np.bool_)).compile()
                else:
                    scales = len(self.protocol.scales)
                    taps, fracs = host((scales, 2, TILE), np.int32), host((scales, TILE), np.float32)
                    labels = host((TILE, TILE), np.int32)
                    self._tile.lower(*arrays, 0, taps, fracs, taps, fracs, labels, with_scores=with_scores).compile()

        todo = [index for index in plans if programs(index) - self._compiled]
        if self.protocol.whole and len(set().union(self._programs, *map(programs, todo))) > self.max_live_programs:
            return  # they would be let go of before they run (_dispatch_group): each compiles as it comes
        if todo:
            with ThreadPoolExecutor(max_workers=len(todo)) as pool:
                list(pool.map(compile_for, todo))
        for index in todo:
            self._compiled |= programs(index)
            self._programs |= programs(index)

    def _group_plan(self, group: list[tuple[np.ndarray, Any]]) -> tuple[tuple, tuple]:
        """(canvas shapes, window shapes) of a group of (image, label) pairs ('whole': one image)."""
        return self._plan(group[0][0].shape[:2] if self.protocol.whole else None)

    def _plan(self, image_shape: tuple[int, int] | None) -> tuple[tuple, tuple]:
        """(canvas shapes, window shapes) of an image of ``image_shape`` (sliding windows: of every image)."""
        protocol = self.protocol
        if protocol.whole:
            scaled = [protocol.scaled_size(*image_shape, scale) for scale in protocol.scales]
            shapes = tuple(protocol.whole_shape(h, w) for h, w in scaled)
            return shapes * self.passes, tuple(sorted(set(shapes)))
        windows = {(protocol.crop_size, protocol.crop_size)}
        return self.canvas_shapes * self.passes, tuple(windows)

    def _keys(self, device: int, canvases: tuple, windows: Iterable, with_scores: bool) -> set[tuple]:
        """The programs a group of these canvases and window shapes runs on ``device``."""
        keys = {(device, "zeros", None, canvases), (device, f"tile_{with_scores}", None, canvases)}
        for window in map(tuple, windows):
            keys |= {(device, "network", window, None), (device, "accumulate", window, canvases)}
        return keys

    @property
    def variables(self) -> Any:
        return self._variables[0]

    @property
    def compile_count(self) -> int:
        """How many programs were compiled: each function, at each shape it ran with, once per device that
        compiled or ran it (again after the runner let go of its programs: ``max_live_programs``)."""
        return self.programs_dropped + len(self._programs)

    def _drop_programs(self) -> None:
        """Lets go of every compiled program (the jitted functions' caches)."""
        for function in (self._network, self._accumulate, self._tile, *self._zeros):
            function.clear_cache()
        self.programs_dropped += len(self._programs)
        self._programs.clear()
        self._compiled.clear()

    # Jitted bodies. The Python-side counter runs only while tracing.

    def _zeros_body(self, shapes: tuple[tuple[int, int], ...]) -> tuple[tuple[jax.Array, ...], tuple[jax.Array, ...]]:
        self.traces["zeros"] += 1
        g, c = self.images_per_call, self.num_classes
        sums = tuple(jnp.zeros((g, *shape, c), jnp.float32) for shape in shapes)
        counts = tuple(jnp.zeros((g, *shape), jnp.float32) for shape in shapes)
        return sums, counts

    def _network_body(self, variables, windows):
        """The windows' scores: ``exp(logits)`` (with flip: of the sum with the flipped window's logits), or
        with ``softmax`` the logits themselves (and the flipped window's, flipped back, apart)."""
        self.traces[f"network_{windows.shape[1]}x{windows.shape[2]}"] += 1
        batch = windows.shape[0]
        images = jnp.concatenate([windows, windows[:, :, ::-1]]) if self.protocol.flip else windows
        logits = self.logits_fn(variables, images).astype(jnp.float32)
        passes = [logits[:batch], logits[batch:, :, ::-1]] if self.protocol.flip else [logits]
        if not self.protocol.softmax:
            passes = [jnp.exp(sum(passes))]  # exp of summed logits, not softmax: the reference's module_inference
        return tuple(passes)

    def _accumulate_body(self, sums, counts, passes, slot, scale_index, top, left, valid):
        """Adds each window's scores and a count of 1 to its slot's canvas of its scale (the flipped pass of
        ``softmax`` to the scale's second canvas)."""
        batch, height, width = passes[0].shape[:3]
        self.traces[f"accumulate_{height}x{width}"] += 1
        scales = len(self.protocol.scales)
        sums, counts = list(sums), list(counts)
        for k, canvas in enumerate(sums):
            if canvas.shape[1] < height or canvas.shape[2] < width:
                continue  # 'whole': another scale's window shape; it never belongs here
            scores = passes[k // scales]
            for b in range(batch):
                weight = (valid[b] & (scale_index[b] == k % scales)).astype(jnp.float32)
                start = (slot[b], top[b], left[b])
                region = jax.lax.dynamic_slice(sums[k], (*start, 0), (1, height, width, self.num_classes))
                sums[k] = jax.lax.dynamic_update_slice(sums[k], region + weight * scores[b][None], (*start, 0))
                region = jax.lax.dynamic_slice(counts[k], start, (1, height, width))
                counts[k] = jax.lax.dynamic_update_slice(counts[k], region + weight, start)
        return tuple(sums), tuple(counts)

    def _tile_body(self, sums, counts, slot, row_taps, row_frac, col_taps, col_frac, labels, *, with_scores: bool):
        """One output tile: per canvas, its average resized back (2x2 taps), with ``softmax`` softmaxed, summed
        (``softmax``: averaged); argmax; confusion.

        row_taps / col_taps: int32 [K, 2, T] (lo, hi) source indices per scale; *_frac float32 [K, T];
        labels int32 [T, T] with -1 for ignored and padded pixels.
        """
        self.traces["tile"] += 1
        total = jnp.zeros((*labels.shape, self.num_classes), jnp.float32)
        scales = len(self.protocol.scales)
        for k in range(len(sums)):

            def averaged(rows, cols, k=k):
                index = (slot, rows[:, None], cols[None, :])
                count = counts[k][index]
                return sums[k][index] / jnp.where(count > 0, count, 1.0)[..., None]

            fr, fc = row_frac[k % scales][:, None, None], col_frac[k % scales][None, :, None]
            (r0, r1), (c0, c1) = row_taps[k % scales], col_taps[k % scales]
            top = averaged(r0, c0) * (1 - fc) + averaged(r0, c1) * fc
            bottom = averaged(r1, c0) * (1 - fc) + averaged(r1, c1) * fc
            resized = top * (1 - fr) + bottom * fr
            total = total + (jax.nn.softmax(resized, axis=-1) if self.protocol.softmax else resized)
        if self.protocol.softmax:
            total = total / len(sums)  # mmsegmentation's mean probability
        predictions = jnp.argmax(total, axis=-1).astype(jnp.int32)
        confusion = metrics.batch_confusion(labels, predictions, self.num_classes)
        return (total if with_scores else None), predictions, confusion

    # Host side.

    def _scaled(self, images: Sequence[np.ndarray]) -> list[list[np.ndarray]]:
        """Each image at each of the protocol's scales, resized on host threads (NumPy's arithmetic runs
        without the GIL): [image][scale]."""
        jobs = [
            (image, *self.protocol.scaled_size(*image.shape[:2], scale), self.protocol.image_align_corners)
            for image in images
            for scale in self.protocol.scales
        ]
        workers = min(
            len(jobs), len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        )
        if workers == 1:  # one image at one scale, or one core: no threads to start
            scaled = [resize_image(*job) for job in jobs]
        else:
            with ThreadPoolExecutor(max_workers=workers) as pool:
                scaled = list(pool.map(lambda job: resize_image(*job), jobs))
        count = len(self.protocol.scales)
        return [scaled[i * count : (i + 1) * count] for i in range(len(images))]

    def _windows(self, slot: int, scaled_images: Sequence[np.ndarray]) -> Iterator[_Window]:
        protocol = self.protocol
        for k, scaled in enumerate(scaled_images):
            height, width = scaled.shape[:2]
            if protocol.whole:  # the scaled image, its sides padded to multiples of protocol.pad_multiple
                shape, origins = protocol.whole_shape(height, width), [(0, 0)]
            else:
                side = protocol.crop_size
                shape, origins = (side, side), window_origins(height, width, protocol.crop_size, protocol.stride)
            for top, left in origins:
                pixels = scaled[top : top + shape[0], left : left + shape[1]]  # a view, copied once: into the batch
                if pixels.shape[:2] != shape:
                    # Window content beyond the scaled image is normalised black, as the reference's pad_image.
                    padded = np.broadcast_to(PAD_VALUE, (*shape, 3)).copy()
                    padded[: pixels.shape[0], : pixels.shape[1]] = pixels
                    pixels = padded
                yield _Window(slot, k, top, left, pixels)

    def _batches(self, windows: list[_Window]) -> Iterator[tuple[np.ndarray, ...]]:
        """The accumulate step's host arguments: windows grouped by shape, ``window_batch`` at a time (the last
        padded with invalid ones): (pixels, slot, scale_index, top, left, valid)."""
        by_shape: dict[tuple[int, int], list[_Window]] = collections.defaultdict(list)
        for window in windows:
            by_shape[window.pixels.shape[:2]].append(window)
        for shape, group in by_shape.items():
            for start in range(0, len(group), self.window_batch):
                chunk = group[start : start + self.window_batch]
                pad = self.window_batch - len(chunk)
                pixels = np.zeros((self.window_batch, *shape, 3), np.float32)
                for index, window in enumerate(chunk):
                    pixels[index] = window.pixels
                fields = [np.array([getattr(w, f) for w in chunk] + [0] * pad, np.int32) for f in _FIELDS]
                yield pixels, *fields, np.arange(self.window_batch) < len(chunk)

    def _run_windows(self, windows: list[_Window], sums, counts, variables):
        """Feeds windows through the network and their scores into the canvases, a batch at a time."""
        for pixels, *fields in self._batches(windows):
            sums, counts = self._accumulate(sums, counts, self._network(variables, pixels), *fields)
        return sums, counts

    def _tile_tables(self, image_size: int, origin: int, scaled_sizes: list[int]) -> tuple[np.ndarray, np.ndarray]:
        """Per-scale (lo, hi) taps and fractions for output rows (or columns) origin .. origin + TILE."""
        taps = np.zeros((len(scaled_sizes), 2, TILE), np.int32)
        frac = np.zeros((len(scaled_sizes), TILE), np.float32)
        count = min(TILE, image_size - origin)
        for k, scaled in enumerate(scaled_sizes):
            lo, hi, f = align_corners_taps(scaled, image_size, self.protocol.align_corners)
            taps[k, 0, :count], taps[k, 1, :count] = lo[origin : origin + count], hi[origin : origin + count]
            frac[k, :count] = f[origin : origin + count]
        return taps, frac

    def run(
        self, images: Iterable[np.ndarray], labels: Iterable[np.ndarray] | None = None, *, with_scores: bool = False
    ) -> Iterator[dict[str, Any]]:
        """Yields, per image in order, {'prediction': int32 [H, W], 'confusion': int64 [C, C] (zeros without
        labels), 'scores': float32 [H, W, C] (only ``with_scores``): the reference's exp-scores summed over
        scales, or with ``softmax`` (the mmseg protocols) the passes' mean probabilities}.

        images: normalised float32 [H, W, 3] (see :func:`normalize`), any sizes; labels: int32 [H, W] with
        -1 = ignore.
        """
        labels = labels if labels is not None else itertools.repeat(None)
        return self.run_pairs(zip(images, labels, strict=False), with_scores)  # repeat(None) never ends

    def run_pairs(
        self, examples: Iterable[tuple[np.ndarray, np.ndarray | None]], with_scores: bool = False
    ) -> Iterator[dict[str, Any]]:
        """:meth:`run` over (image, label or None) pairs, ``images_per_call`` at a time, the groups spread over
        the devices; results in input order."""
        examples = iter(examples)
        groups = iter(lambda: list(itertools.islice(examples, self.images_per_call)), [])
        first = list(itertools.islice(groups, len(self.devices)))  # the devices this input will use
        if len(first) > 1:  # each device's first group's programs, compiled on host threads at once
            self._compile(with_scores, {i: {self._group_plan(group)} for i, group in enumerate(first)})
        in_flight: collections.deque[list] = collections.deque()
        turn = itertools.cycle(range(len(self.devices)))
        for group in itertools.chain(first, groups):
            # Dispatched (asynchronously) before the oldest group is fetched: every device stays busy.
            in_flight.append(self._dispatch_group(group, next(turn), with_scores))
            if len(in_flight) == len(self.devices) * self.groups_in_flight:
                yield from self._collect_group(in_flight.popleft(), with_scores)
        while in_flight:
            yield from self._collect_group(in_flight.popleft(), with_scores)

    def _dispatch_group(self, group: list[tuple[np.ndarray, np.ndarray | None]], device: int, with_scores: bool):
        self.groups_per_device[device] += 1
        scaled = self._scaled([image for image, _ in group])
        windows = [w for slot, images in enumerate(scaled) for w in self._windows(slot, images)]
        canvases, shapes = self._group_plan(group)
        keys = self._keys(device, canvases, shapes, with_scores)
        if self.protocol.whole and len(self._programs | keys) > self.max_live_programs:
            self._drop_programs()
        self._programs |= keys
        sums, counts = self._run_windows(windows, *self._zeros[device](canvases), self._variables[device])
        pending = []
        for slot, (image, label) in enumerate(group):
            height, width = image.shape[:2]
            sizes = [self.protocol.scaled_size(height, width, s) for s in self.protocol.scales]
            tiles = []
            for top in range(0, height, TILE):
                row_taps, row_frac = self._tile_tables(height, top, [h for h, _ in sizes])
                for left in range(0, width, TILE):
                    col_taps, col_frac = self._tile_tables(width, left, [w for _, w in sizes])
                    tile_labels = np.full((TILE, TILE), -1, np.int32)
                    if label is not None:
                        part = label[top : top + TILE, left : left + TILE]
                        tile_labels[: part.shape[0], : part.shape[1]] = part
                    outputs = self._tile(
                        sums, counts, slot, row_taps, row_frac, col_taps, col_frac, tile_labels, with_scores=with_scores
                    )
                    tiles.append((top, left, outputs))
            pending.append((height, width, tiles))
        return pending

    def _collect_group(self, pending: list, with_scores: bool) -> Iterator[dict[str, Any]]:
        for height, width, tiles in pending:  # fetched after every tile of the group was dispatched
            prediction = np.zeros((height, width), np.int32)
            scores = np.zeros((height, width, self.num_classes), np.float32) if with_scores else None
            confusion = np.zeros((self.num_classes, self.num_classes), np.int64)
            for top, left, (tile_scores, tile_prediction, tile_confusion) in jax.device_get(tiles):
                h, w = min(TILE, height - top), min(TILE, width - left)
                prediction[top : top + h, left : left + w] = tile_prediction[:h, :w]
                if with_scores:
                    scores[top : top + h, left : left + w] = tile_scores[:h, :w]
                confusion += tile_confusion.astype(np.int64)
            result = {"prediction": prediction, "confusion": confusion}
            if with_scores:
                result["scores"] = scores
            yield result


_FIELDS = ("slot", "scale_index", "top", "left")


def model_logits_fn(model: Any) -> LogitsFn:
    """``logits_fn`` of a segmentation model: the main head's logits at the input size."""

    def logits_fn(variables, images):
        return model.apply(variables, images, train=False)["logits"]

    return logits_fn


# ----------------------------------------------------------------------------------------------------
# Reports.


def submission_encoding(label_lut: np.ndarray, num_classes: int) -> np.ndarray:
    """train id -> the benchmark's raw value (the smallest raw value mapping to it): ADE20K ``id + 1``,
    Cityscapes label ids, Pascal Context ``id + 1``, VOC the id itself."""
    encoding = np.zeros(num_classes, np.int64)
    for train_id in range(num_classes):
        raw = np.flatnonzero(np.asarray(label_lut) == train_id)
        if raw.size == 0:
            raise ValueError(f"class {train_id} has no raw label value in the dataset's label table")
        encoding[train_id] = raw[0]
    return encoding


def submission_image(raw: np.ndarray, mode: str, palette: np.ndarray) -> Any:
    """A test-server PNG of ``raw`` (labels in the benchmark's encoding, :func:`submission_encoding`) in the
    dataset's ``submission_mode``: ``'P'`` in ``palette``'s colours (Pascal VOC), else grayscale (ADE20K,
    Cityscapes, Pascal Context)."""
    from PIL import Image

    raw = np.asarray(raw)
    if raw.size and raw.max() > 255:  # a dataset of more than 256 classes (a folder one): 16-bit grey
        return Image.fromarray(raw.astype(np.uint16))
    if mode == "P":
        return visualize.palette_png(raw, palette)
    return Image.fromarray(raw.astype(np.uint8), mode="L")


def pcontext_60_class_miou(mean_iou_59: float) -> float:
    """The Pascal Context number papers report: the 59-class mIoU with background added as a class of IoU 0,
    i.e. ``mIoU_59 * 59 / 60`` (FastFCN issue #39; 54.03 -> 53.13, the paper's headline)."""
    return mean_iou_59 * 59 / 60


def per_class_table(scores: Mapping[str, Any], class_names: Sequence[str], confusion: np.ndarray) -> str:
    """Markdown table of per-class IoU (%) with labelled/predicted pixel counts, then the summary rows."""
    labelled, predicted = confusion.sum(axis=1), confusion.sum(axis=0)
    lines = ["| id | class | IoU (%) | labelled pixels | predicted pixels |", "|---:|---|---:|---:|---:|"]
    for i, iou in enumerate(scores["per_class_iou"]):
        absent = labelled[i] == 0 and predicted[i] == 0
        value = "absent (0)" if absent else f"{100 * iou:.2f}"
        lines.append(f"| {i} | {class_names[i]} | {value} | {labelled[i]} | {predicted[i]} |")
    lines += [
        "",
        f"- pixAcc: {100 * scores['pixel_accuracy']:.2f} %",
        f"- mIoU (reference definition, mean over all {len(class_names)} classes, absent = 0): "
        f"{100 * scores['mean_iou']:.2f} %",
        f"- mIoU over classes present in labels or predictions: {100 * scores['mean_iou_present']:.2f} %",
    ]
    if "mean_iou_60" in scores:
        lines.append(
            "- Pascal Context 60-class mIoU as the FastFCN paper reports it (59-class mIoU x 59/60, background "
            "counted 0; not a 60-class evaluation that scores background, as mmsegmentation's and HRNet's are): "
            f"{100 * scores['mean_iou_60']:.2f} %"
        )
    return "\n".join(lines) + "\n"


def _section(config: Any, name: str) -> Mapping[str, Any]:
    section = config.get(name) if hasattr(config, "get") else None
    return section if section is not None else {}


def protocol_from_config(config: Any, dataset_info: Any) -> tuple[str, Protocol]:
    """(protocol name, Protocol) from ``config.evaluation`` (all keys optional; see docs/evaluation.md)."""
    settings = _section(config, "evaluation")
    name = settings.get("protocol", "single_scale")
    dataset_config = _section(config, "dataset")
    base = settings.get("base_size", 0) or dataset_config.get("base_size", 0) or dataset_info.base_size
    crop = settings.get("crop_size", 0) or dataset_config.get("crop_size", 0) or dataset_info.crop_size
    return name, make_protocol(
        name,
        base_size=base,
        crop_size=crop,
        scales=tuple(settings.get("scales", ()) or ()),
        flip=settings.get("flip", "auto"),
        stride_ratio=settings.get("stride_ratio", 2.0 / 3.0),
        dataset=dataset_info.name,
        test_scale=tuple(settings.get("test_scale", ()) or ()),
        pad_multiple=settings.get("pad_multiple", 0) or 0,
    )


def sum_over_processes(counts: np.ndarray) -> np.ndarray:
    """Sum of an int64 array over all processes, exact (JAX moves int32 without x64: 20-bit halves)."""
    from jax.experimental import multihost_utils

    counts = np.asarray(counts, np.int64)
    high, low = (counts >> 20).astype(np.int32), (counts & (2**20 - 1)).astype(np.int32)
    gathered = [np.asarray(multihost_utils.process_allgather(part), np.int64).sum(0) for part in (high, low)]
    return (gathered[0] << 20) + gathered[1]


# What makes two evaluations' results different ones (metrics.json keys); the split and protocol name are in
# the folder's name.
RESULT_SETTINGS = (
    "checkpoint",
    "step",
    "model_name",
    "dataset",
    "num_images",
    "protocol_scales",
    "protocol_flip",
    "protocol_base_size",
    "protocol_crop_size",
    "protocol_stride",
    "protocol_whole",
    "protocol_test_scale",
    "protocol_pad_multiple",
    "protocol_image_resize",
)


def _settings(result: Mapping[str, Any]) -> dict[str, Any]:
    """The settings that make results different ones, the ones a protocol does not use left out (as None)."""
    settings = json.loads(json.dumps({key: result.get(key) for key in RESULT_SETTINGS}))  # tuples as JSON lists
    if settings["checkpoint"]:
        settings["checkpoint"] = str(Path(settings["checkpoint"]).expanduser().absolute())
    settings["protocol_test_scale"] = settings["protocol_test_scale"] or []  # results older than test scales: none
    settings["protocol_image_resize"] = settings["protocol_image_resize"] or ""  # older: as the scores
    if settings["protocol_test_scale"]:  # the mmseg protocols: no long side, no windows
        settings.update(protocol_base_size=None, protocol_crop_size=None, protocol_stride=None)
    if not settings["protocol_whole"]:
        settings["protocol_pad_multiple"] = None  # windows pad to their own size
    elif settings["protocol_pad_multiple"] is None:  # results older than the setting: 'whole' padded to 32
        settings["protocol_pad_multiple"] = WHOLE_MULTIPLE
    return settings


def results_label(result: Mapping[str, Any], workdir: Path, current_dataset: str | None = None) -> str:
    """What distinguishes an evaluation's results, for a folder name: the dataset when it is not
    ``current_dataset``, ``step30``, the checkpoint when it is not the workdir's own (``best``, or the folder's
    name), then flip, scales and stride where they are not the protocol's defaults, and the sizes:
    ``step30_best_flip_base64_crop48``."""
    settings = _settings(result)
    parts = []
    if current_dataset and settings["dataset"] and settings["dataset"] != current_dataset:
        parts.append(re.sub(r"[^A-Za-z0-9_.-]+", "-", str(settings["dataset"])))  # folder:six -> folder-six
    parts += [f"step{settings['step']}"] if settings["step"] is not None else []
    if settings["checkpoint"] and Path(settings["checkpoint"]) != workdir:
        checkpoint = Path(settings["checkpoint"])
        inside = checkpoint.is_relative_to(workdir)
        parts.append("-".join(checkpoint.relative_to(workdir).parts) if inside else checkpoint.name)
    name, flip, scales = result.get("protocol"), settings["protocol_flip"], settings["protocol_scales"]
    multi = name in ("multi_scale", "mmseg_multi_scale")
    if flip is not None and flip != multi:
        parts.append("flip" if flip else "noflip")
    default_scales = MULTI_SCALES if multi else (1.0,)
    if name == "multi_scale" and result.get("dataset") == "cityscapes":
        default_scales += CITYSCAPES_EXTRA_SCALES
    if scales is not None and tuple(scales) != default_scales:
        parts.append("scales" + "-".join(f"{scale:g}" for scale in scales))
    base, crop, stride = (settings[f"protocol_{key}"] for key in ("base_size", "crop_size", "stride"))
    pad = settings["protocol_pad_multiple"]
    if pad is not None and result.get("protocol_whole") and pad != (1 if name in MMSEG_PROTOCOLS else WHOLE_MULTIPLE):
        parts.append(f"pad{pad}")
    if settings["protocol_test_scale"]:  # the mmseg protocols use no base or crop size
        parts.append("scale" + "x".join(str(side) for side in settings["protocol_test_scale"]))
    elif base is not None and crop is not None:
        parts.append(f"base{base}_crop{crop}")
        if stride is not None and stride != int(crop * 2.0 / 3.0):
            parts.append(f"stride{stride}")
    return "_".join(str(part) for part in parts) or "earlier"


def keep_earlier_results(out: Path, result: Mapping[str, Any], workdir: Path) -> str | None:
    """Before ``result`` is written to ``out``: moves earlier results there of another checkpoint, step,
    protocol setting (scales, flip, sizes) or image count aside to ``<out>_<what they were>``
    (:func:`results_label`, ``_2``, ... if that is taken too), so that nothing is replaced silently. Returns
    what it did, for the user (None: ``out`` holds no results)."""
    metrics_file = out / "metrics.json"
    if not metrics_file.is_file():
        return None
    try:
        earlier = json.loads(metrics_file.read_text())
    except (OSError, ValueError):
        earlier = {}
    if not isinstance(earlier, dict):
        earlier = {}
    if _settings(earlier) == _settings(result):
        return f"replacing the earlier results in {out}: the same checkpoint, step and protocol settings"
    label = results_label(earlier, workdir, result.get("dataset"))
    target, n = out.with_name(f"{out.name}_{label}"), 2
    while target.exists():
        target, n = out.with_name(f"{out.name}_{label}_{n}"), n + 1
    out.rename(target)
    if earlier.get("protocol_test_scale"):
        sizes = f"test scale {tuple(earlier['protocol_test_scale'])}"
    else:
        sizes = f"base {earlier.get('protocol_base_size')}, crop {earlier.get('protocol_crop_size')}"
    return (
        f"earlier results in {out} ({earlier.get('checkpoint')}, step {earlier.get('step')}, "
        f"{earlier.get('num_images')} images, scales {earlier.get('protocol_scales')}, flip "
        f"{earlier.get('protocol_flip')}, {sizes}) differ from this evaluation's: kept, moved to {target}"
    )


def run_evaluation(config: Any, workdir: str | Path) -> dict[str, Any]:
    """Evaluates the workdir's checkpoint (or ``config.init_from``) on ``config.dataset.eval_split``.

    Writes to ``WORKDIR/eval/<split>_<protocol>/``: ``metrics.json``, ``per_class_iou.md``, ``confusion.png``,
    ``confusion.npy``; with ``evaluation.submission_dir`` also one label PNG per image in the benchmark's raw
    encoding. Earlier results there of another checkpoint, step or protocol setting are kept, moved aside
    (:func:`keep_earlier_results`). Returns the metrics dict.
    """
    from PIL import Image

    from fastfcn_jax import checkpointing
    from fastfcn_jax.data import pipeline
    from fastfcn_jax.data.datasets import directory, get_dataset_info
    from fastfcn_jax.models import create_model

    workdir = Path(workdir).expanduser().absolute()
    settings = _section(config, "evaluation")
    data_dir = config.dataset.data_dir or None
    dataset = get_dataset_info(config.dataset.name, data_dir)
    split = settings.get("split", "") or config.dataset.eval_split
    # Absolute: results name it, and later evaluations compare it, from any working directory.
    source = str(Path(config.get("init_from", "") or workdir).expanduser().absolute())
    variables, info = checkpointing.restore_variables(source)
    checkpointing.require_segmentation_weights(info, source, "evaluated")
    num_classes = int(info["num_classes"])
    if num_classes != dataset.num_classes:
        if info.get("dataset") == dataset.name:  # e.g. a folder dataset's classes.json edited since
            hint = "its class table has changed since the model was trained"
        else:
            hint = "set config.dataset.name to the dataset the model was trained on" + (
                f" (--config.dataset.name={info['dataset']}, as the checkpoint records)" if info.get("dataset") else ""
            )
        raise ValueError(
            f"checkpoint {source} predicts {num_classes} classes but dataset {dataset.name!r} has "
            f"{dataset.num_classes}: {hint}"
        )
    trained_names = list(info.get("class_names") or [])
    if trained_names and trained_names != list(dataset.class_names) and jax.process_index() == 0:
        renamed = [(a, b) for a, b in zip(trained_names, dataset.class_names, strict=True) if a != b]
        print(
            f"note: dataset {dataset.name!r} names its classes differently from the checkpoint's training data "
            f"({', '.join(f'{a!r} there, {b!r} here' for a, b in renamed[:3])}"
            f"{', ...' if len(renamed) > 3 else ''}): class k is scored as the model's class k; results use the "
            "checkpoint's names",
            flush=True,
        )
    checkpointing.note_unused_model_config(info, source, config.model, "is evaluated")
    model = create_model(info["model_name"], num_classes, **checkpointing.model_overrides(info))
    name, protocol = protocol_from_config(config, dataset)
    protocol = dataclasses.replace(protocol, align_corners=model.align_corners)  # the model's resizes
    runner = ProtocolRunner(
        model_logits_fn(model),
        variables,
        num_classes,
        protocol,
        window_batch=settings.get("batch_size", 0) or 8,
        images_per_call=settings.get("images_per_call", 0) or 4,
        devices=sharding.evaluation_devices(config.get("num_devices") or 0),
    )
    pipeline.prepare_on_first_process(config.dataset.name, data_dir, config.dataset.get("manual_dir", "") or None)
    try:
        total = full_size = pipeline.dataset_size(dataset, split, data_dir)
    except (KeyError, ValueError) as error:  # tfds: "Unknown split 'test'. Should be one of [...]"
        hint = (
            "; unlabelled test images are predicted, not evaluated: --mode=predict --inputs=THEIR_FOLDER "
            "--config.evaluation.submission_dir=DIR (docs/evaluation.md)"
            if "test" in split
            else ""
        )
        raise ValueError(f"config.evaluation.split / config.dataset.eval_split {split!r}: {error}{hint}") from None
    limit = settings.get("max_examples", 0) or total
    total = min(total, limit)
    submission_dir = Path(settings["submission_dir"]).expanduser() if settings.get("submission_dir") else None
    encoding = submission_encoding(dataset.label_lut, num_classes) if submission_dir else None
    if submission_dir:
        submission_dir.mkdir(parents=True, exist_ok=True)

    names: list[str] = []
    # Several processes (--distributed): each evaluates every P-th image on its own devices; the confusion
    # matrices are summed and the first process writes the results.
    process, processes = jax.process_index(), jax.process_count()
    share = len(range(process, total, processes))
    lead = process == 0

    def examples() -> Iterator[tuple[np.ndarray, np.ndarray]]:
        for example in pipeline.full_examples(
            dataset, data_dir=data_dir, split=split, limit=limit, shard=(process, processes)
        ):
            names.append(example["file_name"])
            yield normalize(example["image"]), example["label"]

    if lead:
        print(
            f"evaluating {source} ({checkpointing.model_label(info)}) on {dataset.name}/{split}: {total} images"
            + (f" over {processes} processes" if processes > 1 else "")
            + (
                f" on {len(runner.devices)} devices" + (" each" if processes > 1 else "")
                if len(runner.devices) > 1
                else ""
            )
            + f", protocol {name} ({protocol.describe()})",
            flush=True,
        )
        trained = (int(info.get("base_size") or 0), int(info.get("crop_size") or 0))
        used = (protocol.base_size, protocol.crop_size)
        explicit = settings.get("base_size") or settings.get("crop_size")
        if all(trained) and trained != used and not explicit and not protocol.test_scale:
            # Prediction prefers the recorded sizes; evaluation keeps the protocol's (the paper's numbers are at
            # those), but says so.
            print(
                f"note: the checkpoint's run was trained at base {trained[0]} / crop {trained[1]}, this evaluation "
                f"runs at base {used[0]} / crop {used[1]} (config.dataset's, else the dataset's); to evaluate at the "
                f"trained sizes add --config.evaluation.base_size={trained[0]} "
                f"--config.evaluation.crop_size={trained[1]}",
                flush=True,
            )
    confusion = np.zeros((num_classes, num_classes), np.int64)
    start = time.perf_counter()
    for i, result in enumerate(runner.run_pairs(examples())):
        confusion += result["confusion"]
        if encoding is not None:
            raw = encoding[result["prediction"]]
            image = submission_image(raw, dataset.submission_mode, dataset.palette)
            image.save(submission_dir / (Path(names[i]).stem + ".png"))
        done = i + 1
        if lead and (done % 50 == 0 or done == share):
            running = metrics.segmentation_scores(confusion)
            print(
                f"  {done}/{share}{' (this process)' if processes > 1 else ''}  pixAcc "
                f"{running['pixel_accuracy']:.4f}  mIoU {running['mean_iou']:.4f}  "
                f"{done / (time.perf_counter() - start):.2f} img/s  compilations {runner.compile_count}",
                flush=True,
            )
    num_images = len(names)
    if processes > 1:
        confusion, num_images = sum_over_processes(confusion), int(sum_over_processes(np.int64(num_images)))
    seconds = time.perf_counter() - start
    scores = metrics.segmentation_scores(confusion)
    if dataset.name == "pcontext" and num_classes == 59:
        scores["mean_iou_60"] = pcontext_60_class_miou(scores["mean_iou"])
    class_names = list(info.get("class_names") or dataset.class_names)
    result = {
        "checkpoint": source,
        "step": info.get("step"),
        "model_name": info["model_name"],
        "dataset": dataset.name,
        "split": split,
        "num_images": num_images,
        # Where the images came from and the code that scored them (neither compared between results).
        "data_dir": directory(data_dir) or "(tfds default)",
        "code_version": code_version(),
        "protocol": name,
        **{f"protocol_{k}": v for k, v in dataclasses.asdict(protocol).items()},
        "pixel_accuracy": scores["pixel_accuracy"],
        "mean_iou": scores["mean_iou"],
        "mean_iou_present": scores["mean_iou_present"],
        "score": (scores["pixel_accuracy"] + scores["mean_iou"]) / 2,  # ADE20K's "final score"
        **({"mean_iou_60": scores["mean_iou_60"]} if "mean_iou_60" in scores else {}),
        "per_class_iou": dict(zip(class_names, scores["per_class_iou"], strict=True)),
        "compilations": runner.compile_count,
        "seconds": seconds,
    }
    if not protocol.whole:
        result["protocol_pad_multiple"] = None  # windows are padded to the crop, not to a multiple
    # A partial run (max_examples) never overwrites the whole split's results.
    partial = f"_first{num_images}" if num_images < full_size else ""
    out = workdir / "eval" / f"{split}_{name}{partial}"
    if not lead:
        return result
    kept = keep_earlier_results(out, result, workdir)
    if kept:
        print(kept, flush=True)
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.json").write_text(json.dumps(result, indent=2))
    heading = (
        f"# {dataset.name} {split}: {num_images} images, {name} ({protocol.describe()})\n\n"
        f"{info['model_name']}, checkpoint {source}, step {info.get('step')}; fastfcn-jax {result['code_version']}\n\n"
    )
    (out / "per_class_iou.md").write_text(heading + per_class_table(scores, class_names, confusion))
    np.save(out / "confusion.npy", confusion)
    Image.fromarray(visualize.confusion_image(confusion, class_names)).save(out / "confusion.png")
    message = (
        f"{dataset.name}/{split} {name}: pixAcc {scores['pixel_accuracy']:.4f}  mIoU {scores['mean_iou']:.4f}"
        f"  (present classes {scores['mean_iou_present']:.4f})"
    )
    if "mean_iou_60" in scores:
        message += f"  60-class mIoU {scores['mean_iou_60']:.4f}"
    print(f"{message}; {runner.compile_count} compilations, {seconds:.1f} s; written to {out}", flush=True)
    return result

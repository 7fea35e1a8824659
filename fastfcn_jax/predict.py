"""Prediction on your own images: label masks and overlays, and a Python API.

    predictor = fastfcn_jax.Predictor.from_checkpoint("/tmp/fastfcn_demo")
    mask = predictor(image)  # uint8/int [H, W, 3|4] or [H, W] -> int32 [H, W] class indices

Images of any size and mode (RGB, grayscale, RGBA; JPEG, PNG, ...) go through the same test protocol as
evaluation (:mod:`fastfcn_jax.evaluate`), several images per device call, with a fixed number of compilations
(``whole``: one per padded image shape).
"""

from __future__ import annotations

import collections
import dataclasses
import glob
import json
import os
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from fastfcn_jax import sharding, visualize
from fastfcn_jax.data.image_files import IMAGE_SUFFIXES, pil_to_rgb, to_rgb
from fastfcn_jax.evaluate import (
    PROTOCOLS,
    ProtocolRunner,
    make_protocol,
    model_logits_fn,
    normalize,
    submission_encoding,
    submission_image,
    sum_over_processes,
)

# The reference's sizes, for checkpoints that do not name a known dataset.
DEFAULT_BASE_SIZE, DEFAULT_CROP_SIZE = 520, 480
# Written beside the masks by run_prediction: each input's path -> its output files, checkpoint and protocol.
INDEX_FILE = "predictions.json"


def load_image(path: str | Path, *, exif_orientation: bool = True) -> np.ndarray:
    """uint8 RGB [H, W, 3] of an image file (16-bit and float images as :mod:`fastfcn_jax.data.image_files`
    says, as the dataset builders read them). With ``exif_orientation``
    turned as its EXIF tag says (as photo viewers show it); without, as stored (as datasets and their
    benchmarks read it).

    Raises:
      ValueError: the file is not an image PIL can decode.
    """
    try:
        with Image.open(path) as opened:
            if exif_orientation:
                opened = ImageOps.exif_transpose(opened)
            return pil_to_rgb(opened)
    except Image.DecompressionBombError as error:  # past twice Image.MAX_IMAGE_PIXELS (89 MP)
        raise ValueError(
            f"{path}: too large for Pillow, which refuses images past {2 * Image.MAX_IMAGE_PIXELS} pixels as "
            f"possible decompression bombs ({error}); the test protocols scale images to a long side of about "
            "520 anyway, so downscale it first, or, for a trusted file, raise PIL.Image.MAX_IMAGE_PIXELS (Python API)"
        ) from error
    # PIL raises SyntaxError for some bad PNGs.
    except (UnidentifiedImageError, OSError, SyntaxError) as error:
        raise ValueError(f"{path}: not a readable image ({error})") from error


class Predictor:
    """Class-index masks for arbitrary images with a trained model and a test protocol."""

    def __init__(
        self,
        model: Any,
        variables: Any,
        *,
        num_classes: int,
        protocol: Any,
        class_names: Sequence[str] | None = None,
        palette: np.ndarray | None = None,
        window_batch: int = 8,
        images_per_call: int = 4,
        label_lut: np.ndarray | None = None,
        submission_mode: str = "L",
        devices: Sequence[Any] | None = None,
    ) -> None:
        self.num_classes = num_classes
        self.checkpoint_info: dict[str, Any] = {}  # from_checkpoint: the checkpoint's description
        # from_checkpoint: where (base, crop) size came from: 'given', 'checkpoint' (recorded by training),
        # 'unrecorded' (the sizes for a checkpoint that records none), 'dataset' or 'reference' (520 / 480).
        self.size_sources: tuple[str, str] = ("given", "given")
        # The dataset's raw label value -> class table (DatasetInfo.label_lut), for test-server encodings.
        self.label_lut = None if label_lut is None else np.asarray(label_lut)
        self.submission_mode = submission_mode  # DatasetInfo.submission_mode: 'L' or 'P' (Pascal VOC)
        # Images rescaled and scores resized back as the model resizes (reference='mmseg': half-pixel).
        protocol = dataclasses.replace(protocol, align_corners=getattr(model, "align_corners", True))
        self.protocol = protocol
        self.class_names = list(class_names) if class_names else [f"class {i}" for i in range(num_classes)]
        self.palette = np.asarray(palette if palette is not None else visualize.default_palette(num_classes), np.uint8)
        self.runner = ProtocolRunner(
            model_logits_fn(model),
            variables,
            num_classes,
            protocol,
            window_batch=window_batch,
            images_per_call=images_per_call,
            devices=devices,  # None: the default device (the runner places the variables)
        )

    @classmethod
    def from_checkpoint(
        cls,
        path: str | Path,
        *,
        protocol: str = "single_scale",
        scales: Sequence[float] = (),
        flip: bool | str | None = None,
        base_size: int = 0,
        crop_size: int = 0,
        unrecorded_sizes: tuple[int, int] = (0, 0),
        stride_ratio: float = 2.0 / 3.0,
        test_scale: Sequence[int] = (),
        pad_multiple: int = 0,
        window_batch: int = 8,
        images_per_call: int = 4,
        devices: Sequence[Any] | None = None,
    ) -> Predictor:
        """A predictor from a training workdir or a converter output directory.

        Each size (long side at scale 1, window side; pixels) is, in this order: ``base_size`` / ``crop_size``
        when given (> 0); the one the checkpoint's run was trained and validated at (``info['base_size']`` /
        ``info['crop_size']``, recorded by training); for a checkpoint that records none (a converter
        output), ``unrecorded_sizes`` (base, crop) when > 0, else the checkpoint's dataset's
        (``info['dataset']``), else the reference's 520 / 480. ``size_sources`` says which, per size.
        ``protocol`` is one of ``single_scale`` (default), ``multi_scale``, ``whole``, ``mmseg``,
        ``mmseg_multi_scale`` (at ``test_scale``, else mmsegmentation's for the checkpoint's dataset;
        ``pad_multiple``: the whole-image protocols' padding, 0 = the protocol's own). ``devices``:
        where the network runs, groups of ``images_per_call`` images in turn (``ProtocolRunner``); None: the
        default device.
        """
        from fastfcn_jax import checkpointing
        from fastfcn_jax.models import create_model

        variables, info = checkpointing.restore_variables(path)
        checkpointing.require_segmentation_weights(info, path, "used for prediction")
        num_classes = int(info["num_classes"])
        dataset = _dataset_info(info.get("dataset"))
        palette = dataset.palette[:num_classes] if dataset is not None and len(dataset.palette) >= num_classes else None
        if palette is None and len(info.get("palette") or ()) >= num_classes:  # stored by training (folder data)
            palette = np.asarray(info["palette"], np.uint8)[:num_classes]
        names = info.get("class_names") or (dataset.class_names[:num_classes] if dataset is not None else None)
        model = create_model(info["model_name"], num_classes, **checkpointing.model_overrides(info))
        checkpointing.check_variables(
            model, variables, f"checkpoint {path} ({checkpointing.model_label(info)}, {num_classes} classes)"
        )
        candidates = (  # (base, crop) per source, first choice first; 0 / None: not set there
            ("given", (base_size, crop_size)),
            ("checkpoint", (info.get("base_size"), info.get("crop_size"))),
            ("unrecorded", tuple(unrecorded_sizes)),
            ("dataset", (dataset.base_size, dataset.crop_size) if dataset is not None else (0, 0)),
            ("reference", (DEFAULT_BASE_SIZE, DEFAULT_CROP_SIZE)),
        )
        chosen = [next((int(pair[i]), source) for source, pair in candidates if pair[i]) for i in (0, 1)]
        sizes = [size for size, _ in chosen]
        predictor = cls(
            model,
            variables,
            num_classes=num_classes,
            class_names=names,
            palette=palette,
            protocol=make_protocol(
                protocol,
                base_size=sizes[0],
                crop_size=sizes[1],
                scales=scales,
                flip=flip,
                stride_ratio=stride_ratio,
                dataset=dataset.name if dataset is not None else "",
                test_scale=test_scale,
                pad_multiple=pad_multiple,
            ),
            window_batch=window_batch,
            images_per_call=images_per_call,
            label_lut=dataset.label_lut if dataset is not None else None,
            submission_mode=dataset.submission_mode if dataset is not None else "L",
            devices=devices,
        )
        predictor.checkpoint_info = dict(info)
        predictor.size_sources = (chosen[0][1], chosen[1][1])
        return predictor

    def __call__(self, image: Any) -> np.ndarray:
        """int32 [H, W] class indices of one image (see :func:`to_rgb` for accepted arrays)."""
        return self.predict_batch([image])[0]

    def predict_batch(self, images: Sequence[Any]) -> list[np.ndarray]:
        """int32 [H, W] class indices per image; images may differ in size and mode."""
        return list(self.iter_predict(images))

    def iter_predict(self, images: Any) -> Iterator[np.ndarray]:
        """Lazily predicts an iterable of images, ``images_per_call`` at a time."""
        normalised = (normalize(to_rgb(image)) for image in images)
        for result in self.runner.run(normalised):
            yield result["prediction"]

    def overlay(self, image: np.ndarray, mask: np.ndarray, alpha: float = 0.5) -> np.ndarray:
        """uint8 RGB: the image blended with the coloured mask, plus a legend of the classes present (by area)."""
        rgb, mask = to_rgb(image), np.asarray(mask)
        if mask.shape != rgb.shape[:2]:
            raise ValueError(f"mask {mask.shape} and image {rgb.shape[:2]} differ in size; predict the image itself")
        present, counts = np.unique(mask, return_counts=True)
        order = [int(c) for c in present[np.argsort(-counts, kind="stable")]]
        blended = visualize.overlay(rgb, mask, self.palette, alpha=alpha)
        return visualize.add_legend(blended, order, self.class_names, self.palette)

    def mask_image(self, mask: np.ndarray) -> Image.Image:
        """The mask as a PNG-ready image: palette mode (pixel value = class index) for up to 256 classes."""
        if self.num_classes > 256:
            return Image.fromarray(mask.astype(np.uint16))
        return visualize.palette_png(mask, self.palette)

    def benchmark_mask(self, mask: np.ndarray) -> Image.Image:
        """``mask`` in its benchmark's own encoding (ADE20K class + 1, Cityscapes label ids, ...) as the PNG test
        servers take (grayscale; Pascal VOC's palette PNG). Needs the checkpoint's dataset (``label_lut``)."""
        if self.label_lut is None:
            raise ValueError(
                "the checkpoint names no known dataset, so its benchmark's label encoding is unknown: "
                "submission PNGs need a checkpoint trained on pcontext, ade20k, cityscapes, pascal_voc or pascal_aug"
            )
        encoding = submission_encoding(self.label_lut, self.num_classes)
        return submission_image(encoding[mask], self.submission_mode, self.palette)


def _dataset_info(name: str | None):
    if not name:
        return None
    from fastfcn_jax.data.datasets import get_dataset_info

    try:
        return get_dataset_info(name)
    except ValueError:  # a custom folder dataset without its data_dir, or an unknown name: no palette, defaults
        return None


def collect_inputs(inputs: str) -> list[Path]:
    """Files named by ``inputs``: an image file, a folder (its files, not recursive; hidden ones skipped) or a
    glob pattern (``**`` recursive). Raises FileNotFoundError if nothing matches."""
    path = Path(inputs).expanduser()
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.is_file() and not p.name.startswith("."))
    elif path.is_file():
        files = [path]
    else:
        files = sorted(Path(p) for p in glob.glob(str(path), recursive=True) if Path(p).is_file())
    if not files:
        hint = ""
        if path.is_dir() and any(p.is_dir() for p in path.iterdir()):
            hint = f" ({path} holds only folders: '{path / '**' / '*'}' reads them all)"
        raise FileNotFoundError(
            f"no files at {inputs!r}{hint}: give an image file, a folder of images or a glob pattern"
        )
    return files


def _progress(done: int, total: int, note: str = "", width: int = 30) -> None:
    filled = width * done // max(total, 1)
    end = "\n" if done == total else ""
    print(
        f"\rpredict [{'#' * filled}{'.' * (width - filled)}] {done}/{total} files{note}",
        end=end,
        file=sys.stderr,
        flush=True,
    )


def is_own_output(path: Path, output_dir: Path) -> bool:
    """Whether ``path`` is a file :func:`run_prediction` writes into ``output_dir`` (a mask, an overlay)."""
    names = path.name.endswith(("_mask.png", "_overlay.png")) or path.name == INDEX_FILE
    return names and path.parent.resolve() == output_dir.resolve()


def run_prediction(config: Any, workdir: str | Path, inputs: str, output_dir: str | None = None) -> list[Path]:
    """Writes ``<name>_mask.png`` (palette PNG, pixel = class index) and ``<name>_overlay.png`` (image blended
    with the mask, legend of the classes present) per input image into ``output_dir`` (default
    ``WORKDIR/predict``), and there :data:`INDEX_FILE` (each input's path -> its output files, and the
    checkpoint and protocol used); returns the written masks' and overlays' paths. Files that are not images are
    reported and skipped. ``<name>`` is the input's path relative to the inputs' common folder, without its
    suffix, ``/`` as ``_`` (see :func:`output_names`).

    With ``config.evaluation.submission_dir``, also ``<image name>.png`` there (the output name where two
    images share a name) in the benchmark's own label encoding (:meth:`Predictor.benchmark_mask`): test-server
    submissions of unlabelled test images.

    The checkpoint is ``config.init_from`` if set, else ``workdir``; the protocol comes from
    ``config.evaluation`` (as for evaluation). Sizes: ``config.evaluation.base_size`` / ``crop_size`` when set,
    else those the checkpoint's run was trained at (recorded in it), else ``config.dataset``'s, else the
    checkpoint's dataset's (see :meth:`Predictor.from_checkpoint`).
    """
    settings = config.get("evaluation") or {}
    dataset_config = config.get("dataset") or {}
    protocol = settings.get("protocol", "single_scale")
    if protocol not in PROTOCOLS:
        raise ValueError(f"evaluation.protocol={protocol!r}: must be one of {PROTOCOLS}")
    # Absolute, as predictions.json names it.
    checkpoint = str(Path(config.get("init_from", "") or workdir).expanduser().absolute())
    configured = (int(dataset_config.get("base_size", 0) or 0), int(dataset_config.get("crop_size", 0) or 0))
    predictor = Predictor.from_checkpoint(
        checkpoint,
        protocol=protocol,
        scales=tuple(settings.get("scales", ()) or ()),
        flip=settings.get("flip", "auto"),
        base_size=settings.get("base_size", 0) or 0,
        crop_size=settings.get("crop_size", 0) or 0,
        unrecorded_sizes=configured,
        stride_ratio=settings.get("stride_ratio", 2.0 / 3.0),
        test_scale=tuple(settings.get("test_scale", ()) or ()),
        pad_multiple=settings.get("pad_multiple", 0) or 0,
        window_batch=settings.get("batch_size", 0) or 8,
        images_per_call=settings.get("images_per_call", 0) or 4,
        devices=sharding.evaluation_devices(config.get("num_devices") or 0),
    )
    from fastfcn_jax import checkpointing

    checkpointing.note_unused_model_config(predictor.checkpoint_info, checkpoint, config.get("model") or {}, "predicts")
    out = Path(output_dir).expanduser() if output_dir else Path(workdir).expanduser() / "predict"
    files = collect_inputs(inputs)
    folder = Path(inputs).expanduser()
    if folder.is_dir() and jax.process_index() == 0:  # what a folder's listing leaves out, said
        entries = list(folder.iterdir())
        nested = [p for p in entries if p.is_dir() and not p.name.startswith(".")]
        hidden = [p for p in entries if p.is_file() and p.name.startswith(".") and p.suffix.lower() in IMAGE_SUFFIXES]
        parts = []
        if nested:
            parts.append(f"{len(nested)} subfolder(s) (the folder is not read recursively: '{folder / '**' / '*'}' is)")
        if hidden:
            parts.append(f"{len(hidden)} hidden image file(s) (named .*)")
        if parts:
            print(f"left out of {folder}: " + " and ".join(parts), flush=True)
    own = [path for path in files if is_own_output(path, out)]
    if own:  # predicting into the inputs' folder, and again: an earlier run's outputs are not new inputs
        files = [path for path in files if path not in own]
        if jax.process_index() == 0:
            print(f"left out {len(own)} files in {out} that an earlier prediction wrote there (*_mask.png, ...)")
        if not files:
            raise FileNotFoundError(f"{inputs!r} holds only an earlier prediction's outputs (*_mask.png, ...)")
    # Output names over all inputs first, so that several processes (--distributed) name files alike; each
    # process then predicts every P-th file into the same folders (a shared filesystem gathers them).
    stems = output_names(files)
    benchmark_stems = benchmark_names(files, stems)
    process, processes = jax.process_index(), jax.process_count()
    share = [(index, files[index]) for index in range(process, len(files), processes)]
    lead = process == 0
    if lead:
        _report_protocol(predictor, checkpoint, protocol, configured, len(files))
    out.mkdir(parents=True, exist_ok=True)
    submission_dir = settings.get("submission_dir", "")
    submission = Path(submission_dir).expanduser() if submission_dir else None
    if submission is not None:
        predictor.benchmark_mask(np.zeros((1, 1), np.int64))  # an unknown encoding fails before any work
        submission.mkdir(parents=True, exist_ok=True)

    skipped: dict[int, str] = {}  # input index -> why (this process's share)
    loaded: list[tuple[int, np.ndarray]] = []
    done = 0

    def progress() -> None:
        if lead:  # the others' progress is alike; their skipped files are printed by each
            _progress(done, len(share), "" if processes == 1 else " (this process)")

    def readable() -> Iterator[np.ndarray]:
        nonlocal done
        for index, path in share:
            try:
                # Benchmarks score masks of the stored pixels: no EXIF turn for submissions.
                image = load_image(path, exif_orientation=submission is None)
            except ValueError as error:
                skipped[index] = str(error)
                print(f"\nskipped {error}", file=sys.stderr, flush=True)
                done += 1
                progress()
                continue
            loaded.append((index, image))
            yield image

    written: list[Path] = []
    progress()
    for mask in predictor.iter_predict(readable()):
        index, image = loaded.pop(0)
        mask_path, overlay_path = out / f"{stems[index]}_mask.png", out / f"{stems[index]}_overlay.png"
        predictor.mask_image(mask).save(mask_path)
        Image.fromarray(predictor.overlay(image, mask)).save(overlay_path)
        if submission is not None:
            predictor.benchmark_mask(mask).save(submission / f"{benchmark_stems[index]}.png")
        written += [mask_path, overlay_path]
        done += 1
        progress()
    # Counts and which inputs were skipped, over all processes: the first one writes the index of every input.
    flags = np.zeros(len(files), np.int64)
    flags[list(skipped)] = 1
    totals = np.concatenate([[len(written) // 2, len(skipped)], flags]).astype(np.int64)
    if processes > 1:
        totals = sum_over_processes(totals)
    counts, skipped_anywhere = totals[:2], totals[2:]
    index_path = out / INDEX_FILE
    if lead and counts[0]:
        entries = []
        for index, (path, stem) in enumerate(zip(files, stems, strict=True)):
            entry: dict[str, Any] = {"input": str(path.absolute())}
            if skipped_anywhere[index]:
                entry["skipped"] = skipped.get(index, "not a readable image (reported by the process that read it)")
            else:
                entry.update(mask=f"{stem}_mask.png", overlay=f"{stem}_overlay.png")
                if submission is not None:
                    entry["benchmark_mask"] = str((submission / f"{benchmark_stems[index]}.png").absolute())
            entries.append(entry)
        record = {
            "checkpoint": checkpoint,
            "step": predictor.checkpoint_info.get("step"),
            "model_name": predictor.checkpoint_info.get("model_name"),
            "protocol": {"name": protocol, **dataclasses.asdict(predictor.protocol)},
            "files": entries,
        }
        index_path.write_text(json.dumps(record, indent=2))
    if lead:
        print(
            f"wrote {counts[0]} masks and overlays to {out}"
            + (f" and benchmark-encoded masks to {submission}" if submission is not None else "")
            + (f"; skipped {counts[1]} unreadable file(s)" if counts[1] else "")
            + (
                f" ({processes} processes, each wrote its share into these folders on its host)"
                if processes > 1
                else ""
            )
            + (f"; input -> output files in {index_path}" if counts[0] else ""),
            flush=True,
        )
    if not counts[0]:
        raise ValueError(f"none of the {len(files)} input file(s) is a readable image (see the messages above)")
    return written


def _report_protocol(
    predictor: Predictor, checkpoint: str, protocol: str, configured: tuple[int, int], num_files: int
) -> None:
    """Prints the protocol prediction runs (as evaluation does), and a note when config.dataset's sizes are not
    the ones used because the checkpoint records those its run was trained at."""
    used = predictor.protocol
    info = predictor.checkpoint_info
    words = {
        "given": "from config.evaluation",
        "checkpoint": "recorded in the checkpoint",
        "unrecorded": "from config.dataset (the checkpoint records none)",
        "dataset": f"of dataset {info.get('dataset')} (the checkpoint records none)",
        "reference": "the reference's (the checkpoint records none)",
    }
    sources = predictor.size_sources
    origin = (
        f"sizes {words[sources[0]]}"
        if sources[0] == sources[1]
        else f"base {words[sources[0]]}, crop {words[sources[1]]}"
    )
    print(
        f"predicting {num_files} file(s) with {checkpoint} ({info.get('model_name')}, step {info.get('step')}), "
        f"protocol {protocol} ({used.describe()}" + ("" if used.test_scale else f"; {origin}") + ")",
        flush=True,
    )
    sizes = (used.base_size, used.crop_size)
    # config.dataset's sizes where the checkpoint's recorded ones were preferred to them.
    wanted = tuple(c if c and s == "checkpoint" else u for c, s, u in zip(configured, sources, sizes, strict=True))
    if wanted != sizes and not used.test_scale:
        print(
            f"note: predicting at base {sizes[0]} / crop {sizes[1]} ({origin}), not at "
            f"config.dataset's {wanted[0]} / {wanted[1]}; to predict at those, add "
            f"--config.evaluation.base_size={wanted[0]} --config.evaluation.crop_size={wanted[1]}",
            flush=True,
        )


def output_names(files: Sequence[Path]) -> list[str]:
    """One output name per file, distinct: its path relative to the files' common folder without the suffix,
    ``/`` as ``_`` (``a/x.jpg``, ``b/x.jpg`` -> ``a_x``, ``b_x``; files of one folder keep their stems). A name
    taken already (``x.jpg`` beside ``x.png``; ``a_x.jpg`` beside ``a/x.jpg``; names equal but for case, which
    some filesystems do not tell apart) gets the suffix, then a counter: ``x_png``, ``x_png_2``. Image files
    choose first: a sidecar that sorts before its photo (``IMG_1.AAE``) does not take its name."""
    if not files:
        return []
    absolute = [path.absolute() for path in files]
    root = Path(os.path.commonpath([str(path.parent) for path in absolute]))
    images = set(Image.registered_extensions())
    names: list[str] = [""] * len(files)
    used: set[str] = set()
    for index in sorted(range(len(files)), key=lambda i: files[i].suffix.lower() not in images):
        path = absolute[index]
        relative = path.relative_to(root)
        stem = "_".join((*relative.parent.parts, path.stem))
        names[index] = _unique_stem(stem, path.suffix, used)
        used.add(names[index].casefold())
    return names


def benchmark_names(files: Sequence[Path], stems: Sequence[str]) -> list[str]:
    """Test-server file names: each image's own name where no other input shares it (Cityscapes' test images
    lie in one folder per city, their names unique: what the servers match), else its output name
    (:func:`output_names`), made distinct from the plain names."""
    counts = collections.Counter(path.stem.casefold() for path in files)
    names = [path.stem if counts[path.stem.casefold()] == 1 else "" for path in files]
    used = {name.casefold() for name in names if name}
    for index, name in enumerate(names):
        if not name:
            names[index] = _unique_stem(stems[index], files[index].suffix, used)
            used.add(names[index].casefold())
    return names


def _unique_stem(stem: str, suffix: str, used: set[str]) -> str:
    """``stem``, else stem_suffix, else stem_suffix_2, ...: the first not in ``used`` (case-folded names)."""
    if stem.casefold() not in used:
        return stem
    stem = f"{stem}_{suffix.lstrip('.')}" if suffix else stem
    candidate, n = stem, 2
    while candidate.casefold() in used:
        candidate, n = f"{stem}_{n}", n + 1
    return candidate

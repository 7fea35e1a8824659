"""Exporting a trained segmenter: serialized StableHLO (``jax.export``), TF SavedModel and ONNX.

Mode ``export`` of ``main`` (``python -m fastfcn_jax.main --config CFG --workdir DIR --mode=export``) calls
:func:`run_export`. Each artifact computes ``images -> logits | labels`` and records the model name, classes,
palette, input size, normalisation and source checkpoint:

- StableHLO (``DIR/export/model.stablehlo`` + ``model.json``, parameters baked in or in ``params.npz``):
  input ``[B, H, W, 3]`` ImageNet-normalised float32 with a symbolic batch ``B`` and the fixed size ``H, W``
  chosen at export time; lowered for cpu, cuda and tpu so one file runs on each. ``load(path)(images)`` needs
  only jax, numpy and flatbuffers: this module imports flax, orbax and TensorFlow inside the functions that
  write artifacts.
- TF SavedModel (``DIR/export/saved_model``; extra ``export``: orbax-export): signature ``serving_default``
  takes uint8 RGB images ``[B, h, w, 3]`` of any size and resizes, normalises, segments and resizes the
  result back to ``h, w`` itself; :func:`make_serving_fn` is the same computation in JAX.
- ONNX (``DIR/export/model.onnx``; extra ``onnx`` and jax2onnx): input as StableHLO's, symbolic ``B``; checked
  against the JAX model with ONNX Runtime before it is written (:func:`export_onnx`).
"""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from fastfcn_jax.normalization import IMAGENET_MEAN, IMAGENET_STD, normalize_uint8

FORMATS = ("stablehlo", "savedmodel", "onnx")
OUTPUTS = ("logits", "labels")
PLATFORMS = ("cpu", "cuda", "tpu")
# Settings of the optional ``config.export`` section and their defaults (``base_config`` mirrors them).
DEFAULTS: dict[str, Any] = {
    "formats": ("stablehlo",),
    "image_size": 0,  # 0: the checkpoint's training crop size, else config.dataset.crop_size, else the dataset's
    "output": "logits",  # or "labels" (int32 argmax)
    "platforms": PLATFORMS,
    "directory": "",  # "": WORKDIR/export
    "checkpoint": "",  # "": config.init_from, else WORKDIR (its latest checkpoint); or a converter output / workdir
    "embed_params": True,  # False: parameters go to params.npz beside model.stablehlo
    "fold_norm": True,  # BatchNorms folded into the convolutions before them (models.batch_norm.fold_batch_norm)
    "tuned_for": "",  # backend whose 'auto' op choices the export uses: "" = this machine's, or cpu | gpu | tpu
}
STABLEHLO_FILE = "model.stablehlo"
METADATA_FILE = "model.json"
PARAMS_FILE = "params.npz"
SAVED_MODEL_DIR = "saved_model"
ONNX_FILE = "model.onnx"
# TF Serving's place for files that travel with a SavedModel but are not graph assets.
SAVED_MODEL_METADATA = Path("assets.extra") / "fastfcn_metadata.json"
# What each format writes into the export directory: an earlier export's artifacts of a format not written
# again are removed (they would describe another checkpoint, size or output beside the new ones).
ARTIFACTS = {
    "stablehlo": (STABLEHLO_FILE, METADATA_FILE, PARAMS_FILE),
    "savedmodel": (SAVED_MODEL_DIR,),
    "onnx": (ONNX_FILE,),
}
FORMAT_VERSION = 1


# ----------------------------------------------------------------------------------------------------
# The functions that get exported.


def inference_fn(model: Any, output: str = "logits") -> Callable[[Any, jax.Array], jax.Array]:
    """``fn(variables, images [B, H, W, 3] normalised float32) -> logits [B, H, W, C] f32 | labels [B, H, W] i32``."""
    if output not in OUTPUTS:
        raise ValueError(f"export output must be one of {OUTPUTS}, got {output!r}")

    def fn(variables: Any, images: jax.Array) -> jax.Array:
        logits = model.apply(variables, images, train=False)["logits"].astype(jnp.float32)
        return logits if output == "logits" else jnp.argmax(logits, axis=-1).astype(jnp.int32)

    return fn


def make_serving_fn(
    model: Any, variables: Any, image_size: Sequence[int], output: str = "logits"
) -> Callable[[jax.Array], dict[str, jax.Array]]:
    """The SavedModel's serving computation in JAX: uint8 ``[B, h, w, 3]`` of any size -> ``{'labels' [B, h, w]
    int32, 'logits' [B, h, w, C] float32 (when output == 'logits')}``.

    Resizes to ``image_size`` with bilinear interpolation in the model's corner convention (align corners, the
    reference's; half-pixel for ``reference='mmseg'`` models), normalises with the ImageNet statistics, segments,
    and resizes the logits back to ``h, w`` before the argmax (the reference's test-time rescaling). Jitted; each
    input size compiles once.
    """
    from fastfcn_jax.models.resize import resize_bilinear

    size = (int(image_size[0]), int(image_size[1]))
    forward = inference_fn(model, "logits")
    align = getattr(model, "align_corners", True)

    @jax.jit
    def serve(images: jax.Array) -> dict[str, jax.Array]:
        height, width = images.shape[1:3]
        resized = resize_bilinear(images.astype(jnp.float32), size, align_corners=align)
        logits = forward(variables, normalize_uint8(resized))
        logits = resize_bilinear(logits, (height, width), align_corners=align)
        outputs = {"labels": jnp.argmax(logits, axis=-1).astype(jnp.int32)}
        if output == "logits":
            outputs["logits"] = logits
        return outputs

    return serve


# ----------------------------------------------------------------------------------------------------
# Writers, one per format.


def check_platforms(platforms: Sequence[str], what: str) -> None:
    """``platforms`` must be a non-empty subset of :data:`PLATFORMS` (jax's names)."""
    unknown = sorted(set(platforms) - set(PLATFORMS))
    if unknown or not platforms:
        hint = " (jax names NVIDIA GPUs 'cuda')" if "gpu" in unknown else ""
        raise ValueError(f"{what} must be a non-empty subset of {PLATFORMS}{hint}, got {tuple(platforms)}")


def export_stablehlo(
    model: Any,
    variables: Any,
    directory: str | Path,
    *,
    image_size: Sequence[int],
    metadata: Mapping[str, Any],
    output: str = "logits",
    platforms: Sequence[str] = PLATFORMS,
    embed_params: bool = True,
) -> dict[str, Path]:
    """Writes ``model.stablehlo`` (+ ``params.npz`` unless ``embed_params``) and ``model.json`` to ``directory``.

    The input is ``[B, H, W, 3]`` float32 with symbolic ``B`` and ``(H, W) = image_size``. With embedded
    parameters the weights are constants of the module (one self-contained file); beside it, the file stays
    small and the loader passes ``params.npz`` as the leading arguments.
    """
    check_platforms(platforms, "export platforms")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    fn = inference_fn(model, output)
    (batch,) = jax.export.symbolic_shape("B")
    images = jax.ShapeDtypeStruct((batch, int(image_size[0]), int(image_size[1]), 3), jnp.float32)
    variables = jax.tree_util.tree_map(np.asarray, variables)
    paths = {"stablehlo": directory / STABLEHLO_FILE, "metadata": directory / METADATA_FILE}
    if embed_params:
        exported = jax.export.export(jax.jit(lambda x: fn(variables, x)), platforms=tuple(platforms))(images)
        (directory / PARAMS_FILE).unlink(missing_ok=True)  # an earlier export's, which this one does not use
    else:
        abstract = jax.tree_util.tree_map(lambda v: jax.ShapeDtypeStruct(v.shape, v.dtype), variables)
        exported = jax.export.export(jax.jit(fn), platforms=tuple(platforms))(abstract, images)
        leaves = jax.tree_util.tree_leaves(variables)
        paths["params"] = directory / PARAMS_FILE
        np.savez(paths["params"], **{f"{i:05d}": leaf for i, leaf in enumerate(leaves)})
    paths["stablehlo"].write_bytes(exported.serialize())
    record = {
        **metadata,
        "format": "stablehlo",
        "output": output,
        "platforms": list(exported.platforms),
        "params": "embedded" if embed_params else PARAMS_FILE,
        "input": _input_record(image_size, metadata),
    }
    paths["metadata"].write_text(json.dumps(record, indent=2))
    return paths


def export_saved_model(
    model: Any,
    variables: Any,
    directory: str | Path,
    *,
    image_size: Sequence[int],
    metadata: Mapping[str, Any],
    output: str = "logits",
    platforms: Sequence[str] = PLATFORMS,
) -> Path:
    """Writes a TF SavedModel (orbax-export) whose ``serving_default`` takes uint8 ``images`` [B, h, w, 3] of any
    size and returns ``labels`` [B, h, w] int32 and, when ``output == 'logits'``, ``logits`` [B, h, w, C].

    The resizes run in TF (``ResizeBilinear(align_corners=True)``, or ``half_pixel_centers=True`` for
    ``reference='mmseg'`` models: the same formulas as ``models.resize.resize_bilinear``) around the
    jax2tf-converted normalise + model at ``image_size``; :func:`make_serving_fn` is the JAX twin tests compare
    it with. Metadata: ``assets.extra/fastfcn_metadata.json``.
    The model is compiled for every one of ``platforms`` (jax2tf would otherwise serialize it for the exporting
    machine's only: a SavedModel written on a TPU would not load on a CPU).
    """
    try:
        import tensorflow as tf
        from orbax import export as orbax_export
    except ImportError as error:
        raise ImportError(
            "SavedModel export needs orbax-export and TensorFlow: pip install -e '.[export]' in the fastfcn-jax clone"
        ) from error

    directory = Path(directory)
    height, width = int(image_size[0]), int(image_size[1])
    forward = inference_fn(model, "logits")
    align = bool(getattr(model, "align_corners", True))

    def apply_fn(variables: Any, inputs: Mapping[str, jax.Array]) -> dict[str, jax.Array]:
        logits = forward(variables, normalize_uint8(inputs["images"]))
        # The original size rides through the JAX function so the postprocessor can resize back to it.
        return {"logits": logits, "size": inputs["size"]}

    def preprocess(images: tf.Tensor) -> dict[str, tf.Tensor]:
        # The signature's [None, None, None, 3] is not enforced by TF: check it here, in words, before anything
        # reads the images (else whichever op fails first would speak).
        checks = [
            tf.debugging.assert_equal(
                tf.shape(images)[-1], 3, message="images must be uint8 RGB [batch, height, width, 3]"
            ),
            tf.debugging.assert_positive(
                tf.shape(images)[:3], message="images must hold at least one pixel of one image"
            ),
        ]
        with tf.control_dependencies(checks):
            images = tf.identity(images)
        resized = tf.raw_ops.ResizeBilinear(
            images=tf.cast(images, tf.float32), size=(height, width), align_corners=align, half_pixel_centers=not align
        )
        return {"images": resized, "size": tf.shape(images)[1:3]}

    def postprocess(outputs: Mapping[str, tf.Tensor]) -> dict[str, tf.Tensor]:
        logits = tf.raw_ops.ResizeBilinear(
            images=outputs["logits"], size=outputs["size"], align_corners=align, half_pixel_centers=not align
        )
        result = {"labels": tf.argmax(logits, axis=-1, output_type=tf.int32)}
        if output == "logits":
            result["logits"] = logits
        return result

    module = orbax_export.JaxModule(
        jax.tree_util.tree_map(np.asarray, variables),
        apply_fn,
        trainable=False,
        input_polymorphic_shape={"images": f"(b, {height}, {width}, 3)", "size": None},
        jax2tf_kwargs={"native_serialization_platforms": tuple(platforms)},
    )
    serving = orbax_export.ServingConfig(
        "serving_default",
        input_signature=[tf.TensorSpec([None, None, None, 3], tf.uint8, name="images")],
        tf_preprocessor=preprocess,
        tf_postprocessor=postprocess,
    )
    orbax_export.ExportManager(module, [serving]).save(str(directory))
    record = {
        **metadata,
        "format": "savedmodel",
        "output": output,
        "platforms": list(platforms),
        "input": {
            "layout": "NHWC",
            "dtype": "uint8",
            "any_size": True,
            "resized_to": [height, width],
            "resize": f"bilinear, align_corners={align}",
            "normalization": _input_record(image_size, metadata)["normalization"],
        },
    }
    (directory / SAVED_MODEL_METADATA).parent.mkdir(parents=True, exist_ok=True)
    (directory / SAVED_MODEL_METADATA).write_text(json.dumps(record, indent=2))
    return directory


ONNX_INSTALL = "pip install -e '.[onnx]' && pip install --no-deps 'jax2onnx>=0.17.1,<0.18' (docs/export.md: ONNX)"


class OnnxExportError(ValueError):
    """jax2onnx cannot convert the model, or its ONNX output differs from JAX (see :func:`export_onnx`)."""


def export_onnx(
    model: Any,
    variables: Any,
    path: str | Path,
    *,
    image_size: Sequence[int],
    metadata: Mapping[str, Any],
    output: str = "logits",
) -> Path:
    """Writes an ONNX model (jax2onnx) with input ``images`` [B, H, W, 3] normalised float32, symbolic ``B``.

    The converted model is checked against the JAX model with ONNX Runtime on random images (a batch of 2)
    before anything is written; logits further than 1e-4 x their std, or labels that differ at more than 0.1%
    of the pixels, raise :class:`OnnxExportError`, as does a model jax2onnx cannot convert. jax2onnx >= 0.17.1
    (0.13 gave outputs 0.14 x std away).
    """
    try:
        from importlib.metadata import version

        import jax2onnx
        import onnxruntime
    except ImportError as error:
        raise ImportError(f"ONNX export needs jax2onnx and onnxruntime: {ONNX_INSTALL}") from error
    path = Path(path)
    if hasattr(model, "max_pool_implementation"):
        # jax2onnx makes XLA's NHWC pooling window an ONNX MaxPool over four axes, which ONNX Runtime refuses;
        # the maximum of the window's taps is the same function (OpChoices.max_pool).
        model = model.clone(max_pool_implementation="taps")
    fn = inference_fn(model, output)
    variables = jax.tree_util.tree_map(np.asarray, variables)
    try:
        proto = jax2onnx.to_onnx(
            lambda images: fn(variables, images),
            inputs=[("B", int(image_size[0]), int(image_size[1]), 3)],
            model_name=str(metadata.get("model_name", "fastfcn")),
            input_names=["images"],
            output_names=[output],
        )
    except Exception as error:  # jax2onnx raises many kinds; name the converter and the cause
        raise OnnxExportError(f"jax2onnx {version('jax2onnx')} cannot convert the model: {error!r}") from error
    images = np.random.default_rng(0).standard_normal((2, int(image_size[0]), int(image_size[1]), 3)).astype(np.float32)
    session = onnxruntime.InferenceSession(proto.SerializeToString())
    got = session.run(None, {session.get_inputs()[0].name: images})[0]
    want = np.asarray(fn(variables, images))
    if got.shape != want.shape:
        error, difference = np.inf, f"have the shape {got.shape}, not {want.shape}"
    elif output == "labels":  # an argmax: a near tie may flip between two runtimes' roundings, so count them
        error = float(np.mean(got != want)) / 1e-3
        difference = f"differ from the JAX model's at {error * 1e-3:.3g} of the pixels (limit 0.001)"
    else:
        error = float(np.max(np.abs(got.astype(np.float64) - want))) / (float(np.std(want)) or 1.0) / 1e-4
        difference = f"differ from the JAX model's by {error * 1e-4:.3g} x their std (limit 1e-4)"
    if error > 1:
        raise OnnxExportError(
            f"jax2onnx {version('jax2onnx')} produced an ONNX model whose {output} {difference}; nothing was "
            "written. Use the StableHLO or SavedModel export."
        )
    record = {**metadata, "format": "onnx", "output": output, "input": _input_record(image_size, metadata)}
    entry = proto.metadata_props.add()
    entry.key, entry.value = "fastfcn", json.dumps(record)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(proto.SerializeToString())
    return path


def _input_record(image_size: Sequence[int], metadata: Mapping[str, Any]) -> dict[str, Any]:

    # The model's corner convention (reference='mmseg' models resize with half-pixel centres).
    align = (metadata.get("model_overrides") or {}).get("reference", "fastfcn") != "mmseg"
    return {
        "layout": "NHWC",
        "shape": ["B", int(image_size[0]), int(image_size[1]), 3],
        "dtype": "float32",
        "normalization": {
            "formula": "(uint8 / 255 - mean) / std",
            "mean": [float(v) for v in IMAGENET_MEAN],
            "std": [float(v) for v in IMAGENET_STD],
        },
        # Bilinear weights sum to 1, so resizing before or after the (affine) normalisation is the same.
        "resize": f"bilinear, align_corners={align}, to [H, W] (before or after normalising: the same)",
    }


# ----------------------------------------------------------------------------------------------------
# Loading (jax + numpy only).


class ExportedSegmenter:
    """A loaded StableHLO export: ``self(images [B, H, W, 3] normalised float32) -> logits | labels``.

    ``metadata`` holds ``model_name``, ``class_names``, ``palette``, ``input`` (shape, normalisation),
    ``output``, ``platforms`` and ``source_checkpoint``.
    """

    def __init__(self, exported: jax.export.Exported, metadata: dict[str, Any], params: list[np.ndarray]) -> None:
        self.exported = exported
        self.metadata = metadata
        self._params = params

    @property
    def image_size(self) -> tuple[int, int]:
        return tuple(int(d) for d in self.exported.in_avals[-1].shape[1:3])

    def normalize(self, images: np.ndarray) -> np.ndarray:
        """uint8 RGB ``[B, H, W, 3]`` at :attr:`image_size` -> the normalised float32 input."""
        norm = self.metadata["input"]["normalization"]
        mean, std = np.asarray(norm["mean"], np.float32), np.asarray(norm["std"], np.float32)
        return ((np.asarray(images, np.float32) / 255.0 - mean) / std).astype(np.float32)

    def __call__(self, images: Any) -> jax.Array:
        dtype = jnp.result_type(images)
        if not jnp.issubdtype(dtype, jnp.floating):
            raise ValueError(
                f"this export takes normalised float images, got {dtype}: pass segmenter.normalize(uint8_images)"
            )
        if np.ndim(images) == 3 and tuple(np.shape(images)) == (*self.image_size, 3):
            raise ValueError(f"this export takes a batch [B, H, W, 3], got one image {np.shape(images)}: images[None]")
        if np.ndim(images) != 4 or tuple(np.shape(images)[1:]) != (*self.image_size, 3):
            raise ValueError(
                f"this export takes [B, {self.image_size[0]}, {self.image_size[1]}, 3] images, got "
                f"{tuple(np.shape(images))}; resize first (or export again with export.image_size)"
            )
        leaves = [*self._params, jnp.asarray(images, jnp.float32)]
        args, kwargs = jax.tree_util.tree_unflatten(self.exported.in_tree, leaves)
        try:
            return self.exported.call(*args, **kwargs)
        except ValueError as error:
            made_with = self.metadata.get("jax_version")
            if "exported for 0 devices" not in str(error) or not made_with or made_with == jax.__version__:
                raise
            # jax 0.8.0 reads a jax 0.10 artifact's device count as 0 (docs/export.md: versions).
            raise ValueError(
                f"{error}: this jax ({jax.__version__}) cannot run an artifact exported with jax {made_with}; use "
                "a newer jax (docs/export.md: versions)"
            ) from error


def load(path: str | Path) -> ExportedSegmenter:
    """Loads a StableHLO export (its directory, or the ``model.stablehlo`` file) with only jax, numpy and
    flatbuffers (which ``jax.export`` needs to read it)."""
    path = Path(path)
    directory = path if path.is_dir() else path.parent
    file = path if path.is_file() else directory / STABLEHLO_FILE
    if not file.is_file():
        found = [name for name in (SAVED_MODEL_DIR, ONNX_FILE) if (directory / name).exists()]
        other = f" ({directory} holds {' and '.join(found)}: TensorFlow and ONNX Runtime load those)" if found else ""
        raise FileNotFoundError(
            f"no {STABLEHLO_FILE} at {path}{other}: export one with python -m fastfcn_jax.main --mode=export ..."
        )
    exported = jax.export.deserialize(bytearray(file.read_bytes()))
    metadata_file = directory / METADATA_FILE
    metadata = json.loads(metadata_file.read_text()) if metadata_file.is_file() else {}
    params: list[np.ndarray] = []
    if metadata.get("params", "embedded") != "embedded":
        with np.load(directory / metadata["params"]) as archive:
            params = [archive[key] for key in sorted(archive.files)]
    return ExportedSegmenter(exported, metadata, params)


# ----------------------------------------------------------------------------------------------------
# The export job.


def export_settings(config: Any) -> dict[str, Any]:
    """``config.export`` (optional) over :data:`DEFAULTS`, validated; unknown keys are errors."""
    section = config.get("export") if hasattr(config, "get") else None
    given = dict(section.items()) if section is not None else {}
    unknown = sorted(set(given) - set(DEFAULTS))
    if unknown:
        raise ValueError(f"unknown config.export key(s) {unknown}; valid keys: {sorted(DEFAULTS)}")
    settings = {**DEFAULTS, **given}
    settings["formats"] = tuple(settings["formats"])
    settings["platforms"] = tuple(settings["platforms"])
    bad = sorted(set(settings["formats"]) - set(FORMATS))
    if bad or not settings["formats"]:
        raise ValueError(f"config.export.formats={settings['formats']!r}: choose from {FORMATS}")
    if settings["output"] not in OUTPUTS:
        raise ValueError(f"config.export.output={settings['output']!r}: must be one of {OUTPUTS}")
    check_platforms(settings["platforms"], "config.export.platforms")
    if settings["tuned_for"] not in ("", "cpu", "gpu", "tpu"):
        raise ValueError(f"config.export.tuned_for={settings['tuned_for']!r}: must be '', 'cpu', 'gpu' or 'tpu'")
    if "onnx" in settings["formats"]:
        from importlib.util import find_spec

        missing = [name for name in ("jax2onnx", "onnxruntime") if find_spec(name) is None]
        if missing:  # found now, not after the other formats are written
            raise ImportError(f"config.export.formats has 'onnx', which needs {' and '.join(missing)}: {ONNX_INSTALL}")
    if int(settings["image_size"]) < 0:
        raise ValueError(f"config.export.image_size={settings['image_size']}: must be >= 0 (0 = the crop size)")
    return settings


def _trained_overrides(info: dict[str, Any], configured: dict[str, Any], source: Path) -> dict[str, Any]:
    """The model as checkpoint ``info`` was trained (its stored overrides), computed as the config says
    (``dtype`` and op choices: the config's, not training's); an architecture override of the config that
    differs from training's (or from the model's default, where training kept it) is an error: one that changes
    no weight shape (output_stride, dilations) would otherwise export another function. ``aux`` and
    ``se_loss`` follow the checkpoint where it records them (they do not change the exported logits, and the
    config's default would contradict it)."""
    from fastfcn_jax import checkpointing

    conflicts = checkpointing.architecture_conflicts(info, configured)
    if conflicts:
        raise ValueError(
            f"config.model.overrides.{' and '.join(conflicts)}: checkpoint {source} was trained otherwise; leave "
            "it unset (the checkpoint's is used) or export another checkpoint"
        )
    how = {k: v for k, v in configured.items() if k == "dtype" or k.endswith("_implementation")}
    trained = {k: v for k, v in checkpointing.model_overrides(info).items() if not k.endswith("_implementation")}
    heads = {k: trained[k] for k in ("aux", "se_loss") if k in trained}
    return {**trained, **{k: v for k, v in configured.items() if k not in how and k not in heads}, **how}


def export_size(image_size: int, trained: int, config: Any, dataset: Any) -> tuple[int, str]:
    """The exported input side and where it comes from: ``config.export.image_size``, else the crop size the
    checkpoint was trained at (as prediction prefers it), else ``config.dataset.crop_size``, else the dataset's."""
    configured = int(config.dataset.get("crop_size") or 0)
    if image_size:
        return image_size, "config.export.image_size"
    if trained:
        ignored = f"; config.dataset.crop_size={configured} is not used" if configured and configured != trained else ""
        return trained, f"the crop size the checkpoint was trained at{ignored} (config.export.image_size sets another)"
    if configured:
        return configured, "config.dataset.crop_size (config.export.image_size sets another)"
    return dataset.crop_size, f"dataset {dataset.name}'s crop size (config.export.image_size sets another)"


def run_export(config: Any, workdir: str | Path) -> dict[str, str]:
    """Exports the checkpoint in ``config.export.checkpoint`` (else ``config.init_from``, else ``workdir``'s
    latest) as the formats in
    ``config.export.formats``; returns ``{'stablehlo', 'metadata', 'params', 'savedmodel', 'onnx'}`` -> path for
    those written. The model is ``config.model``; a checkpoint of another model or class count is an error.
    Every artifact is written to a hidden folder inside the directory and moved into place only when all are
    written (an earlier one of the same name put back if a move fails), so a failed export leaves the directory
    as it was. An earlier export's artifacts there that this one does not write
    again (:func:`stale_artifacts`) are then removed, and that is printed.
    """
    from fastfcn_jax import checkpointing
    from fastfcn_jax.config import model_overrides
    from fastfcn_jax.data.datasets import get_dataset_info
    from fastfcn_jax.models import create_model
    from fastfcn_jax.models.batch_norm import fold_batch_norm
    from fastfcn_jax.models.op_choices import target_backend

    settings = export_settings(config)
    workdir = Path(workdir).expanduser().absolute()
    # config.init_from names the checkpoint of every reading mode (eval and predict too).
    source = Path(settings["checkpoint"] or config.get("init_from") or workdir).expanduser().absolute()
    variables, info = checkpointing.restore_variables(source)
    checkpointing.require_segmentation_weights(info, source, "exported")
    print(
        f"exporting {source} ({checkpointing.model_label(info)}, {info['num_classes']} classes, step {info['step']})",
        flush=True,
    )
    dataset_name = info.get("dataset") or config.dataset.name
    dataset = get_dataset_info(dataset_name, config.dataset.get("data_dir") or None)
    num_classes = config.model.num_classes or dataset.num_classes
    differences = checkpointing.config_differences(info, config.model.name, num_classes)
    if differences:
        raise ValueError(
            f"checkpoint {source} holds {info['model_name']} with {info['num_classes']} classes, but the config "
            f"asks for {' and '.join(differences)}: export with the config the checkpoint was trained with, or set "
            "config.init_from (or config.export.checkpoint) to another checkpoint"
        )
    overrides = _trained_overrides(info, model_overrides(config), source)
    with target_backend(settings["tuned_for"] or None):  # dtype 'auto': the serving backend's compute dtype
        model = create_model(config.model.name, num_classes, **overrides)
    overrides["dtype"] = model.dtype
    size, origin = export_size(int(settings["image_size"]), int(info.get("crop_size") or 0), config, dataset)
    print(f"input {size}x{size}: {origin}", flush=True)
    image_size = (size, size)
    variables = {"params": variables["params"], "batch_stats": variables.get("batch_stats", {})}
    checkpointing.check_variables(model, variables, f"checkpoint {source}", image_size)
    if settings["fold_norm"]:
        # The same function with one fewer pass per BatchNorm: its scale rides in the convolution's kernel.
        model = create_model(config.model.name, num_classes, **{**overrides, "norm_implementation": "folded"})
        # Another backbone's layers are its own: 'folded' reaches only this package's (README: another backbone).
        variables = fold_batch_norm(variables, keep=("backbone",) if "backbone" in overrides else ())

    class_names = list(info.get("class_names") or dataset.class_names)[:num_classes]
    metadata = {
        "fastfcn_export_version": FORMAT_VERSION,
        "model_name": config.model.name,
        "model_overrides": checkpointing.storable_overrides(overrides),
        "num_classes": num_classes,
        "class_names": class_names,
        "palette": np.asarray(dataset.palette, np.uint8)[:num_classes].tolist(),
        "dataset": dataset_name,
        "source_checkpoint": {"path": str(source), "step": info.get("step")},
        "jax_version": jax.__version__,
        "batch_norm": "folded" if settings["fold_norm"] else "standard",
        "op_choices_for": settings["tuned_for"] or jax.default_backend(),
    }
    directory = Path(settings["directory"] or workdir / "export").expanduser().absolute()
    stale = stale_artifacts(directory, settings["formats"], embed_params=bool(settings["embed_params"]))
    foreign = directory / SAVED_MODEL_DIR
    if "savedmodel" in settings["formats"] and foreign.is_dir() and not (foreign / "saved_model.pb").is_file():
        raise ValueError(f"{foreign} holds files that are not a SavedModel: move them, or export to another directory")
    directory.mkdir(parents=True, exist_ok=True)
    # Written in a folder inside the directory (its filesystem, its permissions), then moved into place.
    with tempfile.TemporaryDirectory(prefix=".partial-", dir=directory) as staging:
        written = _write_artifacts(model, variables, Path(staging), settings, image_size, metadata)
        written = _move_into_place(written, Path(staging), directory)
    if stale:
        names = ", ".join(f"{path.name}/" if path.is_dir() else path.name for path in stale)
        for path in stale:
            if path.is_dir():
                shutil.rmtree(path)
            else:
                path.unlink(missing_ok=True)
        print(
            f"removed {names} from {directory}: an earlier export's, which this one (config.export.formats="
            f"{settings['formats']}, embed_params={bool(settings['embed_params'])}) does not write again and which "
            "would not match it",
            flush=True,
        )
    return written


def _move_into_place(written: Mapping[str, str], staging: Path, directory: Path) -> dict[str, str]:
    """Moves each written artifact from ``staging`` to ``directory``, an earlier one of the same name set aside
    in ``staging`` first and put back if a move fails: either every artifact is replaced, or none."""
    moved: list[tuple[Path, Path | None]] = []
    try:
        for path in written.values():
            target = directory / Path(path).relative_to(staging)
            backup = None
            if target.exists():
                backup = staging / f".earlier-{target.name}"
                target.replace(backup)
            moved.append((target, backup))
            Path(path).replace(target)
    except OSError:
        for target, backup in reversed(moved):
            if target.is_dir():
                shutil.rmtree(target, ignore_errors=True)
            elif target.exists():
                target.unlink()
            if backup is not None:
                backup.replace(target)
        raise
    return {name: str(directory / Path(path).relative_to(staging)) for name, path in written.items()}


def _write_artifacts(
    model: Any,
    variables: Any,
    staging: Path,
    settings: Mapping[str, Any],
    image_size: tuple[int, int],
    metadata: Mapping[str, Any],
) -> dict[str, str]:
    from fastfcn_jax.models.op_choices import target_backend, xla_forms

    written: dict[str, str] = {}
    # One trace serves every platform of the module: its 'auto' op choices are made for one backend. Pallas
    # kernels (a training choice) are exported as their XLA forms: a Triton kernel has no CPU or TPU lowering
    # and would tie the artifact to one GPU generation.
    with target_backend(settings["tuned_for"] or None), xla_forms():
        if "stablehlo" in settings["formats"]:
            paths = export_stablehlo(
                model,
                variables,
                staging,
                image_size=image_size,
                metadata=metadata,
                output=settings["output"],
                platforms=settings["platforms"],
                embed_params=bool(settings["embed_params"]),
            )
            written.update({k: str(v) for k, v in paths.items()})
        if "savedmodel" in settings["formats"]:
            path = export_saved_model(
                model,
                variables,
                staging / SAVED_MODEL_DIR,
                image_size=image_size,
                metadata=metadata,
                output=settings["output"],
                platforms=settings["platforms"],
            )
            written["savedmodel"] = str(path)
        if "onnx" in settings["formats"]:
            path = export_onnx(
                model,
                variables,
                staging / ONNX_FILE,
                image_size=image_size,
                metadata=metadata,
                output=settings["output"],
            )
            written["onnx"] = str(path)
    return written


def stale_artifacts(directory: Path, formats: Sequence[str], *, embed_params: bool) -> list[Path]:
    """An earlier export's artifacts in ``directory`` that an export of ``formats`` does not write again: the
    files of the other formats (a ``saved_model`` folder only when it holds a SavedModel) and, with
    ``embed_params``, ``params.npz``."""
    stale = []
    for kind, names in ARTIFACTS.items():
        for name in names:
            path = directory / name
            if kind in formats and not (name == PARAMS_FILE and embed_params):
                continue
            if name == SAVED_MODEL_DIR and not (path / "saved_model.pb").is_file():
                continue
            if path.exists():
                stale.append(path)
    return stale

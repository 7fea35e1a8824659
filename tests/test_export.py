"""Export round trips: StableHLO in a fresh process without flax, SavedModel on uint8 images, ONNX in ONNX Runtime."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from fastfcn_jax import checkpointing, export
from fastfcn_jax.data.datasets import get_dataset_info
from fastfcn_jax.models import create_model
from tests.model_weights import assert_image_dependent, calibrated_variables
from tests.test_configs import CONFIGS, load

DEMO = next(p for p in CONFIGS if p.stem == "demo")
MODEL = "encnet_jpu_tiny"
DATASET = "synthetic_shapes"
SIZE = 64  # the export's fixed input size (the tiny model's stride is 32)
REPO = Path(__file__).resolve().parent.parent


# Of the logits' spread: float32 rounding (BatchNorm folded into the kernels, other fusions, TF's runtime)
# measured up to 2.2e-4 on this calibrated tiny model; bfloat16 compute is 0.27 off, a wrong layer more.
TOLERANCE = 1e-3


def demo_config(**export_settings) -> ml_collections.ConfigDict:
    config = load(DEMO).get_config()
    with config.unlocked():
        config.export = ml_collections.ConfigDict({"image_size": SIZE, **export_settings})
    return config


def relative_error(actual: np.ndarray, expected: np.ndarray) -> float:
    """max |actual - expected| in units of the expected outputs' standard deviation."""
    return float(np.max(np.abs(np.asarray(actual) - np.asarray(expected))) / np.std(expected))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny model with non-trivial BN statistics, saved as a checkpoint like a training run's."""
    num_classes = get_dataset_info(DATASET).num_classes
    model = create_model(MODEL, num_classes)
    variables = calibrated_variables(model, SIZE)  # see tests/model_weights.py
    assert_image_dependent(reference_logits(model, variables, np.random.default_rng(1).normal(size=(2, SIZE, SIZE, 3))))
    workdir = tmp_path_factory.mktemp("workdir")
    info = {"model_name": MODEL, "num_classes": num_classes, "class_names": None, "dataset": DATASET}
    checkpointing.save_variables(workdir / "checkpoints", variables, info, step=7)
    return model, variables, workdir


@pytest.fixture(scope="module")
def exported(trained):
    """One export job writing StableHLO and the SavedModel, shared by the tests below."""
    _, _, workdir = trained
    return export.run_export(demo_config(formats=("stablehlo", "savedmodel")), workdir)


def assert_same_labels_but_near_ties(labels: np.ndarray, expected: np.ndarray, logits: np.ndarray) -> None:
    """``labels`` equal ``expected`` (the argmax of ``logits``) except where the two best logits are within
    float32 rounding of each other (``TOLERANCE`` of their spread), where either class is right."""
    top2 = np.sort(np.asarray(logits), axis=-1)[..., -2:]
    near_tie = top2[..., 1] - top2[..., 0] <= TOLERANCE * np.std(logits)
    differ = np.asarray(labels) != np.asarray(expected)
    assert not np.any(differ & ~near_tie), f"{np.sum(differ & ~near_tie)} labels differ away from ties"
    assert differ.mean() < 0.01


def reference_logits(model, variables, images: np.ndarray) -> np.ndarray:
    return np.asarray(jax.jit(lambda v, x: model.apply(v, x, train=False)["logits"])(variables, images))


def test_stablehlo_round_trip_in_fresh_process_without_flax_for_two_batch_sizes(trained, exported, tmp_path):
    model, variables, _ = trained
    rng = np.random.default_rng(1)
    inputs = {f"batch{n}": rng.normal(size=(n, SIZE, SIZE, 3)).astype(np.float32) for n in (1, 3)}
    np.savez(tmp_path / "inputs.npz", **inputs)
    script = textwrap.dedent(
        f"""
        import sys
        import numpy as np
        from fastfcn_jax import export
        segmenter = export.load({exported["stablehlo"]!r})
        with np.load({str(tmp_path / "inputs.npz")!r}) as inputs:
            outputs = {{k: np.asarray(segmenter(inputs[k])) for k in inputs.files}}
        np.savez({str(tmp_path / "outputs.npz")!r}, **outputs)
        heavy = sorted(m for m in ("flax", "tensorflow", "orbax", "optax") if m in sys.modules)
        print("imported:", heavy)
        sys.exit(1 if heavy else 0)
        """
    )
    result = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    with np.load(tmp_path / "outputs.npz") as outputs:
        for key, images in inputs.items():
            expected = reference_logits(model, variables, images)
            assert outputs[key].shape == expected.shape == (len(images), SIZE, SIZE, model.num_classes)
            assert relative_error(outputs[key], expected) <= TOLERANCE


def test_stablehlo_is_lowered_for_cpu_cuda_and_tpu_with_symbolic_batch(exported):
    segmenter = export.load(exported["stablehlo"])
    assert segmenter.exported.platforms == ("cpu", "cuda", "tpu")
    batch, height, width, channels = segmenter.exported.in_avals[0].shape
    assert not isinstance(batch, int) and (height, width, channels) == (SIZE, SIZE, 3)


def test_stablehlo_metadata_records_model_classes_palette_input_and_source(trained, exported):
    _, _, workdir = trained
    metadata = export.load(exported["stablehlo"]).metadata
    dataset = get_dataset_info(DATASET)
    assert metadata["model_name"] == MODEL and metadata["num_classes"] == dataset.num_classes
    assert metadata["class_names"] == list(dataset.class_names)
    assert metadata["palette"] == np.asarray(dataset.palette).tolist()
    assert metadata["input"]["shape"] == ["B", SIZE, SIZE, 3]
    assert metadata["input"]["normalization"]["mean"] == pytest.approx([0.485, 0.456, 0.406])
    assert metadata["input"]["normalization"]["std"] == pytest.approx([0.229, 0.224, 0.225])
    assert metadata["source_checkpoint"] == {"path": str(workdir), "step": 7}
    assert metadata["output"] == "logits" and metadata["params"] == "embedded"
    # Exported with its BatchNorms folded into the convolutions (config.export.fold_norm, the default); the
    # round-trip tests compare it with the unfolded model.
    assert metadata["batch_norm"] == "folded"


def test_loader_normalize_matches_the_imagenet_formula(exported):
    segmenter = export.load(exported["stablehlo"])
    images = np.arange(SIZE * SIZE * 3, dtype=np.int64).reshape(1, SIZE, SIZE, 3) % 256
    expected = (images / 255.0 - np.array([0.485, 0.456, 0.406])) / np.array([0.229, 0.224, 0.225])
    np.testing.assert_allclose(segmenter.normalize(images.astype(np.uint8)), expected, rtol=1e-6, atol=1e-6)


def test_loader_rejects_images_of_another_size(exported):
    with pytest.raises(ValueError, match=f"takes \\[B, {SIZE}, {SIZE}, 3\\]"):
        export.load(exported["stablehlo"])(np.zeros((1, SIZE + 32, SIZE, 3), np.float32))
    # Raw pixels would run on un-normalised input and give wrong labels: refused, saying what to do.
    segmenter = export.load(exported["stablehlo"])
    with pytest.raises(ValueError, match=r"normalised float images, got uint8: pass segmenter.normalize"):
        segmenter(np.zeros((1, SIZE, SIZE, 3), np.uint8))
    assert segmenter(jnp.zeros((1, SIZE, SIZE, 3), jnp.bfloat16)).shape[:3] == (1, SIZE, SIZE)  # floats of any width
    with pytest.raises(ValueError, match=r"takes a batch \[B, H, W, 3\], got one image .*: images\[None\]"):
        segmenter(np.zeros((SIZE, SIZE, 3), np.float32))


def test_a_jax_too_old_for_the_artifact_is_said_as_such(exported, monkeypatch):
    # jax 0.8.0 calling an export of jax 0.10.2 fails with the first message (docs/export.md: versions); another
    # platform's artifact is jax's own message, not a version hint.
    segmenter = export.load(exported["stablehlo"])
    segmenter.metadata["jax_version"] = "0.99.0"
    message = "Function <lambda> was exported for 0 devices and is called in a context with 1 devices."

    def failing(*args, **kwargs):
        raise ValueError(message)

    monkeypatch.setattr(type(segmenter.exported), "call", failing)
    with pytest.raises(ValueError, match=r"cannot run an artifact exported with jax 0\.99\.0; use a newer jax"):
        segmenter(np.zeros((1, SIZE, SIZE, 3), np.float32))
    message = "Function <lambda> was exported for platforms ('tpu',) but it is used on ('cpu',)."
    with pytest.raises(ValueError) as error:
        segmenter(np.zeros((1, SIZE, SIZE, 3), np.float32))
    assert str(error.value) == message


def test_loading_a_directory_without_stablehlo_names_what_it_holds(tmp_path):
    (tmp_path / export.SAVED_MODEL_DIR).mkdir()
    with pytest.raises(FileNotFoundError, match=r"holds saved_model: TensorFlow and ONNX Runtime load those"):
        export.load(tmp_path)


def test_params_beside_the_module_and_labels_output(trained, tmp_path):
    model, variables, _ = trained
    paths = export.export_stablehlo(
        model,
        variables,
        tmp_path,
        image_size=(SIZE, SIZE),
        metadata={"model_name": MODEL},
        output="labels",
        platforms=("cpu",),
        embed_params=False,
    )
    assert paths["params"].is_file()
    segmenter = export.load(tmp_path)
    images = np.random.default_rng(2).normal(size=(2, SIZE, SIZE, 3)).astype(np.float32)
    labels = np.asarray(segmenter(images))
    assert labels.dtype == np.int32
    np.testing.assert_array_equal(labels, reference_logits(model, variables, images).argmax(-1))
    weights = sum(leaf.nbytes for leaf in jax.tree_util.tree_leaves(variables))
    assert paths["stablehlo"].stat().st_size < weights  # the weights live in params.npz, not in the module


def test_saved_model_on_uint8_images_of_two_sizes_matches_package_serving_fn(trained, exported):
    import tensorflow as tf

    model, variables, _ = trained
    serving = tf.saved_model.load(exported["savedmodel"]).signatures["serving_default"]
    serve = export.make_serving_fn(model, variables, (SIZE, SIZE))
    rng = np.random.default_rng(3)
    for shape in ((2, 50, 70, 3), (1, 96, 80, 3)):
        images = rng.integers(0, 256, shape, dtype=np.uint8)
        got = {k: v.numpy() for k, v in serving(images=tf.constant(images)).items()}
        expected = jax.device_get(serve(images))
        assert got["logits"].shape == (*shape[:3], model.num_classes)
        assert relative_error(got["logits"], expected["logits"]) <= TOLERANCE
        assert_same_labels_but_near_ties(got["labels"], expected["labels"], expected["logits"])


def test_serving_fn_at_the_export_size_is_normalise_then_model(trained):
    # At the export size both resizes are the identity, so serving must equal the model on normalised pixels.
    model, variables, _ = trained
    images = np.random.default_rng(4).integers(0, 256, (2, SIZE, SIZE, 3), dtype=np.uint8)
    normalised = ((images / 255.0 - np.array([0.485, 0.456, 0.406])) / np.array([0.229, 0.224, 0.225])).astype(
        np.float32
    )
    expected = reference_logits(model, variables, normalised)
    got = np.asarray(export.make_serving_fn(model, variables, (SIZE, SIZE))(images)["logits"])
    assert relative_error(got, expected) <= TOLERANCE


def test_saved_model_carries_the_metadata_and_runs_on_every_export_platform(exported):
    metadata = json.loads((Path(exported["savedmodel"]) / export.SAVED_MODEL_METADATA).read_text())
    assert metadata["model_name"] == MODEL and metadata["input"]["dtype"] == "uint8"
    assert metadata["input"]["resized_to"] == [SIZE, SIZE] and len(metadata["palette"]) == metadata["num_classes"]
    # jax2tf would serialize the model for the exporting machine only (a TPU export would not load on a CPU).
    from tensorflow.core.protobuf import saved_model_pb2

    saved = saved_model_pb2.SavedModel()
    saved.ParseFromString((Path(exported["savedmodel"]) / "saved_model.pb").read_bytes())
    graph = saved.meta_graphs[0].graph_def
    nodes = [*graph.node, *(node for function in graph.library.function for node in function.node_def)]
    platforms = {tuple(p.decode() for p in n.attr["platforms"].list.s) for n in nodes if n.op == "XlaCallModule"}
    assert platforms == {("CPU", "CUDA", "TPU")} and metadata["platforms"] == ["cpu", "cuda", "tpu"]


def test_saved_model_names_a_wrong_channel_count_and_an_empty_batch(exported):
    import tensorflow as tf

    serve = tf.saved_model.load(exported["savedmodel"]).signatures["serving_default"]
    with pytest.raises(tf.errors.InvalidArgumentError, match=r"uint8 RGB \[batch, height, width, 3\]"):
        serve(images=tf.zeros((1, 40, 50, 4), tf.uint8))
    for shape in ((0, 40, 50, 3), (1, 0, 50, 3)):
        with pytest.raises(tf.errors.InvalidArgumentError, match=r"at least one pixel of one image"):
            serve(images=tf.zeros(shape, tf.uint8))


def test_exporting_a_checkpoint_of_another_model_is_a_clear_error(trained):
    _, _, workdir = trained
    config = demo_config()
    config.model.name = "psp_jpu_tiny"
    with pytest.raises(ValueError, match=f"holds {MODEL} .* asks for config.model.name=psp_jpu_tiny:"):
        export.run_export(config, workdir)


def test_exporting_a_checkpoint_with_other_shapes_is_a_clear_error(trained):
    _, _, workdir = trained
    config = demo_config()
    config.model.overrides.aux = False  # same name and classes, but no auxiliary head
    with pytest.raises(ValueError, match="does not fit the configured model: .*unexpected: params/auxiliary_head"):
        export.run_export(config, workdir)


def test_stored_overrides_read_back_as_model_arguments_and_export_takes_the_configs_op_choices():
    stored = checkpointing.storable_overrides({"jpu_dilations": (1, 2, 4), "dtype": jnp.bfloat16, "aux": False})
    assert stored == {"jpu_dilations": [1, 2, 4], "dtype": "bfloat16", "aux": False}
    assert checkpointing.model_overrides({"model_overrides": stored})["jpu_dilations"] == (1, 2, 4)
    # Checkpoints of earlier versions stored tuples as their repr.
    assert checkpointing.model_overrides({"model_overrides": {"psp_bins": "(1, 2, 3, 6)"}}) == {
        "psp_bins": (1, 2, 3, 6)
    }
    # An option of another head that earlier versions accepted and stored (it changed nothing): left out, said.
    older = {"model_name": "encnet_dilated_tiny", "model_overrides": {"psp_bins": [1, 2], "aux": False}}
    with pytest.warns(UserWarning, match=r"stores psp_bins=\(1, 2\), left out: psp_bins is an option of the psp"):
        kept = checkpointing.model_overrides(older)
    assert kept == {"aux": False} and create_model("encnet_dilated_tiny", 3, **kept).head == "encnet"
    trained = {"depthwise_implementation": "grouped", "aux": False, "output_stride": 16}
    info = {"model_name": "fcn_dilated_tiny", "num_classes": 6, "model_overrides": trained}
    configured = {"dtype": "float32", "aux": True}  # the config's defaults
    assert export._trained_overrides(info, configured, Path("ckpt")) == {
        "aux": False,  # as trained: the config's default does not contradict it
        "output_stride": 16,
        "dtype": "float32",  # how to compute: the config's (and its op choices, none here)
    }


def test_export_builds_the_model_the_checkpoint_was_trained_as(tmp_path):
    # output_stride changes no weight shape: a model built from the config alone would export another function.
    model = create_model("fcn_dilated_tiny", 6, output_stride=16)
    variables = jax.jit(lambda: model.init(jax.random.PRNGKey(2), jnp.zeros((1, SIZE, SIZE, 3)), train=False))()
    info = {
        "model_name": "fcn_dilated_tiny",
        "num_classes": 6,
        "dataset": DATASET,
        "model_overrides": {"output_stride": 16},
    }
    checkpointing.save_variables(tmp_path / "os16", jax.device_get(variables), info)
    config = demo_config(checkpoint=str(tmp_path / "os16"), directory=str(tmp_path / "out"), fold_norm=False)
    config.model.name = "fcn_dilated_tiny"
    export.run_export(config, tmp_path)
    images = np.random.default_rng(4).normal(size=(1, SIZE, SIZE, 3)).astype(np.float32)
    got = np.asarray(export.load(tmp_path / "out")(images))
    assert relative_error(got, reference_logits(model, variables, images)) <= TOLERANCE
    assert json.loads((tmp_path / "out" / export.METADATA_FILE).read_text())["model_overrides"]["output_stride"] == 16
    config.model.overrides.output_stride = 8
    with pytest.raises(ValueError, match=r"output_stride=8 \(the checkpoint's: 16\): checkpoint .* trained otherwise"):
        export.run_export(config, tmp_path)


def test_an_mmseg_model_exports_with_its_half_pixel_resizes(tmp_path):
    # reference='mmseg' (a converted mmsegmentation checkpoint records it): the export rebuilds that variant, and
    # the SavedModel's TF resizes and the JAX serving function interpolate as the model does.
    import tensorflow as tf

    num_classes = get_dataset_info(DATASET).num_classes
    model = create_model("psp_jpu_tiny", num_classes, reference="mmseg")
    variables = calibrated_variables(model, SIZE)
    info = {
        "model_name": "psp_jpu_tiny",
        "num_classes": num_classes,
        "dataset": DATASET,
        "model_overrides": {"reference": "mmseg"},
        "source": "mmseg",
    }
    checkpointing.save_variables(tmp_path / "mmseg", jax.device_get(variables), info)
    config = demo_config(
        checkpoint=str(tmp_path / "mmseg"), directory=str(tmp_path / "out"), formats=("stablehlo", "savedmodel")
    )
    config.model.name = "psp_jpu_tiny"
    paths = export.run_export(config, tmp_path)
    images = np.random.default_rng(4).normal(size=(1, SIZE, SIZE, 3)).astype(np.float32)
    assert (
        relative_error(np.asarray(export.load(paths["stablehlo"])(images)), reference_logits(model, variables, images))
        <= TOLERANCE
    )
    metadata = json.loads((Path(paths["savedmodel"]) / export.SAVED_MODEL_METADATA).read_text())
    assert metadata["input"]["resize"] == "bilinear, align_corners=False"
    serving = tf.saved_model.load(paths["savedmodel"]).signatures["serving_default"]
    serve = export.make_serving_fn(model, variables, (SIZE, SIZE))
    pixels = np.random.default_rng(3).integers(0, 256, (1, 50, 90, 3), dtype=np.uint8)
    got = serving(images=tf.constant(pixels))["logits"].numpy()
    expected = np.asarray(serve(pixels)["logits"])
    assert relative_error(got, expected) <= TOLERANCE
    # Resized the other way, the function is another one.
    fastfcn = export.make_serving_fn(create_model("psp_jpu_tiny", num_classes), variables, (SIZE, SIZE))
    assert relative_error(np.asarray(fastfcn(pixels)["logits"]), expected) > 100 * TOLERANCE


def test_an_architecture_override_is_refused_also_where_training_kept_the_default(tmp_path, capsys):
    # Training stores only the overrides it was given: a config that changes a default is compared to it.
    model = create_model("encnet_jpu_tiny", 6)
    variables = jax.jit(lambda: model.init(jax.random.PRNGKey(2), jnp.zeros((1, SIZE, SIZE, 3)), train=False))()
    info = {"model_name": "encnet_jpu_tiny", "num_classes": 6, "dataset": DATASET, "model_overrides": {"aux": True}}
    checkpointing.save_variables(tmp_path / "ckpt", jax.device_get(variables), info)
    config = demo_config(checkpoint=str(tmp_path / "ckpt"), directory=str(tmp_path / "out"))
    config.model.overrides.jpu_dilations = (1, 2, 4, 16)
    with pytest.raises(ValueError, match=r"jpu_dilations=\(1, 2, 4, 16\) \(the checkpoint's: \(1, 2, 4, 8\)\)"):
        export.run_export(config, tmp_path)
    config.model.overrides.jpu_dilations = [1, 2, 4, 8]  # the default, as a list: no conflict
    assert checkpointing.architecture_conflicts(info, {"jpu_dilations": [1, 2, 4, 8], "dtype": "bfloat16"}) == []
    # Evaluation and prediction run the checkpoint's model and say that the override is not used.
    checkpointing.note_unused_model_config(info, "ckpt", {"overrides": {"jpu_dilations": (1, 2, 4, 16)}}, "predicts")
    assert "config.model.overrides.jpu_dilations=(1, 2, 4, 16) (the checkpoint's: (1, 2, 4, 8)) is not used" in (
        capsys.readouterr().out
    )


def test_export_settings_reject_unknown_keys_and_formats():
    with pytest.raises(ValueError, match="unknown config.export key"):
        export.export_settings(demo_config(size=3))
    with pytest.raises(ValueError, match="config.export.formats"):
        export.export_settings(demo_config(formats=("tflite",)))
    assert export.export_settings(load(DEMO).get_config())["formats"] == ("stablehlo",)
    with pytest.raises(ValueError, match="config.export.tuned_for"):
        export.export_settings(demo_config(tuned_for="cuda"))
    with pytest.raises(ValueError, match=r"config.export.platforms must be .* \(jax names NVIDIA GPUs 'cuda'\)"):
        export.export_settings(demo_config(platforms=("cpu", "gpu")))


def test_export_tuned_for_gpus_on_this_machine_computes_the_same_function(trained, tmp_path):
    # Made here for GPU serving: the JPU input padded once, the GPU forms of every 'auto' choice.
    model, variables, workdir = trained
    config = demo_config(tuned_for="gpu", platforms=("cpu", "cuda"), directory=str(tmp_path), formats=("stablehlo",))
    metadata = json.loads(Path(export.run_export(config, workdir)["metadata"]).read_text())
    assert metadata["model_overrides"]["dtype"] == "bfloat16"  # dtype 'auto' (the default): bfloat16 for GPUs
    config.model.overrides.dtype = "float32"
    paths = export.run_export(config, workdir)
    metadata = json.loads(Path(paths["metadata"]).read_text())
    assert metadata["op_choices_for"] == "gpu" and metadata["batch_norm"] == "folded"
    assert metadata["model_overrides"]["dtype"] == "float32"
    segmenter = export.load(paths["stablehlo"])
    assert "optimization_barrier" in segmenter.exported.mlir_module()
    images = np.random.default_rng(2).normal(size=(2, SIZE, SIZE, 3)).astype(np.float32)
    assert relative_error(segmenter(images), reference_logits(model, variables, images)) <= TOLERANCE


def test_the_exported_size_prefers_the_checkpoints_training_crop_and_says_where_it_comes_from():
    from types import SimpleNamespace

    config = load(DEMO).get_config()
    dataset = SimpleNamespace(name="synthetic_shapes", crop_size=480)
    assert export.export_size(64, 96, config, dataset) == (64, "config.export.image_size")
    size, origin = export.export_size(0, 80, config, dataset)  # the demo config's dataset.crop_size is 96
    assert size == 80 and origin.startswith("the crop size the checkpoint was trained at; config.dataset.crop_size=96")
    assert export.export_size(0, 0, config, dataset)[0] == 96
    config.dataset.crop_size = 0
    assert export.export_size(0, 0, config, dataset) == (480, "dataset synthetic_shapes's crop size (config.export."
                                                               "image_size sets another)")  # fmt: skip


def test_a_model_trained_with_pallas_kernels_exports_their_xla_forms(trained, tmp_path):
    # The config's Pallas choices (GPU training) would have no CPU lowering in a cpu+cuda module.
    model, variables, workdir = trained
    config = demo_config(tuned_for="gpu", platforms=("cpu", "cuda"), directory=str(tmp_path), formats=("stablehlo",))
    with config.unlocked():
        config.model.ops = "depthwise=pallas,depthwise_input_grad=pallas,depthwise_kernel_grad=pallas"
    config.model.overrides.dtype = "float32"  # 'auto' would compute a GPU export in bfloat16
    paths = export.run_export(config, workdir)
    segmenter = export.load(paths["stablehlo"])
    assert "triton" not in segmenter.exported.mlir_module().lower()
    images = np.random.default_rng(3).normal(size=(1, SIZE, SIZE, 3)).astype(np.float32)
    assert relative_error(segmenter(images), reference_logits(model, variables, images)) <= TOLERANCE


def test_onnx_export_is_refused_with_an_install_hint_without_jax2onnx(trained, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "jax2onnx", None)
    model, variables, _ = trained
    with pytest.raises(ImportError, match=r"pip install -e '\.\[onnx\]' && pip install --no-deps 'jax2onnx"):
        export.export_onnx(model, variables, tmp_path / "model.onnx", image_size=(SIZE, SIZE), metadata={})
    assert not (tmp_path / "model.onnx").exists()


def onnx_session(path: Path):
    import onnxruntime

    return onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def test_onnx_round_trip_in_onnx_runtime_for_two_batch_sizes_with_the_metadata(trained, tmp_path):
    model, variables, workdir = trained
    paths = export.run_export(demo_config(directory=str(tmp_path), formats=("onnx",)), workdir)
    assert set(paths) == {"onnx"} and sorted(p.name for p in tmp_path.iterdir()) == [export.ONNX_FILE]
    session = onnx_session(paths["onnx"])
    (given,) = session.get_inputs()
    assert given.name == "images" and given.shape[1:] == [SIZE, SIZE, 3] and isinstance(given.shape[0], str)
    rng = np.random.default_rng(4)
    for batch in (1, 3):
        images = rng.normal(size=(batch, SIZE, SIZE, 3)).astype(np.float32)
        (logits,) = session.run(None, {"images": images})
        expected = reference_logits(model, variables, images)
        assert logits.shape == expected.shape == (batch, SIZE, SIZE, model.num_classes)
        assert relative_error(logits, expected) <= TOLERANCE
    record = json.loads(session.get_modelmeta().custom_metadata_map["fastfcn"])
    assert record["model_name"] == MODEL and record["num_classes"] == model.num_classes
    assert record["class_names"] == list(get_dataset_info(DATASET).class_names)[: model.num_classes]
    assert record["format"] == "onnx" and record["output"] == "logits" and record["batch_norm"] == "folded"
    assert record["input"]["shape"] == ["B", SIZE, SIZE, 3] and record["source_checkpoint"]["step"] == 7


def test_onnx_labels_output(trained, tmp_path):
    model, variables, _ = trained
    path = export.export_onnx(
        model, variables, tmp_path / "model.onnx", image_size=(SIZE, SIZE), metadata={}, output="labels"
    )
    images = np.random.default_rng(5).normal(size=(2, SIZE, SIZE, 3)).astype(np.float32)
    (labels,) = onnx_session(path).run(None, {"images": images})
    logits = reference_logits(model, variables, images)
    assert labels.shape == (2, SIZE, SIZE) and np.issubdtype(labels.dtype, np.integer)
    assert_same_labels_but_near_ties(labels, logits.argmax(-1), logits)


def test_onnx_export_that_computes_something_else_is_refused_and_writes_nothing(trained, tmp_path, monkeypatch):
    # The check before writing: ONNX Runtime's outputs against the JAX model's (here made to differ).
    import onnxruntime

    class Shifted(onnxruntime.InferenceSession):
        def run(self, *args, **kwargs):
            return [output + 0.01 for output in super().run(*args, **kwargs)]

    monkeypatch.setattr(onnxruntime, "InferenceSession", Shifted)
    model, variables, _ = trained
    with pytest.raises(export.OnnxExportError, match=r"logits differ from the JAX model's by [\d.e-]+ x their std"):
        export.export_onnx(model, variables, tmp_path / "model.onnx", image_size=(SIZE, SIZE), metadata={})
    assert not (tmp_path / "model.onnx").exists()


def test_a_failed_export_leaves_the_directory_as_it_was(trained, tmp_path, monkeypatch):
    # StableHLO written, then ONNX fails: the earlier export's files stay, none of this one's land beside them.
    _, _, workdir = trained
    directory = tmp_path / "export"
    export.run_export(demo_config(platforms=("cpu",), directory=str(directory), formats=("stablehlo",)), workdir)
    before = {p.name: p.read_bytes() for p in directory.iterdir()}

    def fail(*args, **kwargs):
        raise export.OnnxExportError("jax2onnx cannot convert the model")

    monkeypatch.setattr(export, "export_onnx", fail)
    config = demo_config(platforms=("cpu",), directory=str(directory), formats=("stablehlo", "onnx"), output="labels")
    with pytest.raises(export.OnnxExportError):
        export.run_export(config, workdir)
    assert {p.name: p.read_bytes() for p in directory.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]  # no staging folder left


def test_exporting_again_replaces_a_saved_model_and_every_artifact_or_none(trained, tmp_path, monkeypatch):
    _, _, workdir = trained
    config = demo_config(platforms=("cpu",), directory=str(tmp_path), formats=("stablehlo", "savedmodel"))
    export.run_export(config, workdir)
    (tmp_path / export.SAVED_MODEL_DIR / "earlier.txt").write_text("from the earlier export")
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}

    # A move that fails half-way (model.json after model.stablehlo): the earlier files are put back.
    real_replace = Path.replace

    def failing_replace(self, target):
        if self.name == export.METADATA_FILE and self.parent.name.startswith(".partial-"):
            raise OSError("disk full")
        return real_replace(self, target)

    monkeypatch.setattr(Path, "replace", failing_replace)
    with pytest.raises(OSError, match="disk full"):
        export.run_export(demo_config(platforms=("cpu",), directory=str(tmp_path), formats=("stablehlo",)), workdir)
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == before
    monkeypatch.undo()

    # Exported again: the SavedModel replaced as a whole (nothing of the earlier one left in it).
    export.run_export(config, workdir)
    assert not (tmp_path / export.SAVED_MODEL_DIR / "earlier.txt").exists()
    assert (tmp_path / export.SAVED_MODEL_DIR / "saved_model.pb").is_file()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
    # A saved_model folder of someone else's files is not replaced.
    shutil.rmtree(tmp_path / export.SAVED_MODEL_DIR)
    (tmp_path / export.SAVED_MODEL_DIR).mkdir()
    (tmp_path / export.SAVED_MODEL_DIR / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match=r"saved_model holds files that are not a SavedModel: move them"):
        export.run_export(config, workdir)


def test_an_export_directory_on_another_filesystem_is_written_in_place(trained, tmp_path):
    # A link to another filesystem (here memory): the staging folder lives inside the directory.
    shm = Path("/dev/shm")
    if not shm.is_dir() or shm.stat().st_dev == tmp_path.stat().st_dev:
        # A second filesystem cannot be made without privileges; this project's machines (and CI) have one.
        pytest.skip("no /dev/shm on another filesystem than the tests' temporary folder on this machine")
    _, _, workdir = trained
    target = Path(tempfile.mkdtemp(dir=shm))
    try:
        (tmp_path / "link").symlink_to(target)
        config = demo_config(platforms=("cpu",), directory=str(tmp_path / "link"), formats=("stablehlo",))
        export.run_export(config, workdir)
        assert sorted(p.name for p in target.iterdir()) == [export.METADATA_FILE, export.STABLEHLO_FILE]
    finally:
        shutil.rmtree(target)


def test_exporting_again_removes_artifacts_of_formats_not_written_this_time(trained, tmp_path, capsys):
    # An earlier export into the same directory wrote a SavedModel, ONNX and params.npz (of another checkpoint,
    # size or output): TF Serving pointed at saved_model/ would serve that one beside the new StableHLO.
    _, _, workdir = trained
    earlier = tmp_path / export.SAVED_MODEL_DIR
    (earlier / "variables").mkdir(parents=True)
    (earlier / "saved_model.pb").write_bytes(b"earlier graph")
    (earlier / "variables" / "variables.index").write_bytes(b"earlier weights")
    for name in (export.ONNX_FILE, export.PARAMS_FILE, "notes.txt"):
        (tmp_path / name).write_bytes(b"earlier")
    config = demo_config(platforms=("cpu",), directory=str(tmp_path), formats=("stablehlo",))
    paths = export.run_export(config, workdir)

    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [export.STABLEHLO_FILE, export.METADATA_FILE, "notes.txt"]
    )
    assert set(paths) == {"stablehlo", "metadata"}
    assert (
        f"removed params.npz, saved_model/, model.onnx from {tmp_path}: an earlier export's" in capsys.readouterr().out
    )

    # Parameters beside the module this time: params.npz is written, not stale; a saved_model folder that holds
    # no SavedModel is not this package's to remove; an export of another format replaces the StableHLO files.
    (tmp_path / export.SAVED_MODEL_DIR).mkdir()
    (tmp_path / export.PARAMS_FILE).write_bytes(b"earlier")
    assert export.stale_artifacts(tmp_path, ("stablehlo",), embed_params=False) == []
    assert export.stale_artifacts(tmp_path, ("onnx",), embed_params=True) == [
        tmp_path / name for name in (export.STABLEHLO_FILE, export.METADATA_FILE, export.PARAMS_FILE)
    ]


def test_export_takes_config_init_from_as_every_reading_mode_does(trained, tmp_path):
    _, _, workdir = trained
    config = demo_config(platforms=("cpu",), directory=str(tmp_path / "out"), formats=("stablehlo",))
    config.init_from = str(workdir / "checkpoints" / "7")  # one step's folder, as eval and predict take it
    export.run_export(config, tmp_path / "empty_workdir")
    metadata = json.loads((tmp_path / "out" / export.METADATA_FILE).read_text())
    assert metadata["source_checkpoint"] == {"path": str(workdir / "checkpoints" / "7"), "step": 7}


def test_a_model_on_another_backbone_exports_as_stablehlo_and_onnx(tmp_path):
    # The writers take any Segmenter: README "The JPU on another backbone".
    from tests.test_models import PatchBackbone, own_backbone_model

    model = own_backbone_model(PatchBackbone())
    images = np.random.default_rng(6).normal(size=(2, SIZE, SIZE, 3)).astype(np.float32)
    variables = model.init(jax.random.PRNGKey(0), images)
    expected = reference_logits(model, variables, images)
    kwargs = dict(image_size=(SIZE, SIZE), metadata={"model_name": "encnet_jpu_on_patches"})
    export.export_stablehlo(model, variables, tmp_path, platforms=("cpu",), **kwargs)
    assert relative_error(export.load(tmp_path)(images), expected) <= TOLERANCE
    (logits,) = onnx_session(export.export_onnx(model, variables, tmp_path / "model.onnx", **kwargs)).run(
        None, {"images": images}
    )
    assert relative_error(logits, expected) <= TOLERANCE


def test_exporting_a_custom_backbone_leaves_its_own_batch_norms_unfolded(tmp_path):
    # Its 'bn' before 'conv' (pre-activation) is no BatchNorm after a convolution: folding it would change the
    # function (the package folds only its own layers, built for it with norm_implementation='folded').
    spec = {"backbone": "tests.test_models:PreNormBackbone", "jpu_width": 16}
    model = create_model("fcn_jpu_custom", 6, **spec)
    images = np.random.default_rng(7).normal(size=(2, SIZE, SIZE, 3)).astype(np.float32)
    variables = model.init(jax.random.PRNGKey(0), images)
    rng = np.random.default_rng(8)  # running statistics far from 0 and 1: a wrong fold shows
    variables["batch_stats"] = jax.tree_util.tree_map(
        lambda v: rng.uniform(0.5, 2.0, v.shape).astype(v.dtype), variables["batch_stats"]
    )
    info = {"model_name": "fcn_jpu_custom", "num_classes": 6, "dataset": DATASET, "model_overrides": spec}
    checkpointing.save_variables(tmp_path / "run" / "checkpoints", variables, info, step=1)
    config = demo_config(platforms=("cpu",), directory=str(tmp_path / "out"), formats=("stablehlo",))
    config.model.name = "fcn_jpu_custom"
    for key, value in spec.items():
        config.model.overrides[key] = value
    paths = export.run_export(config, tmp_path / "run")
    assert json.loads(Path(paths["metadata"]).read_text())["batch_norm"] == "folded"  # the neck's and heads'
    expected = reference_logits(model, variables, images)
    assert relative_error(export.load(paths["stablehlo"])(images), expected) <= TOLERANCE

"""Reading weight files and the converter command line: torch-written files read without torch, parity through
a file as a user converts one, ImageNet backbones against a NumPy ResNet, and bad inputs that write nothing.
"""

from __future__ import annotations

import collections
import io
import json
import math
import os
import pickle
import sys
import types
import zipfile
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import save_file as save_safetensors

from fastfcn_jax.checkpointing import model_overrides, restore_variables
from fastfcn_jax.convert import (
    CheckpointReadError,
    ConversionError,
    UnsafeCheckpointError,
    convert_state_dict,
    convert_with_report,
    load_state_dict,
)
from fastfcn_jax.convert.__main__ import main as convert_main
from fastfcn_jax.convert.parity import official_state_dict as fixture_state_dict
from fastfcn_jax.models import create_model
from tests.conftest import FIXTURES
from tests.test_parity import PARITY, official_state_dict

TORCH_PTH = FIXTURES / "torch_pth"
PARITY_MMSEG = FIXTURES / "parity_mmseg"
TOLERANCE = 1e-4


def relative_error(out: np.ndarray, ref: np.ndarray) -> float:
    return float(np.max(np.abs(out - ref)) / np.std(ref))


def assert_outputs_match(model, variables, reference) -> None:
    """The model's outputs on a parity fixture's input are the fixture's (those it stores of the three)."""
    images = jnp.asarray(reference["input"].transpose(0, 2, 3, 1))
    with jax.default_matmul_precision("highest"):
        outputs = jax.jit(lambda v, x: model.apply(v, x, train=False))(variables, images)
    for name in ("logits", "aux_logits", "se_logits"):
        if name not in reference:
            continue
        out_array = np.asarray(outputs[name])
        if out_array.ndim == 4:
            out_array = out_array.transpose(0, 3, 1, 2)
        assert relative_error(out_array, reference[name]) < TOLERANCE, name


def run_cli(*args: str | Path) -> int:
    return convert_main([str(a) for a in args])


# --- reading files -------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["checkpoint.pth.tar", "legacy.pth"])
def test_torch_written_file_reads_back_exactly_as_written(name, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch", None)  # any attempt to import torch now fails
    expected = np.load(TORCH_PTH / "expected.npz")
    dtypes = json.loads((TORCH_PTH / "expected_dtypes.json").read_text())

    state_dict = load_state_dict(TORCH_PTH / name)

    # The training checkpoint's epoch, optimizer and best_pred are left out; order is kept.
    assert list(state_dict) == list(dtypes)
    for key, value in state_dict.items():
        assert str(value.dtype) == dtypes[key], key
        assert value.shape == expected[key].shape, key
        np.testing.assert_array_equal(value.astype(expected[key].dtype), expected[key], err_msg=key)
        assert value.flags.c_contiguous and value.flags.writeable, key
    assert int(state_dict["1.num_batches_tracked"]) == 12345


def test_npz_and_safetensors_read_back_with_their_dtypes(tmp_path):
    rng = np.random.default_rng(0)
    arrays = {
        "conv.weight": rng.standard_normal((4, 3, 3, 3)).astype(np.float32),
        "half": rng.standard_normal((5,)).astype(np.float16),
        "double": rng.standard_normal((2, 2)),
        "bn.num_batches_tracked": np.array(7, np.int64),
    }
    np.savez(tmp_path / "w.npz", **arrays)
    save_safetensors(arrays, str(tmp_path / "w.safetensors"), metadata={"format": "pt"})
    for name in ("w.npz", "w.safetensors"):
        state_dict = load_state_dict(tmp_path / name)
        assert sorted(state_dict) == sorted(arrays)
        for key, value in arrays.items():
            assert state_dict[key].dtype == value.dtype and state_dict[key].shape == value.shape
            np.testing.assert_array_equal(state_dict[key], value)


def malicious_zip(path: Path, marker: Path) -> None:
    """A torch-style zip whose data.pkl would run ``os.system`` when unpickled by plain pickle."""

    class RunsCode:
        def __reduce__(self):
            return os.system, (f"touch {marker}",)

    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("archive/data.pkl", pickle.dumps({"state_dict": RunsCode()}, protocol=2))
        archive.writestr("archive/version", "3\n")


def test_mmengine_checkpoint_gives_its_weights_and_drops_its_metadata(monkeypatch):
    # Saved by mmengine as its runner does (make_mmengine_fixture.py): NumPy scalars in `meta` and mmengine's
    # HistoryBuffer objects in `message_hub`, which torch.load(weights_only=True) refuses. Their globals are
    # read as inert records and dropped; nothing is imported (torch, numpy's pickling helpers, mmengine).
    monkeypatch.setitem(sys.modules, "torch", None)
    monkeypatch.setitem(sys.modules, "mmengine", None)
    state_dict = load_state_dict(TORCH_PTH / "mmengine_checkpoint.pth")
    assert sorted(state_dict) == ["b", "w"]
    np.testing.assert_array_equal(state_dict["w"], np.arange(6, dtype=np.float32).reshape(2, 3))
    np.testing.assert_array_equal(state_dict["b"], np.array([0.5, -1.5], np.float32))


def test_an_object_of_another_global_among_the_weights_is_refused(tmp_path):
    marker = tmp_path / "pwned"

    class RunsCode:
        def __reduce__(self):
            return os.system, (f"touch {marker}",)

    path = tmp_path / "mixed.pth"
    with zipfile.ZipFile(path, "w") as archive:
        payload = {"meta": {"note": RunsCode()}, "state_dict": {"w": RunsCode()}}
        archive.writestr("archive/data.pkl", pickle.dumps(payload, protocol=2))
    with pytest.raises(UnsafeCheckpointError, match=r"mixed\.pth: refusing .*(posix|os)\.system where the weights"):
        load_state_dict(path)
    assert not marker.exists()


def test_records_of_other_globals_nested_in_the_weights_or_under_a_tensor_are_refused(tmp_path, monkeypatch):
    marker = tmp_path / "pwned"

    class RunsCode:
        def __reduce__(self):
            return os.system, (f"touch {marker}",)

    utils_module = types.ModuleType("torch._utils")

    def _rebuild_tensor_v2(*args):
        raise AssertionError("never called: only pickled")

    _rebuild_tensor_v2.__module__, _rebuild_tensor_v2.__qualname__ = "torch._utils", "_rebuild_tensor_v2"
    utils_module._rebuild_tensor_v2 = _rebuild_tensor_v2
    monkeypatch.setitem(sys.modules, "torch", types.ModuleType("torch"))
    monkeypatch.setitem(sys.modules, "torch._utils", utils_module)

    class TensorOnRecord:
        def __reduce__(self):
            return _rebuild_tensor_v2, (RunsCode(), 0, (2,), (1,), False, collections.OrderedDict())

    payloads = {
        "nested": {"state_dict": {"w": (RunsCode(),)}},
        "listed": [RunsCode()],
        "storage": {"state_dict": {"w": TensorOnRecord()}},
    }

    def write(name: str, payload) -> Path:
        path = tmp_path / f"{name}.pth"
        with zipfile.ZipFile(path, "w") as archive:
            archive.writestr("archive/data.pkl", pickle.dumps(payload, protocol=2))
        return path

    for name, payload in payloads.items():
        with pytest.raises(UnsafeCheckpointError, match=rf"{name}\.pth: refusing .*(posix|os)\.system"):
            load_state_dict(write(name, payload))
    # Outside the weights such a tensor is dropped with the rest (an optimizer state, say).
    weights = write("optimizer", {"state_dict": {}, "optimizer": {"m": TensorOnRecord()}})
    with pytest.raises(CheckpointReadError, match=r"optimizer\.pth: holds a dict, not a state_dict"):
        load_state_dict(weights)
    # A list holding itself many times is looked into once (the search for records is not exponential in it).
    looped: list = []
    looped.extend([looped] * 2000)
    with pytest.raises(CheckpointReadError, match=r"looped\.pth: not a state_dict: entries \['w'\]"):
        load_state_dict(write("looped", {"state_dict": {"w": looped}}))
    # A bytearray of a size, which a few bytes of pickle would make gigabytes, is refused before it is made.
    huge = tmp_path / "huge.pth"
    with zipfile.ZipFile(huge, "w") as archive:
        archive.writestr("archive/data.pkl", b"\x80\x02cbuiltins\nbytearray\nJ\x00\x00\x00\x40\x85R.")
    with pytest.raises(CheckpointReadError, match=r"huge\.pth: .*bytearray\(1073741824\)"):
        load_state_dict(huge)
    assert not marker.exists()


def test_pickle_that_would_run_code_is_refused_naming_the_global(tmp_path):
    marker = tmp_path / "pwned"
    malicious_zip(tmp_path / "evil.pth", marker)
    with pytest.raises(UnsafeCheckpointError, match=r"evil\.pth.*(posix|os)\.system"):
        load_state_dict(tmp_path / "evil.pth")
    # The legacy (bare pickle) path is restricted from its first pickle on.
    (tmp_path / "evil_legacy.pth").write_bytes(pickle.dumps(eval, protocol=2))
    with pytest.raises(UnsafeCheckpointError, match=r"builtins\.eval"):
        load_state_dict(tmp_path / "evil_legacy.pth")
    assert not marker.exists()


def torch_style_zip(path: Path, monkeypatch, storage: np.ndarray, offset: int, size: tuple, stride: tuple):
    """A ``torch.save``-format file holding one float32 tensor view ``{'w': ...}``, written without torch:
    stand-in ``torch`` modules let pickle name torch's globals as torch itself does."""
    torch_module, utils_module = types.ModuleType("torch"), types.ModuleType("torch._utils")

    def _rebuild_tensor_v2(*args):
        raise AssertionError("never called: only pickled")

    class FloatStorage:
        pass

    _rebuild_tensor_v2.__module__, FloatStorage.__module__ = "torch._utils", "torch"
    _rebuild_tensor_v2.__qualname__, FloatStorage.__qualname__ = "_rebuild_tensor_v2", "FloatStorage"
    utils_module._rebuild_tensor_v2, torch_module.FloatStorage = _rebuild_tensor_v2, FloatStorage

    class StoredTensor:
        def __reduce__(self):
            return _rebuild_tensor_v2, (storage, offset, size, stride, False, collections.OrderedDict())

    class TorchPickler(pickle.Pickler):
        def persistent_id(self, obj):
            if isinstance(obj, np.ndarray):
                return ("storage", FloatStorage, "0", "cpu", obj.size)
            return None

    monkeypatch.setitem(sys.modules, "torch", torch_module)
    monkeypatch.setitem(sys.modules, "torch._utils", utils_module)
    buffer = io.BytesIO()
    TorchPickler(buffer, protocol=2).dump({"w": StoredTensor()})
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("archive/data.pkl", buffer.getvalue())
        archive.writestr("archive/data/0", storage.astype("<f4").tobytes())


def test_strided_view_reads_the_elements_its_strides_name(tmp_path, monkeypatch):
    torch_style_zip(tmp_path / "view.pth", monkeypatch, np.arange(6, dtype="f4"), 1, (2, 2), (1, 2))
    np.testing.assert_array_equal(load_state_dict(tmp_path / "view.pth")["w"], [[1, 3], [2, 4]])
    # An expanded dimension (stride 0) repeats elements: read, up to a size a small file cannot ask beyond.
    torch_style_zip(tmp_path / "expanded.pth", monkeypatch, np.arange(3, dtype="f4"), 0, (2, 3), (0, 1))
    np.testing.assert_array_equal(load_state_dict(tmp_path / "expanded.pth")["w"], [[0, 1, 2], [0, 1, 2]])
    torch_style_zip(tmp_path / "huge.pth", monkeypatch, np.arange(1, dtype="f4"), 0, (1 << 16, 1 << 16), (0, 0))
    with pytest.raises(CheckpointReadError, match=r"huge\.pth: tensor w cannot be read.*repeats its storage"):
        load_state_dict(tmp_path / "huge.pth")


@pytest.mark.parametrize(
    ("offset", "size", "stride"), [(3, (2,), (-1,)), (-1, (2,), (1,)), (1, (3,), (2,)), (0, (2, 2), (1,))]
)
def test_tensor_view_outside_its_storage_is_refused(tmp_path, monkeypatch, offset, size, stride):
    torch_style_zip(tmp_path / "bad_view.pth", monkeypatch, np.arange(4, dtype="f4"), offset, size, stride)
    with pytest.raises(CheckpointReadError, match=r"bad_view\.pth: tensor w cannot be read"):
        load_state_dict(tmp_path / "bad_view.pth")


@pytest.mark.parametrize(
    ("name", "contents", "message"),
    [
        ("notes.pth", b"these are not weights\n", "not a checkpoint"),
        ("image.pth", b"\x89PNG\r\n\x1a\n" + bytes(64), "not a checkpoint"),
        ("empty.pth", b"", "empty file"),
        ("archive.pth", None, "neither a torch.save checkpoint"),
    ],
)
def test_file_that_is_not_a_checkpoint_is_named_in_the_error(tmp_path, name, contents, message):
    path = tmp_path / name
    if contents is None:
        with zipfile.ZipFile(path, "w") as archive:
            archive.writestr("readme.txt", "hello")
    else:
        path.write_bytes(contents)
    with pytest.raises(CheckpointReadError, match=message) as error:
        load_state_dict(path)
    assert str(path) in str(error.value)


@pytest.mark.parametrize("name", ["checkpoint.pth.tar", "legacy.pth", "w.safetensors", "w.npz"])
@pytest.mark.parametrize("keep", [0.5, 0.98])
def test_truncated_file_is_an_error_naming_it(tmp_path, name, keep):
    source = TORCH_PTH / name
    if not source.exists():  # the formats written in the test
        arrays = {"weight": np.arange(600, dtype=np.float32).reshape(20, 30)}
        source = tmp_path / f"full_{name}"
        if name.endswith(".npz"):
            np.savez(source, **arrays)
        else:
            save_safetensors(arrays, str(source))
    data = source.read_bytes()
    path = tmp_path / name
    path.write_bytes(data[: int(len(data) * keep)])
    with pytest.raises(CheckpointReadError, match="truncated") as error:
        load_state_dict(path)
    assert str(path) in str(error.value)


# --- parity through a file, as a user converts one ----------------------------------------------------


@pytest.fixture(scope="module")
def ade_npz(tmp_path_factory) -> Path:
    """The encnet_jpu_r50_ade fixture's synthetic official weights as an .npz file."""
    path = tmp_path_factory.mktemp("weights") / "encnet_jpu_r50_ade.npz"
    np.savez(path, **official_state_dict("encnet_jpu_r50_ade"))
    return path


@pytest.mark.parametrize(
    ("fixture", "model_name", "num_classes", "suffix"),
    [
        ("encnet_jpu_r50_ade", "encnet_jpu_r50", 150, ".npz"),
        ("encnet_jpux_r50_pcontext", "encnet_jpux_r50", 59, ".safetensors"),
    ],
)
def test_cli_conversion_matches_official_outputs(tmp_path, ade_npz, fixture, model_name, num_classes, suffix):
    if suffix == ".npz":
        weights = ade_npz
    else:
        weights = tmp_path / f"{fixture}{suffix}"
        save_safetensors(official_state_dict(fixture), str(weights))
    out = tmp_path / "converted"
    assert run_cli("--model", model_name, "--num-classes", num_classes, weights, "--out", out) == 0

    variables, info = restore_variables(out)
    assert info["model_name"] == model_name and info["num_classes"] == num_classes
    assert info["source"] == "official" and info["input_file"] == weights.name
    assert len(info["input_sha256"]) == 64 and "source keys used" in info["conversion_report"]
    reference = np.load(PARITY / f"{fixture}.npz")
    model = create_model(model_name, num_classes)
    assert_outputs_match(model, variables, reference)


def test_cli_conversion_of_an_mmseg_checkpoint_matches_mmsegs_outputs(tmp_path, capsys):
    # mmsegmentation's FastFCN EncNet (Cityscapes): converted with --from mmseg into the reference='mmseg'
    # variant, which the checkpoint records, so the model rebuilt from it gives mmseg's outputs.
    weights = tmp_path / "fastfcn_r50-d32_jpu_enc.safetensors"
    save_safetensors(fixture_state_dict(PARITY_MMSEG, "encnet_jpu_r50_mmseg"), str(weights))
    out = tmp_path / "converted"
    argv = ["--model", "encnet_jpu_r50", "--num-classes", 19, weights, "--out", out]
    assert run_cli(*argv, "--from", "mmseg", "--class-names", "cityscapes") == 0
    variables, info = restore_variables(out)
    assert info["source"] == "mmseg" and info["model_overrides"] == {"reference": "mmseg"}
    assert info["class_names"][:2] == ["road", "sidewalk"]
    model = create_model(info["model_name"], info["num_classes"], **model_overrides(info))
    reference = np.load(PARITY_MMSEG / "encnet_jpu_r50_mmseg.npz")
    assert_outputs_match(model, variables, reference)
    # Without --from mmseg, the official layout's keys are missing and mmseg's unexpected: the error says
    # which --from the file's keys suggest; and the other way round.
    capsys.readouterr()
    assert run_cli(*argv[:-1], tmp_path / "other") == 1
    assert "an mmsegmentation model's: convert it with --from mmseg" in capsys.readouterr().err
    official = tmp_path / "official.npz"
    np.savez(official, **official_state_dict("psp_jpu_r50_pcontext"))
    assert (
        run_cli("--model", "psp_jpu_r50", "--num-classes", 59, official, "--from", "mmseg", "--out", out, "--overwrite")
        == 1
    )
    assert "an official FastFCN model's: convert it with --from official" in capsys.readouterr().err
    with pytest.raises(ValueError, match="mmsegmentation checkpoints"):
        convert_state_dict({}, "psp_jpu_r50", 19, "official", model_overrides={"reference": "mmseg"})
    # mmcv's ImageNet ResNetV1c (stem.*, layer1.*) is named as such, not taken for a torchvision ResNet.
    v1c = {"stem.0.weight": np.zeros((32, 3, 3, 3), np.float32), "layer1.0.conv1.weight": np.zeros((64, 64, 1, 1))}
    with pytest.raises(ConversionError, match=r"ResNetV1c ImageNet backbone's .*not a source of this converter"):
        convert_state_dict(v1c, "psp_jpu_tiny", 3, "official")


def test_cli_output_restores_to_the_converted_variables(tmp_path, ade_npz, capsys):
    out = tmp_path / "converted"
    class_names = [f"class {i}" for i in range(150)]
    (tmp_path / "names.txt").write_text("\n".join(class_names) + "\n")
    argv = ["--model", "encnet_jpu_r50", "--num-classes", 150, ade_npz, "--out", out]
    assert run_cli(*argv, "--class-names", tmp_path / "names.txt") == 0

    variables, info = restore_variables(out)
    expected = convert_state_dict(load_state_dict(ade_npz), "encnet_jpu_r50", 150)
    assert jax.tree.structure(variables) == jax.tree.structure(expected)
    assert all(jax.tree.leaves(jax.tree.map(np.array_equal, variables, expected)))
    assert info["class_names"] == class_names and info["model_overrides"] == {}
    assert not list(tmp_path.glob(".converted.partial-*"))  # the staging folder was renamed away
    # A second run refuses to overwrite, unless asked to.
    assert run_cli(*argv) == 1
    assert run_cli(*argv, "--overwrite") == 0
    assert restore_variables(out)[1]["class_names"] is None
    # A class-name file of another count: named as the flag's, not the weights file's, problem.
    (tmp_path / "three.txt").write_text("sky\nroad\ncar\n")
    capsys.readouterr()
    assert run_cli(*argv, "--overwrite", "--class-names", tmp_path / "three.txt") == 1
    assert f"error: --class-names {tmp_path / 'three.txt'}: holds 3 class names, but --num-classes is 150" in (
        capsys.readouterr().err
    )


# --- bad inputs write nothing -------------------------------------------------------------------------


def assert_cli_fails_and_writes_nothing(tmp_path, capsys, argv, *messages: str) -> None:
    out = tmp_path / "out"
    before = sorted(p.name for p in tmp_path.iterdir())
    assert run_cli(*argv, "--out", out) == 1
    error = capsys.readouterr().err
    assert all(message in error for message in messages), error
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_psp_weights_into_encnet_fail_naming_keys(tmp_path, capsys):
    weights = tmp_path / "psp.npz"
    np.savez(weights, **official_state_dict("psp_jpu_r50_pcontext"))
    argv = ["--model", "encnet_jpu_r50", "--num-classes", 59, weights]
    assert_cli_fails_and_writes_nothing(
        tmp_path,
        capsys,
        argv,
        f"error: {weights}: ",  # the file, then the keys
        "missing from the checkpoint",
        "head.encmodule.encoding.3.codewords",
        "unexpected checkpoint key",
        "head.conv5.0.conv1.0.weight",
    )


def test_other_class_count_fails_suggesting_reinit_classifier(tmp_path, capsys, ade_npz):
    argv = ["--model", "encnet_jpu_r50", "--num-classes", 59, ade_npz]
    assert_cli_fails_and_writes_nothing(
        tmp_path, capsys, argv, "head.conv6.1.weight: checkpoint shape (150, 512, 1, 1)", "--reinit-classifier"
    )


@pytest.mark.parametrize("case", ["not_a_checkpoint", "truncated", "runs_code"])
def test_bad_file_fails_in_the_cli_and_writes_nothing(tmp_path, capsys, case):
    weights = tmp_path / "in.pth"
    marker = tmp_path / "pwned"
    if case == "not_a_checkpoint":
        weights.write_text("model = resnet50()\n")
        message = "not a checkpoint"
    elif case == "truncated":
        weights.write_bytes((TORCH_PTH / "checkpoint.pth.tar").read_bytes()[:3000])
        message = "truncated"
    else:
        malicious_zip(weights, marker)
        message = "refusing to unpickle"
    argv = ["--model", "fcn_jpu_tiny", "--num-classes", 5, weights]
    assert_cli_fails_and_writes_nothing(tmp_path, capsys, argv, message)
    assert not marker.exists()


def test_failed_overwrite_leaves_the_old_output_in_place(tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("old")
    (tmp_path / "bad.pth").write_text("nope")
    argv = ["--model", "fcn_jpu_tiny", "--num-classes", 5, tmp_path / "bad.pth", "--out", out]
    assert run_cli(*argv, "--overwrite") == 1
    assert "not a checkpoint" in capsys.readouterr().err
    assert [p.name for p in out.iterdir()] == ["keep.txt"]


# --- ImageNet backbones --------------------------------------------------------------------------------

# fcn_jpu_tiny's backbone: deep stem 8-8-16 (or a 7x7 stem of 8), one bottleneck per stage, planes 8..64.
TINY_STEM_WIDTH, TINY_BASE_WIDTH, TINY_BLOCKS = 8, 8, (1, 1, 1, 1)


def imagenet_resnet_state_dict(stem: str, seed: int = 0) -> dict[str, np.ndarray]:
    """An ImageNet ResNet state_dict with torchvision / GluonCV-v1s key names, at the tiny widths."""
    rng = np.random.default_rng(seed)
    state_dict: dict[str, np.ndarray] = {}

    def conv(name: str, out_channels: int, in_channels: int, size: int) -> None:
        std = math.sqrt(1.0 / (in_channels * size * size))
        state_dict[f"{name}.weight"] = rng.normal(0, std, (out_channels, in_channels, size, size)).astype("f4")

    def bn(name: str, channels: int) -> None:
        state_dict[f"{name}.weight"] = rng.uniform(0.5, 1.5, channels).astype("f4")
        state_dict[f"{name}.bias"] = rng.normal(0, 0.1, channels).astype("f4")
        state_dict[f"{name}.running_mean"] = rng.normal(0, 0.1, channels).astype("f4")
        state_dict[f"{name}.running_var"] = rng.uniform(0.5, 1.5, channels).astype("f4")
        state_dict[f"{name}.num_batches_tracked"] = np.array(100, np.int64)

    width = TINY_STEM_WIDTH
    if stem == "deep":  # conv1 = [conv, BN, ReLU, conv, BN, ReLU, conv], then bn1
        conv("conv1.0", width, 3, 3)
        bn("conv1.1", width)
        conv("conv1.3", width, width, 3)
        bn("conv1.4", width)
        conv("conv1.6", 2 * width, width, 3)
        bn("bn1", 2 * width)
        in_channels = 2 * width
    else:
        conv("conv1", width, 3, 7)
        bn("bn1", width)
        in_channels = width
    for stage, num_blocks in enumerate(TINY_BLOCKS, start=1):
        planes = TINY_BASE_WIDTH * 2 ** (stage - 1)
        for block in range(num_blocks):
            prefix = f"layer{stage}.{block}"
            conv(f"{prefix}.conv1", planes, in_channels, 1)
            bn(f"{prefix}.bn1", planes)
            conv(f"{prefix}.conv2", planes, planes, 3)
            bn(f"{prefix}.bn2", planes)
            conv(f"{prefix}.conv3", 4 * planes, planes, 1)
            bn(f"{prefix}.bn3", 4 * planes)
            if block == 0:
                conv(f"{prefix}.downsample.0", 4 * planes, in_channels, 1)
                bn(f"{prefix}.downsample.1", 4 * planes)
            in_channels = 4 * planes
    state_dict["fc.weight"] = rng.normal(0, 0.01, (10, in_channels)).astype("f4")
    state_dict["fc.bias"] = np.zeros(10, "f4")
    return state_dict


def np_conv(x: np.ndarray, weight: np.ndarray, stride: int = 1, padding: int = 0) -> np.ndarray:
    """PyTorch Conv2d (no bias) on NCHW with an OIHW weight, as a sum of shifted 1x1 convolutions."""
    _, _, height, width = x.shape
    size = weight.shape[-1]
    x = np.pad(x, ((0, 0), (0, 0), (padding, padding), (padding, padding)))
    out_h = (height + 2 * padding - size) // stride + 1
    out_w = (width + 2 * padding - size) // stride + 1
    out = 0.0
    for i in range(size):
        for j in range(size):
            patch = x[:, :, i : i + stride * (out_h - 1) + 1 : stride, j : j + stride * (out_w - 1) + 1 : stride]
            out = out + np.einsum("nchw,oc->nohw", patch, weight[:, :, i, j])
    return out


def np_bn(x: np.ndarray, sd: dict[str, np.ndarray], name: str) -> np.ndarray:
    def per_channel(leaf):
        return sd[f"{name}.{leaf}"].astype(np.float64)[None, :, None, None]

    scale = per_channel("weight") / np.sqrt(per_channel("running_var") + 1e-5)
    return (x - per_channel("running_mean")) * scale + per_channel("bias")


def np_max_pool(x: np.ndarray) -> np.ndarray:
    """MaxPool2d(3, stride 2, padding 1): the padding never wins (-inf)."""
    x = np.pad(x, ((0, 0), (0, 0), (1, 1), (1, 1)), constant_values=-np.inf)
    out_h, out_w = (x.shape[2] - 3) // 2 + 1, (x.shape[3] - 3) // 2 + 1
    windows = [x[:, :, i : i + 2 * out_h - 1 : 2, j : j + 2 * out_w - 1 : 2] for i in range(3) for j in range(3)]
    return np.max(windows, axis=0)


def np_resnet_c4(sd: dict[str, np.ndarray], x: np.ndarray, stem: str) -> np.ndarray:
    """The ImageNet ResNet (stride on the 3x3 conv, as torchvision v1.5 and GluonCV v1s) up to layer4."""
    relu = lambda v: np.maximum(v, 0.0)  # noqa: E731
    w = {k: v.astype(np.float64) for k, v in sd.items()}
    if stem == "deep":
        x = relu(np_bn(np_conv(x, w["conv1.0.weight"], 2, 1), sd, "conv1.1"))
        x = relu(np_bn(np_conv(x, w["conv1.3.weight"], 1, 1), sd, "conv1.4"))
        x = relu(np_bn(np_conv(x, w["conv1.6.weight"], 1, 1), sd, "bn1"))
    else:
        x = relu(np_bn(np_conv(x, w["conv1.weight"], 2, 3), sd, "bn1"))
    x = np_max_pool(x)
    for stage, num_blocks in enumerate(TINY_BLOCKS, start=1):
        for block in range(num_blocks):
            p = f"layer{stage}.{block}"
            stride = 2 if stage > 1 and block == 0 else 1
            y = relu(np_bn(np_conv(x, w[f"{p}.conv1.weight"]), sd, f"{p}.bn1"))
            y = relu(np_bn(np_conv(y, w[f"{p}.conv2.weight"], stride, 1), sd, f"{p}.bn2"))
            y = np_bn(np_conv(y, w[f"{p}.conv3.weight"]), sd, f"{p}.bn3")
            shortcut = x
            if f"{p}.downsample.0.weight" in sd:
                shortcut = np_bn(np_conv(x, w[f"{p}.downsample.0.weight"], stride), sd, f"{p}.downsample.1")
            x = relu(y + shortcut)
    return x


@pytest.mark.parametrize(
    ("source", "stem", "suffix"), [("resnet_s", "deep", ".safetensors"), ("torchvision", "standard", ".npz")]
)
def test_imagenet_backbone_converts_and_its_c4_matches_a_numpy_resnet(tmp_path, source, stem, suffix):
    state_dict = imagenet_resnet_state_dict(stem)
    weights = tmp_path / f"resnet{suffix}"
    if suffix == ".npz":
        np.savez(weights, **state_dict)
    else:
        save_safetensors(state_dict, str(weights))
    variables, report = convert_with_report(load_state_dict(weights), "fcn_jpu_tiny", 5, source)

    # Every backbone variable came from the file; the ImageNet classifier and counters were dropped.
    assert not report.unexpected
    dropped = [k for k in state_dict if k.startswith("fc.") or k.endswith("num_batches_tracked")]
    assert sorted(report.dropped) == sorted(dropped)  # named as in the file
    assert len(report.used) == len(state_dict) - len(report.dropped)
    assert all(name.split("/")[1] == "backbone" for name in report.filled)
    assert {name.split("/")[1] for name in report.initialized} == {"neck", "decode_head", "auxiliary_head"}
    first_conv = "conv1.0.weight" if stem == "deep" else "conv1.weight"
    np.testing.assert_array_equal(
        variables["params"]["backbone"]["stem1"]["conv"]["kernel"], state_dict[first_conv].transpose(2, 3, 1, 0)
    )

    image = np.random.default_rng(1).standard_normal((1, 3, 45, 61)).astype(np.float32)
    model = create_model("fcn_jpu_tiny", 5, stem=stem)
    _, state = jax.jit(lambda v, x: model.apply(v, x, train=False, mutable=["intermediates"]))(
        variables, jnp.asarray(image.transpose(0, 2, 3, 1))
    )
    c4 = np.asarray(state["intermediates"]["c4"]).transpose(0, 3, 1, 2)
    expected = np_resnet_c4(state_dict, image.astype(np.float64), stem)
    assert c4.shape == expected.shape == (1, 256, 2, 2)
    assert relative_error(c4, expected) < TOLERANCE


def test_rng_option_initialises_the_fresh_layers(tmp_path):
    state_dict = imagenet_resnet_state_dict("deep")
    key = jax.random.key(3, impl="rbg")
    converted = convert_state_dict(state_dict, "fcn_jpu_tiny", 5, "resnet_s", rng=key)
    again = convert_state_dict(state_dict, "fcn_jpu_tiny", 5, "resnet_s", rng=key)
    other = convert_state_dict(state_dict, "fcn_jpu_tiny", 5, "resnet_s", rng=jax.random.key(4, impl="rbg"))
    neck = lambda v: v["params"]["neck"]["conv5"]["conv"]["kernel"]  # noqa: E731
    np.testing.assert_array_equal(neck(converted), neck(again))
    assert not np.allclose(neck(converted), neck(other))


def test_class_names_come_from_a_dataset_name_or_a_file(tmp_path):
    from fastfcn_jax.convert.__main__ import read_class_names

    names = read_class_names("ade20k", 150)
    assert len(names) == 150 and names[0] == "wall"
    with pytest.raises(ValueError, match="59 classes, but --num-classes is 150"):
        read_class_names("pcontext", 150)
    with pytest.raises(ValueError, match="neither a file nor a dataset"):
        read_class_names(str(tmp_path / "missing.txt"), 3)
    (tmp_path / "names.txt").write_text("sky\nroad\n\ncar\n")
    assert read_class_names(tmp_path / "names.txt", 3) == ["sky", "road", "car"]


@pytest.mark.parametrize("stem, suggested", [("deep", "resnet_s"), ("standard", "torchvision")])
def test_an_imagenet_resnet_converted_as_a_segmentation_model_is_refused_with_the_right_from(stem, suggested):
    state_dict = imagenet_resnet_state_dict(stem)
    with pytest.raises(ConversionError, match=f"are an ImageNet ResNet's: convert it with --from {suggested}"):
        convert_with_report(state_dict, "fcn_jpu_tiny", 5)
    # The flags the error offers would otherwise give a random model that passes for a converted one.
    with pytest.raises(ConversionError, match="no checkpoint key fits the model"):
        convert_with_report(state_dict, "fcn_jpu_tiny", 5, allow_missing=True, allow_unexpected=True)
    # The other way round: a whole segmentation model given as ImageNet weights, its keys as in the file.
    whole = {f"pretrained.{key}": value for key, value in state_dict.items()} | {"head.conv5.0.weight": np.zeros(1)}
    with pytest.raises(ConversionError, match=r"(?s)unexpected .*: head\.conv5\.0\.weight.*--from official"):
        convert_with_report(whole, "fcn_jpu_tiny", 5, "resnet_s" if stem == "deep" else "torchvision")


def test_a_directory_given_as_the_checkpoint_names_the_files_inside(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"x")
    with pytest.raises(CheckpointReadError, match=r"a directory, not a checkpoint file: .*\(model.safetensors\)"):
        load_state_dict(tmp_path)

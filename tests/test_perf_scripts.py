"""The performance scripts in experiments/: the real-format input-pipeline benchmark and the GPU diagnosis's
trace summary, run on CPU at tiny sizes (their numbers are never asserted; their plumbing is)."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO / "experiments" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def test_ade20k_format_tree_is_what_the_real_builder_reads(tmp_path: Path) -> None:
    from fastfcn_jax.data import pipeline

    script = _load("input_pipeline")
    script.write_ade20k_tree(tmp_path / "raw", images=3)
    base = tmp_path / "raw/ADEChallengeData2016"
    mask = np.asarray(Image.open(base / "annotations/training/ADE_train_00000001.png"))
    assert mask.dtype == np.uint8 and mask.max() <= 150 and len(np.unique(mask)) > 1
    image = Image.open(base / "images/training/ADE_train_00000001.jpg")
    assert image.format == "JPEG" and image.size[::-1] == mask.shape
    pipeline.prepare("ade20k", tmp_path / "tfds", manual_dir=tmp_path / "raw")
    assert pipeline.dataset_size("ade20k", "train", tmp_path / "tfds") == 3
    assert pipeline.dataset_size("ade20k", "validation", tmp_path / "tfds") == 8
    batch = next(pipeline.train_batches("ade20k", data_dir=tmp_path / "tfds", batch_size=2, seed=0, crop_size=64))
    assert batch["image"].shape == (2, 64, 64, 3) and batch["label"].min() >= -1 and batch["label"].max() < 150


def test_diagnosis_attributes_profiled_time_to_model_scopes(tmp_path: Path) -> None:
    script = _load("gpu_diagnose")
    # Nominal ceilings: no GPU here, but the join of measured and roofline time per HLO instruction is real.
    summary = script.profile_forward("encnet_jpu_tiny", 1, 32, "float32", tmp_path / "traces", ceilings=(1e11, 1e10))
    assert summary["device_events"] > 0 and summary["device_ms_per_iteration"] > 0
    scopes = set(summary["by_scope_ms"])
    assert any(s.startswith("backbone/") for s in scopes) and any(s.startswith("neck/") for s in scopes)
    assert (tmp_path / "traces" / "hlo_encnet_jpu_tiny.txt.gz").exists()
    assert summary["roofline_ms"] > 0
    above = list(summary["above_roofline"].values())
    assert above and all(row["measured_ms"] > 0 and row["roofline_ms"] >= 0 for row in above)
    assert [row["excess_ms"] for row in above] == sorted((row["excess_ms"] for row in above), reverse=True)
    assert any(row["flops"] > 0 for row in above)  # the convolutions and matmuls are among the joined kernels


def test_hlo_scopes_reads_flax_module_paths() -> None:
    script = _load("gpu_diagnose")
    hlo = (
        '  %fusion.3 = f32[2]{0} fusion(%p), kind=kLoop, metadata={op_name="jit(apply)/Segmenter/neck/dilation2/'
        'depthwise/add" stack_frame_id=1}\n'
        '  ROOT %dot.1 = f32[2]{0} dot(%a, %b), metadata={op_name="jit(apply)/Segmenter/jit(_take)/gather"}\n'
    )
    assert script.hlo_scopes(hlo) == {"fusion.3": "neck/dilation2", "dot.1": "gather"}


def test_diagnosis_profiles_a_train_step_with_backward_scopes(tmp_path: Path) -> None:
    script = _load("gpu_diagnose")
    summary = script.profile_train_step("fcn_jpu_tiny", 2, 32, "float32", tmp_path / "traces")
    scopes = set(summary["by_scope_ms"])
    assert any(s.startswith("grad neck/") for s in scopes) and any(s.startswith("neck/") for s in scopes)
    assert (tmp_path / "traces" / "hlo_train_fcn_jpu_tiny.txt.gz").exists()


def test_gpu_aot_builds_a_target_description_for_each_gpu_and_parses_its_options() -> None:
    script = _load("gpu_aot")
    args = script._parse_args(["--train", "--size", "480", "--ops", "separable=split", "--gpu", "h100"])
    assert args.train and args.size == 480 and args.ops == "separable=split" and args.batch_size == 16
    for gpu in script.GPUS.values():
        target = script._TARGET.format(**gpu)
        assert f'device_description_str: "{gpu["name"]}"' in target
        assert "cuda_compute_capability {\n    major: 9" in target


def test_train_variants_times_each_variant_as_it_compiles(tmp_path: Path, capsys) -> None:
    script = _load("train_variants")
    output = tmp_path / "variants.json"
    assert script.parse_variant("model=encnet_dilated_r50,depthwise=grouped", "encnet_jpu_r50") == (
        "model=encnet_dilated_r50,depthwise=grouped",
        "encnet_dilated_r50",
        {"depthwise": "grouped"},
    )
    # A variant that fails (here an unknown choice; on a GPU, say, a kernel that does not compile) is reported
    # and the others still run.
    variants = [
        "--variant",
        "default",
        "--variant",
        "depthwise=bogus",
        "--variant",
        "depthwise_input_grad=materialized",
    ]
    assert script.main(["--quick", *variants, "--output", str(output), "--warmup", "0"]) == 0
    report = json.loads(output.read_text())
    rows = report["rows"]
    assert [r["variant"] for r in rows] == ["default", "depthwise_input_grad=materialized"]
    assert rows[1]["ops"] == {"depthwise_input_grad": "materialized"} and rows[0]["model"] == "encnet_jpu_tiny"
    assert all(len(r["runs_ms"]) == 2 and r["median_ms"] > 0 and r["flops"] > 0 for r in rows)
    assert all(r["back_to_back_ms"] > 0 and r["images_per_s"] == 2e3 / r["back_to_back_ms"] for r in rows)
    assert set(report["interleaved"]) == {r["variant"] for r in rows}
    assert "depthwise_implementation must be one of" in report["failed"]["depthwise=bogus"]
    out = capsys.readouterr().out
    assert "| depthwise_input_grad=materialized | encnet_jpu_tiny |" in out
    assert "| depthwise=bogus | encnet_jpu_tiny | failed: ValueError" in out


def test_pallas_check_compares_the_kernels_with_the_xla_forms(capsys) -> None:
    script = _load("pallas_check")
    assert script.main(["--quick"]) == 0
    out = capsys.readouterr().out
    assert "| 8 |" in out and "PASS" in out and "interpreted" in out and "| loss | gradient |" in out
    # The GPU's timing tables (--time), on tiny shapes: every form and block shape runs and is timed.
    loss_times = script.time_loss(1, 2, 5, 20, interpret=True, runs=1)
    grad_times = script.time_kernel_gradient(1, 5, 16, 1, 2, interpret=True, runs=1)
    assert [what for what, _ in loss_times][:2] == ["loss + gradient, fused", "loss + gradient, pallas"]
    assert len(loss_times) == 2 + len(script.LOSS_KERNEL_CONFIGS) and len(grad_times) == 1 + len(
        script.KERNEL_GRAD_ROWS
    )
    assert all(ms > 0 for _, ms in loss_times + grad_times)
    # Summation order differs between the forms, so a tolerance of zero must fail.
    assert script.main(["--quick", "--tolerance", "0"]) == 1
    assert "FAIL" in capsys.readouterr().out


def test_gpu_check_skips_stages_past_its_deadline(tmp_path: Path) -> None:
    # A lease's call must end in time to bring its files back: no stage starts with under 30 s left.
    env = {**os.environ, "GPU_CHECK_DEADLINE": "20", "GPU_CHECK_STAGES": "forward,train", "PYTHON": sys.executable}
    result = subprocess.run(
        ["bash", str(REPO / "experiments" / "gpu_check.sh"), str(tmp_path)],
        env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 1
    log = (tmp_path / "log.txt").read_text()
    assert "=== forward_bf16: skipped" in log and "=== train_bf16: skipped" in log
    assert "failed stages: environment(skipped) forward_bf16(skipped)" in log


def test_gpu_check_stops_when_jax_found_no_gpu(tmp_path: Path) -> None:
    # A CUDA plugin that did not load leaves jax on the CPU: the lease must not be spent compiling R50 models there.
    env = {**os.environ, "GPU_CHECK_STAGES": "forward", "PYTHON": sys.executable}
    env.pop("GPU_CHECK_QUICK", None)
    result = subprocess.run(
        ["bash", str(REPO / "experiments" / "gpu_check.sh"), str(tmp_path)],
        env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 2, result.stdout[-2000:]
    log = (tmp_path / "log.txt").read_text()
    assert "=== no GPU: jax's backend is cpu" in log and "forward_bf16" not in log


def test_eval_speed_times_the_protocol_on_several_devices_without_tensorflow(capsys) -> None:
    # The accelerator image has no TensorFlow or ml_collections: evaluation must import without them.
    code = (
        "import sys\n"
        "import fastfcn_jax.benchmark, fastfcn_jax.evaluate\n"
        "assert 'tensorflow' not in sys.modules and 'ml_collections' not in sys.modules, sorted(sys.modules)\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO)
    script = _load("eval_speed")
    args = ["--model", "fcn_jpu_tiny", "--num-classes", "5", "--image-size", "40,60", "--base-size", "48"]
    args += ["--crop-size", "32", "--images", "3", "--images-per-call", "1", "--devices", "2", "--json"]
    assert script.main(args) == 0
    out = capsys.readouterr().out
    result = json.loads(out[out.index("{") :])
    # 40x60 at scales 0.5..1.75 of base 48: 16x24 .. 56x84, windows of 32 at stride 21: 1, 2, 2, 6, 6, 12.
    assert result["windows_per_image"] == 29 and result["devices"] == 2 and result["flip"]
    assert result["images_per_s"] > 0 and result["compilations"] == 2 * 4
    assert "| fcn_jpu_tiny (float32) | multi_scale (0.5, 0.75, 1, 1.25, 1.5, 1.75, flip) | 40x60 | 29 | 2 |" in out


def test_onnx_check_converts_runs_and_compares_a_model(capsys) -> None:
    script = _load("onnx_check")
    assert script.main(["--models", "fcn_jpu_tiny", "--size", "64", "--repeats", "1", "--json"]) == 0
    out = capsys.readouterr().out
    row = json.loads(out.strip().splitlines()[-1])
    assert row["model"] == "fcn_jpu_tiny" and row["relative_error"] < 1e-4  # export_onnx's own limit
    assert row["onnx_ms"] > 0 and row["jax_ms"] > 0 and row["onnx_mb"] > 0
    assert out.startswith("| model | size | max error / std |")

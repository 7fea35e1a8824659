"""The command line entry point on the demo config."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).parent.parent


def run_main(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "fastfcn_jax.main", "--config", str(ROOT / "configs" / "demo.py"), *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=env,
    )


def test_demo_summary_runs_and_writes_summary(tmp_path):
    result = run_main(
        f"--workdir={tmp_path}",
        "--mode=summary",
        "--config.model.name=psp_jpu_tiny",
        "--config.model.num_classes=6",
        "--config.model.overrides.aux=False",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["outputs"] == {"logits": [1, 96, 96, 6]}
    assert summary["model"]["name"] == "psp_jpu_tiny"
    assert "| **total** |" in result.stdout


def test_runs_keep_their_compilations_for_the_next_run(tmp_path):
    # Without JAX_COMPILATION_CACHE_DIR (the suite's own cache, which would win), config.compilation_cache='auto'
    # keeps programs under $XDG_CACHE_HOME; every program is written (no 1 s threshold) so the tiny model's count.
    env = {key: value for key, value in os.environ.items() if key != "JAX_COMPILATION_CACHE_DIR"}
    env.update(XDG_CACHE_HOME=str(tmp_path / "cache"), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
    args = (f"--workdir={tmp_path / 'run'}", "--mode=summary", "--config.model.name=fcn_jpu_tiny")
    assert run_main(*args, env=env).returncode == 0
    (folder,) = (tmp_path / "cache" / "fastfcn_jax" / "xla").iterdir()  # one per host CPU kind
    programs = sorted(folder.glob("*-cache"))
    assert programs, sorted(folder.iterdir())
    used = {path: path.read_bytes() for path in folder.glob("*-atime")}  # last-use times, rewritten on each hit
    assert len(used) == len(programs)

    result = run_main(*args, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert sorted(folder.glob("*-cache")) == programs  # nothing compiled anew
    assert all(path.read_bytes() != before for path, before in used.items())  # every program read back

    off = tmp_path / "off"
    assert run_main(*args, "--config.compilation_cache=", env=env | {"XDG_CACHE_HOME": str(off)}).returncode == 0
    assert not off.exists()


def test_summary_of_a_trained_workdir_describes_its_checkpoints_model(tmp_path):
    import jax
    import numpy as np

    from fastfcn_jax import checkpointing
    from fastfcn_jax.models import create_model

    # Trained with an architecture override the summary's command line does not repeat.
    model = create_model("fcn_jpu_tiny", 5, jpu_width=8, aux=False)
    variables = jax.jit(lambda x: model.init(jax.random.PRNGKey(0), x, train=False))(np.zeros((1, 32, 32, 3)))
    info = {
        "model_name": "fcn_jpu_tiny",
        "num_classes": 5,
        "model_overrides": {"jpu_width": 8, "aux": False},
        "crop_size": 48,
    }
    checkpointing.save_variables(tmp_path / "checkpoints", jax.device_get(variables), info, step=3)
    # The demo config (encnet_jpu_tiny, crop 96), with init_from a backbone's weights as the paper configs' runs:
    # the workdir's model is summarised.
    checkpointing.save_backbone(tmp_path / "backbone", variables["params"]["backbone"])
    result = run_main(f"--workdir={tmp_path}", "--mode=summary", f"--config.init_from={tmp_path / 'backbone'}")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "holds a backbone's weights alone, not the model: not summarised" in result.stdout
    assert "the config's config.model.name=encnet_jpu_tiny is not used" in result.stdout
    assert f"fcn_jpu_tiny (5 classes, step 3 of {tmp_path})" in result.stdout
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["outputs"] == {"logits": [1, 48, 48, 5]}  # at the crop size it was trained at
    assert summary["model"]["overrides"]["jpu_width"] == 8 and summary["step"] == 3
    assert summary["parameters"] == sum(np.size(leaf) for leaf in jax.tree_util.tree_leaves(variables["params"]))

    # Without a trained workdir: the configured model, with random weights, at the config's crop.
    result = run_main(
        f"--workdir={tmp_path / 'other'}", "--mode=summary", f"--config.init_from={tmp_path / 'backbone'}"
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "encnet_jpu_tiny (6 classes, random weights)" in result.stdout
    assert json.loads((tmp_path / "other" / "summary.json").read_text())["outputs"]["logits"] == [1, 96, 96, 6]


def test_unknown_config_key_is_rejected_by_name(tmp_path):
    result = run_main(f"--workdir={tmp_path}", "--config.model.nmae=psp_jpu_tiny")
    assert result.returncode != 0
    assert "unknown config key config.model.nmae; did you mean config.model.name?" in result.stderr
    result = run_main(f"--workdir={tmp_path}", "--config.model.overrides.head=psp")
    assert result.returncode != 0
    assert "config.model.overrides.head; the head, neck and depth are the model's name: set config.model.name" in (
        result.stderr
    )
    assert "Traceback" not in result.stderr
    result = run_main(f"--workdir={tmp_path}", "--config.trian.batch_size=3")  # a misspelt section
    assert "unknown config key config.trian.batch_size; did you mean config.train.batch_size?" in result.stderr
    result = run_main(f"--workdir={tmp_path}", "--config.model.name=psp_jpu_tiny", "--config.train.model=3")
    assert "unknown config key config.train.model " in result.stderr  # the failing one of two naming "model"
    result = run_main(f"--workdir={tmp_path}", "--config.train.bogus=3")  # nothing close: the whole key named
    assert "error: unknown config key config.train.bogus" in result.stderr and "Traceback" not in result.stderr
    # The suggestion is a whole key that exists: 'mode' is close to 'modle', but config.mode.name is no key.
    result = run_main(f"--workdir={tmp_path}", "--config.modle.name=psp_jpu_tiny")
    assert "unknown config key config.modle.name; did you mean config.model.name?" in result.stderr


def test_a_config_file_that_does_not_exist_is_named_in_one_line(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "fastfcn_jax.main", "--config", "configs/nonexistent.py", f"--workdir={tmp_path}"],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "error: cannot load --config configs/nonexistent.py: [Errno 2] No such file" in result.stderr
    # A config file that cannot be run: a syntax error, no get_config(), an argument get_config() does not take.
    (tmp_path / "syntax.py").write_text("def get_config(:\n    pass\n")
    (tmp_path / "none.py").write_text("X = 1\n")
    expected = {
        str(tmp_path / "syntax.py"): f"error: cannot load --config {tmp_path / 'syntax.py'}: invalid syntax at line 1",
        str(tmp_path / "none.py"): "has no attribute 'get_config' (a config file defines get_config() without",
        "configs/demo.py:foo": "get_config() takes 0 positional arguments but 1 was given (a config file defines",
    }
    for config, message in expected.items():
        result = subprocess.run(
            [sys.executable, "-m", "fastfcn_jax.main", f"--config={config}", f"--workdir={tmp_path}"],
            capture_output=True,
            text=True,
            cwd=ROOT,
        )
        assert result.returncode == 1 and "Traceback" not in result.stderr and message in result.stderr, result.stderr


def test_a_second_signal_during_training_exits_128_plus_its_number_in_one_line(tmp_path):
    # train.StopRequest raises StoppedNow from wherever the second signal lands (often deep inside jax).
    script = (
        "import sys; from absl import app; from fastfcn_jax import main, train\n"
        "def stopped(config, workdir): raise train.StoppedNow(15)\n"
        "train.train_and_evaluate = stopped\n"
        f"sys.argv = ['main', '--config', {str(ROOT / 'configs' / 'demo.py')!r}, '--workdir', {str(tmp_path)!r}]\n"
        "app.run(main.main, flags_parser=main.parse_flags)\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 128 + 15, result.stderr[-3000:]
    assert "stopped: signal 15 received twice: stopped at once" in result.stderr
    assert "Traceback" not in result.stderr


def test_a_workdir_that_cannot_be_written_is_an_error_before_any_work(tmp_path):
    (tmp_path / "a_file").write_text("")
    result = run_main(f"--workdir={tmp_path / 'a_file' / 'run'}", "--mode=summary")
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert f"cannot write to {tmp_path / 'a_file' / 'run'}" in result.stderr and "--workdir" in result.stderr
    # A file given as the workdir: said as such, by reading and writing modes alike.
    for mode in ("eval", "summary"):
        result = run_main(f"--workdir={tmp_path / 'a_file'}", f"--mode={mode}")
        assert result.returncode != 0 and "Traceback" not in result.stderr
        assert f"--workdir {tmp_path / 'a_file'} is a file, not a folder" in result.stderr


def test_a_bucket_url_is_refused_instead_of_becoming_a_local_folder(tmp_path):
    # Path("gs://b/run") is the relative folder "gs:/b/run": checkpoints would land on the VM's disk.
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "fastfcn_jax.main",
            "--config",
            str(ROOT / "configs/demo.py"),
            "--mode=export",
            "--workdir=gs://my-bucket/run",
        ],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert "--workdir=gs://my-bucket/run: a URL" in result.stderr and "gcsfuse" in result.stderr
    assert not (tmp_path / "gs:").exists()


def test_an_optional_export_format_without_its_package_fails_before_any_work(tmp_path):
    # jax2onnx is hidden from the process (None in sys.modules), whether or not this machine has it.
    args = [str(ROOT / "configs/demo.py"), f"--workdir={tmp_path}", "--mode=export"]
    hide_and_run = (
        "import runpy, sys; sys.modules['jax2onnx'] = None; "
        f"sys.argv = ['main', '--config', *{args!r}, \"--config.export.formats=('stablehlo', 'onnx')\"]; "
        "runpy.run_module('fastfcn_jax.main', run_name='__main__')"
    )
    result = subprocess.run([sys.executable, "-c", hide_and_run], capture_output=True, text=True, cwd=ROOT)
    assert result.returncode != 0 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert "needs jax2onnx" in result.stderr and "pip install -e '.[onnx]'" in result.stderr
    assert not (tmp_path / "export").exists()


def test_ctrl_c_during_evaluation_stops_in_one_line_with_status_130(tmp_path):
    args = [str(ROOT / "configs/demo.py"), f"--workdir={tmp_path}", "--mode=eval"]
    interrupted = (
        "import runpy, sys, fastfcn_jax.evaluate as evaluate\n"
        "def run_evaluation(*args, **kwargs):\n"
        "    raise KeyboardInterrupt\n"
        "evaluate.run_evaluation = run_evaluation\n"
        f"sys.argv = ['main', '--config', *{args!r}]\n"
        "runpy.run_module('fastfcn_jax.main', run_name='__main__')\n"
    )
    result = subprocess.run([sys.executable, "-c", interrupted], capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 130 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert "stopped: interrupted (Ctrl-C)" in result.stderr


def test_unknown_model_name_is_rejected_with_the_available_names(tmp_path):
    result = run_main(f"--workdir={tmp_path}", "--mode=summary", "--config.model.name=encnet_jpu_r18")
    assert result.returncode != 0
    assert "unknown model 'encnet_jpu_r18'" in result.stderr and "encnet_jpu_r50" in result.stderr


def test_impossible_config_value_is_rejected_by_key(tmp_path):
    result = run_main(f"--workdir={tmp_path}", "--config.train.batch_size=0")
    assert result.returncode != 0
    assert "config.train.batch_size=0" in result.stderr


def test_predict_mode_needs_inputs(tmp_path):
    result = run_main(f"--workdir={tmp_path}", "--mode=predict")
    assert result.returncode != 0
    assert "error: mode=predict needs --inputs" in result.stderr
    assert "Traceback" not in result.stderr and "--helpfull" not in result.stderr  # one line, no flag listing
    # Predict's flags in another mode: refused, not silently ignored.
    result = run_main(f"--workdir={tmp_path}", "--mode=eval", "--inputs=photos")
    assert "error: --inputs and --output_dir are for --mode=predict, not --mode=eval" in result.stderr


def test_single_process_modes_refuse_distributed_before_joining_a_job(tmp_path):
    # No coordinator runs: a mode that tried to join one would wait for it instead of failing at once.
    result = run_main(f"--workdir={tmp_path}", "--mode=export", "--distributed", "--coordinator_address=localhost:1")
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "error: --mode=export runs in one process: drop --distributed" in result.stderr


def test_a_multi_process_job_needs_distributed_and_its_addresses(tmp_path):
    # Without --distributed each copy would train alone, into the same workdir as the others.
    result = run_main(f"--workdir={tmp_path}", "--process_id=1", "--num_processes=2")
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "error: --num_processes and --process_id describe a multi-process job: add --distributed" in result.stderr
    env = {key: value for key, value in os.environ.items() if not key.startswith(("SLURM_", "TPU_"))}
    result = run_main(f"--workdir={tmp_path}", "--distributed", env=env)
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert "error: --distributed: " in result.stderr and "pass --coordinator_address=HOST:PORT" in result.stderr


def test_benchmark_mode_takes_the_scripts_options(tmp_path):
    result = run_main(
        f"--workdir={tmp_path}",
        "--mode=benchmark",
        "--config.benchmark.models=encnet_jpu_tiny",
        "--config.benchmark.image_size=32",
        "--config.benchmark.num_classes=5",
        "--config.benchmark.warmup=0",
        "--config.benchmark.repeats=1",
        "--config.benchmark.peak=False",
        "--config.benchmark.ops=depthwise=grouped",
        "--config.benchmark.until=jpu",
        "--config.benchmark.train_models=encnet_jpu_tiny",
        "--config.benchmark.train_sizes=32",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    results = json.loads((tmp_path / "benchmark.json").read_text())
    (model,) = results["models"].values()
    assert model["ops"] == {"depthwise": "grouped"} and model["until"] == "jpu" and results["peak"] is None
    (step,) = results["train_steps"]
    assert step["image_size"] == [32, 32] and step["ops"] == {"depthwise": "grouped"}
    assert "forward only up to jpu" in result.stdout and f"written to {tmp_path / 'benchmark.json'}" in result.stdout


def test_impossible_benchmark_values_are_rejected_by_key(tmp_path):
    result = run_main(
        f"--workdir={tmp_path}", "--mode=benchmark", "--config.benchmark.until=c9", "--config.benchmark.ops=grouped"
    )
    assert result.returncode != 0
    assert "config.benchmark.until='c9'" in result.stderr and "config.benchmark.ops='grouped'" in result.stderr
    result = run_main(
        f"--workdir={tmp_path}",
        "--mode=benchmark",
        "--config.benchmark.train_models=fcn_jpu_tiny",
        "--config.benchmark.train_sizes=",
    )
    assert "config.benchmark.train_sizes='': must name at least one size when" in result.stderr


def test_reading_modes_name_a_workdir_that_does_not_exist_instead_of_creating_it(tmp_path):
    missing = tmp_path / "typo"
    result = run_main(f"--workdir={missing}", "--mode=eval")
    assert f"error: --workdir {missing} does not exist: eval reads the checkpoint" in result.stderr
    result = run_main(f"--workdir={missing}", "--mode=export")
    assert "point config.init_from or config.export.checkpoint at a checkpoint" in result.stderr
    assert result.returncode != 0 and not missing.exists()

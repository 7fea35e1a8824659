"""The Colab TPU notebook runs top to bottom on CPU (every cell but the install cell) with a tiny step count."""

from __future__ import annotations

import json
import os
from pathlib import Path

import nbclient
import nbformat

REPO = Path(__file__).resolve().parent.parent
NOTEBOOK = REPO / "experiments" / "colab_tpu.ipynb"
INSTALL_TAG = "install"


def test_notebook_has_one_install_cell_and_no_outputs_committed():
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    tagged = [c for c in notebook.cells if INSTALL_TAG in c.metadata.get("tags", [])]
    assert len(tagged) == 1 and "pip install" in tagged[0].source
    assert all(not c.get("outputs") for c in notebook.cells if c.cell_type == "code")


def run_install_cell(monkeypatch, *, gpu: bool = False, tpu: bool = False, tensorflow: dict | None = None) -> list:
    """Runs the install cell as IPython would on a runtime with the given accelerator and TensorFlow
    distributions installed, recording its shell and magic commands (with IPython's {variable} expansion)
    instead of running them."""
    import importlib.metadata
    import shutil
    import string
    import subprocess

    from IPython.core.inputtransformer2 import TransformerManager

    notebook = nbformat.read(NOTEBOOK, as_version=4)
    (install,) = [c.source for c in notebook.cells if INSTALL_TAG in c.metadata.get("tags", [])]
    code = TransformerManager().transform_cell(install.replace('"/content/fastfcn-jax"', repr(str(REPO))))
    namespace: dict = {}
    commands = []

    class Shell:
        def run_line_magic(self, magic: str, line: str) -> None:
            commands.append(" ".join(f"%{magic} {string.Formatter().vformat(line, (), namespace)}".split()))

        def system(self, command: str) -> None:
            commands.append("!" + string.Formatter().vformat(command, (), namespace))

    versions = tensorflow if tensorflow is not None else {"tensorflow": "2.21.0"}

    def version(name: str) -> str:
        if name.startswith("tensorflow") and name in versions:
            return versions[name]
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "version", version)
    monkeypatch.setattr(shutil, "which", lambda name: "/usr/bin/nvidia-smi" if gpu and name == "nvidia-smi" else None)
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: subprocess.CompletedProcess(a, 0 if gpu else 9))
    monkeypatch.setenv("TPU_ACCELERATOR_TYPE", "v5litepod-1") if tpu else monkeypatch.delenv(
        "TPU_ACCELERATOR_TYPE", raising=False
    )
    namespace["get_ipython"] = Shell
    exec(compile(code, "install cell", "exec"), namespace)
    return commands


def test_notebook_installs_the_jax_family_at_the_versions_the_tests_pass_with(monkeypatch):
    # Colab keeps whatever jax it has unless told otherwise; older ones break training or export (jax < 0.8), and
    # a jax without the runtime's plugin runs on the CPU.
    constraints = dict(
        line.strip().replace("_", "-").lower().split("==")
        for line in (REPO / "constraints.txt").read_text().splitlines()
        if "==" in line
    )
    family = " ".join(
        f'"{name}=={constraints[name]}"' for name in ("flax", "optax", "orbax-checkpoint", "orbax-export")
    )
    tf = constraints["tensorflow-cpu"]
    for runtime, extra in ((dict(gpu=True), "[cuda12]"), (dict(tpu=True), "[tpu]"), ({}, "")):
        commands = run_install_cell(monkeypatch, **runtime)
        assert commands[0] == f"%cd {REPO}" and commands[1] == "%pip install --quiet --no-deps -e ."
        assert commands[2].startswith(f'%pip install --quiet "jax{extra}=={constraints["jax"]}" {family} ')
        assert "tensorflow==" not in commands[2]  # Colab's own, as new as the tests'
    # An older TensorFlow of whichever distribution is upgraded in place; none: tensorflow installed.
    commands = run_install_cell(monkeypatch, tensorflow={"tensorflow-cpu": "2.19.0"})
    assert commands[2].endswith(f" tensorflow-cpu=={tf}") and " tensorflow==" not in commands[2]
    assert run_install_cell(monkeypatch, tensorflow={})[2].endswith(f" tensorflow=={tf}")
    # Without REPO_URL and a checkout the cell stops there, saying what to set.
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    (install,) = [c.source for c in notebook.cells if INSTALL_TAG in c.metadata.get("tags", [])]
    assert 'REPO_URL = ""' in install and "set REPO_URL to the repository's git URL" in install


def test_notebook_trains_evaluates_shows_predictions_and_exports_on_cpu(tmp_path):
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    notebook.cells = [c for c in notebook.cells if INSTALL_TAG not in c.metadata.get("tags", [])]
    workdir = tmp_path / "workdir"
    env = {
        "FASTFCN_NOTEBOOK_STEPS": "4",
        "FASTFCN_NOTEBOOK_EVAL_EXAMPLES": "4",
        "FASTFCN_NOTEBOOK_WORKDIR": str(workdir),
        "TFDS_DATA_DIR": str(tmp_path / "tfds"),
        # The rest, as for every test, is conftest's environment, which the kernel inherits: 4 fake CPU devices
        # (sharded like a TPU host), the tests' XLA flags and the shared compilation cache.
    }
    previous = {key: os.environ.get(key) for key in env}
    os.environ.update(env)  # the kernel inherits this process's environment
    try:
        client = nbclient.NotebookClient(
            notebook, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(REPO)}}
        )
        client.execute()
    finally:
        for key, value in previous.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value

    outputs = {
        i: "".join(o.get("text", "") for o in cell.get("outputs", []))
        for i, cell in enumerate(notebook.cells)
        if cell.cell_type == "code"
    }
    text = "\n".join(outputs.values())
    assert "4 cpu devices" in text
    assert json.loads((workdir / "metrics.json").read_text())["step"] == 4
    assert "pixAcc" in text and "mIoU" in text
    assert "| encnet_jpu_tiny vs encnet_dilated_tiny |" in text and "| train step |" in text
    images = [o for cell in notebook.cells for o in cell.get("outputs", []) if "image/png" in o.get("data", {})]
    assert len(images) == 4 + 1  # the training run's 4 panels and the overlay strip
    assert (workdir / "export" / "model.stablehlo").is_file()
    assert (workdir / "export" / "saved_model" / "saved_model.pb").is_file()

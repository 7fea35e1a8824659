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


def test_notebook_installs_the_jax_family_at_the_versions_the_tests_pass_with():
    # Colab keeps whatever jax it has unless told otherwise; older ones break training or export (jax < 0.8).
    import re

    notebook = nbformat.read(NOTEBOOK, as_version=4)
    (install,) = [c.source for c in notebook.cells if INSTALL_TAG in c.metadata.get("tags", [])]
    found = re.findall(r'"([a-z-]+)(?:\[(\w+)\])?==([\w.]+)"', install)
    pins = {name: version for name, _, version in found}
    assert {extra for _, extra, _ in found if extra} == {"tpu", "cuda12"}  # the runtime's accelerator support
    constraints = dict(
        line.strip().replace("_", "-").lower().split("==")
        for line in (REPO / "constraints.txt").read_text().splitlines()
        if "==" in line
    )
    constraints["tensorflow"] = constraints["tensorflow-cpu"]  # Colab's tensorflow, upgraded only if older
    assert set(pins) == {"jax", "flax", "optax", "orbax-checkpoint", "orbax-export", "tensorflow"}
    assert {name: constraints[name] for name in pins} == pins
    assert "raise RuntimeError" in install  # a failed clone stops the notebook there, not cells later


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

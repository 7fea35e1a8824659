"""Two local processes joined by jax.distributed train together: 2 hosts x 2 CPU devices = one 4-device mesh."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from subprocess import Popen

import numpy as np
from PIL import Image

from fastfcn_jax import checkpointing
from fastfcn_jax.train import STOP_CHECK_EVERY
from tests.conftest import TEST_XLA_FLAGS
from tests.test_main import ROOT
from tests.test_train_job import DEMO


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("localhost", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def two_processes(command: list[str], extra: tuple[list[str], list[str]] = ([], [])) -> Iterator[list[Popen]]:
    """Processes 0 and 1 of one jax.distributed job running ``command`` (plus ``extra[i]`` for process i; 2
    CPU devices each), stdout and stderr together in a text pipe; killed if still running at the end (a
    failed test leaves no job waiting for its other half)."""
    env = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count=2 {TEST_XLA_FLAGS}"}
    distributed = ["--distributed", f"--coordinator_address=localhost:{free_port()}", "--num_processes=2"]
    processes = [
        Popen(
            [*command, *distributed, f"--process_id={index}", *extra[index]],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for index in range(2)
    ]
    try:
        yield processes
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
                process.wait()


def run_two_processes(
    command: list[str], extra: tuple[list[str], list[str]] = ([], []), check: bool = True
) -> list[str]:
    """Runs the job of :func:`two_processes` to its end; the processes' outputs, each ending with
    ``exit status N``. ``check``: both must exit 0."""
    outputs = []
    with two_processes(command, extra) as processes:
        for process in processes:
            output = process.communicate(timeout=600)[0]
            assert process.returncode == 0 or not check, output[-4000:]
            outputs.append(f"{output}\nexit status {process.returncode}")
    return outputs


def demo_command(tmp_path, *overrides: str) -> list[str]:
    """The demo config's training command (48x48 crops, global batch 8, workdir and data_dir in ``tmp_path``,
    a log line per step, no evaluation), then ``overrides``."""
    return [
        sys.executable, "-m", "fastfcn_jax.main", "--config", str(DEMO), f"--workdir={tmp_path / 'run'}",
        f"--config.dataset.data_dir={tmp_path / 'tfds'}", "--config.dataset.crop_size=48",
        "--config.dataset.base_size=64", "--config.train.batch_size=8", "--config.train.log_every=1",
        "--config.train.eval_every=0", *overrides,
    ]  # fmt: skip


def test_two_processes_train_one_model_on_a_global_mesh(tmp_path):
    command = demo_command(tmp_path, "--config.train.num_steps=3", "--config.eval.batch_size=8")
    outputs = run_two_processes(command)
    # Only the first process reports and writes metrics; both took part in every step and the checkpoint.
    assert "step 3/3" in outputs[0] and "step 3/3" not in outputs[1]
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["step"] == 3 and 0.0 <= metrics["mean_iou"] <= 1.0
    variables, info = checkpointing.restore_variables(tmp_path / "run")
    assert info["step"] == 3
    assert all(np.all(np.isfinite(leaf)) for leaf in jax_leaves(variables))

    # Evaluation over both processes: each takes every other image; the sums equal one process's evaluation.
    # Into a data_dir without the dataset: the first process builds it, the other waits.
    evaluation = [*command, f"--config.dataset.data_dir={tmp_path / 'tfds2'}", "--mode=eval"]
    evaluation.append("--config.evaluation.max_examples=5")
    outputs = run_two_processes(evaluation)
    assert "5 images over 2 processes" in outputs[0] and "; written to" not in outputs[1]
    out = tmp_path / "run" / "eval" / "validation_single_scale_first5"
    together = json.loads((out / "metrics.json").read_text())
    confusion = np.load(out / "confusion.npy")
    alone = subprocess.run(evaluation, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert alone.returncode == 0, alone.stdout[-3000:] + alone.stderr[-3000:]
    assert json.loads((out / "metrics.json").read_text())["num_images"] == together["num_images"] == 5
    np.testing.assert_array_equal(np.load(out / "confusion.npy"), confusion)
    assert confusion.sum() > 0

    # Prediction over both processes: each predicts every other file (names fixed over all files first); the
    # outputs equal one process's, the unreadable file is reported by the process it fell to.
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    for index, name in enumerate(["a.png", "c.png", "d.png", "e.png"]):
        pixels = np.random.default_rng(index).integers(0, 256, (40 + 8 * index, 56, 3), np.uint8)
        Image.fromarray(pixels).save(inputs / name)
    (inputs / "b.txt").write_text("not an image")
    predict = [*command, "--mode=predict", f"--inputs={inputs}"]
    outputs = run_two_processes([*predict, f"--output_dir={tmp_path / 'together'}"])
    assert "wrote 4 masks and overlays" in outputs[0] and "skipped 1 unreadable" in outputs[0], outputs[0][-3000:]
    assert "b.txt" in outputs[1] and "wrote" not in outputs[1], outputs[1][-3000:]
    alone = subprocess.run(
        [*predict, f"--output_dir={tmp_path / 'alone'}"], cwd=ROOT, capture_output=True, text=True, timeout=600
    )
    assert alone.returncode == 0, alone.stdout[-3000:] + alone.stderr[-3000:]
    names = sorted(path.name for path in (tmp_path / "alone").iterdir())
    assert names == sorted(path.name for path in (tmp_path / "together").iterdir()) and len(names) == 9
    assert "predictions.json" in names  # the index of inputs and their outputs, written by the first process
    for name in names:
        if name.endswith("_mask.png"):
            together = np.asarray(Image.open(tmp_path / "together" / name))
            np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "alone" / name)), together)

    # One process fails on its own (its host lacks the workdir): it says why and leaves at once without jax's
    # 5-minute shutdown barrier; the other ends when a collective or the heartbeat timeout (here 20 s instead
    # of 100) finds it gone.
    outputs = run_two_processes(
        [*evaluation[:-1], "--config.evaluation.max_examples=4", "--heartbeat_timeout=20"],
        extra=([], [f"--workdir={tmp_path / 'not_mounted'}"]),
        check=False,
    )
    assert not any("Shutdown barrier" in output for output in outputs), [output[-3000:] for output in outputs]
    assert "not_mounted does not exist" in outputs[1] and "process 1 of 2 failed" in outputs[1], outputs[1][-3000:]
    assert outputs[1].endswith("exit status 1") and not outputs[0].endswith("exit status 0"), outputs[0][-3000:]
    # Process 0 fails in whatever it waits for then (a collective: "process 0 of 2 failed"; the backend's
    # start, which aborts in C++): no assertion on its words.
    assert not (tmp_path / "run" / "eval" / "validation_single_scale_first4").exists()


def test_sigterm_to_one_process_stops_every_process_after_the_same_step_with_a_checkpoint(tmp_path):
    # A preempted host gets SIGTERM alone, at any point of its step: its request travels with the steps, both
    # processes read it at the same check step (train.STOP_CHECK_EVERY), checkpoint the step after it together
    # and exit 143 (a process stopping alone would leave the other waiting in the next step's collectives).
    command = demo_command(tmp_path, "--config.train.num_steps=300", "--config.train.checkpoint_every=1000")
    with two_processes(command) as processes:
        lines = []
        for line in processes[0].stdout:
            lines.append(line)
            if line.startswith("step 3/300"):
                processes[1].send_signal(signal.SIGTERM)
                break
        outputs = ["".join(lines) + processes[0].communicate(timeout=300)[0]]
        outputs.append(processes[1].communicate(timeout=300)[0])
    for process, output in zip(processes, outputs, strict=True):
        assert process.returncode == 128 + signal.SIGTERM, output[-3000:]
    stopped = re.search(r"stopped at step (\d+)/300", outputs[0])
    assert stopped, outputs[0][-3000:]
    _, info = checkpointing.restore_variables(tmp_path / "run")
    # The step after a check step (STOP_CHECK_EVERY + 1 unless process 1 ran 7 steps ahead of process 0).
    assert info["step"] == int(stopped.group(1)) and int(stopped.group(1)) % STOP_CHECK_EVERY == 1


def jax_leaves(tree):
    import jax

    return jax.tree_util.tree_leaves(tree)

"""The train job end to end on the embedded dataset: metrics, checkpoints, resume, init_from, pictures."""

from __future__ import annotations

import gc
import json

import jax
import numpy as np
import pytest

from fastfcn_jax import checkpointing
from fastfcn_jax.config import validate
from fastfcn_jax.train import train_and_evaluate
from tests.test_configs import CONFIGS, load

DEMO = next(p for p in CONFIGS if p.stem == "demo")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("tfds"))


def small_config(data_dir: str, **train):
    config = load(DEMO).get_config()
    config.dataset.data_dir = data_dir
    config.dataset.crop_size = 48
    config.dataset.base_size = 64
    config.train.batch_size = 4
    config.train.num_steps = 6
    config.train.log_every = 2
    config.train.eval_every = 3
    config.train.checkpoint_every = 3
    for key, value in train.items():
        config.train[key] = value
    validate(config)
    return config


def test_train_job_writes_metrics_checkpoints_tensorboard_and_pictures(data_dir, tmp_path):
    config = small_config(data_dir)
    config.model.ops = "loss_logits=head"  # an op choice of the command line, recorded with the weights
    final = train_and_evaluate(config, tmp_path)
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["step"] == 6 == final["step"]
    for key in ("pixel_accuracy", "mean_iou", "mean_iou_present"):
        assert 0.0 <= metrics[key] <= 1.0
    assert any(key.startswith("iou/") for key in metrics)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit()) == ["3", "6"]
    assert any((tmp_path / "best").iterdir())
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    # The same scalars as JSON lines, readable without TensorBoard.
    lines = [json.loads(line) for line in (tmp_path / "scalars.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines if "train/loss" in line] == [2, 4, 6]
    assert [line["step"] for line in lines if "val/mean_iou" in line] == [3, 6]
    assert lines[-1]["val/mean_iou"] == pytest.approx(metrics["mean_iou"])
    assert len(list((tmp_path / "predictions").glob("*.png"))) == 4
    written = json.loads((tmp_path / "config.json").read_text())
    assert written["seed"] == 0 and written["total_steps"] == 6 and "code_version" in written
    variables, info = checkpointing.restore_variables(tmp_path)
    assert info["model_name"] == "encnet_jpu_tiny" and info["num_classes"] == 6 and info["step"] == 6
    assert len(info["class_names"]) == 6
    assert info["model_overrides"]["loss_logits_implementation"] == "head"
    # The best step opens as any checkpoint (docs/evaluation.md: --config.init_from=WORKDIR/best).
    _, best = checkpointing.restore_variables(tmp_path / "best")
    assert best["step"] in (3, 6) and best["score"] > 0 and best["model_name"] == "encnet_jpu_tiny"


def test_time_boxed_run_resumed_equals_uninterrupted_run(data_dir, tmp_path):
    train_and_evaluate(small_config(data_dir), tmp_path / "straight")
    boxed = train_and_evaluate(small_config(data_dir, stop_after_steps=4), tmp_path / "boxed")
    assert boxed["stopped_by"] == "stop_after_steps" and boxed["step"] == 4
    # Validated at step 3 (eval_every), stopped at 4: the metrics say whose they are.
    assert boxed["evaluated_step"] == 3 == json.loads((tmp_path / "boxed" / "metrics.json").read_text())["step"]
    assert not (tmp_path / "boxed" / "predictions").exists()  # panels only of the weights validated
    first, info = checkpointing.restore_variables(tmp_path / "boxed")
    assert info["step"] == 4
    # Resumes at step 4 and replays the data order; its box ends at num_steps: finished, not stopped.
    assert train_and_evaluate(small_config(data_dir, stop_after_steps=4), tmp_path / "boxed")["stopped_by"] is None
    straight, _ = checkpointing.restore_variables(tmp_path / "straight")
    resumed, info = checkpointing.restore_variables(tmp_path / "boxed")
    assert info["step"] == 6
    for a, b in zip(jax.tree_util.tree_leaves(straight), jax.tree_util.tree_leaves(resumed), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_init_from_loads_weights_and_rejects_a_mismatched_model(data_dir, tmp_path):
    train_and_evaluate(small_config(data_dir, num_steps=2, eval_every=0), tmp_path / "source")
    source, _ = checkpointing.restore_variables(tmp_path / "source")

    config = small_config(data_dir, num_steps=1, eval_every=0, lr_per_16=1e-12, weight_decay=0.0)
    config.init_from = str(tmp_path / "source")
    train_and_evaluate(config, tmp_path / "target")
    target, _ = checkpointing.restore_variables(tmp_path / "target")
    np.testing.assert_allclose(
        target["params"]["backbone"]["stem1"]["conv"]["kernel"],
        source["params"]["backbone"]["stem1"]["conv"]["kernel"],
        atol=1e-6,
    )

    config = small_config(data_dir, num_steps=1)
    config.model.name = "psp_jpu_tiny"
    config.init_from = str(tmp_path / "source")
    # Another head: its variables are missing and EncNet's unexpected, both counted and shown.
    with pytest.raises(
        ValueError,
        match=r"does not fit the configured psp_jpu_tiny: \d+ missing: .*; \.\.\. \d+ more \| "
        r"\d+ unexpected: params/decode_head/",
    ):
        train_and_evaluate(config, tmp_path / "mismatch")
    # A run that failed before its first save leaves no empty checkpoint folders that would look like a run.
    assert not (tmp_path / "mismatch" / "checkpoints").exists() and not (tmp_path / "mismatch" / "best").exists()

    # A fine-tune config (the ADE20K trainval one) refuses to start from scratch.
    config = small_config(data_dir, num_steps=1, requires_init_from=True)
    with pytest.raises(ValueError, match="fine-tunes trained weights.*--config.init_from"):
        train_and_evaluate(config, tmp_path / "scratch")
    assert not (tmp_path / "scratch" / "checkpoints").exists() and not (tmp_path / "scratch" / "best").exists()
    # A paper config (an ImageNet backbone expected) refuses random initialisation unless asked for, before any data.
    config = small_config(data_dir, num_steps=1, allow_random_init=False)
    config.dataset.name = "no_such_dataset_prepared"
    with pytest.raises(ValueError, match="starts from ImageNet weights.*--config.train.allow_random_init=True"):
        train_and_evaluate(config, tmp_path / "forgotten")
    assert not (tmp_path / "forgotten").exists()
    # Its run, started with init_from, resumes without it (a resubmitted job, a time-boxed session).
    config = small_config(data_dir, num_steps=3, eval_every=0, allow_random_init=False)
    assert train_and_evaluate(config, tmp_path / "target")["step"] == 3  # from its step 1 above
    assert list((tmp_path / "source" / "checkpoints").iterdir()) and list((tmp_path / "source" / "best").iterdir())


def test_one_imagenet_conversion_initialises_the_backbone_of_any_head_and_dilation(data_dir, tmp_path):
    # The README converts ImageNet weights once for one model; every config with that ResNet trains from it:
    # only the backbone is taken (the file's JPU and heads were random), the rest stays the model's own.
    from fastfcn_jax.convert.__main__ import main as convert
    from tests.test_convert import imagenet_resnet_state_dict

    state_dict = imagenet_resnet_state_dict("deep")
    np.savez(tmp_path / "in1k.npz", **state_dict)
    args = ["--num-classes", "59", "--from", "resnet_s", str(tmp_path / "in1k.npz")]
    assert convert(["--model", "fcn_jpu_tiny", *args, "--out", str(tmp_path / "backbone")]) == 0
    imagenet, _ = checkpointing.restore_variables(tmp_path / "backbone")

    config = small_config(data_dir, num_steps=1, eval_every=0, lr_per_16=1e-12, weight_decay=0.0)
    config.model.name = "psp_dilated_tiny"  # another head, no JPU, 6 classes
    config.init_from = str(tmp_path / "backbone")
    train_and_evaluate(config, tmp_path / "psp")
    trained, info = checkpointing.restore_variables(tmp_path / "psp")
    assert info["model_name"] == "psp_dilated_tiny" and info["num_classes"] == 6
    np.testing.assert_allclose(
        trained["params"]["backbone"]["stem1"]["conv"]["kernel"],
        state_dict["conv1.0.weight"].transpose(2, 3, 1, 0),
        atol=1e-6,
    )
    # Running statistics come from the file too: one step keeps 0.9 of them (PyTorch's BN momentum 0.1).
    stats = trained["batch_stats"]["backbone"]["layer1_0"]["conv1"]["bn"]["var"]
    from_file = imagenet["batch_stats"]["backbone"]["layer1_0"]["conv1"]["bn"]["var"]
    assert np.corrcoef(stats, from_file)[0, 1] > 0.9

    np.savez(tmp_path / "standard.npz", **imagenet_resnet_state_dict("standard"))
    args = ["--num-classes", "59", "--from", "torchvision", str(tmp_path / "standard.npz")]
    assert convert(["--model", "fcn_jpu_tiny", *args, "--out", str(tmp_path / "standard")]) == 0
    config = small_config(data_dir, num_steps=1, eval_every=0, requires_init_from=True)  # a fine-tune config
    config.init_from = str(tmp_path / "backbone")
    with pytest.raises(ValueError, match="holds a backbone.s weights alone, but this config fine-tunes"):
        train_and_evaluate(config, tmp_path / "finetune_from_imagenet")

    config = small_config(data_dir, num_steps=1, eval_every=0)
    config.init_from = str(tmp_path / "standard")  # a 7x7 stem for the deep-stem model
    with pytest.raises(ValueError, match=r"the backbone's weights \(torchvision\) do not fit.*stem") as error:
        train_and_evaluate(config, tmp_path / "standard_run")
    assert "train with --config.model.overrides.stem=standard" in str(error.value)


def test_a_custom_folder_dataset_trains_resumes_only_its_model_and_predicts_in_its_colours(tmp_path, capsys):
    # The glue a user's own data goes through: training finds the folder dataset's class table in data_dir
    # (with no source folder: it is prepared), a resume with another model names the misfit variables, and
    # prediction, which cannot look the dataset up, colours masks with the palette the checkpoint stores.
    from PIL import Image

    from fastfcn_jax.data import prepare
    from fastfcn_jax.predict import Predictor

    source, tfds_dir = tmp_path / "mydata", tmp_path / "tfds"
    table = {"names": ["sky", "grass", "cow"], "palette": [[0, 0, 255], [0, 255, 0], [90, 60, 30]], "ignore_label": 255}
    source.mkdir()
    (source / "classes.json").write_text(json.dumps(table))
    rng = np.random.default_rng(0)
    for split, count in (("train", 4), ("val", 1)):
        for index in range(count):
            for folder, array in (
                ("images", rng.integers(0, 256, (24, 24, 3), dtype=np.uint8)),
                ("masks", rng.integers(0, 3, (24, 24), dtype=np.uint8)),
            ):
                path = source / folder / split / f"img{index}.{'jpg' if folder == 'images' else 'png'}"
                path.parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(array).save(path)
    assert prepare.main(["--dataset", "folder:cows", "--source", str(source), "--data-dir", str(tfds_dir)]) == 0

    config = small_config(str(tfds_dir), num_steps=1, eval_every=0)
    config.dataset.name = "folder:cows"
    config.dataset.crop_size, config.dataset.base_size = 16, 24
    train_and_evaluate(config, tmp_path / "run")
    _, info = checkpointing.restore_variables(tmp_path / "run")
    assert info["num_classes"] == 3 and info["class_names"] == table["names"] and info["crop_size"] == 16

    # A class count the dataset does not have: refused before anything runs (labels past it, classes without any).
    for classes in (2, 5):
        config.model.num_classes = classes
        with pytest.raises(ValueError, match=rf"num_classes={classes}, but dataset 'folder:cows' has 3 classes"):
            train_and_evaluate(config, tmp_path / "run")

    predictor = Predictor.from_checkpoint(tmp_path / "run")
    np.testing.assert_array_equal(predictor.palette, table["palette"])
    assert predictor.protocol.crop_size == 16 and predictor.protocol.base_size == 24

    # Evaluated on a dataset of as many classes under other names: said, and scored under the model's names.
    from fastfcn_jax.evaluate import run_evaluation

    (source / "classes.json").write_text(json.dumps({**table, "names": ["sky", "road", "car"]}))
    assert prepare.main(["--dataset", "folder:roads", "--source", str(source), "--data-dir", str(tfds_dir)]) == 0
    config.model.num_classes = 0
    config.dataset.name = "folder:roads"
    capsys.readouterr()
    scores = run_evaluation(config, tmp_path / "run")
    note = "names its classes differently from the checkpoint's training data ('grass' there, 'road' here, 'cow'"
    assert note in capsys.readouterr().out
    assert list(scores["per_class_iou"]) == table["names"]


def test_sigterm_saves_a_checkpoint_and_stops(data_dir, tmp_path):
    import signal
    import subprocess
    import sys

    from fastfcn_jax.main import EXIT_RESUMABLE
    from tests.test_main import ROOT

    command = [
        sys.executable, "-m", "fastfcn_jax.main", "--config", str(DEMO), f"--workdir={tmp_path}",
        f"--config.dataset.data_dir={data_dir}", "--config.dataset.crop_size=48", "--config.dataset.base_size=64",
        "--config.train.batch_size=4", "--config.train.num_steps=500", "--config.train.log_every=1",
        "--config.train.eval_every=0", "--config.train.checkpoint_every=1000",
    ]  # fmt: skip
    process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = []
    for line in process.stdout:
        lines.append(line)
        if line.startswith("step 3/500"):
            process.send_signal(signal.SIGTERM)
            break
    output = "".join(lines) + process.communicate(timeout=300)[0]
    # Stopped, not finished: a job script (`train && export`) must not go on; 128 + 15 as for a killed process.
    assert process.returncode == 128 + signal.SIGTERM, output[-3000:]
    assert "stopped at step" in output
    _, info = checkpointing.restore_variables(tmp_path)
    assert 3 <= info["step"] < 500  # saved where it stopped, not at a checkpoint_every boundary
    # Time-boxed continuation: resumes, trains 2 steps, exits with the documented "run again" status.
    resumed = subprocess.run(
        [*command, "--config.train.stop_after_steps=2"], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert resumed.returncode == EXIT_RESUMABLE == 75, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert checkpointing.restore_variables(tmp_path)[1]["step"] == info["step"] + 2


# Orbax's reads of the damaged step that its failure abandoned: reclaimed (and reported) within this test.
@pytest.mark.filterwarnings(
    "ignore:Exception ignored in. <coroutine object _read_array_index:pytest.PytestUnraisableExceptionWarning"
)
def test_resume_refuses_another_batch_size_reports_changes_and_skips_an_unreadable_step(
    data_dir, tmp_path, capsys, monkeypatch
):
    from fastfcn_jax import train

    workdir = tmp_path / "run"
    train_and_evaluate(small_config(data_dir, num_steps=4, eval_every=0, checkpoint_every=2), workdir)
    out = capsys.readouterr().out
    assert "first step (compilation included) took" in out and "img/s" in out
    assert "training order: a new permutation of the split each epoch (" in out
    assert json.loads((workdir / "config.json").read_text())["shuffle_buffer"] > 0

    def initialised(*args, **kwargs):
        raise AssertionError("a resumed run compiled and ran the initialisation")

    # Every run below resumes: onto the state's abstract shapes, without initialising a state to overwrite.
    monkeypatch.setattr(train, "create_train_state", initialised)
    # The data order of a resumed run is counted in batches: another batch size would replay or skip examples.
    config = small_config(data_dir, num_steps=6, eval_every=0, checkpoint_every=2)
    config.train.batch_size = 8
    with pytest.raises(ValueError, match=r"trained with train.batch_size=4, this invocation asks for 8"):
        train_and_evaluate(config, workdir)
    # A longer run: allowed, and said (the learning-rate schedule is re-planned); every invocation is recorded.
    train_and_evaluate(small_config(data_dir, num_steps=6, eval_every=0, checkpoint_every=2, lr_per_16=0.02), workdir)
    out = capsys.readouterr().out
    assert "train.num_steps: 4 -> 6" in out and "decays over 6 steps (was 4), from step 4 on" in out
    assert "train.lr_per_16: 0.05 -> 0.02" in out and "train.log_every" not in out
    runs = [json.loads(line) for line in (workdir / "runs.jsonl").read_text().splitlines()]
    assert [(r["start_step"], r["total_steps"]) for r in runs] == [(0, 4), (4, 6)]
    # A damaged newest step (a truncated array file) is moved aside; the run resumes from the step before it.
    # (the weights' largest file: the reading modes read the weights, training the optimizer state too)
    weights = (workdir / "checkpoints/6" / checkpointing.VARIABLES).rglob("*")
    damaged = max(weights, key=lambda p: p.stat().st_size if p.is_file() else 0)
    damaged.write_bytes(damaged.read_bytes()[:100])
    # Evaluation, prediction and export read the newest step: refused in one line naming the older ones.
    with pytest.raises(ValueError, match=r"checkpoint step 6 in .* cannot be read .*init_from=.*/checkpoints/4; steps"):
        checkpointing.restore_variables(workdir)
    final = train_and_evaluate(
        small_config(data_dir, num_steps=6, eval_every=0, checkpoint_every=2, lr_per_16=0.02), workdir
    )
    out = capsys.readouterr().out
    assert "checkpoint step 6" in out and "cannot be read" in out and "resuming from step 4" in out
    assert "resumed from" in out and "at step 4" in out and final["step"] == 6
    assert (workdir / "checkpoints/6.unreadable").is_dir() and (workdir / "checkpoints/6").is_dir()
    gc.collect()
    # Asked again at the end: nothing to train, said so; the metrics are the finished step's, validated again.
    again = train_and_evaluate(
        small_config(data_dir, num_steps=6, eval_every=0, checkpoint_every=2, lr_per_16=0.02), workdir
    )
    assert "nothing to train" in capsys.readouterr().out
    assert again["evaluated_step"] == again["step"] == 6 == json.loads((workdir / "metrics.json").read_text())["step"]


def test_a_failed_validation_loses_no_training_and_a_bad_eval_batch_is_refused_at_once(data_dir, tmp_path, monkeypatch):
    from fastfcn_jax import train

    config = small_config(data_dir, num_steps=3, eval_every=3, checkpoint_every=3)
    config.eval.batch_size = 6  # not divisible by the 4 devices: refused before anything is trained
    with pytest.raises(ValueError, match=r"eval.batch_size=6 must be divisible by the 4 devices"):
        train_and_evaluate(config, tmp_path)
    assert not (tmp_path / "checkpoints").exists()
    # Counted over config.num_devices' mesh, not every device: 6 on 2 devices is fine, 8 on 3 is not.
    config.num_devices = 3
    config.eval.batch_size = 0
    with pytest.raises(ValueError, match=r"train.batch_size=4 must be divisible by the 3 devices of config.num_dev"):
        train_and_evaluate(config, tmp_path)
    config.num_devices, config.train.microbatches = 2, 4
    with pytest.raises(ValueError, match=r"by train.microbatches=4 times the 2 devices of config.num_devices=2"):
        train_and_evaluate(config, tmp_path)
    assert not (tmp_path / "checkpoints").exists()
    for key in ("eval_split", "train_split"):  # a misspelt split: named before training, not after it
        misspelt = small_config(data_dir, num_steps=3)
        misspelt.dataset[key] = "valdation"
        with pytest.raises(ValueError, match=rf"config.dataset.{key}='valdation': Unknown split 'valdation'"):
            train_and_evaluate(misspelt, tmp_path)
        assert not (tmp_path / "checkpoints").exists()

    def failing(*args, **kwargs):
        raise RuntimeError("validation ran out of memory")

    monkeypatch.setattr(train, "evaluate", failing)
    with pytest.raises(RuntimeError, match="validation ran out of memory"):
        train_and_evaluate(small_config(data_dir, num_steps=3, eval_every=3, checkpoint_every=3), tmp_path)
    assert checkpointing.restore_variables(tmp_path)[1]["step"] == 3  # saved before the validation


def test_a_diverged_run_stops_before_saving_over_its_good_checkpoints(data_dir, tmp_path, monkeypatch):
    import jax.numpy as jnp

    from fastfcn_jax import train

    real_step = train.make_train_step

    def diverging_from_step_3(*args, **kwargs):
        step = real_step(*args, **kwargs)

        def diverging(state, batch, rng):
            new_state, terms = step(state, batch, rng)
            return new_state, {**terms, "loss": jnp.where(state.step >= 2, jnp.nan, terms["loss"])}

        return diverging

    monkeypatch.setattr(train, "make_train_step", diverging_from_step_3)
    # Logged every 5 steps: the NaN of step 3 is first seen at step 4's checkpoint, which is not written.
    config = small_config(data_dir, num_steps=6, log_every=5, checkpoint_every=2, eval_every=0)
    with pytest.raises(FloatingPointError, match=r"loss is nan after step 4.*latest checkpoint is step 2"):
        train_and_evaluate(config, tmp_path)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit()) == ["2"]
    assert checkpointing.restore_variables(tmp_path)[1]["step"] == 2
    # Logged every step: stopped at the first NaN, step 3.
    config = small_config(data_dir, num_steps=6, log_every=1, checkpoint_every=2, eval_every=0)
    with pytest.raises(FloatingPointError, match=r"loss is nan after step 3"):
        train_and_evaluate(config, tmp_path / "logged")

    # The update itself diverges (an infinite learning rate): the loss reported is the one before it, finite,
    # but the weights the checkpoint would hold are not.
    def weights_diverging_from_step_3(*args, **kwargs):
        step = real_step(*args, **kwargs)

        def diverging(state, batch, rng):
            new_state, terms = step(state, batch, rng)
            params = jax.tree.map(lambda p: jnp.where(state.step >= 2, jnp.inf, p), new_state.params)
            return new_state.replace(params=params), terms

        return diverging

    monkeypatch.setattr(train, "make_train_step", weights_diverging_from_step_3)
    config = small_config(data_dir, num_steps=6, log_every=5, checkpoint_every=1, eval_every=0)
    with pytest.raises(FloatingPointError, match=r"weights hold NaN or infinite values after step 3.*latest .* step 2"):
        train_and_evaluate(config, tmp_path / "weights")
    assert sorted(p.name for p in (tmp_path / "weights" / "checkpoints").iterdir() if p.name.isdigit()) == ["1", "2"]


def test_a_second_signal_stops_at_once():
    import os
    import signal

    from fastfcn_jax.train import StoppedNow, StopRequest

    with StopRequest() as stop:
        os.kill(os.getpid(), signal.SIGINT)
        assert stop.requested  # the first: checkpoint, then stop
        with pytest.raises(StoppedNow) as stopped:
            os.kill(os.getpid(), signal.SIGINT)
    assert stopped.value.signum == signal.SIGINT and isinstance(stopped.value, KeyboardInterrupt)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_a_resumed_run_replaces_the_tensorboard_points_logged_after_its_checkpoint(tmp_path):
    import tensorflow as tf

    from fastfcn_jax.summary_writer import SummaryWriter

    def points(logdir, files=None) -> list[tuple[str, int]]:
        found = []
        for path in files or sorted(logdir.glob("events.out.tfevents.*")):
            for record in tf.data.TFRecordDataset(str(path)).as_numpy_iterator():
                event = tf.compat.v1.Event.FromString(record)
                found += [(value.tag, event.step) for value in event.summary.value]
        return sorted(found)

    jsonl = tmp_path.parent / f"{tmp_path.name}.jsonl"
    killed = SummaryWriter(tmp_path, jsonl=jsonl)  # logged steps 1-5, its last checkpoint at step 3, then SIGKILL
    for step in range(1, 6):
        killed.scalars(step, {"train/loss": 1.0 / step})
    killed.close()
    with open(jsonl, "a") as log:
        log.write('{"step": 6, "train/lo')  # a line the kill cut short
    resumed = SummaryWriter(tmp_path, start_step=3, jsonl=jsonl)
    for step in (4, 5, 6):
        resumed.scalars(step, {"train/loss": 0.5 / step})
    resumed.close()
    assert points(tmp_path) == [("train/loss", step) for step in range(1, 7)]  # each step once
    logged = [json.loads(line) for line in jsonl.read_text().splitlines()]
    assert [(r["step"], r["train/loss"]) for r in logged] == [
        (1, 1.0),
        (2, 0.5),
        (3, 1 / 3),
        (4, 0.125),
        (5, 0.1),
        (6, 0.5 / 6),
    ]
    SummaryWriter(tmp_path, start_step=6).close()  # nothing after step 6: files left as they are
    assert points(tmp_path) == [("train/loss", step) for step in range(1, 7)]
    # A file cut short by the kill: its readable records are kept, the resume goes on.
    (resumed_file,) = [p for p in tmp_path.glob("events.out.tfevents.*") if ("train/loss", 6) in points(p, [p])]
    resumed_file.write_bytes(resumed_file.read_bytes()[:-5])  # step 6's record (the last) cut short
    SummaryWriter(tmp_path, start_step=5).close()
    assert points(tmp_path) == [("train/loss", step) for step in range(1, 6)]
    assert not [p.name for p in tmp_path.iterdir() if not p.name.startswith("events.out.tfevents.")]
    # A run killed before its first checkpoint: the next one starts from scratch and logs every step again.
    SummaryWriter(tmp_path, start_step=0, jsonl=jsonl).close()
    assert points(tmp_path) == [] and jsonl.read_text() == ""


def test_resuming_on_another_number_of_processes_or_shuffle_is_reported(tmp_path, capsys):
    from fastfcn_jax.train import check_resumed_settings

    record = {"config": {"train": {"batch_size": 16}}, "total_steps": 10, "base_lr": 0.01, "start_step": 4}
    before = {**record, "start_step": 0, "processes": 2, "devices": 8, "shuffle_buffer": 5000}
    (tmp_path / "config.json").write_text(json.dumps(before))
    check_resumed_settings(tmp_path / "config.json", {**record, "processes": 1, "devices": 8, "shuffle_buffer": 5000})
    assert "processes: 2 -> 1: each reads its own shard" in capsys.readouterr().out
    check_resumed_settings(tmp_path / "config.json", {**record, "processes": 2, "devices": 4, "shuffle_buffer": 5000})
    assert capsys.readouterr().out == ""  # devices alone do not change the data order
    # config.dataset.shuffle_buffer=0 resolved on a host with less memory: another order, said.
    check_resumed_settings(tmp_path / "config.json", {**record, "processes": 2, "devices": 8, "shuffle_buffer": 1024})
    assert "shuffle buffer: 5000 -> 1024 examples (training order)" in capsys.readouterr().out
    # A run recorded before the buffer was: it shuffled with at most 1024 examples.
    (tmp_path / "config.json").write_text(json.dumps({**record, "start_step": 0, "processes": 2, "devices": 8}))
    now = {**record, "processes": 2, "devices": 8, "shuffle_buffer": 5000, "shuffled_examples": 5000}
    check_resumed_settings(tmp_path / "config.json", now)
    assert "shuffle buffer: 1024 -> 5000 examples (training order)" in capsys.readouterr().out
    check_resumed_settings(tmp_path / "config.json", {**now, "shuffle_buffer": 700, "shuffled_examples": 700})
    assert capsys.readouterr().out == ""  # a split of 700: the whole split then too


def test_a_custom_backbone_model_trains_evaluates_and_exports_from_its_checkpoint(data_dir, tmp_path, capsys):
    # encnet_jpu_custom with backbone='module:Name': stored with the weights, so the reading modes rebuild it
    # from the checkpoint alone (here with the demo config's own model settings, which are not used).
    from fastfcn_jax import evaluate, export

    config = small_config(data_dir, num_steps=2, eval_every=0)
    config.model.name = "encnet_jpu_custom"
    overrides = {"backbone": "tests.test_models:PatchBackbone", "jpu_width": 16, "head_width": 16, "num_codes": 8}
    for key, value in overrides.items():
        config.model.overrides[key] = value
    final = train_and_evaluate(config, tmp_path)
    variables, info = checkpointing.restore_variables(tmp_path)
    assert info["model_overrides"]["backbone"] == "tests.test_models:PatchBackbone" and final["step"] == 2
    assert set(variables["params"]["backbone"]) >= {"downsample0", "mix3"}

    reading = small_config(data_dir)
    with reading.unlocked():
        reading.evaluation.max_examples = 4
    result = evaluate.run_evaluation(reading, tmp_path)
    assert result["model_name"] == "encnet_jpu_custom" and 0 <= result["mean_iou"] <= 1
    assert "holds encnet_jpu_custom with 6 classes and is evaluated as such" in capsys.readouterr().out
    reading.model.name = "encnet_jpu_custom"
    for key, value in overrides.items():
        reading.model.overrides[key] = value
    with reading.unlocked():
        reading.export = {"platforms": ("cpu",), "formats": ("stablehlo",)}
    paths = export.run_export(reading, tmp_path)
    segmenter = export.load(paths["stablehlo"])
    assert segmenter(np.zeros((1, *segmenter.image_size, 3), np.float32)).shape == (1, *segmenter.image_size, 6)

    # Its backbone alone (checkpointing.save_backbone) initialises another head's model on that backbone.
    from fastfcn_jax import optim, sharding, train
    from fastfcn_jax.models import create_model

    checkpointing.save_backbone(
        tmp_path / "backbone", variables["params"]["backbone"], variables["batch_stats"].get("backbone")
    )
    other = create_model("psp_jpux_custom", 3, backbone="tests.test_models:PatchBackbone", jpu_width=32, jpux_groups=4)
    optimizer, mesh = optim.make_optimizer(lambda step: 0.01), sharding.make_mesh(None)
    fresh = train.create_train_state(other, optimizer, jax.random.PRNGKey(5), (1, 64, 64, 3), mesh)
    loaded, source = train.load_pretrained(fresh, str(tmp_path / "backbone"), mesh)
    assert source["source"] == "backbone"
    jax.tree_util.tree_map(np.testing.assert_array_equal, loaded.params["backbone"], variables["params"]["backbone"])
    jax.tree_util.tree_map(np.testing.assert_array_equal, loaded.params["neck"], fresh.params["neck"])


def test_a_trained_model_of_another_class_count_is_fine_tuned_with_fresh_classifiers(data_dir, tmp_path):
    from flax.traverse_util import flatten_dict

    from fastfcn_jax import optim, sharding, train
    from fastfcn_jax.models import create_model
    from fastfcn_jax.models.segmenter import CLASSIFIER_MODULES

    trained_model = create_model("encnet_jpu_tiny", 10)
    trained = trained_model.init(jax.random.PRNGKey(1), np.zeros((1, 48, 48, 3), np.float32), train=False)
    info = {"model_name": "encnet_jpu_tiny", "num_classes": 10, "class_names": None, "dataset": "ten_classes"}
    checkpointing.save_variables(tmp_path / "ten" / "checkpoints", trained, info, step=5)

    optimizer, mesh = optim.make_optimizer(lambda step: 0.01), sharding.make_mesh(None)
    model = create_model("encnet_jpu_tiny", 6)
    fresh = train.create_train_state(model, optimizer, jax.random.PRNGKey(2), (1, 48, 48, 3), mesh)
    with pytest.raises(ValueError, match=r"(?s)its classifiers are for 10 classes: .*reinit_classifier=True"):
        train.load_pretrained(fresh, str(tmp_path / "ten"), mesh)
    loaded, _ = train.load_pretrained(fresh, str(tmp_path / "ten"), mesh, reinit_classifier=True)
    for collection in ("params", "batch_stats"):
        before, after = (flatten_dict(dict(tree[collection])) for tree in (trained, loaded.variables))
        new = flatten_dict(dict(getattr(fresh, collection)))
        assert set(after) == set(new)
        for path, value in after.items():
            classifier = "/".join(path[:-1]) in CLASSIFIER_MODULES
            np.testing.assert_array_equal(value, new[path] if classifier else before[path], err_msg=str(path))
        if collection == "params":
            assert sum("/".join(p[:-1]) in CLASSIFIER_MODULES for p in after) == 6  # 3 layers: kernel, bias

    # Through the training job: refused with the way forward, then trained with it.
    config = small_config(data_dir, num_steps=1, eval_every=0)
    config.init_from = str(tmp_path / "ten")
    with pytest.raises(ValueError, match=r"reinit_classifier=True"):
        train_and_evaluate(config, tmp_path / "six")
    config.train.reinit_classifier = True
    assert train_and_evaluate(config, tmp_path / "six")["step"] == 1
    assert checkpointing.restore_variables(tmp_path / "six")[1]["num_classes"] == 6

"""Command line entry point: ``python -m fastfcn_jax.main --config configs/<name>.py --workdir DIR``.

Thin glue: parses flags, validates the config and dispatches to the mode's module. Modes:

- ``train``: train, validate, checkpoint (resumes from WORKDIR);
- ``eval``: the reference's test protocol on a split (docs/evaluation.md);
- ``predict``: masks and overlays for ``--inputs`` (a file, folder or glob);
- ``export``: StableHLO / SavedModel / ONNX artifacts (docs/export.md);
- ``summary``: parameter table and one forward pass (of the model WORKDIR's checkpoint or ``init_from`` holds, if any);
- ``benchmark``: forward latency and FLOPs, dilated vs JPU.

Exit status of ``train``: 0 when ``num_steps`` are done; ``EXIT_RESUMABLE`` (75, sysexits' EX_TEMPFAIL)
when ``train.stop_after_steps`` stopped it; 128 + N when signal N (SIGTERM: 143, Ctrl-C: 130) stopped it
after its checkpoint, or at once without one when a second signal came. Run the same command again to
continue. 1 for a user error.
"""

from __future__ import annotations

import os
import re
import signal
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from fastfcn_jax.config import MODES, validate

FLAGS = flags.FLAGS
SINGLE_PROCESS_MODES = ("export", "summary", "benchmark")
EXIT_RESUMABLE = 75  # checkpointed before num_steps on request (train.stop_after_steps): run again to continue
config_flags.DEFINE_config_file("config", None, "Experiment config file (configs/*.py).", lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for outputs (checkpoints, metrics, TensorBoard, summaries).")
flags.DEFINE_enum("mode", None, MODES, "What to run; defaults to the config's `mode`.")
flags.DEFINE_string("inputs", None, "mode=predict: an image file, a folder or a glob.")
flags.DEFINE_string("output_dir", None, "mode=predict: where to write masks and overlays (default WORKDIR/predict).")
flags.DEFINE_bool("distributed", False, "Call jax.distributed.initialize() first (multi-host runs).")
flags.DEFINE_string("coordinator_address", None, "With --distributed: host:port of process 0 (else auto-detected).")
flags.DEFINE_integer("num_processes", None, "With --distributed: number of processes (else auto-detected).")
flags.DEFINE_integer("process_id", None, "With --distributed: this process's index (else auto-detected).")
flags.DEFINE_integer(
    "heartbeat_timeout",
    100,
    "With --distributed: seconds without a heartbeat after which the job counts a process as gone and the "
    "others stop (jax's default, 100); lower it to end a job sooner after a host dies.",
    lower_bound=1,
)
flags.mark_flags_as_required(["config", "workdir"])


def writable_directory(path: str, flag: str = "--workdir") -> None:
    """Creates ``path`` if needed and checks that files can be written in it; ValueError names it otherwise."""
    import tempfile
    from pathlib import Path

    directory = Path(path).expanduser()
    if directory.exists() and not directory.is_dir():
        raise ValueError(f"{flag} {directory} is a file, not a folder: give a folder")
    try:
        directory.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=directory, prefix=".write_check_"):
            pass
    except OSError as error:
        raise ValueError(f"cannot write to {directory} ({error.strerror or error}): give another {flag}") from error


def local_paths(config) -> None:
    """Refuses URLs (gs://, s3://) where files are handled as local paths: they would silently become local
    folders named ``gs:``. tfds reads ``config.dataset.data_dir`` from a bucket itself."""
    given = {
        "--workdir": FLAGS.workdir,
        "--output_dir": FLAGS.output_dir,
        "config.init_from": config.get("init_from"),
        "config.export.directory": config.export.get("directory"),
        "config.export.checkpoint": config.export.get("checkpoint"),
        "config.evaluation.submission_dir": config.evaluation.get("submission_dir"),
    }
    for name, value in given.items():
        if value and "://" in str(value):
            raise ValueError(
                f"{name}={value}: a URL, but this path is read and written as a local folder; use a local path or "
                "a mounted bucket (gcsfuse, Colab's drive.mount)"
            )


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if not FLAGS.distributed:
        given = [
            f"--{name}"
            for name in ("coordinator_address", "num_processes", "process_id")
            if getattr(FLAGS, name) is not None
        ]
        if given:  # each copy would train alone, into the same workdir as the others
            sys.exit(
                f"error: {' and '.join(given)} describe a multi-process job: add --distributed (docs/multihost.md)"
            )
        tasks = os.environ.get("SLURM_STEP_NUM_TASKS", "1")
        if tasks.isdigit() and int(tasks) > 1:
            print(
                f"warning: started as one of {tasks} tasks of a SLURM step without --distributed: each task runs as "
                "a job of its own (into the same workdir, if they share one); add --distributed for one job over "
                "all of them (docs/multihost.md)",
                file=sys.stderr,
                flush=True,
            )
        run_mode()
        return
    mode = FLAGS.mode or FLAGS.config.get("mode")
    if mode in SINGLE_PROCESS_MODES:
        # Each process would write the same files (export) or time a different share of the machine.
        sys.exit(f"error: --mode={mode} runs in one process: drop --distributed (train, eval and predict take it)")
    import jax

    # On TPU pods and SLURM/Kubernetes clusters jax detects these; elsewhere pass all three.
    try:
        jax.distributed.initialize(
            FLAGS.coordinator_address,
            FLAGS.num_processes,
            FLAGS.process_id,
            heartbeat_timeout_seconds=FLAGS.heartbeat_timeout,
        )
    except ValueError as error:  # "coordinator_address should be defined.", "The process id ... must be defined."
        sys.exit(
            f"error: --distributed: {error} Outside SLURM and TPU pods, where jax finds them itself, pass "
            "--coordinator_address=HOST:PORT, --num_processes=N and --process_id=I (docs/multihost.md)"
        )
    # jax's preemption notifier takes SIGTERM and would leave the process running; outside the training
    # loop (which handles it, train.StopRequest) SIGTERM ends the process as it does without --distributed.
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    try:
        run_mode()
    except BaseException as error:  # noqa: BLE001 (every way out of one process must end the job)
        leave_failed_job(error)
        raise


def job_processes() -> int:
    """The processes of this jax.distributed job (1 without one); the backend need not work."""
    from jax._src import distributed

    return distributed.global_state.num_processes or 1


def leave_failed_job(error: BaseException) -> None:
    """Ends this process of a jax.distributed job at once when it failed on its own (a user error, a bug).

    Exiting normally would run jax's shutdown barrier, which waits 5 minutes for the other processes while
    they wait in their next collective for this one; then every process aborts with a C++ stack trace and
    this error is buried. Leaving without the barrier ends the others within the coordination service's
    heartbeat timeout (``--heartbeat_timeout``, 100 s; at once where a collective sees the closed
    connection). A deliberate exit (an integer status: a signal's checkpointed stop,
    train.stop_after_steps) reached by every process together returns normally, as does a job of one
    process (nothing to wait for; an asynchronous checkpoint write finishes).
    """
    if isinstance(error, SystemExit) and (error.code is None or isinstance(error.code, int)):
        return
    from jax._src import distributed  # not jax.process_index(): the backend may be what failed

    index, count = distributed.global_state.process_id, job_processes()
    if count <= 1:
        return
    signum = getattr(error, "signum", None)  # train.StoppedNow: a second signal during training
    status = 128 + signum if signum else 130 if isinstance(error, KeyboardInterrupt) else 1
    try:
        import traceback

        if isinstance(error, SystemExit):
            message = str(error.code)
        elif signum:
            message = str(error)
        elif isinstance(error, KeyboardInterrupt):  # outside training, whose signal handler checkpoints first
            message = "interrupted"
        else:
            message = "".join(traceback.format_exception(error)).rstrip()
            if type(error).__name__ == "JaxRuntimeError":  # most often a collective whose peer has left
                message += "\n(if another process of the job failed first, its output says why)"
        print(
            f"{message}\n(process {index} of {count} failed: ending the job without waiting for the other processes)",
            file=sys.stderr,
        )
        sys.stdout.flush()
        sys.stderr.flush()
    finally:
        os._exit(status)


def run_mode() -> None:
    """Validates ``--config`` and runs its mode; a user error exits with a one-line message."""
    config = FLAGS.config
    if FLAGS.mode:
        with config.unlocked():
            config.mode = FLAGS.mode
    logging.set_verbosity(logging.WARNING)  # orbax logs every file operation at INFO
    workdir = os.path.expanduser(FLAGS.workdir)  # a quoted '~/runs/x' too (the shell expands only bare ones)
    try:
        validate(config)
        local_paths(config)
        # The modes that read a trained workdir: a mistyped one is named, not created empty.
        checkpoint_key = "init_from or config.export.checkpoint" if config.mode == "export" else "init_from"
        named = config.init_from or (config.mode == "export" and config.export.checkpoint)
        reads_workdir = config.mode in ("eval", "predict", "export") and not named
        if reads_workdir and os.path.isfile(workdir):
            raise ValueError(f"--workdir {workdir} is a file, not a folder: give the training run's folder")
        if reads_workdir and not os.path.isdir(workdir):
            raise FileNotFoundError(
                f"--workdir {workdir} does not exist: {config.mode} reads the checkpoint of a training run there "
                f"(train into it first, or point config.{checkpoint_key} at a checkpoint)"
            )
        # Every mode writes into the workdir (predict: into --output_dir when given); a read-only one fails
        # now, not after the work is done.
        if config.mode != "predict" and (FLAGS.inputs or FLAGS.output_dir):  # not silently ignored
            raise ValueError(f"--inputs and --output_dir are for --mode=predict, not --mode={config.mode}")
        if config.mode == "predict" and FLAGS.output_dir:
            writable_directory(FLAGS.output_dir, "--output_dir")
        elif config.mode == "export" and config.export.get("directory"):
            writable_directory(config.export.directory, "config.export.directory")
        else:
            writable_directory(workdir)
        if config.mode != "benchmark":  # which reports compile times: a cache hit is no compilation
            from fastfcn_jax.compilation_cache import enable

            enable(config.compilation_cache)
        if config.mode == "train":
            from fastfcn_jax.train import train_and_evaluate

            final = train_and_evaluate(config, workdir)
            import jax

            if "mean_iou" in final and jax.process_index() == 0:  # the process that wrote metrics.json
                print(
                    f"validation at step {final['evaluated_step']}: pixAcc {final['pixel_accuracy']:.4f}  "
                    f"mIoU {final['mean_iou']:.4f}  (written to {workdir}/metrics.json)"
                )
            # A run stopped before num_steps (checkpointed, resumable) must not look finished to a job script
            # (`train && export`) or a scheduler: 128 + N after signal N, as a shell reports a process that
            # signal ended; EXIT_RESUMABLE after train.stop_after_steps, so a time-boxed job can loop on it.
            stopped_by = final.get("stopped_by")
            if stopped_by == "stop_after_steps":
                sys.exit(EXIT_RESUMABLE)
            if stopped_by is not None:
                sys.exit(128 + int(stopped_by))
        elif config.mode == "eval":
            from fastfcn_jax.evaluate import run_evaluation

            run_evaluation(config, workdir)
        elif config.mode == "predict":
            from fastfcn_jax.predict import run_prediction

            if not FLAGS.inputs:
                raise ValueError("mode=predict needs --inputs (an image file, a folder or a glob)")
            run_prediction(config, workdir, FLAGS.inputs, FLAGS.output_dir)
        elif config.mode == "export":
            from fastfcn_jax.export import run_export

            for kind, path in run_export(config, workdir).items():
                print(f"{kind}: {path}")
        elif config.mode == "benchmark":
            import json
            from pathlib import Path

            from fastfcn_jax.benchmark import format_table, run_benchmark
            from fastfcn_jax.models.op_choices import parse_ops

            settings = config.benchmark

            def items(text: str) -> list[str]:
                return [item.strip() for item in text.split(",") if item.strip()]

            results = run_benchmark(
                items(settings.models),
                num_classes=settings.num_classes,
                image_size=(settings.image_size, settings.image_size),
                batch_size=settings.batch_size,
                warmup=settings.warmup,
                repeats=settings.repeats,
                dtype=settings.dtype,
                aux=settings.aux,
                ops=parse_ops(settings.ops),
                until=settings.until or None,
                constant_weights=settings.constant_weights,
                peak=settings.peak,
                train_names=items(settings.train_models),
                train_sizes=[(int(size), int(size)) for size in items(settings.train_sizes)],
                train_batch_size=settings.train_batch_size,
                interleave=settings.interleave,
            )
            print(format_table(results), flush=True)  # first: the numbers are not lost if the write fails
            written = Path(workdir) / "benchmark.json"
            written.write_text(json.dumps(results, indent=2, default=str))
            print(f"written to {written}")
        elif config.mode == "summary":
            from fastfcn_jax import checkpointing
            from fastfcn_jax.summary import run_summary

            # The model a checkpoint holds, as eval and predict run it: config.init_from's, else the workdir's (an
            # init_from of a backbone's weights alone, as paper configs train with, gives way to the workdir's).
            trained = checkpointing.has_steps(workdir)
            checkpoints = [path for path in (config.init_from, workdir if trained else "") if path]
            model_config = config.model.to_dict()
            if not model_config["num_classes"] and not trained:  # an init_from may hold a backbone alone
                from fastfcn_jax.data.datasets import get_dataset_info

                data_dir = config.dataset.get("data_dir") or None
                model_config["num_classes"] = get_dataset_info(config.dataset.name, data_dir).num_classes
            # At the summarised checkpoint's training crop (as predict), else config.dataset's, else 512.
            default_size = config.dataset.crop_size or 512
            run_summary(model_config, None, 1, config.seed, workdir, checkpoints, default_size=default_size)
    except KeyboardInterrupt as error:
        # A second signal during training (train.StoppedNow): said in one line, exit status 128 + N as for a process
        # that signal ended. A job of several processes leaves through leave_failed_job, which does the same.
        # Ctrl-C in another mode (no checkpoint to save there) likewise, without a traceback.
        if job_processes() > 1:
            raise
        print(f"stopped: {str(error) or 'interrupted (Ctrl-C)'}", file=sys.stderr)
        sys.exit(128 + (getattr(error, "signum", None) or signal.SIGINT))
    except (ValueError, FileNotFoundError, ImportError, FloatingPointError) as error:
        # A user error (bad config value, missing dataset, checkpoint or optional package, a diverged run): say
        # what is wrong, no traceback. An ImportError that names no package to install is a bug: its traceback stays.
        if isinstance(error, ImportError) and "pip install" not in str(error):
            raise
        sys.exit(f"error: {error}")


def _first_unknown_index(key: str) -> int | None:
    """The position of the first part of ``config.a.b.c`` that the base config lacks (None: the key exists)."""
    from fastfcn_jax.config import base_config

    node: object = base_config()
    for index, part in enumerate(key.split(".")[1:], start=1):
        if not hasattr(node, "keys") or part not in node:
            return index
        node = node[part]
    return None


def _first_unknown_part(key: str) -> str | None:
    """That part itself, so that of several overrides the one that failed is named."""
    index = _first_unknown_index(key)
    return None if index is None else key.split(".")[index]


def _closest_key(key: str) -> str | None:
    """``key`` with its first unknown part replaced by the closest name there that makes a whole existing key
    (``config.modle.name`` -> ``config.model.name``, not ``config.mode.name``)."""
    import difflib

    from fastfcn_jax.config import base_config

    parts, index = key.split("."), _first_unknown_index(key)
    node: object = base_config()
    for part in parts[1:index]:
        node = node[part]
    if index is None or not hasattr(node, "keys"):
        return None
    with_name = {name: ".".join([*parts[:index], name, *parts[index + 1 :]]) for name in node}
    candidates = [name for name, whole in with_name.items() if _first_unknown_index(whole) is None]
    close = difflib.get_close_matches(parts[index], candidates, n=1, cutoff=0.6)
    return with_name[close[0]] if close else None


def parse_flags(argv: list[str]) -> list[str]:
    """absl's flag parsing, with a bad ``--config.KEY=VALUE`` (an unknown key, a value of the wrong type)
    reported in one line instead of a traceback."""
    try:
        remaining = FLAGS(argv)
        if FLAGS["config"].present:
            FLAGS.config.get("mode")  # a config file that cannot be read is reported on first use
        return remaining
    except OSError as error:  # ml_collections: "Configuration is not available because of ...: [Errno 2] ..."
        from ml_collections import config_flags

        reason = str(error).strip().splitlines()[-1].strip()
        sys.exit(f"error: cannot load --config {config_flags.get_config_filename(FLAGS['config'])}: {reason}")
    except SyntaxError as error:
        sys.exit(f"error: cannot load --config {error.filename}: {error.msg} at line {error.lineno}")
    except flags.Error as error:
        text = str(error)
        if "Error whilst parsing config file" in text:  # ml_collections quotes the traceback: its last line says it
            text = f"{text.splitlines()[0]} {text.strip().splitlines()[-1]}"
            text += " (a config file defines get_config() without arguments)" if "get_config()" in text else ""
        sys.exit(f"error: {text}\nPass --helpshort or --helpfull to see help on flags.")
    except (AttributeError, KeyError, TypeError, ValueError) as error:
        message = error.args[0] if error.args and isinstance(error.args[0], str) else str(error)
        if "get_config" in message:  # no get_config(), or an argument (FILE:ARG) that it does not take
            given = next((arg for arg in argv if arg.startswith("--config=")), "").partition("=")[2]
            if not given and "--config" in argv[:-1]:
                given = argv[argv.index("--config") + 1]
            sys.exit(f"error: --config {given}: {message} (a config file defines get_config() without arguments)")
        # ml_collections puts the repr of its message in an AttributeError's: undo the escaping.
        message = message.replace("\\n", ": ").replace("\\'", "'").replace("\n", ": ")
        if len(message) > 1 and message[0] == message[-1] == "'":
            message = message[1:-1]
        # An unknown key: ml_collections names only its last part, quoted (with a 'Did you mean "x"' when a key
        # is close); name the whole override, and the suggestion as a whole key too.
        quoted = re.match(r"""\s*['"]*([^'":]+)""", message)
        unknown = quoted.group(1).strip() if quoted else message
        keys = [arg[2:].split("=")[0] for arg in argv if arg.startswith("--config.")]
        culprits = [key for key in keys if _first_unknown_part(key) == unknown]
        if isinstance(error, KeyError | AttributeError) and culprits:
            suggestion = _closest_key(culprits[0])
            hint = f"; did you mean {suggestion}?" if suggestion else ""
            if culprits[0] in (f"config.model.overrides.{part}" for part in ("head", "neck", "depth")):
                hint = "; the head, neck and depth are the model's name: set config.model.name (e.g. psp_jpu_r101)"
            sys.exit(
                f"error: unknown config key {culprits[0]}{hint} (the keys and their defaults: fastfcn_jax/config.py, "
                "base_config)"
            )
        sys.exit(f"error: a --config override could not be applied: {message}")


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)

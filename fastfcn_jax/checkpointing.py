"""One on-disk checkpoint format (orbax ``CheckpointManager``) for converted weights and training runs.

Layout: ``DIR/<step>/`` holds the items ``variables`` (``{'params', 'batch_stats'}``), ``info`` (JSON: at least
``model_name``, ``num_classes``, ``class_names``, ``model_overrides``) and, for training runs, ``train_state``
(optimizer state and step). A training workdir keeps its checkpoints in ``WORKDIR/checkpoints``; a converter
output directory is itself such a checkpoint directory with the single step 0. Either can be given to
:func:`restore_variables`.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

VARIABLES = "variables"
INFO = "info"
TRAIN_STATE = "train_state"
REQUIRED_INFO = ("model_name", "num_classes")
# Checkpoints (info['source']) that hold only a backbone: the converter's ImageNet weights, and save_backbone's.
BACKBONE_SOURCES = ("resnet_s", "torchvision", "backbone")


def checkpoint_dir(path: str | Path) -> Path:
    """The directory holding the step folders: ``path/checkpoints`` for a workdir, else ``path``."""
    path = Path(path).expanduser().absolute()
    return path / "checkpoints" if (path / "checkpoints").is_dir() else path


def has_steps(workdir: str | Path) -> bool:
    """Whether a training workdir holds checkpoint steps (``WORKDIR/checkpoints/<step>``); False if it does not
    exist."""
    directory = Path(workdir).expanduser() / "checkpoints"
    return directory.is_dir() and any(step.name.isdigit() for step in directory.iterdir())


def json_info(info: Mapping[str, Any]) -> dict[str, Any]:
    """``info`` as the checkpoint stores it (JSON): dtypes among ``model_overrides`` by name (``jnp.bfloat16``
    -> ``'bfloat16'``); anything else JSON cannot hold is a ValueError naming its key, before any file is
    written."""
    info = dict(info)
    overrides = dict(info.get("model_overrides") or {})
    for key, value in overrides.items():
        if isinstance(value, type | np.dtype):
            with contextlib.suppress(TypeError):  # not a dtype: the check below names it
                overrides[key] = jnp.dtype(value).name
    info["model_overrides"] = overrides
    for key, value in [*((f"model_overrides.{k}", v) for k, v in overrides.items()), *info.items()]:
        try:
            json.dumps(value)
        except (TypeError, ValueError) as error:
            raise ValueError(f"checkpoint info {key}={value!r} cannot be stored as JSON ({error})") from None
    return info


def storable_overrides(overrides: Mapping[str, Any]) -> dict[str, Any]:
    """``create_model`` overrides as JSON values: numbers and flags as they are, sequences as lists, anything
    else (a dtype) by its name. :func:`model_overrides` reads them back."""
    stored = {}
    for key, value in overrides.items():
        if isinstance(value, bool | int | float | str) or value is None:
            stored[key] = value
        elif isinstance(value, list | tuple):
            stored[key] = list(value)
        else:
            stored[key] = jnp.dtype(value).name if isinstance(value, type | np.dtype) else str(value)
    return stored


def model_overrides(info: Mapping[str, Any]) -> dict[str, Any]:
    """A checkpoint's stored ``model_overrides`` as ``create_model`` arguments: lists back to tuples, and the
    strings older checkpoints stored for tuples (``'(1, 2, 4, 8)'``) parsed. Options of another head or neck,
    which training once accepted and which changed nothing, are left out with a warning (``create_model``
    refuses them)."""
    import ast
    import warnings

    from fastfcn_jax.models.registry import unused_options

    overrides = {}
    for key, value in dict(info.get("model_overrides") or {}).items():
        if isinstance(value, str) and value[:1] in "([" and value[-1:] in ")]":
            with contextlib.suppress(ValueError, SyntaxError):
                value = ast.literal_eval(value)
        overrides[key] = tuple(value) if isinstance(value, list | tuple) else value
    for key in sorted(overrides):
        for reason in unused_options(str(info.get("model_name", "")), {key: overrides[key]}):
            warnings.warn(f"the checkpoint stores {key}={overrides.pop(key)!r}, left out: {reason}", stacklevel=2)
    return overrides


def save_variables(directory: str | Path, variables: Mapping[str, Any], info: Mapping[str, Any], step: int = 0) -> Path:
    """Writes ``variables`` and ``info`` as step ``step`` of a checkpoint directory and waits for it."""
    missing = [k for k in REQUIRED_INFO if k not in info]
    if missing:
        raise ValueError(f"checkpoint info needs {missing}; got {sorted(info)}")
    directory = Path(directory).expanduser().absolute()
    info = json_info({"class_names": None, "model_overrides": {}, **info})
    with ocp.CheckpointManager(directory, options=ocp.CheckpointManagerOptions(create=True)) as manager:
        manager.save(
            step,
            args=ocp.args.Composite(
                **{VARIABLES: ocp.args.StandardSave(dict(variables)), INFO: ocp.args.JsonSave(dict(info))}
            ),
            force=True,
        )
        manager.wait_until_finished()
    return directory


def save_backbone(directory: str | Path, params: Any, batch_stats: Any = None, *, description: str = "") -> Path:
    """Writes pretrained weights of a backbone alone (another backbone's: README "The JPU on another backbone")
    as a checkpoint that ``config.init_from`` takes for the backbone of any model with that backbone, the neck
    and heads left to their initialisers (as the ImageNet conversions of the ResNets)."""
    variables = {"params": {"backbone": params}, "batch_stats": {"backbone": batch_stats or {}}}
    info = {"model_name": "backbone", "num_classes": 0, "source": "backbone", "input_file": description}
    return save_variables(directory, variables, info)


def _item_handlers() -> dict[str, Any]:
    # Every item a checkpoint may hold: an item without a handler makes orbax warn on each open.
    return {
        VARIABLES: ocp.StandardCheckpointHandler(),
        TRAIN_STATE: ocp.StandardCheckpointHandler(),
        INFO: ocp.JsonCheckpointHandler(),
    }


def _stored_structs(manager: ocp.CheckpointManager, step: int, sharding: Any = None) -> dict[str, Any]:
    """The shapes and dtypes of a step's stored variables (``{'params', 'batch_stats'}``), read from its metadata."""
    return jax.tree_util.tree_map(
        lambda meta: jax.ShapeDtypeStruct(tuple(meta.shape), meta.dtype, sharding=sharding),
        dict(manager.item_metadata(step)[VARIABLES]),
    )


def unreadable_reason(error: Exception) -> str:
    """An orbax or TensorStore read error in one line, without the TensorStore spec it appends."""
    text = " ".join(str(error).split()).split(" See full TensorStore details")[0]
    return text[:300]


def restore_variables(path: str | Path, step: int | None = None) -> tuple[dict[str, Any], dict[str, Any]]:
    """Restores ``(variables, info)`` from a converter output or a training workdir (latest step by default).

    ``variables`` is ``{'params', 'batch_stats'}`` as NumPy arrays on the host; ``info`` holds at least
    ``model_name``, ``num_classes``, ``class_names`` and ``model_overrides``. ``path`` may also be one step's
    folder (``WORKDIR/checkpoints/60``): that step.
    """
    path = Path(path).expanduser().absolute()
    if step is None and (path / VARIABLES).is_dir() and (path / INFO).is_dir():
        resolved = path if path.name.isdigit() else path.resolve()  # a link to a step's folder
        if not resolved.name.isdigit():
            raise FileNotFoundError(
                f"{path} looks like one step's folder, but checkpoints find their steps by the folder names (a "
                "number): give it its step's number as its name, or name the folder that holds it"
            )
        path, step = resolved.parent, int(resolved.name)
    directory = checkpoint_dir(path)
    if not directory.is_dir():
        raise FileNotFoundError(
            f"no checkpoint directory at {directory}: give a converter output directory "
            "(python -m fastfcn_jax.convert ... --out DIR) or a training workdir"
        )
    with ocp.CheckpointManager(directory, item_handlers=_item_handlers()) as manager:
        step = manager.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(
                f"{directory} holds no finished checkpoint step: train into that workdir first (--mode=train), or "
                "name another checkpoint (config.init_from; for export config.export.checkpoint)"
            )
        # Restore onto one local device whatever topology wrote it (a pod's checkpoint opens on a laptop).
        device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        try:
            target = _stored_structs(manager, step, device)
            restored = manager.restore(
                step,
                args=ocp.args.Composite(**{VARIABLES: ocp.args.StandardRestore(target), INFO: ocp.args.JsonRestore()}),
            )
        except Exception as error:  # orbax and TensorStore raise many kinds; the step is unusable either way
            others = [other for other in sorted(manager.all_steps(), reverse=True) if other != step]
            older = [other for other in others if other < step]
            hint = "it is the only one"
            if others:
                kind, suggested = ("an older", older[0]) if older else ("another", others[0])
                hint = f"name {kind} step (config.init_from={directory / str(suggested)}; steps {others})"
            raise ValueError(
                f"checkpoint step {step} in {directory} cannot be read ({unreadable_reason(error)}): "
                f"{hint}; if its files are damaged, move the step away (training does so itself on resume)"
            ) from error
    variables = jax.tree_util.tree_map(np.asarray, dict(restored[VARIABLES]))
    info = dict(restored[INFO])
    info["step"] = int(step)
    return variables, info


def require_segmentation_weights(info: Mapping[str, Any], source: Any, use: str) -> None:
    """Refuses a conversion of ImageNet weights where a trained segmentation model is needed (evaluation,
    prediction, export): its model's JPU and heads were never trained."""
    if info.get("source") in BACKBONE_SOURCES:
        raise ValueError(
            f"{source} holds a backbone's weights alone ({info['source']}): its JPU and heads were never trained, "
            f"so it cannot be {use}; train a model from it first (--mode=train --config.init_from={source})"
        )


def config_differences(info: Mapping[str, Any], model_name: str, num_classes: int) -> list[str]:
    """What a config's model (``num_classes`` 0: not compared) asks for that the checkpoint ``info`` is not,
    as ``key=value`` phrases."""
    differences = []
    if info["model_name"] != model_name:
        differences.append(f"config.model.name={model_name}")
    if num_classes and int(info["num_classes"]) != num_classes:
        differences.append(f"{num_classes} classes (config.model.num_classes, 0 = the dataset's)")
    return differences


# create_model arguments that choose how the network is computed or trained, not which function it is.
_NOT_ARCHITECTURE = ("dtype", "aux", "se_loss", "dropout")  # dropout: training only


def architecture_conflicts(info: Mapping[str, Any], configured: Mapping[str, Any]) -> list[str]:
    """The ``create_model`` overrides in ``configured`` that would build another network than checkpoint
    ``info``'s, as ``key=value (the checkpoint's: ...)`` phrases. The checkpoint's value is its stored override
    or, where training left the key at its default (only set keys are stored), the model's default. Compute
    dtype, op choices (``*_implementation``), the training heads (``aux``, ``se_loss``) and ``dropout`` are not
    compared."""
    from fastfcn_jax.models import create_model

    def plain(value: Any) -> Any:
        return tuple(plain(v) for v in value) if isinstance(value, list | tuple) else value

    trained = model_overrides(info)
    # A ..._custom model's backbone is part of its name: always stored.
    named = {"backbone": trained["backbone"]} if "backbone" in trained else {}
    defaults = create_model(info["model_name"], int(info["num_classes"]), **named)
    conflicts = []
    for key, value in configured.items():
        if key in _NOT_ARCHITECTURE or key.endswith("_implementation"):
            continue
        was = trained[key] if key in trained else getattr(defaults, key, value)
        if plain(value) != plain(was) and str(value) != str(was):
            conflicts.append(f"{key}={value!r} (the checkpoint's: {was!r})")
    return conflicts


def model_label(info: Mapping[str, Any]) -> str:
    """A checkpoint's model name as messages show it, naming mmsegmentation's variant (``reference='mmseg'``)."""
    variant = " in mmsegmentation's variant" if model_overrides(info).get("reference") == "mmseg" else ""
    return f"{info['model_name']}{variant}"


def note_unused_model_config(info: Mapping[str, Any], source: Any, model_config: Mapping[str, Any], use: str) -> None:
    """Says which of ``model_config``'s name / class count / architecture overrides the checkpoint
    contradicts: evaluation and prediction run the model a checkpoint describes (``use``: "is evaluated",
    "predicts")."""
    from fastfcn_jax.models.registry import model_kwargs

    differences = config_differences(
        info, model_config.get("name", info["model_name"]), model_config.get("num_classes", 0)
    )
    differences += [f"config.model.overrides.{c}" for c in architecture_conflicts(info, model_kwargs(model_config))]
    if differences and jax.process_index() == 0:  # once per job, not per process
        print(
            f"note: {source} holds {model_label(info)} with {info['num_classes']} classes and {use} as such; the "
            f"config's {' and '.join(differences)} is not used"
        )


def variable_mismatches(expected: Mapping[str, Any], given: Mapping[str, Any]) -> list[str]:
    """Every missing, unexpected or differently shaped variable of ``given`` against ``expected`` (both
    ``{'params', 'batch_stats'}`` trees of arrays or shape structs), as ``'collection/module/.../leaf'`` lines."""
    from flax import traverse_util

    flat_expected = traverse_util.flatten_dict(dict(expected), sep="/")
    flat_given = traverse_util.flatten_dict(dict(given), sep="/")
    problems = [f"missing {k}" for k in flat_expected if k not in flat_given]
    problems += [f"unexpected {k}" for k in flat_given if k not in flat_expected]
    problems += [
        f"{k}: checkpoint {tuple(np.shape(flat_given[k]))} vs model {tuple(v.shape)}"
        for k, v in flat_expected.items()
        if k in flat_given and tuple(np.shape(flat_given[k])) != tuple(v.shape)
    ]
    return problems


def describe_mismatches(problems: Sequence[str], per_kind: int = 4, separator: str = " | ") -> str:
    """:func:`variable_mismatches`' lines in one message: how many of each kind, the first few of each (a
    checkpoint of another head has as many unexpected variables as missing ones: both must show)."""
    kinds = {"missing": [], "unexpected": [], "shape": []}
    for problem in problems:
        kind, _, name = problem.partition(" ")
        if kind in ("missing", "unexpected"):
            kinds[kind].append(name)
        else:
            kinds["shape"].append(problem)
    counts = {"missing": "missing", "unexpected": "unexpected", "shape": "of another shape"}
    parts = []
    for kind, found in kinds.items():
        if found:
            more = f"; ... {len(found) - per_kind} more" if len(found) > per_kind else ""
            parts.append(f"{len(found)} {counts[kind]}: " + "; ".join(found[:per_kind]) + more)
    return separator.join(parts)


def check_variables(
    model: Any, variables: Mapping[str, Any], source: str, image_size: Sequence[int] = (64, 64)
) -> None:
    """Raises ValueError listing every missing, unexpected or differently shaped variable of ``variables``
    against those ``model`` (a Segmenter) initialises (abstractly: nothing is computed)."""
    sample = jax.ShapeDtypeStruct((1, int(image_size[0]), int(image_size[1]), 3), jnp.float32)
    expected = jax.eval_shape(lambda x: model.init(jax.random.PRNGKey(0), x, train=False), sample)
    problems = variable_mismatches(expected, variables)
    if problems:
        raise ValueError(f"{source} does not fit the configured model: {describe_mismatches(problems)}")


def _abstract(tree: Any) -> Any:
    """Shape/dtype/sharding structs of a (sharded) pytree: restoring onto them reshards to the current mesh."""
    return jax.tree_util.tree_map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)), tree
    )


class CheckpointMismatchError(ValueError):
    """A checkpoint of another model (names and shapes of its variables differ from the configured model's)."""


class TrainCheckpointer:
    """Checkpoints of a training run: ``WORKDIR/checkpoints`` (latest ``keep`` steps, async saves) and
    ``WORKDIR/best`` (the best validation score, as the reference's ``model_best.pth.tar``).

    Works on any state with ``step``, ``params``, ``batch_stats`` and ``opt_state`` fields and a
    ``replace`` method (``train.TrainState``).
    """

    def __init__(self, workdir: str | Path, *, keep: int, info: Mapping[str, Any]) -> None:
        workdir = Path(workdir).expanduser().absolute()
        self.directory = workdir / "checkpoints"
        self.info = json_info({"class_names": None, "model_overrides": {}, **info})
        self._manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True),
            item_handlers=_item_handlers(),
        )
        # Not max_to_keep=1: orbax keeps the highest steps, so a better step below a best one of an abandoned
        # future (a resume from an older checkpoint) would be the one deleted; save_best removes the others.
        self._best = ocp.CheckpointManager(
            workdir / "best",
            options=ocp.CheckpointManagerOptions(create=True),
            item_handlers=_item_handlers(),
        )

    def _args(self, state: Any, extra_info: Mapping[str, Any] | None = None) -> ocp.args.Composite:
        return ocp.args.Composite(
            **{
                VARIABLES: ocp.args.StandardSave({"params": state.params, "batch_stats": state.batch_stats}),
                TRAIN_STATE: ocp.args.StandardSave({"step": state.step, "opt_state": state.opt_state}),
                INFO: ocp.args.JsonSave({**self.info, **(extra_info or {})}),
            }
        )

    def save(self, step: int, state: Any) -> None:
        """Starts an asynchronous save of ``state`` as ``step`` (a no-op if that step exists)."""
        if step not in self._manager.all_steps():
            self._manager.save(step, args=self._args(state))

    def save_best(self, step: int, state: Any, score: float) -> None:
        """Saves ``state`` as ``WORKDIR/best`` (its only step once saved)."""
        # The two managers must never save concurrently: each async save runs cross-host barriers in a
        # background thread, and interleaved barriers of two managers can deadlock a multi-host run.
        self._manager.wait_until_finished()
        if step in self._best.all_steps():  # a resumed run's better weights for a step an earlier run saved
            self._best.delete(step)
        self._best.save(step, args=self._args(state, {"score": float(score)}), force=True)
        self._best.wait_until_finished()
        for other in self._best.all_steps():
            if other != step:
                self._best.delete(other)

    def latest_step(self) -> int | None:
        """The newest step saved (or being saved) in ``WORKDIR/checkpoints``, None if there is none."""
        return self._manager.latest_step()

    def best_score(self) -> float | None:
        """The score of ``WORKDIR/best`` (the highest, should a kill during save_best have left two steps)."""
        scores = []
        for step in self._best.all_steps():
            info = self._best.restore(step, args=ocp.args.Composite(**{INFO: ocp.args.JsonRestore()}))[INFO]
            scores += [info["score"]] if info.get("score") is not None else []
        return max(scores, default=None)

    def restore_latest(self, state: Any) -> Any | None:
        """The latest readable checkpoint restored onto ``state``'s structure and shardings, or None if there is
        none.

        Because the targets carry the current shardings, a checkpoint written on 4 devices restores on 1. Newer
        steps that cannot be read (a file damaged or lost, e.g. by a job killed while a copy was made) are moved
        aside as ``STEP.unreadable`` with a warning once an older step has been restored. When no step can be
        read, nothing is moved (the cause may be passing: memory, a network filesystem) and the error names each
        step's reason; a workdir holding only ``STEP.unreadable`` steps is refused rather than trained from
        scratch. A checkpoint of another model is an error (:class:`CheckpointMismatchError`).
        """
        steps = sorted(self._manager.all_steps(), reverse=True)
        failures: list[tuple[int, str, Exception]] = []
        for step in steps:
            try:
                restored = self._restore_step(step, state)
            except CheckpointMismatchError:
                raise
            except Exception as error:  # orbax and TensorStore raise many kinds; the step is unusable either way
                failures.append((step, unreadable_reason(error), error))
                continue
            if failures and jax.process_count() > 1:  # moving files while other hosts read them: leave it to the user
                listed = "; ".join(f"step {failed}: {reason}" for failed, reason, _ in failures)
                paths = " ".join(str(self.directory / str(failed)) for failed, _, _ in failures)
                raise ValueError(
                    f"checkpoints in {self.directory} cannot be read ({listed}); delete {paths} to resume from "
                    f"step {step}"
                ) from failures[0][2]
            for step_failed, reason, _ in failures:
                aside = self.directory / f"{step_failed}.unreadable"
                for attempt in range(2, 1000):  # a step set aside before, saved again and damaged again
                    if not aside.exists():
                        break
                    aside = self.directory / f"{step_failed}.unreadable-{attempt}"
                (self.directory / str(step_failed)).rename(aside)
                print(
                    f"warning: checkpoint step {step_failed} in {self.directory} cannot be read ({reason}), moved "
                    f"to {aside}; resuming from step {step}"
                )
            if failures:
                self._manager.reload()
            return restored
        if failures:
            listed = "\n  ".join(f"step {step}: {reason}" for step, reason, _ in failures)
            raise ValueError(
                f"no checkpoint in {self.directory} can be read:\n  {listed}\nIf the files are damaged, delete "
                "them to train from scratch (or restore them from a copy); if the cause has passed, run again."
            ) from failures[0][2]
        unreadable = sorted(self.directory.glob("*.unreadable*"))
        if unreadable:
            raise ValueError(
                f"{self.directory} holds only steps set aside as unreadable ({', '.join(p.name for p in unreadable)}): "
                "rename one back (STEP.unreadable -> STEP) to try it again, or delete them to train from scratch"
            )
        return None

    def _restore_step(self, step: int, state: Any) -> Any:
        variables = _abstract({"params": state.params, "batch_stats": state.batch_stats})
        problems = variable_mismatches(variables, _stored_structs(self._manager, step))
        if problems:
            stored = self._manager.restore(step, args=ocp.args.Composite(**{INFO: ocp.args.JsonRestore()}))[INFO]
            listed = describe_mismatches(problems, per_kind=8, separator="\n  ")
            raise CheckpointMismatchError(
                f"{self.directory} holds step {step} of {stored.get('model_name')} with {stored.get('num_classes')} "
                f"classes and overrides {stored.get('model_overrides')}, which does not fit the configured "
                f"{self.info.get('model_name')} with {self.info.get('num_classes')} classes and overrides "
                f"{self.info.get('model_overrides')}:\n  {listed}\n"
                "Resume with the config that run was trained with (WORKDIR/config.json), or train in a new "
                "--workdir (config.init_from cannot take these weights either: their variables do not fit)."
            )
        train_state = _abstract({"step": state.step, "opt_state": state.opt_state})
        restored = self._manager.restore(
            step,
            args=ocp.args.Composite(
                **{VARIABLES: ocp.args.StandardRestore(variables), TRAIN_STATE: ocp.args.StandardRestore(train_state)}
            ),
        )
        return state.replace(
            step=restored[TRAIN_STATE]["step"],
            params=restored[VARIABLES]["params"],
            batch_stats=restored[VARIABLES]["batch_stats"],
            opt_state=restored[TRAIN_STATE]["opt_state"],
        )

    def wait(self) -> None:
        self._manager.wait_until_finished()
        self._best.wait_until_finished()

    def close(self) -> None:
        """Finishes the saves begun; removes ``checkpoints/`` and ``best/`` if nothing was saved in them (a run
        that failed before its first save leaves its workdir as it found it, not with empty folders that look
        like a run)."""
        self.wait()
        self._manager.close()
        self._best.close()
        if jax.process_index() == 0:
            for directory in (self.directory, self.directory.parent / "best"):
                with contextlib.suppress(OSError):  # not empty (or already gone): kept
                    directory.rmdir()

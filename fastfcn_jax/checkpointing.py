"""One on-disk checkpoint format (orbax ``CheckpointManager``) for converted weights and training runs.

Layout: ``DIR/<step>/`` holds the items ``variables`` (``{'params', 'batch_stats'}``), ``info`` (JSON: at least
``model_name``, ``num_classes``, ``class_names``, ``model_overrides``) and, for training runs, ``train_state``
(optimizer state and step). A training workdir keeps its checkpoints in ``WORKDIR/checkpoints``; a converter
output directory is itself such a checkpoint directory with the single step 0. Either can be given to
:func:`restore_variables`.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

VARIABLES = "variables"
INFO = "info"
TRAIN_STATE = "train_state"
REQUIRED_INFO = ("model_name", "num_classes")


def checkpoint_dir(path: str | Path) -> Path:
    """The directory holding the step folders: ``path/checkpoints`` for a workdir, else ``path``."""
    path = Path(path).expanduser().absolute()
    return path / "checkpoints" if (path / "checkpoints").is_dir() else path


def save_variables(directory: str | Path, variables: Mapping[str, Any], info: Mapping[str, Any], step: int = 0) -> Path:
    """Writes ``variables`` and ``info`` as step ``step`` of a checkpoint directory and waits for it."""
    missing = [k for k in REQUIRED_INFO if k not in info]
    if missing:
        raise ValueError(f"checkpoint info needs {missing}; got {sorted(info)}")
    directory = Path(directory).expanduser().absolute()
    info = {"class_names": None, "model_overrides": {}, **info}
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


def restore_variables(path: str | Path, step: int | None = None) -> tuple[dict[str, Any], dict[str, Any]]:
    """Restores ``(variables, info)`` from a converter output or a training workdir (latest step by default).

    ``variables`` is ``{'params', 'batch_stats'}`` as NumPy arrays on the host; ``info`` holds at least
    ``model_name``, ``num_classes``, ``class_names`` and ``model_overrides``.
    """
    directory = checkpoint_dir(path)
    if not directory.is_dir():
        raise FileNotFoundError(
            f"no checkpoint directory at {directory}: give a converter output directory "
            "(python -m fastfcn_jax.convert ... --out DIR) or a training workdir"
        )
    with ocp.CheckpointManager(directory) as manager:
        step = manager.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"{directory} holds no finished checkpoint step")
        restored = manager.restore(
            step, args=ocp.args.Composite(**{VARIABLES: ocp.args.StandardRestore(), INFO: ocp.args.JsonRestore()})
        )
    variables = jax.tree_util.tree_map(np.asarray, dict(restored[VARIABLES]))
    info = dict(restored[INFO])
    info["step"] = int(step)
    return variables, info

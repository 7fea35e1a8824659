"""A model summary: parameters per module, output shapes and one timed forward pass."""

from __future__ import annotations

import json
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from fastfcn_jax.models import model_from_config


def count_parameters(tree: Any) -> int:
    """Number of scalar elements in a pytree of arrays (or shape structs)."""
    return sum(int(np.prod(leaf.shape)) for leaf in jax.tree_util.tree_leaves(tree))


def parameter_table(variables: Mapping[str, Any]) -> str:
    """Markdown table of parameter and BatchNorm-statistics counts per top-level module."""
    params, stats = variables.get("params", {}), variables.get("batch_stats", {})
    rows = ["| module | parameters | BN statistics |", "|---|---:|---:|"]
    for name in params:
        rows.append(f"| {name} | {count_parameters(params[name]):,} | {count_parameters(stats.get(name, {})):,} |")
    rows.append(f"| **total** | **{count_parameters(params):,}** | **{count_parameters(stats):,}** |")
    return "\n".join(rows)


def run_summary(
    model_config: Mapping[str, Any],
    image_size: tuple[int, int] | None,
    batch_size: int,
    seed: int,
    workdir: str | Path | None = None,
    checkpoints: Sequence[str | Path] = (),
    default_size: int = 512,
) -> dict[str, Any]:
    """Builds the model, runs one forward pass on random images and returns (and prints) a summary.

    With ``checkpoints`` (training workdirs or converter outputs, in order of preference), the model the first
    one holds, with its weights, as evaluation and prediction run it (``model_config``'s contradicting choices
    are named and not used); one that holds a backbone's weights alone (an ImageNet conversion) gives way to
    the next, and without any ``model_config``'s model is summarised with random weights. ``image_size`` None:
    the crop size the summarised checkpoint was trained at, else ``default_size``. Writes ``summary.json`` into
    ``workdir`` when given.
    """
    from fastfcn_jax import checkpointing

    variables, info, checkpoint = None, {}, None
    for candidate in checkpoints:
        variables, info = checkpointing.restore_variables(candidate)
        if info.get("source") not in checkpointing.BACKBONE_SOURCES:
            checkpoint = candidate
            break
        print(f"note: {candidate} holds a backbone's weights alone, not the model: not summarised")
        variables, info = None, {}
    crop = int(info.get("crop_size") or default_size)
    image_size = tuple(image_size or (crop, crop))
    images = jax.random.normal(jax.random.PRNGKey(seed), (batch_size, *image_size, 3), jnp.float32)
    described: dict[str, Any] = {}
    if variables is not None:
        from fastfcn_jax.models import create_model

        checkpointing.note_unused_model_config(info, checkpoint, model_config, "is summarised")
        overrides = checkpointing.model_overrides(info)
        model = create_model(info["model_name"], int(info["num_classes"]), **overrides)
        checkpointing.check_variables(model, variables, f"checkpoint {checkpoint} ({checkpointing.model_label(info)})")
        model_config = {"name": info["model_name"], "num_classes": int(info["num_classes"]), "overrides": overrides}
        described = {"checkpoint": str(Path(checkpoint).expanduser().absolute()), "step": info["step"]}
    else:
        if not model_config.get("num_classes"):
            raise ValueError("set config.model.num_classes: there is no checkpoint to take the class count from")
        model = model_from_config(model_config)
        variables = jax.jit(lambda x: model.init(jax.random.PRNGKey(seed + 1), x, train=False))(images)
    forward = jax.jit(lambda v, x: model.apply(v, x, train=False))
    start = time.perf_counter()
    outputs = jax.block_until_ready(forward(variables, images))
    first = time.perf_counter() - start
    start = time.perf_counter()
    jax.block_until_ready(forward(variables, images))
    second = time.perf_counter() - start
    summary = {
        "model": dict(model_config.items()) | {"overrides": dict((model_config.get("overrides") or {}).items())},
        **described,
        "input_shape": [batch_size, *image_size, 3],
        "outputs": {k: list(v.shape) for k, v in outputs.items()},
        "parameters": count_parameters(variables["params"]),
        "batch_stats": count_parameters(variables["batch_stats"]),
        "compile_and_run_seconds": round(first, 3),
        "forward_seconds": round(second, 4),
        "backend": jax.default_backend(),
        "devices": [str(d) for d in jax.devices()],
    }
    weights = f"step {described['step']} of {described['checkpoint']}" if described else "random weights"
    label = checkpointing.model_label(
        {"model_name": model_config["name"], "model_overrides": dict(model_config.get("overrides") or {})}
    )
    print(f"model {label} ({model_config['num_classes']} classes, {weights}) on {jax.default_backend()}")
    print(parameter_table(variables))
    for key, shape in summary["outputs"].items():
        print(f"{key}: {shape}")
    print(f"forward pass (after compilation): {second * 1000:.1f} ms for a batch of {batch_size}")
    if workdir is not None:
        path = Path(workdir)
        path.mkdir(parents=True, exist_ok=True)
        (path / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
        print(f"wrote {path / 'summary.json'}")
    return summary

"""Models by name: ``{encnet,psp,deeplab,fcn}_{jpu,jpux,dilated}_r{50,101,152}``, ``..._tiny`` variants, and
``..._custom`` with another backbone named by an import path (``backbone='my_package.nets:ConvNeXtTiny'``).

``create_model(name, num_classes, **overrides)`` is the stable entry point. A model's configuration is a
plain dict of :class:`Segmenter` fields, so it can live in an ``ml_collections`` config
(``model_from_config``)
without the model code importing ``ml_collections``.
"""

from __future__ import annotations

import dataclasses
import importlib
import re
from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp
import numpy as np

from fastfcn_jax.models.op_choices import backend, op_overrides, parse_ops
from fastfcn_jax.models.segmenter import HEADS, NECKS, RESNET_FIELDS, Segmenter, check_reference

DEPTHS = (50, 101, 152)

# Tiny variants: the same code path with one block per stage and narrow layers, for tests and demos.
TINY = dict(
    stage_sizes=(1, 1, 1, 1),
    stem_width=8,
    base_width=8,
    jpu_width=16,
    jpux_groups=4,
    head_width=16,
    num_codes=8,
    aspp_rates=(2, 4, 6),
)

_NAME = re.compile(r"^(?P<head>[a-z]+)_(?P<neck>[a-z]+)_(?P<size>r\d+|tiny|custom)$")
_FIELDS = {f.name for f in dataclasses.fields(Segmenter)} - {"parent", "name", "num_classes"}
# Fields the model name fixes ({head}_{neck}_r{depth}); overriding them would contradict the name.
_NAMED = {"head", "neck", "depth", "stage_sizes"}
_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
# Options of one head or neck: given for another, they would change nothing, silently.
_OPTION_OF = {
    "head_width": ("head", ("encnet",)),  # the other heads' widths follow their input (the reference's)
    "num_codes": ("head", ("encnet",)),
    "psp_bins": ("head", ("psp",)),
    "aspp_rates": ("head", ("deeplab",)),
    "jpu_width": ("neck", ("jpu", "jpux")),
    "jpu_dilations": ("neck", ("jpu",)),
    "jpux_dilations": ("neck", ("jpux",)),
    "jpux_groups": ("neck", ("jpux",)),
}


def available_models() -> list[str]:
    """Every registered model name."""
    sizes = [f"r{d}" for d in DEPTHS] + ["tiny"]
    return [f"{h}_{n}_{s}" for h in HEADS for n in NECKS for s in sizes]


def unused_options(name: str, overrides: Mapping[str, Any]) -> list[str]:
    """Why each of ``overrides`` that belongs to another head or neck than model ``name``'s would change
    nothing (``psp_bins`` on an EncNet model), one sentence per option; [] for an unknown name."""
    match = _NAME.match(name)
    if not match:
        return []
    reasons = []
    for key in sorted(set(overrides) & set(_OPTION_OF)):
        part, owners = _OPTION_OF[key]
        if match[part] not in owners:
            reasons.append(
                f"{key} is an option of the {' and '.join(owners)} {part}{'s' if len(owners) > 1 else ''}: it would "
                f"change nothing in {name!r} (its {part} is {match[part]})"
            )
    return reasons


def model_config(name: str, **overrides: Any) -> dict[str, Any]:
    """The Segmenter fields of a registered model, with ``overrides`` applied and validated."""
    match = _NAME.match(name)
    if not match or match["head"] not in HEADS or match["neck"] not in NECKS:
        raise ValueError(
            f"unknown model {name!r}; available: {', '.join(available_models())}, and {{head}}_{{neck}}_custom "
            "with backbone='module:Name'"
        )
    config: dict[str, Any] = {"head": match["head"], "neck": match["neck"]}
    custom = match["size"] == "custom"
    if custom != ("backbone" in overrides):
        raise ValueError(
            f"{name!r} has another backbone, named by backbone='module:Name', an import path (on the command line "
            "--config.model.overrides.backbone=module:Name; a checkpoint of such a model stores it)"
            if custom
            else f"{name!r} names its ResNet backbone; for another one name the model "
            f"{match['head']}_{match['neck']}_custom with backbone='module:Name' (an import path)"
        )
    resnet_fields = sorted(set(overrides) & set(RESNET_FIELDS))
    if custom and resnet_fields:
        raise ValueError(f"{resnet_fields} configure the ResNet, which {name!r} replaces by its backbone")
    if match["size"] == "tiny":
        config.update(TINY)
    elif custom:
        pass  # the backbone's own; the neck and heads at the paper's widths unless overridden
    else:
        depth = int(match["size"][1:])
        if depth not in DEPTHS:
            raise ValueError(
                f"unknown model {name!r}: ResNet depth must be one of {DEPTHS}; "
                f"available: {', '.join(available_models())}"
            )
        config["depth"] = depth
    # The reference enables the SE branch for EncNet only (se_loss=(name == 'encnet')).
    config["se_loss"] = match["head"] == "encnet"
    unknown = sorted(set(overrides) - _FIELDS)
    if unknown:
        raise ValueError(f"unknown model option(s) {unknown} for {name!r}; valid options: {sorted(_FIELDS - _NAMED)}")
    named = sorted(set(overrides) & _NAMED)
    if named:
        raise ValueError(f"{named} are fixed by the model name {name!r}: choose another name instead")
    unused = unused_options(name, overrides)
    if unused:
        raise ValueError(unused[0])
    if overrides.get("reference") == "mmseg" and not custom and match["size"] != "tiny":
        config["stem_width"] = 32  # ResNetV1c's deep stem, 32-32-64
    config.update(overrides)
    if custom:
        config["backbone"] = load_backbone(config["backbone"])
    return _validated(name, config)


def load_backbone(spec: Any) -> Any:
    """A backbone module from ``spec``: a Flax module, or ``'module.path:Name'`` naming a Flax module class or
    a function that returns one, called without arguments (bind settings with a subclass or a function)."""
    import flax.linen as nn

    if isinstance(spec, nn.Module):
        return spec.clone()
    module_name, _, attribute = str(spec).partition(":")
    if not module_name or not attribute:
        raise ValueError(f"backbone={spec!r}: expected 'module.path:Name', e.g. 'my_package.nets:ConvNeXtTiny'")
    try:
        found = getattr(importlib.import_module(module_name), attribute)
    except ImportError as error:
        missing = getattr(error, "name", None) or ""
        if module_name == missing or module_name.startswith(f"{missing}."):
            raise ValueError(f"backbone={spec!r}: cannot import {module_name}; is it on PYTHONPATH?") from None
        raise ValueError(f"backbone={spec!r}: importing {module_name} failed: {error}") from None
    except AttributeError:
        raise ValueError(f"backbone={spec!r}: {module_name} has no {attribute}") from None
    # A module instance is callable too (it applies the module): used as it is, a copy per model.
    backbone = found.clone() if isinstance(found, nn.Module) else found() if callable(found) else found
    if not isinstance(backbone, nn.Module):
        raise ValueError(f"backbone={spec!r} gives a {type(backbone).__name__}, not a Flax module")
    return backbone


def _validated(name: str, config: dict[str, Any]) -> dict[str, Any]:
    dtype = config.get("dtype", jnp.float32)
    if isinstance(dtype, str):
        if dtype == "auto":  # the design's policy: bfloat16 compute on accelerators, float32 on CPUs
            dtype = "bfloat16" if backend() in ("gpu", "tpu") else "float32"
        if dtype not in _DTYPES:
            raise ValueError(f"{name}: dtype must be 'auto' or one of {sorted(_DTYPES)}, got {dtype!r}")
        config["dtype"] = _DTYPES[dtype]
    if config.get("stem", "deep") not in ("deep", "standard"):
        raise ValueError(f"{name}: stem must be 'deep' or 'standard', got {config['stem']!r}")
    try:
        check_reference(config.get("reference", "fastfcn"), config["head"], config["neck"], config.get("stem", "deep"))
    except ValueError as error:
        raise ValueError(f"{name}: {error}") from None
    output_stride = config.get("output_stride")
    if output_stride is not None:
        if output_stride not in (8, 16, 32):
            raise ValueError(f"{name}: output_stride must be 8, 16 or 32, got {output_stride}")
        if config["neck"] != "dilated" and output_stride != 32:
            raise ValueError(f"{name}: JPU necks need the output-stride-32 backbone, got output_stride={output_stride}")
    if config["se_loss"] and config["head"] != "encnet":
        raise ValueError(f"{name}: se_loss is only defined for the EncNet head")
    for key in ("jpu_width", "head_width", "num_codes", "stem_width", "base_width"):
        if key in config and int(config[key]) < 1:
            raise ValueError(f"{name}: {key} must be positive, got {config[key]}")
    if config["neck"] == "jpux":
        width, groups = config.get("jpu_width", 512), config.get("jpux_groups", 32)
        if (width // 2) % groups:
            raise ValueError(f"{name}: jpu_width/2 = {width // 2} must be divisible by jpux_groups = {groups}")
    if not 0.0 <= float(config.get("dropout", 0.1)) < 1.0:
        raise ValueError(f"{name}: dropout must be in [0, 1), got {config['dropout']}")
    for key in ("aux", "se_loss"):
        if not isinstance(config.get(key, False), bool | np.bool_):
            raise ValueError(f"{name}: {key} must be True or False, got {config[key]!r}")
    for key in ("jpu_dilations", "aspp_rates", "psp_bins"):
        if key in config and (not config[key] or any(int(v) < 1 for v in config[key])):
            raise ValueError(f"{name}: {key} must be positive integers, at least one, got {config[key]!r}")
    # The op choices (``*_implementation``), validated now rather than at the first init or apply.
    _ = Segmenter(num_classes=1, **config).ops
    return config


def create_model(name: str, num_classes: int, **overrides: Any) -> Segmenter:
    """Builds a registered model, e.g. ``create_model('encnet_jpu_r50', 150, dtype='bfloat16')``.

    Defaults follow the reference: aux head on, SE branch on for EncNet. Overrides are any
    :class:`Segmenter` field (``aux``, ``se_loss``, ``stem``, ``output_stride``, ``dtype``, ``jpu_width``,
    ...). ``model.init(rng, images, train=False)`` gives ``{'params', 'batch_stats'}``.
    """
    if isinstance(num_classes, bool) or not isinstance(num_classes, int | np.integer) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive integer, got {num_classes!r}")
    return Segmenter(num_classes=int(num_classes), **model_config(name, **overrides))


def model_kwargs(config: Mapping[str, Any], ops_key: str = "ops") -> dict[str, Any]:
    """The :func:`create_model` overrides of a model config: its ``overrides`` mapping and its ``ops`` string
    of op choices (``"depthwise=grouped,loss_logits=head"``, see :class:`OpChoices`); errors name the ops
    as ``ops_key``."""
    try:
        ops = op_overrides(parse_ops(config.get("ops") or ""))
    except ValueError as error:
        raise ValueError(f"{ops_key}={config.get('ops')!r}: {error}") from None
    # None: not overridden (the command-line placeholders of fastfcn_jax.config).
    overrides = {key: value for key, value in (config.get("overrides") or {}).items() if value is not None}
    return {**overrides, **ops}


def model_from_config(config: Mapping[str, Any]) -> Segmenter:
    """Builds a model from a mapping (dict or ``ml_collections.ConfigDict``) with keys ``name``,
    ``num_classes`` and optional ``overrides`` and ``ops``."""
    config = dict(config.items())
    missing = {"name", "num_classes"} - set(config)
    if missing:
        raise ValueError(f"model config needs {sorted(missing)}; got keys {sorted(config)}")
    unknown = set(config) - {"name", "num_classes", "overrides", "ops"}
    if unknown:
        raise ValueError(f"unknown model config key(s) {sorted(unknown)}; expected name, num_classes, overrides, ops")
    return create_model(config["name"], config["num_classes"], **model_kwargs(config))

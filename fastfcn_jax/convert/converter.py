"""PyTorch state_dict -> Flax variables for the models of :mod:`fastfcn_jax.models`, strictly checked."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from fastfcn_jax.checkpointing import BACKBONE_SOURCES
from fastfcn_jax.convert.keymap import UNUSED_SOURCE_KEY, torch_key, torch_module
from fastfcn_jax.models import create_model, model_config
from fastfcn_jax.models.segmenter import CLASSIFIER_MODULES

SOURCES = ("official", "mmseg", "resnet_s", "torchvision")
# ImageNet classifiers: only the backbone comes from the file, so training from such a conversion takes only
# its backbone (train.load_pretrained) and one conversion serves every model with the same ResNet.


class ConversionError(ValueError):
    """A checkpoint does not fit the model: missing or unexpected keys, or a shape mismatch."""


@dataclasses.dataclass
class ConversionReport:
    """What a conversion used, filled, dropped and left over (all PyTorch keys or Flax paths)."""

    used: list[str] = dataclasses.field(default_factory=list)
    filled: list[str] = dataclasses.field(default_factory=list)
    dropped: list[str] = dataclasses.field(default_factory=list)
    unexpected: list[str] = dataclasses.field(default_factory=list)
    missing: list[str] = dataclasses.field(default_factory=list)
    initialized: list[str] = dataclasses.field(default_factory=list)

    def summary(self) -> str:
        counters = [key for key in self.dropped if key.endswith("num_batches_tracked")]
        named_drops = [key for key in self.dropped if key not in counters]
        lines = [
            f"source keys used: {len(self.used)}",
            f"model variables filled from the checkpoint: {len(self.filled)}",
            f"source keys dropped as unused: {len(self.dropped)} ({len(counters)} num_batches_tracked counters"
            + (", and the keys listed below)" if named_drops else ")"),
            f"unexpected source keys ignored: {len(self.unexpected)}",
            f"model variables freshly initialised: {len(self.initialized)}",
        ]
        for title, items in (
            ("dropped", named_drops),
            ("unexpected", self.unexpected),
            ("initialised", self.initialized),
        ):
            lines += [f"  {title}: {item}" for item in items]
        return "\n".join(lines)


def _to_numpy(value: Any) -> np.ndarray:
    if hasattr(value, "detach"):  # a torch tensor; torch itself is never imported
        value = value.detach().cpu().numpy()
    return np.asarray(value)


def _normalise_keys(state_dict: Mapping[str, Any], source: str) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """The state dict under the official model's key names, and each renamed key's name in the file."""
    if "state_dict" in state_dict and isinstance(state_dict["state_dict"], Mapping):
        state_dict = state_dict["state_dict"]
    out, in_file = {}, {}
    for original, value in state_dict.items():
        key = original[len("module.") :] if original.startswith("module.") else original  # DataParallel / DDP
        if source in BACKBONE_SOURCES and not key.startswith("pretrained."):
            key = "pretrained." + key
        out[key] = value
        in_file[key] = original
    return out, in_file


def _layout_hint(keys: Sequence[str], source: str) -> str:
    """Which ``--from`` the file's key names suggest, when it is not ``source`` ('' otherwise)."""
    bare = [key.removeprefix("module.") for key in keys]
    pretrained = any(key.startswith("pretrained.") for key in bare)
    if any(key.startswith("stem.") for key in bare) and any(key.startswith("layer1.") for key in bare):
        return (
            "the file's keys (stem.*, layer1.*, ...) are a ResNetV1c ImageNet backbone's (mmcv's "
            "open-mmlab://resnet50_v1c): not a source of this converter (mmsegmentation's trained models convert "
            "with --from mmseg; ImageNet backbones with --from resnet_s or torchvision)"
        )
    if source == "official" and not pretrained and any(key.startswith(("layer1.", "conv1.")) for key in bare):
        stem = "resnet_s" if any(key.startswith("conv1.0.") for key in bare) else "torchvision"
        return (
            f"the file's keys (conv1.*, layer1.*, ...) are an ImageNet ResNet's: convert it with --from {stem} "
            "(its backbone only; the JPU and heads are initialised afresh)"
        )
    if source in BACKBONE_SOURCES and any(key.startswith(("jpu.", "head.", "auxlayer.")) for key in bare):
        return "the file holds a whole segmentation model (jpu.*, head.* keys): convert it with --from official"
    mmseg = any(key.startswith(("backbone.", "decode_head.")) for key in bare)
    if source != "mmseg" and mmseg:
        return "the file's keys (backbone.*, decode_head.*) are an mmsegmentation model's: convert it with --from mmseg"
    if source == "mmseg" and not mmseg and pretrained:
        return "the file's keys (pretrained.*) are an official FastFCN model's: convert it with --from official"
    return ""


def convert_with_report(
    state_dict: Mapping[str, Any],
    model_name: str,
    num_classes: int,
    source: str = "official",
    *,
    allow_missing: bool = False,
    allow_unexpected: bool = False,
    reinit_classifier: bool = False,
    seed: int = 0,
    rng: jax.Array | None = None,
    model_overrides: Mapping[str, Any] | None = None,
) -> tuple[dict[str, Any], ConversionReport]:
    """Like :func:`convert_state_dict`, also returning the :class:`ConversionReport`."""
    if source not in SOURCES:
        raise ValueError(f"unknown source {source!r}; expected one of {SOURCES}")
    overrides = dict(model_overrides or {})
    if source == "torchvision":
        overrides.setdefault("stem", "standard")
    if source == "mmseg":
        overrides.setdefault("reference", "mmseg")
    if (overrides.get("reference", "fastfcn") == "mmseg") != (source == "mmseg"):
        raise ValueError(
            f"source {source!r} with reference={overrides['reference']!r}: mmsegmentation checkpoints (source "
            "'mmseg') are converted into reference='mmseg' models, and only they"
        )
    config = model_config(model_name, **overrides)
    reference = config.get("reference", "fastfcn")
    model = create_model(model_name, num_classes, **overrides)
    dummy = jnp.zeros((1, 64, 64, 3), jnp.float32)
    template = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(seed), dummy, train=False))

    source_dict, in_file = _normalise_keys(state_dict, source)
    backbone_only = source in BACKBONE_SOURCES
    report = ConversionReport()
    converted: dict[str, dict[tuple[str, ...], np.ndarray]] = {}
    need_init: list[tuple[str, tuple[str, ...]]] = []
    errors: list[str] = []
    classifier_mismatch = False
    mismatched: set[str] = set()  # keys of a model variable, but of the wrong shape: not "unexpected"
    for collection in ("params", "batch_stats"):
        flat = traverse_util.flatten_dict(template.get(collection, {}))
        converted[collection] = {}
        for path, spec in flat.items():
            flax_name = f"{collection}/{'/'.join(path)}"
            module = "/".join(path[:-1])
            key, to_flax = torch_key(collection, path, config["head"], config.get("stem", "deep"), reference)
            if reinit_classifier and module in CLASSIFIER_MODULES:
                need_init.append((collection, path))
                continue
            if key not in source_dict:
                if allow_missing or (backbone_only and path[0] != "backbone"):
                    need_init.append((collection, path))
                else:
                    shown = key.removeprefix("pretrained.") if backbone_only else key  # as such a file names it
                    report.missing.append(f"{shown} (for {flax_name}, shape {tuple(spec.shape)})")
                continue
            raw = _to_numpy(source_dict[key])
            value = to_flax(raw.astype(np.float32))
            if tuple(value.shape) != tuple(spec.shape):
                classifier_mismatch = classifier_mismatch or module in CLASSIFIER_MODULES
                mismatched.add(key)
                errors.append(
                    f"{in_file[key]}: checkpoint shape {tuple(raw.shape)} (Flax layout {tuple(value.shape)}) "
                    "does not match "
                    f"model variable {flax_name} of shape {tuple(spec.shape)}"
                )
                continue
            converted[collection][path] = value
            report.used.append(key)
            report.filled.append(flax_name)

    used = set(report.used) | mismatched
    for key in source_dict:
        if key in used:
            continue
        if UNUSED_SOURCE_KEY.search(key) or (reinit_classifier and _is_classifier_key(key, config["head"], reference)):
            report.dropped.append(in_file[key])
        else:
            report.unexpected.append(in_file[key])

    if classifier_mismatch:
        errors.append(
            "the classifier shapes differ: is the checkpoint for another class count? Pass "
            "reinit_classifier / --reinit-classifier to initialise the classifiers afresh"
        )
    if report.missing:
        errors.append(
            f"{len(report.missing)} model variable(s) missing from the checkpoint (pass allow_missing / "
            "--allow-missing to initialise them randomly): " + "; ".join(report.missing[:20])
        )
    if report.unexpected and not allow_unexpected:
        errors.append(
            f"{len(report.unexpected)} unexpected checkpoint key(s) "
            "(pass allow_unexpected / --allow-unexpected to "
            "ignore them): " + ", ".join(report.unexpected[:20])
        )
    hint = _layout_hint(list(in_file.values()), source)
    if not report.used and not errors:  # --allow-missing and --allow-unexpected would give a random model
        errors.append("no checkpoint key fits the model: nothing would be converted")
    if errors:
        raise ConversionError(
            f"cannot convert the checkpoint into {model_name} (num_classes={num_classes}):\n- "
            + "\n- ".join(errors + ([hint] if hint else []))
        )

    if need_init:
        # The 'rbg' generator compiles about twice as fast as threefry for a full model's init.
        key = jax.random.key(seed, impl="rbg") if rng is None else rng
        # The key is an argument, not a constant, so every key shares one compiled (and cached) init.
        fresh = jax.jit(lambda init_key: model.init(init_key, dummy, train=False))(key)
        for collection, path in need_init:
            converted[collection][path] = np.asarray(traverse_util.flatten_dict(fresh[collection])[path])
            report.initialized.append(f"{collection}/{'/'.join(path)}")

    variables = {c: traverse_util.unflatten_dict(v) for c, v in converted.items() if v}
    return variables, report


def _is_classifier_key(key: str, head: str, reference: str = "fastfcn") -> bool:
    prefixes = []
    for module in CLASSIFIER_MODULES:
        try:
            prefixes.append(torch_module(module, head, reference=reference) + ".")
        except KeyError:
            continue
    return any(key.startswith(p) for p in prefixes)


def convert_state_dict(
    state_dict: Mapping[str, Any],
    model_name: str,
    num_classes: int,
    source: str = "official",
    **options: Any,
) -> dict[str, Any]:
    """Converts a PyTorch state_dict into ``{'params', 'batch_stats'}`` for ``create_model(model_name, ...)``.

    ``state_dict`` maps keys to NumPy arrays (or torch tensors); ``num_batches_tracked`` counters and the
    unused ImageNet ``pretrained.fc.*`` are dropped. Sources: ``'official'`` (FastFCN / PyTorch-Encoding
    checkpoints: ``pretrained.``, ``jpu.``, ``head.``, ``auxlayer.``), ``'mmseg'`` (mmsegmentation's FastFCN
    and dilated EncNet / PSPNet / DeepLabV3 R-50 checkpoints: ``backbone.``, ``neck.``, ``decode_head.``,
    ``auxiliary_head.``; the target model is ``create_model(..., reference='mmseg')``), ``'resnet_s'``
    (deep-stem ImageNet backbone, e.g. GluonCV v1s / timm ``resnet50s.gluon_in1k``) and ``'torchvision'`` (7x7 stem; the
    target model is ``create_model(..., stem='standard')``). For the backbone-only sources the JPU and
    heads are freshly initialised. Options: ``allow_missing``, ``allow_unexpected``,
    ``reinit_classifier`` (fresh main, aux and SE classifiers, e.g. for another class count), ``rng`` (a
    JAX PRNG key for the fresh variables; else ``seed``, an int), ``model_overrides``. Raises
    :class:`ConversionError` naming every offending key.
    """
    variables, _ = convert_with_report(state_dict, model_name, num_classes, source, **options)
    return variables

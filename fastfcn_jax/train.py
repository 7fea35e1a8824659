"""Training: the paper's recipe as a sharded, jitted step, with orbax resume and periodic validation.

Readable top to bottom: build the mesh, model, optimiser and state (already sharded); resume from the
workdir, else ``init_from``, else scratch; then loop ``train_step`` over global batches, log, validate,
checkpoint. ``train_step`` and ``eval_step`` are pure functions of ``(state, batch)``.
"""

from __future__ import annotations

import contextlib
import json
import math
import signal
import time
import warnings
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging
from flax.traverse_util import flatten_dict

from fastfcn_jax import checkpointing, code_version, losses, metrics, optim, sharding
from fastfcn_jax.models import batch_norm, create_model, op_choices
from fastfcn_jax.models.segmenter import CLASSIFIER_MODULES
from fastfcn_jax.normalization import normalize_uint8


@flax.struct.dataclass
class TrainState:
    """Everything a step changes. Replicated over the mesh."""

    step: jax.Array
    params: Any
    batch_stats: Any
    opt_state: Any

    @property
    def variables(self) -> dict[str, Any]:
        return {"params": self.params, "batch_stats": self.batch_stats}


# ----------------------------------------------------------------------------------------------------
# Pure steps.


def make_train_step(
    model: Any,
    optimizer: optax.GradientTransformation,
    *,
    aux_weight: float,
    se_weight: float,
    freeze_batch_norm: bool = False,
    microbatches: int = 1,
) -> Callable[[TrainState, Mapping[str, jax.Array], jax.Array], tuple[TrainState, dict[str, jax.Array]]]:
    """``train_step(state, batch, rng) -> (state, metrics)``; batch = {'image', 'label'}: images ImageNet-
    normalised float, or uint8 pixels that the step normalises (``pipeline.train_batches(normalise=False)``).

    BatchNorm statistics are computed over the global batch (the reference's SyncBN): under ``jit`` the
    batch-sharded mean is a cross-device reduction. ``freeze_batch_norm``: BatchNorms use (and keep) their
    running statistics instead (:func:`batch_norm.frozen_batch_norm`).

    ``microbatches`` > 1: gradient accumulation. The batch is split into that many interleaved micro-batches
    (examples ``j::microbatches``, so each stays spread over the devices) run one after another; the update
    is made once, from the mean of their gradients: the activation memory of one micro-batch, the update of
    the whole batch. As in PyTorch's accumulation, BatchNorm normalises each micro-batch by its own
    statistics and updates its running statistics once per micro-batch, and each micro-batch's loss is the
    mean over its own labelled pixels.
    """
    if microbatches < 1:
        raise ValueError(f"microbatches must be >= 1, got {microbatches}")

    def train_step(state, batch, rng):
        # Several processes' stop requests (StopRequest), one per example: returned as their maximum.
        batch = dict(batch)
        stop_votes = batch.pop("stop", None)
        if batch["image"].dtype == jnp.uint8:  # the training pipeline's (a quarter of float32's bytes to send)
            batch["image"] = normalize_uint8(batch["image"])
        dropout_rng = jax.random.fold_in(rng, state.step)
        # Resolved at trace time, for the backend compiled for (op_choices.OpChoices.loss_logits). The loss's own
        # upsampling is the reference's (align corners): a model that resizes otherwise (reference='mmseg')
        # upsamples its logits itself.
        loss_logits = op_choices.choose(model.ops.loss_logits, tpu="head", other="upsampled", gpu="head")
        if not getattr(model, "align_corners", True):
            if model.ops.loss_logits == "head":
                warnings.warn(
                    "loss_logits='head' upsamples with aligned corners; this model resizes with half-pixel centres "
                    "(reference='mmseg'), so its loss takes the model's own upsampled logits",
                    stacklevel=2,
                )
            loss_logits = "upsampled"
        # OpChoices.loss_gradient: the full-resolution loss gradient in the model's compute dtype.
        compute_dtype = getattr(model, "dtype", jnp.float32)
        loss_gradient_dtype = compute_dtype if model.ops.loss_gradient == "compute" else jnp.float32
        loss_upsample = op_choices.choose_pallas("loss_upsample", model.ops.loss_upsample, "fused")

        def loss_fn(params, batch_stats, batch, dropout_rng):
            with batch_norm.frozen_batch_norm(freeze_batch_norm):
                outputs, new_state = model.apply(
                    {"params": params, "batch_stats": batch_stats},
                    batch["image"],
                    train=True,
                    upsample_logits=loss_logits == "upsampled",
                    mutable=["batch_stats"],
                    rngs={"dropout": dropout_rng},
                )
            total, terms = losses.segmentation_loss(
                outputs,
                batch["label"],
                aux_weight=aux_weight,
                se_weight=se_weight,
                gradient_dtype=loss_gradient_dtype,
                upsample=loss_upsample,
            )
            return total, (terms, new_state["batch_stats"])

        grad_fn = jax.grad(loss_fn, has_aux=True)
        if microbatches == 1:
            grads, (terms, batch_stats) = grad_fn(state.params, state.batch_stats, batch, dropout_rng)
        else:

            def accumulate(carry, xs):
                grad_sum, batch_stats = carry
                index, micro = xs
                grads, (terms, batch_stats) = grad_fn(
                    state.params, batch_stats, micro, jax.random.fold_in(dropout_rng, index)
                )
                return (jax.tree_util.tree_map(jnp.add, grad_sum, grads), batch_stats), terms

            zeros = jax.tree_util.tree_map(jnp.zeros_like, state.params)
            steps = (jnp.arange(microbatches), split_microbatches(batch, microbatches))
            (grad_sum, batch_stats), terms = jax.lax.scan(accumulate, (zeros, state.batch_stats), steps)
            grads = jax.tree_util.tree_map(lambda g: g / microbatches, grad_sum)
            terms = jax.tree_util.tree_map(lambda t: jnp.mean(t, axis=0), terms)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        new_state = state.replace(step=state.step + 1, params=params, batch_stats=batch_stats, opt_state=opt_state)
        terms["grad_norm"] = optax.tree.norm(grads)
        if stop_votes is not None:
            terms["stop_requested"] = jnp.max(stop_votes)
        return new_state, terms

    return train_step


def split_microbatches(batch: Mapping[str, jax.Array], microbatches: int) -> dict[str, jax.Array]:
    """``[B, ...] -> [microbatches, B / microbatches, ...]``, micro-batch ``j`` = examples ``j::microbatches``.

    Interleaved rather than contiguous: with the batch sharded over ``'data'`` in contiguous blocks, every
    micro-batch then takes the same number of examples from each device and no example moves between devices
    (when the per-device batch is divisible by ``microbatches``).
    """
    out = {}
    for key, value in batch.items():
        if value.shape[0] % microbatches:
            raise ValueError(
                f"batch[{key!r}] has {value.shape[0]} examples, not divisible by {microbatches} micro-batches"
            )
        split = value.reshape(value.shape[0] // microbatches, microbatches, *value.shape[1:]).swapaxes(0, 1)
        if sharding.has_data_mesh():
            split = jax.lax.with_sharding_constraint(split, jax.sharding.PartitionSpec(None, sharding.DATA_AXIS))
        out[key] = split
    return out


def make_eval_step(model: Any, num_classes: int) -> Callable[[TrainState, Mapping[str, jax.Array]], jax.Array]:
    """``eval_step(state, batch) -> [C, C]`` confusion counts; padded examples (``valid`` False) and
    ignored pixels are not counted."""

    def eval_step(state, batch):
        outputs = model.apply(state.variables, batch["image"], train=False)
        predictions = jnp.argmax(outputs["logits"], axis=-1)
        weights = jnp.broadcast_to(batch["valid"][:, None, None], batch["label"].shape)
        return metrics.batch_confusion(batch["label"], predictions, num_classes, weights)

    return eval_step


# ----------------------------------------------------------------------------------------------------
# State creation and restoring.


def _jitted_init(
    model: Any, optimizer: optax.GradientTransformation, rng: jax.Array, image_shape: tuple[int, ...], mesh
) -> Callable[[], TrainState]:
    def init():
        variables = model.init(rng, jnp.zeros(image_shape, jnp.float32), train=False)
        params = variables["params"]
        return TrainState(
            step=jnp.zeros((), jnp.int32),
            params=params,
            batch_stats=variables.get("batch_stats", {}),
            opt_state=optimizer.init(params),
        )

    return jax.jit(init, out_shardings=sharding.replicated(mesh))


def create_train_state(
    model: Any, optimizer: optax.GradientTransformation, rng: jax.Array, image_shape: tuple[int, ...], mesh
) -> TrainState:
    """Initialises the state directly replicated on the mesh (no host copy of the parameters)."""
    return _jitted_init(model, optimizer, rng, image_shape, mesh)()


def abstract_train_state(
    model: Any, optimizer: optax.GradientTransformation, image_shape: tuple[int, ...], mesh
) -> TrainState:
    """The state's shapes, dtypes and shardings (``jax.ShapeDtypeStruct`` leaves) without compiling or running
    the initialisation: what a resumed run restores its checkpoint onto."""
    return jax.eval_shape(_jitted_init(model, optimizer, jax.random.PRNGKey(0), image_shape, mesh))


def load_pretrained(
    state: TrainState,
    init_from: str,
    mesh,
    model_name: str = "the configured model",
    reference: str = "fastfcn",
    reinit_classifier: bool = False,
) -> tuple[TrainState, dict[str, Any]]:
    """Replaces params and BN statistics with a converter output's (``init_from``), checking every shape.

    A conversion of ImageNet weights (``--from resnet_s`` / ``torchvision``) gives only the backbone: its JPU
    and heads were random, so they stay the model's own and one conversion serves every head, neck, class
    count and dilation with that ResNet. A whole model's weights must be for the configured model's
    ``reference`` (the official design or mmsegmentation's), even where the shapes agree. With
    ``reinit_classifier`` the classifiers (main, aux, SE: ``CLASSIFIER_MODULES``) keep their fresh
    initialisation: a trained model fine-tuned to another class count.
    """
    variables, info = checkpointing.restore_variables(init_from)
    stored_reference = checkpointing.model_overrides(info).get("reference", "fastfcn")
    if info.get("source") not in checkpointing.BACKBONE_SOURCES and stored_reference != reference:
        raise ValueError(
            f"init_from={init_from} holds the reference={stored_reference!r} variant of "
            f"{info.get('model_name')}, {model_name} is reference={reference!r} (the two resize and connect "
            f"their layers differently): train with --config.model.overrides.reference={stored_reference}"
        )
    current = {"params": state.params, "batch_stats": state.batch_stats}
    restored = {"params": variables["params"], "batch_stats": variables.get("batch_stats", {})}
    backbone_only = info.get("source") in checkpointing.BACKBONE_SOURCES
    if backbone_only:
        current = {c: {"backbone": tree.get("backbone", {})} for c, tree in current.items()}
        restored = {c: {"backbone": tree.get("backbone", {})} for c, tree in restored.items()}
    elif reinit_classifier:
        current, restored = (_without_classifiers(tree) for tree in (current, restored))
    problems = checkpointing.variable_mismatches(current, restored)
    if problems:
        what = f"the backbone's weights ({info.get('source')})" if backbone_only else "the checkpoint"
        stems = {"torchvision": "standard", "resnet_s": "deep"}
        hint = ""
        if backbone_only and info.get("source") in stems and any("stem" in problem for problem in problems):
            hint = (
                f"\n{info.get('source')} weights have the {stems[info['source']]} stem: train with "
                f"--config.model.overrides.stem={stems[info['source']]}"
            )
        classifiers = any(module in problem for problem in problems for module in CLASSIFIER_MODULES)
        if classifiers and not backbone_only and not reinit_classifier:
            hint = (
                f"\nits classifiers are for {info.get('num_classes')} classes: to fine-tune it to this dataset's, "
                "train with --config.train.reinit_classifier=True (they start afresh, the rest is loaded)"
            )
        raise ValueError(
            f"init_from={init_from} (model {info.get('model_name')}, {info.get('num_classes')} classes): "
            f"{what} {'do' if backbone_only else 'does'} not fit {model_name}: "
            f"{checkpointing.describe_mismatches(problems)}{hint}"
        )
    restored = jax.device_put(restored, sharding.replicated(mesh))
    if backbone_only:
        restored = {c: {**dict(getattr(state, c)), "backbone": tree["backbone"]} for c, tree in restored.items()}
    elif reinit_classifier:  # the loaded variables, and the fresh classifiers
        restored = {
            c: flax.traverse_util.unflatten_dict({**flatten_dict(dict(getattr(state, c))), **flatten_dict(tree)})
            for c, tree in restored.items()
        }
    return state.replace(params=restored["params"], batch_stats=restored["batch_stats"]), info


def _without_classifiers(variables: Mapping[str, Any]) -> dict[str, Any]:
    """``variables`` ({'params': ..., 'batch_stats': ...}) without the layers of ``CLASSIFIER_MODULES``."""
    return {
        collection: flax.traverse_util.unflatten_dict(
            {
                path: value
                for path, value in flatten_dict(dict(tree)).items()
                if "/".join(path[:-1]) not in CLASSIFIER_MODULES
            }
        )
        for collection, tree in variables.items()
    }


# ----------------------------------------------------------------------------------------------------
# Loop helpers.


# Several processes: every this many steps they combine their stop requests (read one step later).
STOP_CHECK_EVERY = 10


class StoppedNow(KeyboardInterrupt):
    """A second SIGTERM/SIGINT during training: stopped at once, without a checkpoint of the step."""

    def __init__(self, signum: int, first: int | None = None) -> None:
        received = f"signal {signum} received twice" if first in (None, signum) else f"signal {signum} after {first}"
        super().__init__(f"{received}: stopped at once, without saving the current step")
        self.signum = int(signum)


class StopRequest:
    """Turns SIGTERM/SIGINT into a stop at a step boundary so the loop can checkpoint first (preemption).

    Several processes (jax.distributed) must stop after the same step: one that stopped alone would leave
    the others waiting in the next step's collectives, and the checkpoint needs all of them. There each
    step carries every process's request as an input (``batch['stop']``, one value per example) and
    returns their maximum, the same on every process; the loop reads it every ``STOP_CHECK_EVERY`` steps,
    one step late so that no step waits for it, and all processes stop after the same step.
    """

    def __init__(self) -> None:
        self.requested = False
        self.signal: int | None = None  # the signal that asked for the stop
        self._previous = {}

    def __enter__(self) -> StopRequest:
        # (Under jax.distributed this replaces jax's own preemption notifier for the loop's duration: its
        # step agreement loses a notice that comes before its first call and can be misled by orbax's calls.)
        for sig in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(ValueError):  # not the main thread: leave signals alone
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        if self.requested:  # a second Ctrl-C (or SIGTERM): stop now, without the checkpoint
            self.__exit__()
            raise StoppedNow(signum, self.signal)
        logging.warning("signal %d received: checkpointing after this step, then stopping (again: stop now)", signum)
        self.requested, self.signal = True, signum

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def evaluate(
    eval_step: Callable, state: TrainState, batches: Iterator[Mapping[str, np.ndarray]], mesh, num_classes: int
) -> dict[str, Any]:
    """Sums the per-batch confusion matrices on the host in int64 and scores them."""
    confusion = np.zeros((num_classes, num_classes), np.int64)
    pending = None  # read one batch late, so that the device runs a batch while the host reads the one before
    for host_batch in batches:
        batch = sharding.global_batch(
            {"image": host_batch["image"], "label": host_batch["label"], "valid": host_batch["valid"]}, mesh
        )
        counts = eval_step(state, batch)
        if pending is not None:
            confusion += np.asarray(jax.device_get(pending), np.int64)
        pending = counts
    if pending is not None:
        confusion += np.asarray(jax.device_get(pending), np.int64)
    scores = metrics.segmentation_scores(confusion)
    scores["confusion"] = confusion
    return scores


def check_finite_loss(
    loss: Any, step: int, checkpoints: checkpointing.TrainCheckpointer, state: TrainState | None = None
) -> None:
    """Stops a diverged run (a NaN or infinite loss, the same on every process) before it saves its state:
    ``keep_checkpoints`` saves of NaN weights would otherwise rotate every good checkpoint out. With ``state``
    (before a save), its weights and BatchNorm statistics too: the loss is the one before the step's update,
    which can itself be what diverges."""
    value = float(jax.device_get(loss))
    finite = math.isfinite(value) and (state is None or bool(jax.device_get(_all_finite(state.variables))))
    if finite:
        return
    latest = checkpoints.latest_step()
    kept = "no checkpoint was saved"
    if latest is not None:
        kept = f"the latest checkpoint is step {latest} in {checkpoints.directory}"
    what = f"the training loss is {value}" if not math.isfinite(value) else "the weights hold NaN or infinite values"
    raise FloatingPointError(
        f"{what} after step {step}: the run diverged and this step was not saved; {kept}. "
        "Lower the learning rate (--config.train.lr_per_16) or check the data, then run again: it resumes from "
        "the latest checkpoint."
    )


@jax.jit
def _all_finite(tree: Any) -> jax.Array:
    leaves = [jnp.all(jnp.isfinite(leaf)) for leaf in jax.tree.leaves(tree) if jnp.issubdtype(leaf.dtype, jnp.inexact)]
    return jnp.all(jnp.stack(leaves)) if leaves else jnp.bool_(True)


def report(message: str) -> None:
    """A progress line on the first process (absl INFO would also print every orbax internal message)."""
    if jax.process_index() == 0:
        print(message, flush=True)


def format_duration(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s"


def write_json(path: Path, payload: Mapping[str, Any]) -> None:
    path.write_text(json.dumps(payload, indent=2, default=str))


# ----------------------------------------------------------------------------------------------------
# The job.


def train_and_evaluate(config: Any, workdir: str | Path) -> dict[str, Any]:
    """Trains per ``config`` (an ml_collections config, see configs/), writing everything to ``workdir``.

    Returns the last validation metrics of this invocation (also written to ``WORKDIR/metrics.json``, with the
    step validated) and ``evaluated_step``, the step reached and ``stopped_by``: None when ``num_steps`` were
    trained, else the signal number that stopped the run or ``"stop_after_steps"``.
    """
    # The checkpointer and the summary writer are closed on any exit, an exception included: the checkpoint
    # saves already begun finish (a validation that fails loses no training).
    with contextlib.ExitStack() as cleanup:
        return _train_and_evaluate(config, workdir, cleanup)


def _train_and_evaluate(config: Any, workdir: str | Path, cleanup: contextlib.ExitStack) -> dict[str, Any]:
    from fastfcn_jax import summary_writer
    from fastfcn_jax.config import model_overrides
    from fastfcn_jax.data import pipeline
    from fastfcn_jax.data.datasets import get_dataset_info

    workdir = Path(workdir).expanduser().absolute()
    random_init_refused = not config.train.get("allow_random_init", True) and not config.train.get("requires_init_from")
    if random_init_refused and not (config.init_from or checkpointing.has_steps(workdir)):
        raise ValueError(
            "this config reproduces a paper experiment, which starts from ImageNet weights, and neither "
            "config.init_from nor a checkpoint in WORKDIR gives any: pass --config.init_from=DIR (a converted ImageNet "
            "backbone, README 'Training a paper experiment' step 2), or --config.train.allow_random_init=True to "
            "train from random initialisation"
        )
    workdir.mkdir(parents=True, exist_ok=True)
    mesh = sharding.make_mesh(config.get("num_devices") or None)
    dataset = get_dataset_info(config.dataset.name, config.dataset.data_dir or None)
    num_classes = config.model.num_classes or dataset.num_classes
    if num_classes != dataset.num_classes:
        # Fewer: labels past the last class would be scored against no logit; more: classes no label has, which
        # the mIoU would average in.
        raise ValueError(
            f"config.model.num_classes={num_classes}, but dataset {config.dataset.name!r} has {dataset.num_classes} "
            "classes: leave it 0 (the dataset's). To fine-tune weights of another class count, pass them as "
            "config.init_from with --config.train.reinit_classifier=True (a PyTorch file: convert it with "
            "--reinit-classifier, docs/converting.md)"
        )
    crop = config.dataset.crop_size or dataset.crop_size
    overrides = model_overrides(config)
    model = create_model(config.model.name, num_classes, **overrides)

    global_batch = config.train.batch_size
    eval_batch = config.eval.batch_size or global_batch  # global, as train.batch_size
    # The mesh's devices (config.num_devices of them, else all), each process feeding its own share of them.
    devices, local_devices, processes = mesh.devices.size, len(mesh.local_devices), jax.process_count()
    where = f"the {devices} devices" + (f" ({processes} processes)" if processes > 1 else "")
    if config.get("num_devices"):
        where += f" of config.num_devices={config.num_devices}"
    for key, size in (("train.batch_size", global_batch), ("eval.batch_size", eval_batch)):
        if size % processes or (size // processes) % local_devices:
            raise ValueError(f"{key}={size} must be divisible by {where}")
    microbatches = config.train.microbatches
    if global_batch % (microbatches * devices):
        raise ValueError(
            f"train.batch_size={global_batch} must be divisible by train.microbatches={microbatches} times {where}, "
            "so that every micro-batch has the same number of examples on each device"
        )
    data_dir = config.dataset.data_dir or None
    # Builds the tfds files on first use (seconds for the embedded dataset; real ones need manual_dir).
    pipeline.prepare_on_first_process(config.dataset.name, data_dir, config.dataset.manual_dir or None)
    sizes = {}
    for key in ("train_split", "eval_split"):  # both now: a misspelt eval split would surface after training
        try:
            sizes[key] = pipeline.dataset_size(config.dataset.name, config.dataset[key], data_dir)
        except (KeyError, ValueError) as error:  # tfds: "Unknown split 'valdation'. Should be one of [...]"
            raise ValueError(f"config.dataset.{key}={config.dataset[key]!r}: {error}") from None
    train_size = sizes["train_split"]
    steps_per_epoch = max(train_size // global_batch, 1)  # the reference drops the last partial batch
    order = pipeline.training_order(
        config.dataset.name,
        data_dir=data_dir,
        split=config.dataset.train_split,
        shuffle_buffer=config.dataset.shuffle_buffer,
    )
    report(f"training order: {order.description}")
    total_steps = config.train.num_steps or config.train.epochs * steps_per_epoch
    base_lr = optim.scaled_learning_rate(config.train.lr_per_16, global_batch)
    schedule = optim.poly_schedule(base_lr, total_steps, config.train.poly_power)
    optimizer = optim.make_optimizer(
        schedule,
        momentum=config.train.momentum,
        weight_decay=config.train.weight_decay,
        new_layers_lr_multiplier=config.train.new_layers_lr_multiplier,
    )
    rng = jax.random.PRNGKey(config.seed)
    init_rng, step_rng = jax.random.split(rng)

    info = {
        "model_name": config.model.name,
        "num_classes": num_classes,
        "class_names": list(dataset.class_names)[:num_classes],
        "model_overrides": checkpointing.storable_overrides(overrides),
        "dataset": config.dataset.name,
        # What predict needs where it cannot look the dataset up (a custom folder dataset's data_dir).
        "palette": np.asarray(dataset.palette, np.uint8)[:num_classes].tolist(),
        "base_size": int(config.dataset.base_size or dataset.base_size),
        "crop_size": int(crop),
    }
    checkpoints = checkpointing.TrainCheckpointer(workdir, keep=config.train.keep_checkpoints, info=info)
    cleanup.callback(checkpoints.close)
    # A resumed run restores onto the state's shapes and shardings: its initialisation is neither compiled nor run.
    restored_step = checkpoints.restore_latest(abstract_train_state(model, optimizer, (1, crop, crop, 3), mesh))
    if restored_step is not None:
        state = restored_step
        report(f"resumed from {checkpoints.directory} at step {int(state.step)}")
    elif config.train.get("requires_init_from") and not config.init_from:
        raise ValueError(
            "this config fine-tunes trained weights (config.train.requires_init_from) and WORKDIR has no checkpoint "
            "to resume: pass --config.init_from=DIR (the workdir of the run it continues, or a converted "
            "FastFCN checkpoint)"
        )
    else:
        state = create_train_state(model, optimizer, init_rng, (1, crop, crop, 3), mesh)
        if config.init_from:
            state, source = load_pretrained(
                state,
                config.init_from,
                mesh,
                f"the configured {config.model.name}",
                reference=getattr(model, "reference", "fastfcn"),
                reinit_classifier=config.train.reinit_classifier,
            )
            if source.get("source") in checkpointing.BACKBONE_SOURCES and config.train.get("requires_init_from"):
                raise ValueError(
                    f"init_from={config.init_from} holds a backbone's weights alone, but this config "
                    "fine-tunes a trained segmenter (config.train.requires_init_from): pass the workdir of the run it "
                    "continues"
                )
            if source.get("source") in checkpointing.BACKBONE_SOURCES:
                origin = "ImageNet, " if source.get("source") != "backbone" else ""
                report(f"initialised the backbone from {config.init_from} ({origin}{source.get('input_file')})")
            else:
                report(f"initialised from {config.init_from} ({source.get('model_name')})")
    start_step = int(state.step)
    run_record = {
        "config": config.to_dict(),
        "total_steps": total_steps,
        "steps_per_epoch": steps_per_epoch,
        "base_lr": base_lr,
        "code_version": code_version(),
        "seed": config.seed,
        "start_step": start_step,
        "started": time.strftime("%Y-%m-%d %H:%M:%S"),
        "processes": jax.process_count(),
        "devices": int(mesh.devices.size),  # the mesh's: config.num_devices of them, else all
        "shuffle_buffer": order.buffer,  # as resolved on this host (config.dataset.shuffle_buffer=0 depends on it)
        "shuffled_examples": order.examples,  # this process's share of the training split
    }
    if restored_step is not None:
        check_resumed_settings(workdir / "config.json", run_record)
        if start_step >= total_steps:
            report(f"WORKDIR is at step {start_step}, at or past the {total_steps} steps configured: nothing to train")
    if jax.process_index() == 0:
        write_json(workdir / "config.json", run_record)  # this invocation's; every one is kept in runs.jsonl
        with open(workdir / "runs.jsonl", "a") as runs:
            runs.write(json.dumps(run_record, default=str) + "\n")

    replicated, batched = sharding.replicated(mesh), sharding.batch_sharded(mesh)
    state_sharding = jax.tree_util.tree_map(lambda _: replicated, state)
    # Traced with the mesh as context: the Pallas kernels ('auto' on GPUs, op_choices.pallas_for_auto) then run on
    # each device's examples.
    train_step = jax.jit(
        sharding.with_mesh(
            make_train_step(
                model,
                optimizer,
                aux_weight=config.train.aux_weight,
                se_weight=config.train.se_weight,
                freeze_batch_norm=config.train.freeze_batch_norm,
                microbatches=microbatches,
            ),
            mesh,
        ),
        in_shardings=(state_sharding, batched, replicated),
        out_shardings=(state_sharding, replicated),
        donate_argnums=0,
    )
    eval_step = jax.jit(
        sharding.with_mesh(make_eval_step(model, num_classes), mesh),
        in_shardings=(state_sharding, batched),
        out_shardings=replicated,
    )

    local_batch = global_batch // jax.process_count()
    train_batches = pipeline.train_batches(
        config.dataset.name,
        data_dir=data_dir,
        batch_size=local_batch,
        seed=config.seed,
        crop_size=crop,
        base_size=config.dataset.base_size or None,
        split=config.dataset.train_split,
        skip_batches=start_step,  # a resumed run continues the data order after the batches consumed
        normalise=False,  # uint8 images, normalised by the train step
        shuffle_buffer=order.buffer,
    )

    def run_eval() -> dict[str, Any]:
        batches = pipeline.eval_batches(
            config.dataset.name,
            data_dir=data_dir,
            batch_size=eval_batch // jax.process_count(),
            crop_size=crop,
            split=config.dataset.eval_split,
        )
        return evaluate(eval_step, state, batches, mesh, num_classes)

    # From scratch too: a run killed before its first checkpoint left points that this one logs again.
    writer = summary_writer.SummaryWriter(
        workdir / "tensorboard" if jax.process_index() == 0 else None, start_step, jsonl=workdir / "scalars.jsonl"
    )
    cleanup.callback(writer.close)
    last_eval: dict[str, Any] = {}
    last_eval_step = 0
    best_score = checkpoints.best_score()
    if restored_step is None and best_score is not None:  # e.g. checkpoints/ deleted to start again
        report(f"note: {workdir}/best holds an earlier run's step (score {best_score:.4f}): this run replaces it")
        best_score = None
    window_start, window_steps = time.perf_counter(), 0
    run_start = time.perf_counter()
    stopped_by: int | str | None = None
    combined = jax.process_count() > 1  # the processes' stop requests travel with the steps
    votes = None  # a check step's combined request, read after the next step is dispatched
    with StopRequest() as stop:
        for step in range(start_step, total_steps):
            host_batch = next(train_batches)
            if combined:
                host_batch = {**host_batch, "stop": np.full(local_batch, stop.requested, np.int32)}
            state, terms = train_step(state, sharding.global_batch(host_batch, mesh), step_rng)
            done = step + 1
            stopping = stop.requested
            if combined:
                stopping = votes is not None and bool(jax.device_get(votes))  # alike on every process
                vote = terms.pop("stop_requested")
                votes = vote if done % STOP_CHECK_EVERY == 0 else None
                if stopping and not stop.signal:
                    stop.signal = signal.SIGTERM  # another process received it
            if step == start_step:  # compiled in this step: its time is not the throughput
                jax.block_until_ready(terms)
                report(f"first step (compilation included) took {format_duration(time.perf_counter() - run_start)}")
                window_start = time.perf_counter()
            else:
                window_steps += 1
            if done % config.train.log_every == 0 or done == total_steps:
                terms = jax.device_get(terms)  # the only host sync of the loop
                elapsed = time.perf_counter() - window_start
                lr = float(schedule(step))
                scalars = {**{f"train/{k}": float(v) for k, v in terms.items()}, "train/lr": lr}
                speed = ""
                if window_steps:
                    images_per_second = window_steps * global_batch / max(elapsed, 1e-9)
                    eta = (total_steps - done) * elapsed / window_steps
                    speed = f"  {images_per_second:.1f} img/s  ETA {format_duration(eta)}"
                    scalars["train/images_per_second"] = images_per_second
                report(f"step {done}/{total_steps}  loss {terms['loss']:.4f}  lr {lr:.2e}{speed}")
                writer.scalars(done, scalars)
                check_finite_loss(terms["loss"], done, checkpoints)
                window_start, window_steps = time.perf_counter(), 0
            # Saved before validating (asynchronously, while it runs): a validation that fails loses no training.
            time_boxed = config.train.stop_after_steps and done - start_step >= config.train.stop_after_steps
            if done % config.train.checkpoint_every == 0 or done == total_steps or stopping or time_boxed:
                check_finite_loss(terms["loss"], done, checkpoints, state)  # never a diverged state over good ones
                checkpoints.save(done, state)
            should_eval = done == total_steps or (config.train.eval_every and done % config.train.eval_every == 0)
            if should_eval:
                last_eval, last_eval_step = run_eval(), done
                score = (last_eval["pixel_accuracy"] + last_eval["mean_iou"]) / 2
                per_class = dict(zip(info["class_names"], last_eval["per_class_iou"], strict=False))
                report(
                    f"step {done}  validation pixAcc {last_eval['pixel_accuracy']:.4f}  "
                    f"mIoU {last_eval['mean_iou']:.4f}  per class: "
                    + ", ".join(f"{name} {iou:.3f}" for name, iou in per_class.items())
                )
                writer.scalars(
                    done,
                    {
                        "val/pixel_accuracy": last_eval["pixel_accuracy"],
                        "val/mean_iou": last_eval["mean_iou"],
                        **{f"val_iou/{name}": iou for name, iou in per_class.items()},
                    },
                )
                if best_score is None or score > best_score:
                    best_score = score
                    checkpoints.save_best(done, state, score)
            if should_eval or done % config.train.checkpoint_every == 0:  # not training time: out of img/s
                jax.block_until_ready(state.step)
                window_start, window_steps = time.perf_counter(), 0
            if (stopping or time_boxed) and done < total_steps:  # at num_steps the run is finished
                report(f"stopped at step {done}/{total_steps}; run the same command again to resume")
                stopped_by = stop.signal if stopping else "stop_after_steps"
                break
        if not last_eval and int(state.step) >= total_steps:  # a finished run asked again: report its metrics
            last_eval, last_eval_step = run_eval(), int(state.step)
    trained_steps = int(state.step) - start_step
    report(
        f"trained {trained_steps} step{'s' * (trained_steps != 1)} in "
        f"{format_duration(time.perf_counter() - run_start)}"
    )

    # Before num_steps: the signal number (SIGTERM/SIGINT) or "stop_after_steps"; main.py's exit status.
    final = {"step": int(state.step), "stopped_by": stopped_by}
    if last_eval:
        # A run stopped after a validation but before the next one: its metrics are of the validated step.
        final["evaluated_step"] = last_eval_step
        final.update({k: last_eval[k] for k in ("pixel_accuracy", "mean_iou", "mean_iou_present")})
        final["score"] = (last_eval["pixel_accuracy"] + last_eval["mean_iou"]) / 2
        class_names = info["class_names"]
        final.update(
            {
                f"iou/{class_names[i] if i < len(class_names) else i}": v
                for i, v in enumerate(last_eval["per_class_iou"])
            }
        )
        if jax.process_index() == 0:
            metrics = {k: v for k, v in final.items() if k not in ("stopped_by", "evaluated_step")}
            write_json(workdir / "metrics.json", {**metrics, "step": last_eval_step})
            np.save(workdir / "confusion.npy", last_eval["confusion"])
        if jax.process_index() == 0 and last_eval_step == int(state.step):  # panels of the validated weights only
            host_batch = next(
                pipeline.eval_batches(
                    config.dataset.name,
                    data_dir=data_dir,
                    batch_size=4,
                    crop_size=crop,
                    split=config.dataset.eval_split,
                )
            )
            predict = jax.jit(lambda v, x: jnp.argmax(model.apply(v, x, train=False)["logits"], axis=-1))
            predictions = np.asarray(predict(jax.device_get(state.variables), host_batch["image"]))
            keep = host_batch["valid"]
            from fastfcn_jax import visualize  # PIL: only needed here, keeps the step importable anywhere

            paths = visualize.save_panels(
                workdir / "predictions",
                host_batch["image"][keep],
                host_batch["label"][keep],
                predictions[keep],
                dataset.palette,
            )
            report(f"wrote {len(paths)} prediction images (image | label | prediction) to {workdir / 'predictions'}")
    return final


# Settings that may change between the invocations of one run without a note (how it is watched and saved).
_QUIET_ON_RESUME = (
    "mode",
    "init_from",
    "dataset.data_dir",
    "dataset.manual_dir",
    "num_devices",
    "train.allow_random_init",
    "train.reinit_classifier",
    "compilation_cache",
)
_QUIET_PREFIXES = ("train.log_every", "train.eval_every", "train.checkpoint_every", "train.keep_checkpoints",
                   "train.stop_after_steps", "eval.", "evaluation.", "export.", "benchmark.")  # fmt: skip


def check_resumed_settings(previous_path: Path, current: Mapping[str, Any]) -> None:
    """On resume, compares this invocation's settings with the previous one's (``config.json``): a changed
    batch size is refused (the data order of a resumed run is counted in batches), any other training change
    is reported, with what it does to the learning-rate schedule."""
    if not previous_path.exists():
        return
    try:
        previous = json.loads(previous_path.read_text())
    except (OSError, ValueError):
        return  # unreadable: nothing to compare with (it is rewritten below)
    # Both as config.json holds them (tuples as lists), flattened to dotted keys.
    stored = json.loads(json.dumps(current["config"], default=str))
    before, after = (flatten_dict(c, sep=".") for c in (previous.get("config", {}), stored))
    changed = {
        key: (before.get(key), after.get(key))
        for key in sorted(set(before) | set(after))
        if before.get(key) != after.get(key) and key not in _QUIET_ON_RESUME and not key.startswith(_QUIET_PREFIXES)
    }
    if "train.batch_size" in changed:
        old, new = changed["train.batch_size"]
        raise ValueError(
            f"WORKDIR was trained with train.batch_size={old}, this invocation asks for {new}: a resumed run "
            "continues the data order by batches (and the learning rate scales with the batch), so resume with "
            f"--config.train.batch_size={old}, or start a new --workdir with --config.init_from=THIS_WORKDIR"
        )
    lines = [f"  {key}: {old!r} -> {new!r}" for key, (old, new) in changed.items()]
    if previous.get("processes", current["processes"]) != current["processes"]:
        lines.append(
            f"  processes: {previous['processes']} -> {current['processes']}: each reads its own shard of the data, "
            "so the examples from here on are not those an uninterrupted run would have seen"
        )
    # Runs recorded before the buffer was (session 20) shuffled with a buffer of at most 1024 examples
    # (pipeline.SHUFFLE_BUFFER; not imported: TensorFlow stays off this module's import path).
    legacy = min(current.get("shuffled_examples", 0), 1024) or current["shuffle_buffer"]
    if previous.get("shuffle_buffer", legacy) != current["shuffle_buffer"]:
        lines.append(
            f"  shuffle buffer: {previous.get('shuffle_buffer', legacy)} -> {current['shuffle_buffer']} examples "
            "(training order), "
            "so the examples from here on are not those an uninterrupted run would have seen"
        )
    if not lines:
        return
    if previous.get("total_steps") != current["total_steps"]:
        lines.append(
            f"  the learning-rate schedule now decays over {current['total_steps']} steps "
            f"(was {previous.get('total_steps')}), from step {current['start_step']} on"
        )
    if previous.get("base_lr") != current["base_lr"]:
        lines.append(f"  base learning rate {current['base_lr']:.3g} (was {previous.get('base_lr', 0):.3g})")
    report("resuming with settings that differ from the previous invocation (both in runs.jsonl):\n" + "\n".join(lines))

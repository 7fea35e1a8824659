"""The experiment config schema: every key with its default, the paper's recipe, and validation.

Config files in ``configs/`` call :func:`base_config` or :func:`paper_config` and set their own values, so
each is a complete experiment while the schema lives in one place. :func:`validate` rejects impossible
values with messages that name the key (unknown keys are already rejected by the locked ConfigDict).
"""

from __future__ import annotations

import math
from pathlib import Path
from types import ModuleType

import ml_collections
from ml_collections.config_dict import placeholder

from fastfcn_jax.protocols import FLIP_WORDS, PROTOCOLS, option_errors

# Segmenter's integer architecture fields that config.model.overrides offers on the command line.
INT_OVERRIDES = ("stem_width", "base_width", "output_stride", "jpu_width", "jpux_groups", "head_width", "num_codes")

MODES = ("train", "eval", "predict", "export", "summary", "benchmark")

# The reference's per-dataset recipe (FASTFCN.md section 4.1): LR for a batch of 16, epochs, base/crop size.
PAPER_RECIPES = {
    "pcontext": {"lr_per_16": 0.001, "epochs": 80, "base_size": 520, "crop_size": 480},
    "ade20k": {"lr_per_16": 0.01, "epochs": 120, "base_size": 520, "crop_size": 480},
    "cityscapes": {"lr_per_16": 0.01, "epochs": 240, "base_size": 1024, "crop_size": 768},
    "pascal_voc": {"lr_per_16": 0.0001, "epochs": 50, "base_size": 520, "crop_size": 480},
    "pascal_aug": {"lr_per_16": 0.001, "epochs": 50, "base_size": 520, "crop_size": 480},
}


def base_config() -> ml_collections.ConfigDict:
    """Every config key with its default (the reference's defaults where it has one)."""
    config = ml_collections.ConfigDict()
    config.mode = "train"
    config.seed = 1  # the reference's seed
    config.num_devices = 0  # 0: every device (eval and predict: every local one on GPUs/TPUs, one on CPUs)
    config.init_from = ""  # a converter output (python -m fastfcn_jax.convert ...) or another workdir
    # Compiled programs kept on disk for the next run (fastfcn_jax/compilation_cache.py): 'auto' =
    # $XDG_CACHE_HOME/fastfcn_jax/xla (~/.cache/...), a folder, or '' (off); JAX_COMPILATION_CACHE_DIR wins.
    config.compilation_cache = "auto"

    config.model = ml_collections.ConfigDict()
    config.model.name = "encnet_jpu_r50"
    config.model.num_classes = 0  # 0: the dataset's class count
    config.model.overrides = ml_collections.ConfigDict(
        {
            # Compute dtype: 'auto' = bfloat16 on GPU/TPU, float32 on CPU (parameters, BatchNorm statistics and the
            # loss stay float32); 'float32' for the reference's arithmetic everywhere.
            "dtype": "auto",
            "aux": True,
            # Architecture settable from the command line (--config.model.overrides.jpu_width=256); None: the
            # model name's own (fastfcn_jax.models.Segmenter).
            **{key: placeholder(int) for key in INT_OVERRIDES},
            "stem": placeholder(str),
            # 'mmseg': mmsegmentation's variant of the model, for its converted checkpoints (--from mmseg), which
            # record it (evaluation, prediction and export read it from there; fine-tuning needs it set here).
            "reference": placeholder(str),
            # Models named {head}_{neck}_custom: their backbone, 'module.path:Name' (a Flax module class, or a
            # function returning a module, importable here; README "The JPU on another backbone").
            "backbone": placeholder(str),
            "se_loss": placeholder(bool),
            "dropout": placeholder(float),
        }
    )
    # How performance-sensitive ops are computed, e.g. "depthwise=grouped,loss_logits=head" (OpChoices in
    # fastfcn_jax/models/op_choices.py; same maths): "" = each op's default, 'auto' choices made per backend.
    config.model.ops = ""

    config.dataset = ml_collections.ConfigDict()
    config.dataset.name = "pcontext"
    config.dataset.data_dir = ""  # tfds data_dir; "" = tfds default (~/tensorflow_datasets)
    config.dataset.manual_dir = ""  # raw downloaded files, used to build the tfds dataset on first use
    config.dataset.train_split = "train"
    config.dataset.eval_split = "validation"
    config.dataset.base_size = 0  # 0: the dataset's
    config.dataset.crop_size = 0  # 0: the dataset's
    # Training order: 0 = a new permutation of the whole split each epoch, as the reference, where the encoded split
    # fits in a quarter of the host's memory (held there), else a buffer of 1024; N > 0: a buffer of N examples.
    config.dataset.shuffle_buffer = 0

    config.train = ml_collections.ConfigDict()
    config.train.batch_size = 16  # global, over all devices and hosts
    config.train.epochs = 80
    config.train.num_steps = 0  # > 0 overrides epochs
    config.train.lr_per_16 = 0.001  # base LR for a batch of 16, scaled linearly with batch_size
    config.train.momentum = 0.9
    config.train.weight_decay = 1e-4
    config.train.new_layers_lr_multiplier = 10.0  # JPU, head and aux head
    config.train.poly_power = 0.9
    config.train.aux_weight = 0.2
    # Few images per device (FastFCN issue #19: one 12 GB GPU): BatchNorms normalise with their running statistics
    # and keep them (the backbone's from init_from; a fresh JPU's and head's stay 0 / 1); scale and bias train.
    config.train.freeze_batch_norm = False
    config.train.se_weight = 0.2
    # > 1: gradient accumulation; each global batch runs as this many sequential micro-batches (activation memory
    # of batch_size / microbatches, the update of batch_size; BatchNorm statistics per micro-batch).
    config.train.microbatches = 1
    config.train.log_every = 50
    config.train.eval_every = 0  # 0: only at the end
    config.train.checkpoint_every = 1000
    config.train.keep_checkpoints = 3
    config.train.requires_init_from = False  # a fine-tune: refuse to start from scratch without init_from
    # With init_from a whole trained model of another class count (a workdir, a converted model): its classifiers
    # (main, aux, SE) start afresh, every other layer is loaded.
    config.train.reinit_classifier = False
    # False (the paper configs): refuse to start from random initialisation, as a paper experiment starts from
    # ImageNet weights (config.init_from); True trains from scratch on purpose.
    config.train.allow_random_init = True
    config.train.stop_after_steps = 0  # > 0: checkpoint and stop after this many steps of this run (time-boxed
    # sessions such as Colab, cluster jobs); exit status 75; running the same command again resumes

    config.eval = ml_collections.ConfigDict()
    config.eval.batch_size = 0  # global, as train.batch_size; 0: train.batch_size (validation during training)

    # mode=eval and mode=predict: the reference's test protocol (FASTFCN.md section 4.2; docs/evaluation.md).
    config.evaluation = ml_collections.ConfigDict()
    # 'single_scale' | 'multi_scale' (+ flip) | 'whole' | 'mmseg' | 'mmseg_multi_scale' (mmsegmentation's test)
    config.evaluation.protocol = "single_scale"
    config.evaluation.scales = ()  # (): the protocol's own (multi-scale 0.5..1.75; Cityscapes adds 2.0, 2.25)
    config.evaluation.flip = "auto"  # 'auto' (the multi-scale protocols only) | 'true' | 'false'
    # The mmseg protocols' keep-ratio test scale (long, short); (): mmsegmentation's for the dataset
    # (Cityscapes (2048, 1024), ADE20K (2048, 512), Pascal Context (520, 520), VOC (2048, 512)).
    config.evaluation.test_scale = ()
    # The whole-image protocols' padding of each side to a multiple of this; 0: the protocol's own ('whole' 32,
    # the mmseg ones 1 = none, as mmsegmentation: exact, but one network compilation per image size).
    config.evaluation.pad_multiple = 0
    # 0: eval: dataset.base_size / crop_size, else the dataset's (long side 520 at scale 1, 480 windows);
    # predict: the sizes recorded in the checkpoint, else as for eval (docs/evaluation.md).
    config.evaluation.base_size = 0
    config.evaluation.crop_size = 0
    config.evaluation.stride_ratio = 2.0 / 3.0  # window stride = int(crop_size * stride_ratio)
    config.evaluation.batch_size = 0  # windows per network call; 0: 8
    config.evaluation.images_per_call = 0  # 0: 4
    config.evaluation.max_examples = 0  # 0: the whole split
    config.evaluation.submission_dir = ""  # label PNGs in the benchmark's own encoding for test servers
    config.evaluation.split = ""  # "": dataset.eval_split

    # mode=export (docs/export.md).
    config.export = ml_collections.ConfigDict()
    config.export.formats = ("stablehlo",)  # any of 'stablehlo', 'savedmodel', 'onnx'
    config.export.image_size = 0  # 0: the checkpoint's training crop size, else dataset.crop_size, else the dataset's
    config.export.output = "logits"  # or 'labels'
    config.export.platforms = ("cpu", "cuda", "tpu")
    config.export.directory = ""  # "": WORKDIR/export
    config.export.checkpoint = ""  # "": config.init_from, else WORKDIR's latest checkpoint
    config.export.embed_params = True  # False: params.npz beside model.stablehlo
    config.export.fold_norm = True  # BatchNorms folded into the convolutions before them
    config.export.tuned_for = ""  # 'auto' op choices for: "" = the exporting machine's backend, cpu | gpu | tpu

    # mode=benchmark (experiments/benchmark.py has the same options as flags).
    config.benchmark = ml_collections.ConfigDict()
    config.benchmark.models = (
        "encnet_jpu_r50,encnet_dilated_r50,psp_jpu_r50,psp_dilated_r50,deeplab_jpu_r50,deeplab_dilated_r50"
    )
    config.benchmark.image_size = 512
    config.benchmark.batch_size = 1
    config.benchmark.num_classes = 150
    config.benchmark.warmup = 2
    config.benchmark.repeats = 5
    config.benchmark.dtype = "float32"
    config.benchmark.aux = True
    config.benchmark.ops = ""  # e.g. "depthwise=grouped,resize=matmul" (OpChoices in fastfcn_jax/models/op_choices.py)
    config.benchmark.until = ""  # "": whole network; c4 | jpu | head: only up to that feature map
    config.benchmark.peak = True  # also measure the matmul peak in benchmark.dtype
    config.benchmark.constant_weights = False  # weights compiled into the forward program (deployment-style)
    config.benchmark.interleave = True  # models timed in turn, round by round (robust ratios on a drifting machine)
    config.benchmark.train_models = ""  # comma-separated: also time their training step
    config.benchmark.train_sizes = "256,480"
    config.benchmark.train_batch_size = 2
    return config


def paper_config(dataset: str, model: str, *, aux_weight: float = 0.2, **train_overrides) -> ml_collections.ConfigDict:
    """A paper experiment: the reference's recipe for ``dataset`` with ``model`` (aux weight 0.2 for EncNet,
    0.4 for PSP and DeepLab as the reference's scripts pass)."""
    recipe = PAPER_RECIPES[dataset]
    config = base_config()
    config.model.name = model
    config.dataset.name = dataset
    config.dataset.base_size = recipe["base_size"]
    config.dataset.crop_size = recipe["crop_size"]
    config.train.lr_per_16 = recipe["lr_per_16"]
    config.train.epochs = recipe["epochs"]
    config.train.aux_weight = aux_weight
    config.train.se_weight = 0.2 if model.startswith("encnet") else 0.0
    config.train.eval_every = 2000
    config.train.allow_random_init = False  # an ImageNet backbone (init_from) or nothing: a forgotten flag is no run
    for key, value in train_overrides.items():
        config.train[key] = value
    return config


def config_module(path: str | Path) -> ModuleType:
    """A config file (``configs/demo.py``) loaded as a module: its ``get_config()`` and its docstring (the
    launch command)."""
    import importlib.util

    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"no config file {path}")
    if path.suffix != ".py":
        raise ValueError(f"{path}: a config file is Python (configs/*.py) with a get_config()")
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not hasattr(module, "get_config"):
        raise ValueError(f"{path} defines no get_config()")
    return module


def load_config(path: str | Path) -> ml_collections.ConfigDict:
    """A config file's ``get_config()``, as ``--config`` loads it, for the Python API:
    ``run_evaluation(load_config('configs/demo.py'), workdir)``."""
    return config_module(path).get_config()


def validate(config: ml_collections.ConfigDict) -> None:
    """Raises ValueError naming the key for impossible values."""
    problems = []

    def check(ok: bool, key: str, message: str) -> None:
        if not ok:
            problems.append(f"config.{key}={config_value(config, key)!r}: {message}")

    check(config.mode in MODES, "mode", f"must be one of {MODES}")
    check(config.model.num_classes >= 0, "model.num_classes", "must be >= 0 (0 = the dataset's)")
    check(config.num_devices >= 0, "num_devices", "must be >= 0 (0 = all)")
    train = config.train
    check(train.batch_size > 0, "train.batch_size", "must be positive")
    check(train.microbatches > 0, "train.microbatches", "must be positive (1 = no gradient accumulation)")
    check(
        train.microbatches <= 0 or train.batch_size % train.microbatches == 0,
        "train.microbatches",
        f"must divide train.batch_size={train.batch_size}",
    )
    check(train.epochs > 0 or train.num_steps > 0, "train.epochs", "train.epochs or train.num_steps must be positive")
    check(train.num_steps >= 0, "train.num_steps", "must be >= 0")
    # inf passes the range checks below (and trains NaN weights); NaN fails them with their message too.
    for key in ("lr_per_16", "weight_decay", "new_layers_lr_multiplier", "poly_power", "aux_weight", "se_weight"):
        check(math.isfinite(train[key]), f"train.{key}", "must be a finite number")
    check(train.lr_per_16 > 0, "train.lr_per_16", "must be positive")
    check(0 <= train.momentum < 1, "train.momentum", "must be in [0, 1)")
    check(train.weight_decay >= 0, "train.weight_decay", "must be >= 0")
    check(train.new_layers_lr_multiplier > 0, "train.new_layers_lr_multiplier", "must be positive")
    check(train.poly_power > 0, "train.poly_power", "must be positive")
    check(train.aux_weight >= 0, "train.aux_weight", "must be >= 0")
    check(train.se_weight >= 0, "train.se_weight", "must be >= 0")
    check(train.log_every > 0, "train.log_every", "must be positive")
    check(train.eval_every >= 0, "train.eval_every", "must be >= 0")
    check(train.checkpoint_every > 0, "train.checkpoint_every", "must be positive")
    check(train.keep_checkpoints > 0, "train.keep_checkpoints", "must be positive")
    check(train.stop_after_steps >= 0, "train.stop_after_steps", "must be >= 0 (0 = never)")
    check(config.eval.batch_size >= 0, "eval.batch_size", "must be >= 0")
    check(config.dataset.crop_size >= 0, "dataset.crop_size", "must be >= 0")
    check(config.dataset.shuffle_buffer >= 0, "dataset.shuffle_buffer", "must be >= 0 (0 = the whole split)")
    overrides = config.model.get("overrides") or {}
    for key in INT_OVERRIDES:
        value = overrides.get(key)
        check(value is None or value > 0, f"model.overrides.{key}", "must be positive (or unset)")
    dropout = overrides.get("dropout")
    check(dropout is None or 0 <= dropout < 1, "model.overrides.dropout", "must be in [0, 1) (or unset)")
    reference = overrides.get("reference")
    check(
        reference in (None, "fastfcn", "mmseg"), "model.overrides.reference", "must be 'fastfcn' or 'mmseg' (or unset)"
    )
    evaluation = config.evaluation
    check(evaluation.protocol in PROTOCOLS, "evaluation.protocol", f"must be one of {PROTOCOLS}")
    check(str(evaluation.flip).lower() in ("auto", *FLIP_WORDS), "evaluation.flip", "must be 'auto', 'true' or 'false'")
    check(_all_positive(evaluation.scales), "evaluation.scales", "must be positive numbers")
    for option, message in option_errors(evaluation.protocol, evaluation.test_scale, evaluation.pad_multiple).items():
        check(False, f"evaluation.{option}", message)
    check(0 < evaluation.stride_ratio <= 1, "evaluation.stride_ratio", "must be in (0, 1]")
    for key in ("base_size", "crop_size", "batch_size", "images_per_call", "max_examples"):
        check(evaluation[key] >= 0, f"evaluation.{key}", "must be >= 0 (0 = the default)")
    check(config.export.image_size >= 0, "export.image_size", "must be >= 0 (0 = the dataset's crop size)")
    check(config.export.output in ("logits", "labels"), "export.output", "must be 'logits' or 'labels'")
    check(config.export.tuned_for in ("", "cpu", "gpu", "tpu"), "export.tuned_for", "must be '', cpu, gpu or tpu")
    check(config.dataset.base_size >= 0, "dataset.base_size", "must be >= 0")
    bench = config.benchmark
    check(bench.image_size > 0, "benchmark.image_size", "must be positive")
    check(bench.batch_size > 0, "benchmark.batch_size", "must be positive")
    check(bench.train_batch_size > 0, "benchmark.train_batch_size", "must be positive")
    check(bench.warmup >= 0, "benchmark.warmup", "must be >= 0")
    check(bench.repeats > 0, "benchmark.repeats", "must be positive")
    check(bench.dtype in ("float32", "bfloat16", "float16"), "benchmark.dtype", "must be float32, bfloat16 or float16")
    check(
        bench.until in ("", "c1", "c2", "c3", "c4", "jpu", "head"), "benchmark.until", "must be '' or c1..c4, jpu, head"
    )
    sizes = [s.strip() for s in bench.train_sizes.split(",") if s.strip()]
    check(
        all(s.isdigit() and int(s) > 0 for s in sizes),
        "benchmark.train_sizes",
        "must be positive integers, e.g. 256,480",
    )
    check(
        sizes or not bench.train_models.strip(),
        "benchmark.train_sizes",
        "must name at least one size when benchmark.train_models is set",
    )
    for key in ("benchmark.ops", "model.ops"):
        pairs = [p.strip() for p in config_value(config, key).split(",") if p.strip()]
        check(all(p.count("=") == 1 for p in pairs), key, "must be OP=CHOICE[,OP=CHOICE...]")
    if problems:
        raise ValueError("invalid config:\n  " + "\n  ".join(problems))


def _all_positive(values) -> bool:
    try:
        return all(float(v) > 0 for v in values)
    except (TypeError, ValueError):
        return False


def model_overrides(config: ml_collections.ConfigDict) -> dict:
    """``create_model`` keyword arguments of ``config.model``: its ``overrides`` and its ``ops``."""
    from fastfcn_jax.models.registry import model_kwargs

    return model_kwargs(config.model, ops_key="config.model.ops")


def config_value(config: ml_collections.ConfigDict, dotted: str):
    value = config
    for part in dotted.split("."):
        value = value[part]
    return value

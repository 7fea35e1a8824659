"""Every config in configs/ is a complete experiment with the paper's hyper-parameters."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from fastfcn_jax.config import config_module, load_config, model_overrides, validate
from fastfcn_jax.models import model_config

CONFIGS = sorted((Path(__file__).parent.parent / "configs").glob("*.py"))


def load(path: Path):
    return config_module(path)


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_config_is_valid_and_documents_its_launch_command(path):
    module = load(path)
    config = module.get_config()
    validate(config)
    model_config(config.model.name, **model_overrides(config))
    assert f"--config configs/{path.name}" in module.__doc__


@pytest.mark.parametrize("path", [p for p in CONFIGS if p.stem != "demo"], ids=lambda p: p.stem)
def test_paper_configs_use_the_reference_recipe(path):
    config = load(path).get_config()
    dataset, model = config.dataset.name, config.model.name
    trainval = path.stem.endswith("_trainval")  # the test-server fine-tune (FASTFCN.md 4.1, `--ft`)
    # mmsegmentation's design: its released weights (--from mmseg), evaluated or fine-tuned.
    mmseg = config.model.overrides.get("reference") == "mmseg"
    assert path.stem == f"{dataset}_{model}" + ("_trainval" if trainval else "") + ("_mmseg" if mmseg else "")
    if mmseg:  # evaluated as mmsegmentation tests, the protocol of its numbers
        assert config.train.requires_init_from and not config.init_from
        assert "--from mmseg" in load(path).__doc__ and config.evaluation.protocol == "mmseg"
    assert config.train.batch_size == 16
    assert not config.train.allow_random_init  # from ImageNet weights (init_from), as the paper
    assert config.train.momentum == 0.9 and config.train.weight_decay == 1e-4
    assert config.train.new_layers_lr_multiplier == 10 and config.train.poly_power == 0.9
    # The ADE20K R101 dilated baseline was trained at 640/576 (FASTFCN.md 4.1); everything else at 520/480.
    # Cityscapes: the official code's defaults (option.py; no paper result).
    sizes = (640, 576) if path.stem == "ade20k_encnet_dilated_r101" else (520, 480)
    sizes = (1024, 768) if dataset == "cityscapes" else sizes
    assert (config.dataset.base_size, config.dataset.crop_size) == sizes
    expected = {"pcontext": (0.001, 80), "ade20k": (0.01, 120), "cityscapes": (0.01, 240)}[dataset]
    if trainval:  # 20 more epochs at 0.001 on train + val, from the train-split run's weights
        expected = (0.001, 20)
        assert config.dataset.train_split == "train+validation" and config.train.eval_every == 0
        assert config.train.requires_init_from and not config.init_from
        assert f"--config.init_from=~/runs/{path.stem.removesuffix('_trainval')}" in load(path).__doc__
    assert (config.train.lr_per_16, config.train.epochs) == expected
    assert config.train.aux_weight == (0.2 if model.startswith("encnet") else 0.4)
    assert config.train.se_weight == (0.2 if model.startswith("encnet") else 0.0)
    # The docstring's evaluation command uses the protocol of the number it promises.
    doc = load(path).__doc__
    multi_scale = "multi-scale" in doc[: doc.index("Recipe")]
    scored = doc[re.search(r"with the protocol of (the expected|that user's) number", doc).start() :]
    assert f"--config configs/{path.name}" in scored
    # A test-server entry predicts the unlabelled test images in the server's encoding; the others evaluate.
    assert (
        ("--mode=predict" in scored and "--config.evaluation.submission_dir=" in scored)
        if trainval
        else ("--mode=eval" in scored)
    )
    assert ("--config.evaluation.protocol=multi_scale" in scored) == multi_scale


def test_impossible_values_are_rejected_by_key():
    config = load(CONFIGS[0]).get_config()
    config.train.momentum = 1.5
    config.train.batch_size = -2
    with pytest.raises(ValueError, match=r"config\.train\.momentum=1\.5.*\n.*config\.train\.batch_size=-2|batch_size"):
        validate(config)


def test_infinite_learning_rates_and_loss_weights_are_refused():
    # inf passes "> 0" and would train NaN weights from the first step.
    for key in ("lr_per_16", "weight_decay", "new_layers_lr_multiplier", "poly_power", "aux_weight", "se_weight"):
        config = load(CONFIGS[0]).get_config()
        config.train[key] = float("inf")
        with pytest.raises(ValueError, match=rf"config\.train\.{key}=inf: must be a finite number"):
            validate(config)


def test_microbatches_must_divide_the_batch():
    config = load(CONFIGS[0]).get_config()
    config.train.microbatches = 3
    with pytest.raises(ValueError, match=r"config\.train\.microbatches=3: must divide train\.batch_size=16"):
        validate(config)
    config.train.microbatches = 0
    with pytest.raises(ValueError, match=r"config\.train\.microbatches=0: must be positive"):
        validate(config)
    config.train.microbatches = 4
    validate(config)


def test_evaluation_and_export_values_are_checked_before_any_work():
    config = load(CONFIGS[0]).get_config()
    config.evaluation.max_examples = -1
    config.evaluation.stride_ratio = 0.0
    config.evaluation.flip = "yes_please"
    config.evaluation.scales = (1.0, -0.5)
    config.evaluation.batch_size = -2
    config.export.output = "probabilities"
    with pytest.raises(ValueError) as error:
        validate(config)
    for key in (
        "evaluation.max_examples=-1",
        "evaluation.stride_ratio=0.0",
        "evaluation.flip='yes_please'",
        "evaluation.scales=(1.0, -0.5)",
        "evaluation.batch_size=-2",
        "export.output='probabilities'",
    ):
        assert f"config.{key}" in str(error.value)


def test_an_mmseg_test_scale_is_two_positive_integers_for_the_mmseg_protocols_only():
    config = load(CONFIGS[0]).get_config()
    config.evaluation.test_scale = (2048, 512)
    with pytest.raises(ValueError, match=r"config\.evaluation\.test_scale=\(2048, 512\): only the mmseg protocols"):
        validate(config)  # single_scale: it would be ignored
    config.evaluation.protocol = "mmseg_multi_scale"
    validate(config)
    config.evaluation.test_scale = (2048, 0.5)
    with pytest.raises(
        ValueError, match=r"config\.evaluation\.test_scale=\(2048, 0.5\): must be two positive integers"
    ):
        validate(config)
    config.evaluation.test_scale = ()
    config.evaluation.pad_multiple = 32  # whole-image protocols only
    validate(config)
    config.evaluation.protocol = "multi_scale"
    with pytest.raises(ValueError, match=r"config\.evaluation\.pad_multiple=32: only the whole-image protocols"):
        validate(config)


def test_architecture_overrides_are_settable_and_unset_ones_stay_the_models():
    # config.model.overrides offers Segmenter's scalar architecture fields as typed placeholders, so that
    # --config.model.overrides.jpu_width=16 works from the command line; unset (None) ones are not passed on.
    config = load(next(path for path in CONFIGS if path.stem == "pcontext_encnet_jpu_r50")).get_config()
    assert set(model_overrides(config)) == {"dtype", "aux"}
    config.model.overrides.jpu_width = 16
    config.model.overrides.dropout = 0.0
    overrides = model_overrides(config)
    assert overrides["jpu_width"] == 16 and overrides["dropout"] == 0.0 and "head_width" not in overrides
    assert model_config(config.model.name, **overrides)["jpu_width"] == 16
    config.model.overrides.head_width = 0
    with pytest.raises(ValueError, match=r"config\.model\.overrides\.head_width=0: must be positive"):
        validate(config)


def test_model_ops_reach_the_model_and_bad_ones_name_the_key():
    config = load(CONFIGS[0]).get_config()
    config.model.ops = "depthwise=grouped, loss_logits=head"
    overrides = model_overrides(config)
    assert overrides["depthwise_implementation"] == "grouped" and overrides["loss_logits_implementation"] == "head"
    assert overrides["dtype"] == config.model.overrides.dtype
    for bad, message in (("depthwise=dense", "depthwise_implementation must be one of"), ("warp=on", "unknown op")):
        config.model.ops = bad
        with pytest.raises(ValueError, match=rf"config\.model\.ops='{bad}': .*{message}"):
            model_overrides(config)
    config.model.ops = "grouped"
    with pytest.raises(ValueError, match=r"config\.model\.ops='grouped': must be OP=CHOICE"):
        validate(config)


def test_load_config_gives_a_config_files_config_for_the_python_api(tmp_path):
    config = load_config(Path(__file__).parent.parent / "configs" / "pcontext_psp_jpu_r50.py")
    assert config.model.name == "psp_jpu_r50" and config.dataset.name == "pcontext" and config.train.aux_weight == 0.4
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ValueError, match="a config file is Python"):
        load_config(tmp_path / "config.json")
    with pytest.raises(FileNotFoundError, match="no config file"):
        load_config(tmp_path / "missing.py")
    (tmp_path / "empty.py").write_text("x = 1\n")
    with pytest.raises(ValueError, match="defines no get_config"):
        load_config(tmp_path / "empty.py")

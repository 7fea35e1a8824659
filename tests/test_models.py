"""Model structure: parameter counts of the official models, shapes, registry, train/eval, dtype policy."""

from __future__ import annotations

import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fastfcn_jax import optim, train
from fastfcn_jax.models import (
    INTERMEDIATE_NAMES,
    Segmenter,
    available_models,
    create_model,
    layers,
    model_config,
    model_from_config,
    op_choices,
)
from fastfcn_jax.models.resnet import ResNet
from tests.model_weights import assert_image_dependent, calibrated_variables


def count(tree) -> int:
    return sum(int(np.prod(leaf.shape)) for leaf in jax.tree_util.tree_leaves(tree))


def abstract_variables(model, size=(64, 64)):
    images = jnp.zeros((1, *size, 3), jnp.float32)
    return jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), images, train=False))


def abstract_outputs(model, variables, size):
    images = jax.ShapeDtypeStruct((1, *size, 3), jnp.float32)
    return jax.eval_shape(lambda v, x: model.apply(v, x, train=False, mutable=["intermediates"]), variables, images)


# Counted from the official PyTorch models (nclass=150, aux on, SE on for EncNet; parameters only,
# backbone without its unused ImageNet fc).
OFFICIAL_PARAMETER_COUNTS = {
    "encnet_jpu_r50": 47_511_522,
    "psp_jpu_r50": 68_916_460,
    "deeplab_jpu_r50": 61_929_708,
    "fcn_jpu_r50": 55_280_876,
    "encnet_dilated_r50": 36_164_578,
    "encnet_jpux_r50": 47_495_138,
    "encnet_jpu_r101": 66_503_650,
}


@pytest.mark.parametrize(("name", "expected"), sorted(OFFICIAL_PARAMETER_COUNTS.items()))
def test_parameter_count_equals_official_model(name, expected):
    variables = abstract_variables(create_model(name, 150))
    assert count(variables["params"]) == expected


def test_parameter_counts_of_parts_equal_official_modules():
    params = abstract_variables(create_model("encnet_jpu_r50", 150))["params"]
    assert count(params["backbone"]) == 23_631_808
    assert count(params["neck"]) == 19_735_552
    assert count(params["decode_head"]) == 1_745_804
    assert count(params["auxiliary_head"]) == 2_398_358
    r101 = abstract_variables(create_model("encnet_jpu_r101", 150))["params"]
    assert count(r101["backbone"]) == 42_623_936
    jpux = abstract_variables(create_model("encnet_jpux_r50", 150))["params"]
    assert count(jpux["neck"]) == 19_719_168


def test_batchnorm_running_statistics_count():
    variables = abstract_variables(create_model("encnet_jpu_r50", 150))
    assert count(variables["batch_stats"]) == 75_584


def test_standard_stem_backbone_matches_torchvision_resnet50_without_fc():
    # torchvision resnet50: 25,557,032 parameters, of which fc has 2048 * 1000 + 1000.
    params = abstract_variables(create_model("fcn_jpu_r50", 150, stem="standard"))["params"]
    assert count(params["backbone"]) == 25_557_032 - 2_049_000


def test_resnet152_stage_sizes():
    params = abstract_variables(create_model("fcn_dilated_r152", 21, aux=False))["params"]
    blocks = {k.split("_")[0]: 0 for k in params["backbone"] if k.startswith("layer")}
    for k in params["backbone"]:
        if k.startswith("layer"):
            blocks[k.split("_")[0]] += 1
    assert blocks == {"layer1": 3, "layer2": 8, "layer3": 36, "layer4": 3}


def test_shapes_at_512_for_encnet_jpu_r50():
    model = create_model("encnet_jpu_r50", 150)
    out, state = abstract_outputs(model, abstract_variables(model), (512, 512))
    inter = state["intermediates"]
    assert inter["c1"].shape == (1, 128, 128, 256)
    assert inter["c2"].shape == (1, 64, 64, 512)
    assert inter["c3"].shape == (1, 32, 32, 1024)
    assert inter["c4"].shape == (1, 16, 16, 2048)
    assert inter["jpu"].shape == (1, 64, 64, 2048)
    assert inter["head"].shape == (1, 64, 64, 150)
    assert inter["aux_head"].shape == (1, 32, 32, 150)
    assert inter["enc_x"].shape == (1, 64, 64, 512)
    assert inter["enc_e"].shape == (1, 32, 512)
    assert inter["enc_en"].shape == (1, 512)
    assert set(inter) == set(INTERMEDIATE_NAMES)
    assert out["logits"].shape == (1, 512, 512, 150)
    assert out["aux_logits"].shape == (1, 512, 512, 150)
    assert out["se_logits"].shape == (1, 150)


def test_shapes_on_odd_input_follow_pytorch_stride2_arithmetic():
    model = create_model("encnet_jpu_r50", 150)
    out, state = abstract_outputs(model, abstract_variables(model), (97, 131))
    inter = state["intermediates"]

    def down(n):  # floor((n + 2 - 3) / 2) + 1
        return (n - 1) // 2 + 1

    h, w = down(down(97)), down(down(131))  # stem conv and max-pool
    assert inter["c1"].shape[1:3] == (h, w)
    for name in ("c2", "c3", "c4"):
        h, w = down(h), down(w)
        assert inter[name].shape[1:3] == (h, w)
    assert inter["c2"].shape[1:3] == (13, 17)
    assert inter["c3"].shape[1:3] == (7, 9)
    assert inter["c4"].shape[1:3] == (4, 5)
    assert inter["jpu"].shape[1:3] == (13, 17)
    assert out["logits"].shape == (1, 97, 131, 150)


@pytest.mark.parametrize(("output_stride", "c3_stride", "c4_stride"), [(8, 8, 8), (16, 16, 16), (32, 16, 32)])
def test_dilated_backbone_output_strides(output_stride, c3_stride, c4_stride):
    model = create_model("encnet_dilated_r50", 59, output_stride=output_stride)
    _, state = abstract_outputs(model, abstract_variables(model), (256, 256))
    inter = state["intermediates"]
    assert inter["c2"].shape[1] == 256 // 8
    assert inter["c3"].shape[1] == 256 // c3_stride
    assert inter["c4"].shape[1] == 256 // c4_stride


def test_registry_names():
    names = available_models()
    assert len(names) == 4 * 3 * 4
    for head in ("encnet", "psp", "deeplab", "fcn"):
        for neck in ("jpu", "jpux", "dilated"):
            for size in ("r50", "r101", "r152", "tiny"):
                assert f"{head}_{neck}_{size}" in names


@pytest.mark.parametrize(
    ("name", "overrides", "message"),
    [
        ("encnet_jpu_r34", {}, "unknown model"),
        ("unet_jpu_r50", {}, "unknown model"),
        ("encnet_jpu_r50", {"jpu_widht": 256}, "jpu_widht"),
        ("encnet_jpu_r50", {"output_stride": 8}, "output_stride"),
        ("encnet_dilated_r50", {"output_stride": 4}, "output_stride"),
        ("psp_jpu_r50", {"se_loss": True}, "se_loss"),
        ("encnet_jpu_r50", {"dtype": "float8"}, "dtype"),
        ("encnet_jpu_r50", {"stem": "wide"}, "stem"),
        ("encnet_jpux_r50", {"jpu_width": 96}, "jpux_groups"),
        ("encnet_jpu_r50", {"neck": "dilated"}, "fixed by the model name"),
        ("encnet_jpu_tiny", {"depth": 101}, "fixed by the model name"),
        ("encnet_jpu_tiny", {"aux": "no"}, "aux must be True or False"),
        ("psp_jpu_tiny", {"psp_bins": ()}, "psp_bins must be positive integers"),
        ("deeplab_jpu_tiny", {"aspp_rates": (12, 0)}, "aspp_rates must be positive integers"),
        ("fcn_jpu_tiny", {"jpu_dilations": ()}, "jpu_dilations must be positive integers"),
        ("encnet_jpu_tiny", {"psp_bins": (1, 2)}, r"psp_bins is an option of the psp head: it would change nothing"),
        ("psp_dilated_r50", {"jpu_width": 256}, r"jpu_width is an option of the jpu and jpux necks.*neck is dilated"),
        ("fcn_jpu_r50", {"jpux_groups": 16}, r"jpux_groups is an option of the jpux neck"),
        ("psp_jpu_tiny", {"head_width": 64}, r"head_width is an option of the encnet head"),
        ("fcn_jpu_tiny", {"depthwise_implementation": "bogus"}, "depthwise_implementation must be one of"),
        ("encnet_jpu_custom", {}, r"has another backbone, named by backbone='module:Name'.*overrides.backbone"),
        (
            "encnet_jpu_r50",
            {"backbone": "a:B"},
            "names its ResNet backbone; for another one name the model encnet_jpu_custom",
        ),
        ("psp_jpu_custom", {"backbone": "nowhere_module:Net"}, "cannot import nowhere_module; is it on PYTHONPATH"),
        ("psp_jpu_custom", {"backbone": "tests.needs_a_missing_package:Net"}, "importing .* failed: No module named"),
        ("psp_jpu_custom", {"backbone": "tests.test_models:PatchBackbone", "depth": 101}, r"\['depth'\] configure the"),
        ("psp_jpu_custom", {"backbone": "tests.test_models:Nope"}, "tests.test_models has no Nope"),
        ("psp_jpu_custom", {"backbone": "tests.test_models"}, "expected 'module.path:Name'"),
        ("psp_jpu_custom", {"backbone": "tests.test_models:TINY_MODELS"}, "gives a list, not a Flax module"),
        ("psp_jpu_custom", {"backbone": "tests.test_models:PatchBackbone", "stem": "deep"}, "configure the ResNet"),
    ],
)
def test_invalid_model_requests_raise_errors_naming_the_problem(name, overrides, message):
    with pytest.raises(ValueError, match=message):
        create_model(name, 150, **overrides)


@pytest.mark.parametrize("num_classes", [0, 2.7, "5", True])
def test_the_class_count_must_be_a_positive_integer(num_classes):
    with pytest.raises(ValueError, match="num_classes must be a positive integer"):
        create_model("fcn_jpu_tiny", num_classes)


def test_model_from_config_mapping():
    model = model_from_config({"name": "psp_jpu_tiny", "num_classes": 5, "overrides": {"aux": False}})
    assert model.head == "psp" and model.num_classes == 5 and not model.aux
    with pytest.raises(ValueError, match="unknown model config key"):
        model_from_config({"name": "psp_jpu_tiny", "num_classes": 5, "classes": 3})
    # Op choices come as the command line writes them (config.model.ops).
    model = model_from_config({"name": "psp_jpu_tiny", "num_classes": 5, "ops": "depthwise=grouped"})
    assert model.ops.depthwise == "grouped" and model.aux
    with pytest.raises(ValueError, match="ops='depthwise=dense': depthwise_implementation must be one of"):
        model_from_config({"name": "psp_jpu_tiny", "num_classes": 5, "ops": "depthwise=dense"})


TINY_MODELS = [f"{h}_{n}_tiny" for h in ("encnet", "psp", "deeplab", "fcn") for n in ("jpu", "jpux", "dilated")]


@pytest.mark.parametrize("name", TINY_MODELS)
def test_tiny_model_trains_and_evaluates(name):
    model = create_model(name, 5)
    images = jax.random.normal(jax.random.PRNGKey(0), (2, 48, 40, 3))
    variables = jax.jit(lambda x: model.init(jax.random.PRNGKey(1), x, train=False))(images)
    assert set(variables) == {"params", "batch_stats"}

    eval_out = jax.jit(lambda v, x: model.apply(v, x, train=False))(variables, images)
    assert eval_out["logits"].shape == (2, 48, 40, 5)
    assert eval_out["aux_logits"].shape == (2, 48, 40, 5)
    assert ("se_logits" in eval_out) == name.startswith("encnet")
    assert all(bool(jnp.all(jnp.isfinite(v))) for v in jax.tree_util.tree_leaves(eval_out))

    @jax.jit
    def train_apply(v, x, key):
        return model.apply(v, x, train=True, mutable=["batch_stats"], rngs={"dropout": key})

    out_a, new_state = train_apply(variables, images, jax.random.PRNGKey(2))
    assert out_a["aux_logits"].shape == (2, 48, 40, 5)
    out_b, _ = train_apply(variables, images, jax.random.PRNGKey(2))
    out_c, _ = train_apply(variables, images, jax.random.PRNGKey(3))
    # Training uses batch statistics and moves the running ones.
    old, new = variables["batch_stats"], new_state["batch_stats"]
    moved = jax.tree_util.tree_map(lambda a, b: bool(jnp.any(a != b)), old, new)
    assert all(jax.tree_util.tree_leaves(moved))
    # Dropout follows the 'dropout' rng and nothing else.
    np.testing.assert_array_equal(out_a["logits"], out_b["logits"])
    assert not np.allclose(out_a["logits"], out_c["logits"])
    assert not np.allclose(out_a["aux_logits"], out_c["aux_logits"])
    # Evaluation ignores the dropout rng: dropout is inactive.
    again = jax.jit(lambda v, x: model.apply(v, x, train=False, rngs={"dropout": jax.random.PRNGKey(9)}))(
        variables, images
    )
    np.testing.assert_array_equal(eval_out["logits"], again["logits"])
    np.testing.assert_array_equal(eval_out["aux_logits"], again["aux_logits"])


def test_auto_dtype_computes_in_bfloat16_on_accelerators_and_float32_on_cpus():
    assert create_model("fcn_jpu_tiny", 5, dtype="auto").dtype == jnp.float32  # this machine: a CPU
    for name, expected in (("gpu", jnp.bfloat16), ("tpu", jnp.bfloat16), ("cpu", jnp.float32)):
        with op_choices.target_backend(name):
            assert create_model("fcn_jpu_tiny", 5, dtype="auto").dtype == expected, name


def test_bfloat16_compute_keeps_params_stats_and_logits_float32_and_close_to_float32():
    images = jax.random.normal(jax.random.PRNGKey(0), (2, 64, 64, 3))
    f32 = create_model("encnet_jpu_tiny", 5)
    bf16 = create_model("encnet_jpu_tiny", 5, dtype="bfloat16")
    bf16_variables = jax.jit(lambda x: bf16.init(jax.random.PRNGKey(1), x, train=False))(images)
    for leaf in jax.tree_util.tree_leaves(bf16_variables):
        assert leaf.dtype == jnp.float32
    variables = calibrated_variables(f32, 64, seed=1)  # logits that depend on the image (tests/model_weights.py)
    ref = jax.jit(lambda v, x: f32.apply(v, x, train=False))(variables, images)
    assert_image_dependent(ref["logits"])
    out = jax.jit(lambda v, x: bf16.apply(v, x, train=False))(variables, images)
    _, state = jax.jit(
        lambda v, x: bf16.apply(v, x, train=True, mutable=["batch_stats"], rngs={"dropout": jax.random.PRNGKey(0)})
    )(variables, images)
    for leaf in jax.tree_util.tree_leaves(state):
        assert leaf.dtype == jnp.float32
    for key in ("logits", "aux_logits", "se_logits"):
        assert out[key].dtype == jnp.float32
        # bfloat16 keeps 8 bits of mantissa (relative step 2^-8 = 0.4%); through about twenty layers, each
        # normalised by BatchNorm, the error grows to a few percent of the output's spread on average (measured
        # 1.8-6.6%, the SE logits being only ten numbers; at most 27% at some pixel).
        error = np.abs(np.asarray(out[key]) - np.asarray(ref[key])) / np.std(np.asarray(ref[key]))
        assert error.mean() < 0.1 and error.max() < 0.5, (key, error.mean(), error.max())
    agreement = np.mean(np.argmax(out["logits"], -1) == np.argmax(ref["logits"], -1))
    assert agreement > 0.95, agreement  # measured 98.6% of the pixels


def test_models_import_without_tensorflow():
    code = "import sys, fastfcn_jax.models, fastfcn_jax.convert; assert 'tensorflow' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def record_calls(model, images, module_type, train):
    """(module path, module) of every ``module_type`` call during one apply."""
    calls = []

    def interceptor(next_fun, args, kwargs, context):
        if isinstance(context.module, module_type) and context.method_name == "__call__":
            calls.append(("/".join(context.module.path), context.module))
        return next_fun(*args, **kwargs)

    variables = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), images, train=False))
    with nn.intercept_methods(interceptor):
        jax.eval_shape(
            lambda v: model.apply(
                v, images, train=train, mutable=["batch_stats"], rngs={"dropout": jax.random.PRNGKey(0)}
            ),
            variables,
        )
    return calls


# The reference's Dropout2d layers (FastFCN encoding/models/*.py): rate per module, nothing elsewhere.
REFERENCE_DROPOUT = {
    "encnet": {"decode_head/classifier/Dropout_0": 0.1},
    "psp": {"decode_head/classifier/Dropout_0": 0.1},
    "fcn": {"decode_head/classifier/Dropout_0": 0.1},
    "deeplab": {"decode_head/Dropout_0": 0.5, "decode_head/classifier/Dropout_0": 0.1},
}


@pytest.mark.parametrize("head", sorted(REFERENCE_DROPOUT))
def test_channel_dropout_sits_where_the_reference_has_it(head):
    model = create_model(f"{head}_jpu_tiny", 5)
    calls = record_calls(model, jnp.zeros((1, 48, 48, 3)), nn.Dropout, train=True)
    got = {path: module.rate for path, module in calls}
    want = {**REFERENCE_DROPOUT[head], "auxiliary_head/classifier/Dropout_0": 0.1}
    assert got == want
    assert all(tuple(module.broadcast_dims) == (1, 2) for _, module in calls)  # Dropout2d: whole channels


# (layer, block) -> dilation of the bottleneck's 3x3 conv, from the reference's _make_layer.
REFERENCE_DILATIONS = {
    32: {"layer3": [1, 1, 1, 1, 1, 1], "layer4": [1, 1, 1]},
    16: {"layer3": [1, 1, 1, 1, 1, 1], "layer4": [1, 2, 2]},
    8: {"layer3": [1, 2, 2, 2, 2, 2], "layer4": [2, 4, 4]},
}
REFERENCE_STRIDES = {32: (2, 2), 16: (2, 1), 8: (1, 1)}


@pytest.mark.parametrize("output_stride", sorted(REFERENCE_DILATIONS))
def test_dilation_schedule_follows_the_reference(output_stride):
    model = create_model("fcn_dilated_r50", 5, output_stride=output_stride, aux=False)
    calls = record_calls(model, jnp.zeros((1, 64, 64, 3)), layers.Conv2D, train=False)
    conv2 = {path: module for path, module in calls if path.endswith("/conv2/conv")}
    for stage, stride in zip(("layer3", "layer4"), REFERENCE_STRIDES[output_stride], strict=True):
        blocks = sorted(
            (p for p in conv2 if f"/{stage}_" in p), key=lambda p: int(p.split(f"{stage}_")[1].split("/")[0])
        )
        assert [conv2[p].dilation for p in blocks] == REFERENCE_DILATIONS[output_stride][stage]
        assert conv2[blocks[0]].stride == stride


class PatchBackbone(nn.Module):
    """A ConvNeXt-shaped stand-in: a stride-4 patch embedding, then stride-2 stages, LayerNorm, no BatchNorm."""

    widths: tuple[int, ...] = (12, 24, 48, 96)

    @nn.compact
    def __call__(self, images, train=False):
        features, x = [], images
        for index, width in enumerate(self.widths):
            stride = 4 if index == 0 else 2
            x = nn.Conv(width, (stride, stride), strides=stride, padding="SAME", name=f"downsample{index}")(x)
            x = nn.gelu(nn.LayerNorm(name=f"norm{index}")(x))
            x = x + nn.Conv(width, (3, 3), feature_group_count=width, padding="SAME", name=f"mix{index}")(x)
            features.append(x)
        return tuple(features)


def own_backbone_model(backbone, **fields):
    """A tiny EncNet+JPU Segmenter on ``backbone``: the registry's tiny widths without its ResNet fields."""
    config = model_config("encnet_jpu_tiny")
    for key in ("stage_sizes", "stem_width", "base_width", "depth"):
        config.pop(key, None)
    return Segmenter(num_classes=5, **{**config, **fields}, backbone=backbone)


def test_own_backbone_given_the_resnet_is_the_registered_model():
    reference = create_model("encnet_jpu_tiny", 5)
    resnet = ResNet(stage_sizes=(1, 1, 1, 1), stem_width=8, base_width=8, output_stride=32)
    model = own_backbone_model(resnet)
    images = jax.random.normal(jax.random.PRNGKey(0), (2, 64, 48, 3))
    expected = reference.init(jax.random.PRNGKey(1), images)
    variables = model.init(jax.random.PRNGKey(1), images)
    # The same parameter names and values: the module passed in takes the ResNet's place under 'backbone'.
    assert jax.tree_util.tree_structure(variables) == jax.tree_util.tree_structure(expected)
    jax.tree_util.tree_map(np.testing.assert_array_equal, variables, expected)
    out, ref = model.apply(variables, images), reference.apply(expected, images)
    for key in ("logits", "aux_logits", "se_logits"):
        np.testing.assert_array_equal(out[key], ref[key])


def test_the_jpu_and_heads_train_on_another_backbone():
    model = own_backbone_model(PatchBackbone())
    images = jax.random.normal(jax.random.PRNGKey(0), (2, 70, 54, 3))  # strides 4..32 round up
    labels = jax.random.randint(jax.random.PRNGKey(1), (2, 70, 54), -1, 5)
    variables = model.init(jax.random.PRNGKey(2), images)
    assert set(variables["params"]["backbone"]) == {f"{k}{i}" for k in ("downsample", "norm", "mix") for i in range(4)}
    out, state = model.apply(variables, images, mutable=["intermediates"])
    assert out["logits"].shape == out["aux_logits"].shape == (2, 70, 54, 5)
    sizes = {name: state["intermediates"][name].shape for name in ("c1", "c2", "c3", "c4", "jpu", "aux_head")}
    assert sizes == {
        "c1": (2, 18, 14, 12),
        "c2": (2, 9, 7, 24),
        "c3": (2, 5, 4, 48),
        "c4": (2, 3, 2, 96),
        "jpu": (2, 9, 7, 4 * 16),  # at c2's size, four branches of jpu_width
        "aux_head": (2, 5, 4, 5),  # the auxiliary head reads c3
    }
    groups = optim.parameter_groups(variables["params"])
    assert set(jax.tree_util.tree_leaves(groups["backbone"])) == {optim.BACKBONE_GROUP}
    assert optim.BACKBONE_GROUP not in jax.tree_util.tree_leaves({k: v for k, v in groups.items() if k != "backbone"})

    optimizer = optim.make_optimizer(lambda step: 0.01)
    state = train.TrainState(
        step=jnp.zeros((), jnp.int32),
        params=variables["params"],
        batch_stats=variables["batch_stats"],
        opt_state=optimizer.init(variables["params"]),
    )
    step = jax.jit(train.make_train_step(model, optimizer, aux_weight=0.2, se_weight=0.2))
    new_state, metrics = step(state, {"image": images, "label": labels}, jax.random.PRNGKey(3))
    assert np.isfinite(float(metrics["loss"]))
    # The loss reaches every parameter of the backbone, and the neck's and heads' BatchNorms still train.
    changed = jax.tree_util.tree_map(lambda a, b: bool(jnp.any(a != b)), state.params, new_state.params)
    assert all(jax.tree_util.tree_leaves(changed["backbone"]))
    moved = jax.tree_util.tree_map(lambda a, b: bool(jnp.any(a != b)), state.batch_stats, new_state.batch_stats)
    assert all(jax.tree_util.tree_leaves(moved))


class PreNormBackbone(nn.Module):
    """Stages of BatchNorm -> ReLU -> conv (submodules named 'bn' and 'conv', as this package names its own)."""

    @nn.compact
    def __call__(self, images, train=False):
        features, x = [], images
        for index, width in enumerate((8, 16, 24, 32)):
            stride = 4 if index == 0 else 2
            x = nn.BatchNorm(use_running_average=not train, name=f"bn{index}")(x)
            x = StageConv(width, stride, name=f"stage{index}")(nn.relu(x), train)
            features.append(x)
        return features


class StageConv(nn.Module):
    width: int
    stride: int

    @nn.compact
    def __call__(self, x, train):
        x = nn.BatchNorm(use_running_average=not train, name="bn")(x)
        return nn.Conv(self.width, (3, 3), strides=self.stride, padding=1, use_bias=False, name="conv")(nn.relu(x))


class NoTrainFlag(nn.Module):
    """ConvNeXt-style: ``__call__(images)`` only."""

    @nn.compact
    def __call__(self, images):
        return PatchBackbone(name="inner")(images)


class StridedBackbone(nn.Module):
    strides: tuple = (4, 8, 16, 32)

    @nn.compact
    def __call__(self, images, train=False):
        batch, height, width, _ = images.shape
        return [jnp.zeros((batch, -(-height // s), -(-width // s), 4)) for s in self.strides]


PATCHES = PatchBackbone()  # a module-level instance, named by an import path


def test_another_backbone_is_read_at_the_strides_its_neck_expects():
    images = jnp.zeros((1, 70, 54, 3))
    for neck, strides, ok in [
        ("jpu", (4, 8, 16, 32), True),
        ("jpu", (8, 16, 32, 64), False),  # one stage too many: the JPU would run at stride 16
        ("jpux", (4, 8, 8, 8), False),
        ("dilated", (4, 8, 8, 8), True),
        ("dilated", (4, 8, 16, 32), False),  # the head would read stride 32
    ]:
        model = own_backbone_model(StridedBackbone(strides), neck=neck)
        if ok:
            jax.eval_shape(lambda x, m=model: m.init(jax.random.PRNGKey(0), x), images)
            continue
        with pytest.raises(ValueError, match=rf"the {neck} neck reads c1..c4 at strides .*\(NHWC"):
            jax.eval_shape(lambda x, m=model: m.init(jax.random.PRNGKey(0), x), images)


def test_a_backbone_without_a_training_flag_a_module_instance_and_a_class_given_by_mistake():
    images = jnp.zeros((1, 64, 64, 3))
    variables = own_backbone_model(NoTrainFlag()).init(jax.random.PRNGKey(0), images)
    assert "inner" in variables["params"]["backbone"]
    model = create_model("fcn_jpu_custom", 5, backbone="tests.test_models:PATCHES", jpu_width=16)
    assert "downsample0" in jax.eval_shape(lambda x: model.init(jax.random.PRNGKey(0), x), images)["params"]["backbone"]
    with pytest.raises(
        ValueError, match=r"backbone must be a Flax module \(an instance\), got a class: pass an instance"
    ):
        own_backbone_model(PatchBackbone).init(jax.random.PRNGKey(0), images)


class ListBackbone(nn.Module):
    features: tuple

    @nn.compact
    def __call__(self, images, train=False):
        batch = images.shape[0]
        return [jnp.zeros((batch, h, w, 4)) for h, w in self.features]


@pytest.mark.parametrize(
    ("backbone", "fields", "message"),
    [
        (ListBackbone(((8, 8), (4, 4), (2, 2))), {}, r"must return the four stage outputs .* got list of 3"),
        (
            ListBackbone(((16, 16), (2, 2), (4, 4), (8, 8))),
            {},
            r"at strides .* got \[\(16, 16\), \(2, 2\), \(4, 4\), \(8, 8\)\]",
        ),
        (PatchBackbone(), {"depth": 101}, r"\['depth'\] configure the ResNet backbone, which backbone PatchBackbone"),
        (PatchBackbone(), {"stem": "standard"}, r"\['stem'\] configure the ResNet"),
    ],
)
def test_another_backbone_that_breaks_the_contract_is_refused_naming_it(backbone, fields, message):
    with pytest.raises(ValueError, match=message):
        own_backbone_model(backbone, **fields).init(jax.random.PRNGKey(0), jnp.zeros((1, 64, 64, 3)))


def test_a_custom_model_takes_its_backbone_by_import_path_or_as_a_module():
    by_path = create_model("encnet_jpu_custom", 5, backbone="tests.test_models:PatchBackbone", jpu_width=16)
    given = create_model("encnet_jpu_custom", 5, backbone=PatchBackbone(), jpu_width=16)
    images = jnp.zeros((1, 64, 64, 3))
    shapes = [jax.eval_shape(lambda x, m=m: m.init(jax.random.PRNGKey(0), x), images) for m in (by_path, given)]
    assert shapes[0] == shapes[1] and "downsample0" in shapes[0]["params"]["backbone"]
    assert by_path.jpu_width == 16 and by_path.head_width == 512  # the neck and heads at the paper's widths
    with pytest.raises(ValueError, match=r"names its ResNet backbone"):
        create_model("encnet_jpu_tiny", 5, backbone=PatchBackbone())

"""Parity with the official PyTorch FastFCN (master 126661b) and mmsegmentation 1.2.2 on synthetic weights.

The fixtures (copied from shared/parity; parity_mmseg made by its make_fixtures.py) hold the original model's
outputs for weights that ``synthetic_weights.py`` rebuilds from each key list; every array is compared with
``max|out - ref| / std(ref) < 1e-4`` (the official model's own float32 noise is about 1e-5).
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from fastfcn_jax.convert import ConversionError, convert_state_dict, convert_with_report
from fastfcn_jax.convert.parity import FIXTURE_FOLDERS, PARITY_FIXTURES, TOLERANCE, parity_errors
from fastfcn_jax.convert.parity import official_state_dict as _official_state_dict
from tests.conftest import FIXTURES

PARITY = FIXTURES / "parity"


def official_state_dict(fixture: str) -> dict[str, np.ndarray]:
    return _official_state_dict(PARITY, fixture)


# The default fast paths for every fixture; the alternative implementations of resize, 1x1 conv,
# depthwise conv, the separable conv's fusion and the JPU's padded input (see fastfcn_jax/models/op_choices.py)
# on the two fixtures that exercise them.
ALTERNATIVE_OPS = {
    "resize_implementation": "matmul",
    "pointwise_implementation": "conv",
    "depthwise_implementation": "grouped",
    "separable_implementation": "split",
    "jpu_input_implementation": "padded",
    "resized_implementation": "upsampled",
}
CASES = [(fixture, {}) for fixture in sorted(PARITY_FIXTURES)] + [
    ("psp_jpu_r50_pcontext", ALTERNATIVE_OPS),
    ("encnet_jpux_r50_pcontext", ALTERNATIVE_OPS),
    ("psp_jpu_r50_mmseg", ALTERNATIVE_OPS),  # half-pixel resizing as matrices, PSP's levels upsampled
]


@pytest.mark.parametrize(("fixture", "ops"), CASES, ids=[f + ("-alt_ops" if o else "") for f, o in CASES])
def test_outputs_match_original_model(fixture, ops):
    source = PARITY_FIXTURES[fixture][2]
    errors, report = parity_errors(FIXTURES / FIXTURE_FOLDERS[source], fixture, **ops)
    # Every tensor of the original model was used; only the official ImageNet classifier was dropped.
    assert not report.unexpected and not report.initialized
    assert sorted(report.dropped) == (["pretrained.fc.bias", "pretrained.fc.weight"] if source == "official" else [])
    assert {"logits", "aux_logits", "head", "aux_head", "c1", "c2", "c3", "c4"} <= set(errors)
    if fixture.startswith("encnet"):
        assert {"se_logits", "enc_x", "enc_e", "enc_en"} <= set(errors)
    bad = {name: f"{error:.2e}" for name, error in errors.items() if not error < TOLERANCE}
    assert not bad, f"{fixture}: max|out - ref| / std(ref) above {TOLERANCE}: {bad}"


def test_encoding_layer_alone_matches_official_enc_e():
    from fastfcn_jax.models.heads import Encoding

    reference = np.load(PARITY / "encnet_jpu_r50_ade.npz")
    state_dict = official_state_dict("encnet_jpu_r50_ade")
    params = {
        "codewords": state_dict["head.encmodule.encoding.3.codewords"],
        "scale": state_dict["head.encmodule.encoding.3.scale"],
    }
    enc_x = jnp.asarray(reference["enc_x"].transpose(0, 2, 3, 1))
    out = np.asarray(Encoding(32).apply({"params": params}, enc_x))
    ref = reference["enc_e"]
    assert float(np.max(np.abs(out - ref)) / np.std(ref)) < TOLERANCE


def test_missing_key_is_an_error_naming_it():
    state_dict = official_state_dict("fcn_jpu_r50_pcontext")
    del state_dict["jpu.conv4.0.weight"]
    with pytest.raises(ConversionError, match=r"jpu\.conv4\.0\.weight"):
        convert_state_dict(state_dict, "fcn_jpu_r50", 59)


def test_shape_mismatch_names_key_and_both_shapes():
    state_dict = official_state_dict("fcn_jpu_r50_pcontext")
    with pytest.raises(ConversionError, match=r"head\.conv5\.4\.weight.*\(59, 512, 1, 1\).*\(1, 1, 512, 150\)"):
        convert_state_dict(state_dict, "fcn_jpu_r50", 150)


def test_unexpected_key_is_an_error_unless_allowed():
    state_dict = official_state_dict("fcn_jpu_r50_pcontext")
    state_dict["head.extra.weight"] = np.zeros((3,), np.float32)
    with pytest.raises(ConversionError, match=r"head\.extra\.weight"):
        convert_state_dict(state_dict, "fcn_jpu_r50", 59)
    _, report = convert_with_report(state_dict, "fcn_jpu_r50", 59, allow_unexpected=True)
    assert report.unexpected == ["head.extra.weight"]


def test_reinit_classifier_for_another_class_count_reports_what_it_reinitialised():
    state_dict = official_state_dict("encnet_jpu_r50_ade")
    variables, report = convert_with_report(state_dict, "encnet_jpu_r50", 59, reinit_classifier=True)
    assert sorted(report.initialized) == [
        "params/auxiliary_head/classifier/conv/bias",
        "params/auxiliary_head/classifier/conv/kernel",
        "params/decode_head/classifier/conv/bias",
        "params/decode_head/classifier/conv/kernel",
        "params/decode_head/se_classifier/bias",
        "params/decode_head/se_classifier/kernel",
    ]
    assert variables["params"]["decode_head"]["classifier"]["conv"]["kernel"].shape == (1, 1, 512, 59)
    assert "head.conv6.1.weight" in report.dropped and "head.encmodule.selayer.bias" in report.dropped
    np.testing.assert_array_equal(
        variables["params"]["neck"]["conv5"]["conv"]["kernel"],
        state_dict["jpu.conv5.0.weight"].transpose(2, 3, 1, 0),
    )


def test_backbone_only_source_initialises_neck_and_heads():
    state_dict = {
        key[len("pretrained.") :]: value
        for key, value in official_state_dict("fcn_jpu_r50_pcontext").items()
        if key.startswith("pretrained.")
    }
    variables, report = convert_with_report(state_dict, "encnet_jpu_r50", 150, source="resnet_s")
    assert all(not name.startswith(("params/backbone", "batch_stats/backbone")) for name in report.initialized)
    assert any(name.startswith("params/neck") for name in report.initialized)
    assert all(name.startswith(("params/backbone", "batch_stats/backbone")) for name in report.filled)
    np.testing.assert_array_equal(
        variables["batch_stats"]["backbone"]["stem3"]["bn"]["var"], state_dict["bn1.running_var"]
    )


def test_mmseg_protocol_matches_mmsegmentations_own_test():
    """mmsegmentation 1.2.2's test of one image (``parity_mmseg/mmseg_protocol.npz``, its make_fixtures.py): its
    keep-ratio Resize, whole inference, logits resized back to the image, and the softmax mean over ratios and
    flips (SegTTAModel.merge_preds), against the ``mmseg`` protocols on the converted weights."""
    import dataclasses

    import jax

    from fastfcn_jax import evaluate
    from fastfcn_jax.models import create_model

    folder = FIXTURES / FIXTURE_FOLDERS["mmseg"]
    reference = np.load(folder / "mmseg_protocol.npz")
    image, test_scale = reference["image"], tuple(int(side) for side in reference["test_scale"])
    ratios, flips = tuple(float(r) for r in reference["ratios"][::2]), reference["flips"]
    variables, _ = convert_with_report(_official_state_dict(folder, "psp_jpu_r50_mmseg"), "psp_jpu_r50", 19, "mmseg")
    model = create_model("psp_jpu_r50", 19, reference="mmseg")

    def protocol(name, **options):
        made = evaluate.make_protocol(name, base_size=520, crop_size=480, test_scale=test_scale, **options)
        return dataclasses.replace(made, align_corners=model.align_corners)

    # mmseg's resized inputs (OpenCV on uint8) have the protocol's sizes and, but for its rounding, its pixels.
    multi = protocol("mmseg_multi_scale", scales=ratios)
    inputs = {}  # network input shape -> mmseg's [plain, flipped] images, normalised
    for i, (ratio, flip) in enumerate(zip(reference["ratios"], flips, strict=True)):
        mmseg_input = reference[f"input_{i}"]
        assert mmseg_input.shape[:2] == multi.scaled_size(*image.shape[:2], ratio)
        ours = evaluate.resize_image(image.astype(np.float32), *mmseg_input.shape[:2], align_corners=False)
        assert np.abs((ours[:, ::-1] if flip else ours) - mmseg_input).max() < 1  # OpenCV rounds to uint8
        inputs.setdefault(mmseg_input.shape[:2], []).append(evaluate.normalize(mmseg_input))

    def with_mmsegs_inputs(variables, images):  # the runner's own resizing replaced by OpenCV's
        plain, flipped = inputs[images.shape[1:3]]
        substitute = jnp.asarray(np.stack([plain, flipped][: images.shape[0]]))  # the network sees both as fed
        return evaluate.model_logits_fn(model)(variables, images * 0 + substitute)

    def run(logits_fn, protocol):
        with jax.default_matmul_precision("highest"):
            runner = evaluate.ProtocolRunner(logits_fn, variables, 19, protocol)
            (result,) = runner.run([evaluate.normalize(image)], with_scores=True)
        return result

    expected = reference["tta_probabilities"]
    spread = expected.std()
    exact = run(with_mmsegs_inputs, multi)  # the network, the resizing back and the merge: float32 rounding
    assert np.abs(exact["scores"] - expected).max() / spread < TOLERANCE
    np.testing.assert_array_equal(exact["prediction"], reference["tta_prediction"])
    whole = run(evaluate.model_logits_fn(model), multi)  # and this library's resizing of the image
    assert np.abs(whole["scores"] - expected).max() / spread < 1e-2
    assert (whole["prediction"] == reference["tta_prediction"]).mean() > 0.99
    single = run(with_mmsegs_inputs, protocol("mmseg"))  # mmseg's plain test: one pass, logits resized back
    logits = reference["single_logits"]
    probabilities = np.exp(logits - logits.max(-1, keepdims=True))
    probabilities /= probabilities.sum(-1, keepdims=True)
    assert np.abs(single["scores"] - probabilities).max() / probabilities.std() < TOLERANCE
    np.testing.assert_array_equal(single["prediction"], reference["single_prediction"])

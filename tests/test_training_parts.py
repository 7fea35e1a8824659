"""Loss, optimiser, schedule and metrics against hand computations of the reference's formulas."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fastfcn_jax import losses, metrics, optim


def test_cross_entropy_ignores_minus_one_and_averages_over_labelled_pixels():
    rng = np.random.default_rng(0)
    logits = rng.standard_normal((2, 3, 4, 5)).astype(np.float32)
    labels = rng.integers(-1, 5, (2, 3, 4))
    got = float(losses.cross_entropy(jnp.asarray(logits), jnp.asarray(labels)))
    log_probs = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    picked = [-log_probs[b, i, j, labels[b, i, j]] for b, i, j in zip(*np.nonzero(labels >= 0), strict=True)]
    assert got == pytest.approx(np.mean(picked), rel=1e-5)
    assert float(losses.cross_entropy(jnp.asarray(logits), -jnp.ones((2, 3, 4), jnp.int32))) == 0.0


def test_se_loss_targets_and_bce_follow_the_reference():
    labels = jnp.asarray([[[0, 2], [-1, 2]], [[-1, -1], [3, 3]]])
    presence = np.asarray(losses.class_presence(labels, 4))
    np.testing.assert_array_equal(presence, [[1, 0, 1, 0], [0, 0, 0, 1]])
    logits = np.array([[0.3, -1.2, 2.0, 0.0], [1.0, -0.5, 0.1, 4.0]], np.float32)
    probs = 1 / (1 + np.exp(-logits))
    want = -np.mean(presence * np.log(probs) + (1 - presence) * np.log(1 - probs))
    got = float(losses.binary_cross_entropy_with_logits(jnp.asarray(logits), jnp.asarray(presence)))
    assert got == pytest.approx(want, rel=1e-5)


def test_total_loss_weights_aux_and_se_terms():
    rng = np.random.default_rng(1)
    outputs = {
        "logits": jnp.asarray(rng.standard_normal((1, 2, 2, 3)), jnp.float32),
        "aux_logits": jnp.asarray(rng.standard_normal((1, 2, 2, 3)), jnp.float32),
        "se_logits": jnp.asarray(rng.standard_normal((1, 3)), jnp.float32),
    }
    labels = jnp.asarray([[[0, 1], [2, -1]]])
    total, terms = losses.segmentation_loss(outputs, labels, aux_weight=0.2, se_weight=0.2)
    assert float(total) == pytest.approx(float(terms["ce"] + 0.2 * terms["aux_ce"] + 0.2 * terms["se_bce"]))
    total_no_se, terms_no_se = losses.segmentation_loss(
        {k: v for k, v in outputs.items() if k != "se_logits"}, labels, aux_weight=0.4, se_weight=0.2
    )
    assert "se_bce" not in terms_no_se
    assert float(total_no_se) == pytest.approx(float(terms["ce"] + 0.4 * terms["aux_ce"]))


def test_poly_schedule_values():
    schedule = optim.poly_schedule(0.01, 100)
    assert float(schedule(0)) == pytest.approx(0.01)
    assert float(schedule(50)) == pytest.approx(0.01 * 0.5**0.9, rel=1e-6)
    assert float(schedule(99)) == pytest.approx(0.01 * 0.01**0.9, rel=1e-5)
    assert float(schedule(100)) == pytest.approx(0.0, abs=1e-12)
    assert optim.scaled_learning_rate(0.01, 8) == pytest.approx(0.005)


def test_sgd_matches_pytorch_sgd_with_coupled_decay_and_10x_groups():
    params = {
        "backbone": {"w": jnp.asarray([1.0, -2.0])},
        "neck": {"w": jnp.asarray([0.5])},
        "decode_head": {"b": jnp.asarray([3.0])},
    }
    grads_per_step = [
        {
            "backbone": {"w": jnp.asarray([0.1, 0.2])},
            "neck": {"w": jnp.asarray([-0.3])},
            "decode_head": {"b": jnp.asarray([0.05])},
        },
        {
            "backbone": {"w": jnp.asarray([-0.4, 0.0])},
            "neck": {"w": jnp.asarray([0.2])},
            "decode_head": {"b": jnp.asarray([0.0])},
        },
        {
            "backbone": {"w": jnp.asarray([0.3, 0.1])},
            "neck": {"w": jnp.asarray([0.1])},
            "decode_head": {"b": jnp.asarray([-0.2])},
        },
    ]
    base_lr, total, wd, momentum = 0.1, 10, 1e-2, 0.9
    optimizer = optim.make_optimizer(optim.poly_schedule(base_lr, total), momentum=momentum, weight_decay=wd)
    state = optimizer.init(params)
    got = params
    for grads in grads_per_step:
        updates, state = optimizer.update(grads, state, got)
        got = jax.tree_util.tree_map(lambda p, u: p + u, got, updates)

    # PyTorch SGD by hand: d = g + wd p; buf = d on the first step, then momentum * buf + d; p -= lr * buf.
    want = jax.tree_util.tree_map(np.asarray, params)
    buffers = {}
    for step, grads in enumerate(grads_per_step):
        lr = base_lr * (1 - step / total) ** 0.9
        for group in want:
            for name in want[group]:
                p = want[group][name]
                d = np.asarray(grads[group][name]) + wd * p
                key = (group, name)
                buffers[key] = d if step == 0 else momentum * buffers[key] + d
                multiplier = 1.0 if group == "backbone" else 10.0
                want[group][name] = p - lr * multiplier * buffers[key]
    for group in want:
        for name in want[group]:
            np.testing.assert_allclose(got[group][name], want[group][name], rtol=1e-6)


def reference_scores(labels: np.ndarray, predictions: np.ndarray, num_classes: int) -> dict:
    """The reference's batch_pix_accuracy / batch_intersection_union, on the whole set at once."""
    valid = labels >= 0
    correct = np.sum((predictions == labels) & valid)
    labelled = np.sum(valid)
    inter = np.zeros(num_classes)
    union = np.zeros(num_classes)
    for c in range(num_classes):
        p, t = (predictions == c) & valid, (labels == c) & valid
        inter[c] = np.sum(p & t)
        union[c] = np.sum(p) + np.sum(t) - inter[c]
    iou = inter / (np.spacing(1) + union)
    return {"pixel_accuracy": correct / (np.spacing(1) + labelled), "iou": iou, "present": union > 0}


def test_confusion_metrics_match_the_reference_with_ignore_and_absent_classes():
    rng = np.random.default_rng(2)
    num_classes = 6
    labels = rng.integers(-1, 4, (3, 17, 13))  # classes 4 and 5 never labelled ...
    predictions = rng.integers(0, 5, (3, 17, 13))  # ... and 5 never predicted: absent from both
    confusion = metrics.confusion_matrix(labels, predictions, num_classes, ignore_label=-1)
    assert confusion.dtype == np.int64 and confusion.shape == (6, 6)
    assert confusion.sum() == np.sum(labels >= 0)
    scores = metrics.segmentation_scores(confusion)
    want = reference_scores(labels, predictions, num_classes)
    assert scores["pixel_accuracy"] == pytest.approx(want["pixel_accuracy"])
    np.testing.assert_allclose(scores["per_class_iou"], want["iou"])
    assert scores["per_class_iou"][5] == 0.0
    assert scores["mean_iou"] == pytest.approx(np.mean(want["iou"]))
    assert scores["mean_iou_present"] == pytest.approx(np.mean(want["iou"][want["present"]]))
    assert scores["mean_iou_present"] > scores["mean_iou"]


def test_jitted_batch_confusion_equals_host_confusion_and_respects_weights():
    rng = np.random.default_rng(3)
    labels = rng.integers(-1, 5, (2, 9, 7))
    predictions = rng.integers(0, 5, (2, 9, 7))
    weights = np.ones((2, 9, 7))
    weights[1] = 0  # a padded example
    got = jax.jit(metrics.batch_confusion, static_argnums=2)(labels, predictions, 5, weights)
    want = metrics.confusion_matrix(labels[:1], predictions[:1], 5)
    np.testing.assert_array_equal(got, want)


def test_host_confusion_rejects_out_of_range_labels():
    with pytest.raises(ValueError, match="label value 7"):
        metrics.confusion_matrix(np.array([0, 7]), np.array([0, 1]), 5)


def test_cross_entropy_gradient_is_softmax_minus_one_hot_over_labelled_pixels():
    rng = np.random.default_rng(3)
    logits = rng.standard_normal((2, 3, 4, 5)).astype(np.float32) * 4
    labels = rng.integers(-1, 5, (2, 3, 4))
    grad = np.asarray(jax.grad(losses.cross_entropy)(jnp.asarray(logits), jnp.asarray(labels)))
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    one_hot = np.eye(5, dtype=np.float32)[np.maximum(labels, 0)]
    want = (probs - one_hot) * (labels >= 0)[..., None] / np.sum(labels >= 0)
    np.testing.assert_allclose(grad, want, atol=1e-6)


def test_cross_entropy_is_stable_for_large_logits():
    logits = jnp.asarray([[[[1000.0, 0.0, -1000.0], [-500.0, 500.0, 0.0]]]])
    labels = jnp.asarray([[[1, 1]]])
    assert float(losses.cross_entropy(logits, labels)) == pytest.approx(500.0)


@pytest.mark.parametrize("backend", ["cpu", "tpu"])
@pytest.mark.parametrize(("low", "size"), [((5, 7), (33, 20)), ((8, 8), (64, 64)), ((1, 3), (4, 9))])
def test_cross_entropy_of_head_logits_is_that_of_the_upsampled_logits(low, size, backend):
    # The loss upsamples logits smaller than the labels itself (OpChoices.loss_logits='head', on GPUs and
    # TPUs): the same value and gradient as the loss of the model's upsampled output, without writing it.
    # Traced for a TPU, the resize inside is the interpolation-matrix form (resize.resize_bilinear).
    from fastfcn_jax.models.op_choices import target_backend
    from fastfcn_jax.models.resize import resize_bilinear

    logits = jax.random.normal(jax.random.PRNGKey(0), (2, *low, 6)) * 4
    labels = jax.random.randint(jax.random.PRNGKey(1), (2, *size), -1, 6)
    labels = labels.at[0, 0, 0].set(-1)
    fused = jax.jit(jax.value_and_grad(losses.cross_entropy))
    plain = jax.jit(jax.value_and_grad(lambda z, y: losses.cross_entropy(resize_bilinear(z, size), y)))
    with target_backend(backend):
        (value, grad), (want_value, want_grad) = fused(logits, labels), plain(logits, labels)
        # No labelled pixel: 0 and a zero gradient, as the plain form.
        ignored_value, ignored_grad = fused(logits, -jnp.ones_like(labels))
    assert float(value) == pytest.approx(float(want_value), rel=1e-6)
    np.testing.assert_allclose(grad, want_grad, rtol=1e-5, atol=1e-6 * float(jnp.abs(want_grad).max()))
    assert float(ignored_value) == 0.0 and not np.any(np.asarray(ignored_grad))


def test_cross_entropy_of_head_logits_rounds_the_full_resolution_gradient_to_the_gradient_dtype():
    # OpChoices.loss_gradient='compute': the full-resolution gradient is rounded to the model's compute dtype
    # before it is resized back (half the bytes in bfloat16); the value is unchanged and the gradient
    # differs from the float32 one by that rounding only.
    logits = jax.random.normal(jax.random.PRNGKey(0), (2, 6, 5, 7)) * 3
    labels = jax.random.randint(jax.random.PRNGKey(1), (2, 41, 33), -1, 7)
    results = {}
    for dtype in (jnp.float32, jnp.bfloat16):
        loss = functools.partial(losses.cross_entropy, gradient_dtype=dtype)
        results[jnp.dtype(dtype).name] = jax.jit(jax.value_and_grad(loss))(logits, labels)
    (value32, grad32), (value16, grad16) = results["float32"], results["bfloat16"]
    assert float(value16) == float(value32)
    assert grad16.dtype == grad32.dtype == jnp.float32
    scale = float(jnp.abs(grad32).max())
    np.testing.assert_allclose(grad16, grad32, rtol=0, atol=2e-2 * scale)
    assert not np.array_equal(np.asarray(grad16), np.asarray(grad32))  # the rounding happened
    # Rounding each full-resolution term to bfloat16 (8 bits) then summing ~ (41/6) * (33/5) terms per
    # head pixel: far below 1% of the gradient's scale on average.
    assert float(jnp.abs(grad16 - grad32).mean()) < 2e-3 * scale


def test_cross_entropy_of_head_logits_is_stable_for_large_logits():
    # The one-pass log-sum-exp rescales its running sum at each new maximum; -inf never meets -inf.
    logits = jnp.asarray([[[[1000.0, 0.0, -1000.0]], [[-500.0, 500.0, 0.0]]]])  # [1, 2, 1, 3]
    labels = jnp.asarray([[[1, 1], [1, 1], [1, 1]]])  # [1, 3, 2]: the middle row interpolates both
    value, grad = jax.value_and_grad(losses.cross_entropy)(logits, labels)
    upsampled = np.array([[1000.0, 0.0, -1000.0], [250.0, 250.0, -500.0], [-500.0, 500.0, 0.0]])
    per_row = np.log(np.sum(np.exp(upsampled - upsampled.max(-1, keepdims=True)), -1)) + upsampled.max(-1)
    assert float(value) == pytest.approx(np.mean(per_row - upsampled[:, 1]), rel=1e-6)
    assert np.all(np.isfinite(np.asarray(grad)))
    with pytest.raises(ValueError, match="do not match labels"):
        losses.cross_entropy(logits, labels[0])
    with pytest.raises(ValueError, match="do not match labels"):  # larger logits are not downsampled
        losses.cross_entropy(logits, labels[:, :1])

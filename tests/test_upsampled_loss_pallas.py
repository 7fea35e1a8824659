"""The training loss's Pallas kernel (fastfcn_jax.upsampled_loss_pallas), run in Pallas's interpreter: the
kernel body a GPU compiles, against autodiff of the XLA loss of the resized logits."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fastfcn_jax import losses, upsampled_loss_pallas
from fastfcn_jax.models import resize


def test_class_chunks_cover_the_classes_with_few_lanes():
    assert upsampled_loss_pallas.class_chunks(150) == ((0, 128), (128, 32))
    assert upsampled_loss_pallas.class_chunks(59) == ((0, 64),)
    assert upsampled_loss_pallas.class_chunks(21) == ((0, 32),)
    assert upsampled_loss_pallas.class_chunks(3) == ((0, 16),)
    assert upsampled_loss_pallas.class_chunks(171) == ((0, 128), (128, 32), (160, 16))


@pytest.mark.parametrize(("low", "high"), [(5, 17), (60, 480), (1, 6), (4, 4), (7, 8)])
def test_height_bands_partition_the_output_rows_by_their_lower_source_row(low, high):
    starts, counts, weights = upsampled_loss_pallas.height_bands(low, high)
    lower, upper, weight = resize.align_corners_taps(low, high)
    assert counts.sum() == high and starts[0] == 0
    for i in range(low):
        rows = np.arange(starts[i], starts[i] + counts[i])
        assert np.all(lower[rows] == i)
    np.testing.assert_array_equal(weights, weight.astype(np.float32))
    assert np.all(weights[upper == lower] == 0)  # the last row (and all rows of a 1-row input) use one row


def _reference(rows, labels, ignore_label=-1):
    """Sum over labelled pixels of logsumexp - picked logit of ``rows`` resized along the height (XLA)."""

    def total(rows):
        z = resize.resize_bilinear(rows, (labels.shape[1], rows.shape[2]))
        lse, picked = losses._log_sum_exp_and_picked(z, labels)
        return jnp.sum(jnp.where(labels != ignore_label, lse - picked, 0.0))

    return jax.value_and_grad(total)(rows)


# (batch, h, H, W, classes, column block): bands of 3-4 rows, a 1-row input (one band of every row), no
# resize (h = H), widths that are not a multiple of the block, 150 classes (chunks of 128 + 32 lanes).
CASES = [(2, 5, 17, 21, 7, 4), (1, 1, 6, 5, 3, 4), (1, 4, 4, 9, 20, 8), (1, 3, 9, 6, 150, 4), (2, 6, 13, 3, 40, 2)]


@pytest.mark.parametrize("batch,low,high,width,classes,block", CASES)
def test_kernel_matches_autodiff_of_the_resized_loss(batch, low, high, width, classes, block):
    rng = np.random.default_rng(0)
    rows = jnp.asarray(4 * rng.normal(size=(batch, low, width, classes)), jnp.float32)
    # Ignored pixels and labels outside [0, classes): the latter add log-sum-exp only, as the XLA loss.
    labels = jnp.asarray(rng.integers(-1, classes + 2, size=(batch, high, width)), jnp.int32)
    total, grad = upsampled_loss_pallas.height_upsampled_cross_entropy(
        rows, labels, ignore_label=-1, block=block, interpret=True
    )
    want_total, want_grad = _reference(rows, labels)
    assert grad.shape == rows.shape and grad.dtype == jnp.float32
    assert float(total) == pytest.approx(float(want_total), rel=1e-6)
    np.testing.assert_allclose(grad, want_grad, rtol=1e-5, atol=1e-5)
    alone, none = upsampled_loss_pallas.height_upsampled_cross_entropy(
        rows, labels, ignore_label=-1, with_gradient=False, block=block, interpret=True
    )
    assert none is None and float(alone) == float(total)


def test_kernel_writes_the_gradient_in_the_requested_dtype_and_is_stable_for_large_logits():
    rows = jnp.asarray([[[[1000.0, 0.0, -1000.0]], [[-500.0, 500.0, 0.0]]]])  # [1, 2, 1, 3]
    labels = jnp.asarray([[[1], [1], [2]]])  # the middle row interpolates both
    total, grad = upsampled_loss_pallas.height_upsampled_cross_entropy(
        rows, labels, ignore_label=-1, gradient_dtype=jnp.bfloat16, interpret=True
    )
    upsampled = np.array([[1000.0, 0.0, -1000.0], [250.0, 250.0, -500.0], [-500.0, 500.0, 0.0]])
    per_row = np.log(np.sum(np.exp(upsampled - upsampled.max(-1, keepdims=True)), -1)) + upsampled.max(-1)
    assert float(total) == pytest.approx(float(np.sum(per_row - upsampled[[0, 1, 2], [1, 1, 2]])), rel=1e-6)
    want_total, want_grad = _reference(rows, labels)
    assert grad.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(grad, np.float32), want_grad, rtol=1e-2, atol=1e-6)
    with pytest.raises(ValueError, match="do not match rows"):
        upsampled_loss_pallas.height_upsampled_cross_entropy(rows, labels[:, :1], ignore_label=-1, interpret=True)


@pytest.mark.parametrize("gradient_dtype", [jnp.float32, jnp.bfloat16])
def test_pallas_loss_equals_the_fused_loss(gradient_dtype):
    # OpChoices.loss_upsample='pallas': the same value and, up to the gradient dtype's rounding, gradient as
    # the fused XLA form (which rounds each full-resolution term; the kernel rounds each source row's sum).
    logits = jax.random.normal(jax.random.PRNGKey(0), (2, 6, 5, 7)) * 3
    labels = jax.random.randint(jax.random.PRNGKey(1), (2, 41, 33), -1, 7)
    results = {}
    for upsample in ("fused", "pallas"):
        loss = lambda z, u=upsample: losses.cross_entropy(z, labels, gradient_dtype=gradient_dtype, upsample=u)  # noqa: E731
        results[upsample] = jax.jit(jax.value_and_grad(loss))(logits)
    (value, grad), (want_value, want_grad) = results["pallas"], results["fused"]
    assert float(value) == pytest.approx(float(want_value), rel=1e-6)
    scale = float(jnp.abs(want_grad).max())
    atol = 1e-6 * scale if gradient_dtype == jnp.float32 else 2e-2 * scale
    np.testing.assert_allclose(grad, want_grad, rtol=0, atol=atol)
    # No labelled pixel: 0 and a zero gradient.
    empty, empty_grad = jax.value_and_grad(
        lambda z: losses.cross_entropy(z, -jnp.ones_like(labels), upsample="pallas")
    )(logits)
    assert float(empty) == 0.0 and not np.any(np.asarray(empty_grad))
    with pytest.raises(ValueError, match="unknown upsample"):
        losses.cross_entropy(logits, labels, upsample="matmul")
    with pytest.raises(ValueError, match="unknown upsample"):  # checked whether or not the loss resizes
        losses.cross_entropy(logits, jnp.zeros(logits.shape[:3], jnp.int32), upsample="matmul")

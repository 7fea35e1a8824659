"""The Pallas depthwise kernels (fastfcn_jax.models.depthwise_pallas), run in Pallas's interpreter: the same
kernel bodies a GPU compiles, with every window that reaches past an edge zero-filled."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fastfcn_jax.models import depthwise, depthwise_pallas


def _reference_correlation(x, kernel, dilation, offset, out_size):
    k = kernel.shape[0]
    rows, cols = out_size
    border = max(0, offset) + (k - 1) * dilation + max(rows, cols)
    padded = np.pad(np.asarray(x, np.float64), ((0, 0), (border, border), (border, border), (0, 0)))
    out = np.zeros((x.shape[0], rows, cols, x.shape[-1]))
    for a in range(k):
        for b in range(k):
            r0, c0 = border + a * dilation - offset, border + b * dilation - offset
            out += padded[:, r0 : r0 + rows, c0 : c0 + cols] * np.asarray(kernel[a, b], np.float64)
    return out


# (batch, height, width, channels, dilation, margin): widths over one 64-column window (70), odd channel
# counts (block of 1 channel), the JPU's pre-padded input (margin 8) and a margin smaller than it needs.
CASES = [(2, 9, 11, 16, 2, 0), (1, 7, 6, 5, 1, 3), (2, 10, 70, 32, 4, 4), (1, 5, 40, 48, 8, 8)]


@pytest.mark.parametrize("batch,height,width,channels,dilation,margin", CASES)
def test_pallas_kernels_match_the_correlation_and_its_gradients(batch, height, width, channels, dilation, margin):
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(batch, height + 2 * margin, width + 2 * margin, channels)), jnp.float32)
    kernel = jnp.asarray(rng.normal(size=(3, 3, channels)), jnp.float32)
    grad = jnp.asarray(rng.normal(size=(batch, height, width, channels)), jnp.float32)
    pad = dilation
    forward = depthwise_pallas.depthwise_correlate(
        x, kernel, dilation=dilation, offset=pad - margin, out_size=(height, width), interpret=True
    )
    np.testing.assert_allclose(
        forward, _reference_correlation(x, kernel, dilation, pad - margin, (height, width)), rtol=1e-5, atol=1e-4
    )
    # The gradients against autodiff of the XLA shifted form.
    _, vjp = jax.vjp(lambda x, k: depthwise._shifted_taps(x, k[:, :, None], dilation, margin), x, kernel)
    want_x, want_kernel = vjp(grad)
    got_x = depthwise_pallas.depthwise_correlate(
        grad, kernel[::-1, ::-1], dilation=dilation, offset=pad + margin, out_size=x.shape[1:3], interpret=True
    )
    got_kernel = depthwise_pallas.depthwise_kernel_gradient(
        x, grad, dilation=dilation, offset=pad - margin, kernel_size=3, interpret=True
    )
    assert got_x.shape == x.shape and got_kernel.shape == (9, channels)
    np.testing.assert_allclose(got_x, want_x, rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(got_kernel.reshape(3, 3, channels), want_kernel, rtol=1e-5, atol=1e-3)
    # The rows split over programs (the last group past the last row): the same sums, in another order.
    split = depthwise_pallas.depthwise_kernel_gradient(
        x, grad, dilation=dilation, offset=pad - margin, kernel_size=3, rows_per_program=2, interpret=True
    )
    np.testing.assert_allclose(split, got_kernel, rtol=1e-5, atol=1e-4)


def test_pallas_forward_keeps_the_requested_dtype_and_accumulates_in_float32():
    x = jnp.full((1, 4, 4, 8), 1.0 + 2.0**-6, jnp.bfloat16)  # a bf16 value; sums of several of them are not
    kernel = jnp.ones((3, 3, 8), jnp.float32)
    out = depthwise_pallas.depthwise_correlate(x, kernel, dilation=1, offset=1, out_size=(4, 4), interpret=True)
    assert out.dtype == jnp.bfloat16
    # The centre pixel sums nine taps: float32 accumulation, then one rounding to bf16.
    want = float(jnp.asarray(9 * (1.0 + 2.0**-6), jnp.float32).astype(jnp.bfloat16))
    running = jnp.bfloat16(0)
    for _ in range(9):
        running = (running + x[0, 0, 0, 0]).astype(jnp.bfloat16)
    assert float(running) != want  # so the check below tells the two accumulations apart
    assert float(out[0, 1, 1, 0]) == want


def test_column_windows_cover_the_width_with_the_fewest_wasted_columns():
    assert depthwise_pallas._column_block(60) == 64
    assert depthwise_pallas._column_block(76) == 32
    assert depthwise_pallas._column_block(11) == 16
    assert depthwise_pallas.channel_block(1536) == 64
    assert depthwise_pallas.channel_block(48) == 16
    assert depthwise_pallas.channel_block(5) == 1
    assert depthwise_pallas.channel_block(1536, 128) == 128 and depthwise_pallas.channel_block(96, 128) == 32


def test_pallas_kernels_run_per_device_under_a_data_parallel_mesh():
    # Traced with a 'data' mesh as context (sharding.with_mesh, as the training loop does), the Pallas kernels
    # of the depthwise conv and of the loss run on each device's examples (shard_map): the same values and
    # gradients as without the mesh, and no all-gather of the batch (XLA would otherwise replicate the
    # custom calls' operands). Four host devices here (conftest).
    from fastfcn_jax import losses, sharding

    mesh = sharding.make_mesh(4)
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(4, 12, 10, 8)), jnp.float32)
    kernel = jnp.asarray(rng.normal(size=(3, 3, 1, 8)), jnp.float32)
    logits = jnp.asarray(3 * rng.normal(size=(4, 3, 3, 5)), jnp.float32)
    labels = jnp.asarray(rng.integers(-1, 5, size=(4, 9, 7)), jnp.int32)
    pallas = ("pallas", "pallas", "pallas")

    def loss(x, kernel, logits):
        y = depthwise._depthwise_shifted(x, kernel, 2, 2, pallas)
        joint = depthwise.depthwise_joint(x, [kernel, 2 * kernel], (1, 2), 2)  # the JPU's joint kernels
        return (
            jnp.sum(y**2) + sum(jnp.sum(j * y) for j in joint) + losses.cross_entropy(logits, labels, upsample="pallas")
        )

    value_and_grad = jax.value_and_grad(loss, argnums=(0, 1, 2))
    want = jax.jit(value_and_grad)(x, kernel, logits)
    batched = sharding.batch_sharded(mesh)
    args = (jax.device_put(x, batched), kernel, jax.device_put(logits, batched))
    per_device = jax.jit(sharding.with_mesh(value_and_grad, mesh))
    got = per_device(*args)
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5)
    assert got[1][0].sharding.spec[0] == sharding.DATA_AXIS  # the input gradient stays split over the batch
    compiled = per_device.lower(*args).compile().as_text()
    assert "all-gather" not in compiled and "all-reduce" in compiled  # partial sums are added, nothing gathered
    # The loss alone, as evaluation computes it (the kernel's value-only form).
    value = jax.jit(sharding.with_mesh(lambda z: losses.cross_entropy(z, labels, upsample="pallas"), mesh))
    assert float(value(args[2])) == pytest.approx(float(losses.cross_entropy(logits, labels)), rel=1e-6)
    with pytest.raises(ValueError, match="does not split over the 4 devices"):
        jax.jit(sharding.with_mesh(lambda z: losses.cross_entropy(z, labels[:3], upsample="pallas"), mesh))(logits[:3])


def test_pallas_kernels_lower_to_triton_without_a_gpu():
    # The interpreter accepts programs Triton rejects (e.g. tensors of three columns): lowering each kernel
    # for CUDA here checks the Triton side before a GPU is lent (it compiles and runs only on one).
    from fastfcn_jax import upsampled_loss_pallas

    def lowers(fn, *shapes):
        jax.jit(fn).trace(*shapes).lower(lowering_platforms=("cuda",))

    bf16 = jnp.bfloat16
    x, grad = jax.ShapeDtypeStruct((2, 76, 76, 96), bf16), jax.ShapeDtypeStruct((2, 60, 60, 96), bf16)
    kernel = jax.ShapeDtypeStruct((3, 3, 96), bf16)
    lowers(lambda x, k: depthwise_pallas.depthwise_correlate(x, k, dilation=4, offset=-4, out_size=(60, 60)), x, kernel)
    lowers(
        lambda g, k: depthwise_pallas.depthwise_correlate(g, k, dilation=4, offset=12, out_size=(76, 76)), grad, kernel
    )
    # The JPU's joint kernels (OpChoices.jpu_depthwise='joint'): four branches' terms in one kernel.
    kernels, dilations = jax.ShapeDtypeStruct((4, 3, 3, 96), bf16), (1, 2, 4, 8)
    forward_terms = tuple((0, b, d, d - 8, b) for b, d in enumerate(dilations))
    lowers(
        lambda x, k: depthwise_pallas.correlate_terms((x,), k, terms=forward_terms, outputs=4, out_size=(60, 60)),
        x,
        kernels,
    )
    input_terms = tuple((b, b, d, d + 8, 0) for b, d in enumerate(dilations))
    lowers(
        lambda k, *g: depthwise_pallas.correlate_terms(g, k, terms=input_terms, outputs=1, out_size=(76, 76)),
        kernels,
        *(grad,) * 4,
    )
    kernel_terms = tuple((b, d, d - 8) for b, d in enumerate(dilations))
    lowers(
        lambda x, *g: depthwise_pallas.kernel_gradient_terms(x, g, terms=kernel_terms, kernel_size=3), x, *(grad,) * 4
    )
    for rows in (None, 7):
        lowers(
            lambda x, g, rows=rows: depthwise_pallas.depthwise_kernel_gradient(
                x, g, dilation=4, offset=-4, kernel_size=3, rows_per_program=rows
            ),
            x,
            grad,
        )
    rows, labels = jax.ShapeDtypeStruct((2, 60, 480, 150), jnp.float32), jax.ShapeDtypeStruct((2, 480, 480), jnp.int32)
    for block, with_gradient in ((upsampled_loss_pallas.COLUMN_BLOCK, True), (16, False)):
        lowers(
            lambda r, y, block=block, with_gradient=with_gradient: upsampled_loss_pallas.height_upsampled_cross_entropy(
                r, y, ignore_label=-1, gradient_dtype=bf16, block=block, with_gradient=with_gradient
            ),
            rows,
            labels,
        )
    with pytest.raises(ValueError, match="power of two"):
        upsampled_loss_pallas.height_upsampled_cross_entropy(
            jnp.zeros((1, 2, 6, 3)), jnp.zeros((1, 4, 6), jnp.int32), ignore_label=-1, block=3, interpret=True
        )

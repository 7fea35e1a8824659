"""Layers against NumPy re-implementations of PyTorch's own index formulas, written here."""

from __future__ import annotations

import contextlib
import functools
import math
import warnings

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fastfcn_jax import sharding
from fastfcn_jax.models import batch_norm, depthwise, layers, op_choices, resize


def torch_bilinear(x: np.ndarray, out_h: int, out_w: int, align_corners: bool = True) -> np.ndarray:
    """PyTorch's upsample_bilinear2d pixel by pixel, on [H, W] arrays (area_pixel_compute_source_index)."""
    in_h, in_w = x.shape

    def source(dst, in_size, out_size):
        if align_corners:
            real = ((in_size - 1) / (out_size - 1) if out_size > 1 else 0.0) * dst
        else:
            real = max(in_size / out_size * (dst + 0.5) - 0.5, 0.0)
        i0 = int(math.floor(real))
        i1 = i0 + (1 if i0 < in_size - 1 else 0)
        lam1 = real - i0
        return i0, i1, 1.0 - lam1, lam1

    out = np.zeros((out_h, out_w))
    for oh in range(out_h):
        h0, h1, h0l, h1l = source(oh, in_h, out_h)
        for ow in range(out_w):
            w0, w1, w0l, w1l = source(ow, in_w, out_w)
            out[oh, ow] = h0l * (w0l * x[h0, w0] + w1l * x[h0, w1]) + h1l * (w0l * x[h1, w0] + w1l * x[h1, w1])
    return out


def torch_adaptive_avg_pool(x: np.ndarray, out_h: int, out_w: int) -> np.ndarray:
    """PyTorch's adaptive_avg_pool2d on [H, W]: start = floor(i*in/out), end = ceil((i+1)*in/out)."""
    in_h, in_w = x.shape
    out = np.zeros((out_h, out_w))
    for i in range(out_h):
        hs, he = (i * in_h) // out_h, ((i + 1) * in_h + out_h - 1) // out_h
        for j in range(out_w):
            ws, we = (j * in_w) // out_w, ((j + 1) * in_w + out_w - 1) // out_w
            out[i, j] = x[hs:he, ws:we].mean()
    return out


RESIZE_CASES = [
    ((9, 11), (65, 81)),  # head output -> parity input size
    ((3, 3), (9, 11)),  # JPU: c4 -> c2 on the parity input
    ((5, 6), (9, 11)),
    ((1, 1), (7, 5)),  # 1-pixel input (ASPP pooling branch)
    ((7, 5), (1, 1)),  # 1-pixel output
    ((13, 17), (4, 5)),  # downsampling
    ((1, 6), (3, 1)),
    ((64, 64), (512, 512)),
]


@pytest.mark.parametrize("align_corners", [True, False])
@pytest.mark.parametrize("implementation", ["gather", "matmul"])
@pytest.mark.parametrize(("in_size", "out_size"), RESIZE_CASES)
def test_resize_bilinear_matches_pytorch(in_size, out_size, implementation, align_corners):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, *in_size, 3)).astype(np.float32)
    with jax.default_matmul_precision("highest"):
        got = np.asarray(resize.resize_bilinear(jnp.asarray(x), out_size, implementation, align_corners))
    assert got.shape == (2, *out_size, 3)
    for b in range(2):
        for c in range(3):
            want = torch_bilinear(x[b, :, :, c].astype(np.float64), *out_size, align_corners)
            np.testing.assert_allclose(got[b, :, :, c], want, rtol=1e-5, atol=1e-5)


def test_resize_bilinear_keeps_corners_and_is_identity_on_same_size():
    x = jnp.asarray(np.random.default_rng(1).standard_normal((1, 5, 7, 2)), jnp.float32)
    with jax.default_matmul_precision("highest"):
        y = resize.resize_bilinear(x, (9, 13))
    for (i, j), (k, m) in [((0, 0), (0, 0)), ((0, -1), (0, -1)), ((-1, 0), (-1, 0)), ((-1, -1), (-1, -1))]:
        np.testing.assert_allclose(y[0, i, j], x[0, k, m], rtol=1e-6)
    assert resize.resize_bilinear(x, (5, 7)) is x


@pytest.mark.parametrize("in_size", [(9, 11), (5, 6), (3, 3), (13, 17), (64, 64), (1, 1), (2, 7)])
@pytest.mark.parametrize("bins", [1, 2, 3, 6])
def test_adaptive_avg_pool_matches_pytorch(in_size, bins):
    rng = np.random.default_rng(2)
    x = rng.standard_normal((1, *in_size, 2)).astype(np.float32)
    with jax.default_matmul_precision("highest"):
        got = np.asarray(resize.adaptive_avg_pool(jnp.asarray(x), bins))
    assert got.shape == (1, bins, bins, 2)
    for c in range(2):
        want = torch_adaptive_avg_pool(x[0, :, :, c].astype(np.float64), bins, bins)
        np.testing.assert_allclose(got[0, :, :, c], want, rtol=1e-5, atol=1e-6)


def numpy_conv(x: np.ndarray, kernel: np.ndarray, stride: int, pad: int, dilation: int = 1, groups: int = 1):
    """Direct NHWC convolution with symmetric zero padding, as PyTorch's Conv2d(padding=pad)."""
    b, h, w, cin = x.shape
    kh, kw, cin_g, cout = kernel.shape
    xp = np.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    out_h = (h + 2 * pad - dilation * (kh - 1) - 1) // stride + 1
    out_w = (w + 2 * pad - dilation * (kw - 1) - 1) // stride + 1
    out = np.zeros((b, out_h, out_w, cout))
    cout_g = cout // groups
    for i in range(out_h):
        for j in range(out_w):
            patch = xp[
                :,
                i * stride : i * stride + dilation * (kh - 1) + 1 : dilation,
                j * stride : j * stride + dilation * (kw - 1) + 1 : dilation,
                :,
            ]
            for g in range(groups):
                pg = patch[..., g * cin_g : (g + 1) * cin_g]
                kg = kernel[..., g * cout_g : (g + 1) * cout_g]
                out[:, i, j, g * cout_g : (g + 1) * cout_g] = np.einsum("bhwc,hwco->bo", pg, kg)
    return out


@pytest.mark.parametrize("size", [(8, 8), (7, 9), (6, 5)])
def test_stride2_conv_pads_symmetrically_like_pytorch(size):
    rng = np.random.default_rng(3)
    x = rng.standard_normal((1, *size, 3)).astype(np.float32)
    conv = layers.conv2d(4, 3, stride=2)
    params = conv.init(jax.random.PRNGKey(0), jnp.asarray(x))
    with jax.default_matmul_precision("highest"):
        got = np.asarray(conv.apply(params, jnp.asarray(x)))
    want = numpy_conv(x, np.asarray(params["params"]["kernel"]), stride=2, pad=1)
    # PyTorch's output size floor((n + 2 - 3) / 2) + 1.
    assert got.shape[1:3] == ((size[0] - 1) // 2 + 1, (size[1] - 1) // 2 + 1)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("implementation", ["dot", "conv"])
@pytest.mark.parametrize(("size", "stride"), [((8, 8), 1), ((7, 9), 2), ((6, 5), 2)])
def test_pointwise_conv_matches_pytorch_including_stride2_shortcut(size, stride, implementation):
    rng = np.random.default_rng(10)
    x = rng.standard_normal((2, *size, 5)).astype(np.float32)
    conv = layers.Conv2D(3, 1, stride=stride, use_bias=True, pointwise_implementation=implementation)
    params = conv.init(jax.random.PRNGKey(0), jnp.asarray(x))
    with jax.default_matmul_precision("highest"):
        got = np.asarray(conv.apply(params, jnp.asarray(x)))
    want = numpy_conv(x, np.asarray(params["params"]["kernel"]), stride=stride, pad=0) + np.asarray(
        params["params"]["bias"]
    )
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_op_choices_reject_unknown_implementations():
    with pytest.raises(ValueError, match="resize_implementation"):
        op_choices.OpChoices(resize="bicubic")


@pytest.mark.parametrize("dilation", [1, 2, 4, 8])
@pytest.mark.parametrize("implementation", ["shifted", "grouped", "pallas"])
def test_depthwise_conv_matches_grouped_convolution(dilation, implementation):
    rng = np.random.default_rng(4)
    x = rng.standard_normal((2, 9, 11, 5)).astype(np.float32)
    module = depthwise.DepthwiseConv(3, dilation, implementation=implementation)
    params = module.init(jax.random.PRNGKey(1), jnp.asarray(x))
    kernel = np.asarray(params["params"]["kernel"])
    assert kernel.shape == (3, 3, 1, 5)
    with jax.default_matmul_precision("highest"):
        got = np.asarray(module.apply(params, jnp.asarray(x)))
    want = numpy_conv(x, kernel, stride=1, pad=dilation, dilation=dilation, groups=5)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_batchnorm_eval_uses_running_statistics_like_pytorch():
    rng = np.random.default_rng(5)
    x = rng.standard_normal((2, 3, 4, 6)).astype(np.float32)
    bn = batch_norm.BatchNorm(use_running_average=True)
    variables = bn.init(jax.random.PRNGKey(0), jnp.asarray(x))
    mean, var = rng.normal(size=6).astype(np.float32), rng.uniform(0.5, 1.5, 6).astype(np.float32)
    gamma, beta = rng.uniform(0.5, 1.5, 6).astype(np.float32), rng.normal(size=6).astype(np.float32)
    variables = {"params": {"scale": gamma, "bias": beta}, "batch_stats": {"mean": mean, "var": var}}
    got = np.asarray(bn.apply(variables, jnp.asarray(x)))
    want = (x - mean) / np.sqrt(var + 1e-5) * gamma + beta
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_batchnorm_train_normalises_biased_and_updates_running_var_unbiased():
    rng = np.random.default_rng(6)
    x = (3.0 + 2.0 * rng.standard_normal((2, 3, 5, 4))).astype(np.float32)
    bn = batch_norm.BatchNorm(use_running_average=False)
    variables = bn.init(jax.random.PRNGKey(0), jnp.asarray(x))
    got, updated = bn.apply(variables, jnp.asarray(x), mutable=["batch_stats"])
    flat = x.reshape(-1, 4).astype(np.float64)
    n = flat.shape[0]
    biased, unbiased = flat.var(axis=0), flat.var(axis=0) * n / (n - 1)
    np.testing.assert_allclose(got, (x - flat.mean(0)) / np.sqrt(biased + 1e-5), rtol=1e-4, atol=1e-4)
    # PyTorch momentum 0.1: running = 0.9 * running + 0.1 * batch statistic.
    np.testing.assert_allclose(updated["batch_stats"]["mean"], 0.1 * flat.mean(0), rtol=1e-5)
    np.testing.assert_allclose(updated["batch_stats"]["var"], 0.9 + 0.1 * unbiased, rtol=1e-5)


@pytest.mark.parametrize("offset", [0.0, 300.0])
def test_batchnorm_single_pass_statistics_are_exact_about_the_running_mean(offset):
    # Activations whose mean dwarfs their spread: E[x^2] - E[x]^2 about zero would cancel in float32
    # (300^2 = 9e4 against a variance of 1e-2); about the running mean the moments stay exact.
    rng = np.random.default_rng(7)
    x = (offset + 0.1 * rng.standard_normal((4, 6, 6, 3))).astype(np.float32)
    bn = batch_norm.BatchNorm(use_running_average=False)
    variables = bn.init(jax.random.PRNGKey(0), jnp.asarray(x))
    flat = x.reshape(-1, 3).astype(np.float64)
    running_mean = flat.mean(0) + np.array([0.05, -0.02, 0.0])  # a few steps into training: near, not equal
    variables = {
        **variables,
        "batch_stats": {**variables["batch_stats"], "mean": jnp.asarray(running_mean, jnp.float32)},
    }
    got, updated = bn.apply(variables, jnp.asarray(x), mutable=["batch_stats"])
    n = flat.shape[0]
    np.testing.assert_allclose(got, (x - flat.mean(0)) / np.sqrt(flat.var(0) + 1e-5), rtol=2e-3, atol=2e-3)
    unbiased = flat.var(0) * n / (n - 1)
    np.testing.assert_allclose(updated["batch_stats"]["var"], 0.9 + 0.1 * unbiased, rtol=1e-5)
    np.testing.assert_allclose(updated["batch_stats"]["mean"], 0.9 * running_mean + 0.1 * flat.mean(0), rtol=1e-6)


def test_batchnorm_over_codeword_axis_normalises_per_feature_axis_index():
    x = np.random.default_rng(7).standard_normal((3, 4, 8)).astype(np.float32)
    bn = batch_norm.BatchNorm(use_running_average=False, feature_axis=1)
    variables = bn.init(jax.random.PRNGKey(0), jnp.asarray(x))
    assert variables["params"]["scale"].shape == (4,)
    got, _ = bn.apply(variables, jnp.asarray(x), mutable=["batch_stats"])
    mean = x.mean(axis=(0, 2), keepdims=True)
    var = x.var(axis=(0, 2), keepdims=True)
    np.testing.assert_allclose(got, (x - mean) / np.sqrt(var + 1e-5), rtol=1e-4, atol=1e-4)


def test_group_norm_matches_definition():
    x = np.random.default_rng(8).standard_normal((2, 5, 6, 8)).astype(np.float32)
    norm = batch_norm.make_norm("group", train=False, dtype=jnp.float32, num_groups=4)
    variables = norm.init(jax.random.PRNGKey(0), jnp.asarray(x))
    got = np.asarray(norm.apply(variables, jnp.asarray(x)))
    grouped = x.reshape(2, 5, 6, 4, 2)
    mean = grouped.mean(axis=(1, 2, 4), keepdims=True)
    var = grouped.var(axis=(1, 2, 4), keepdims=True)
    np.testing.assert_allclose(got, ((grouped - mean) / np.sqrt(var + 1e-5)).reshape(x.shape), rtol=1e-4, atol=1e-4)


def test_separable_conv_is_depthwise_norm_pointwise_norm_relu_without_relu_between():
    rng = np.random.default_rng(9)
    x = rng.standard_normal((1, 7, 9, 6)).astype(np.float32)
    module = depthwise.SeparableConv(4, dilation=2)
    variables = module.init(jax.random.PRNGKey(2), jnp.asarray(x))
    params = variables["params"]
    # Non-trivial running statistics so that a missing or misplaced norm would show.
    stats = {
        "depthwise_norm": {
            "mean": rng.normal(size=6).astype(np.float32),
            "var": rng.uniform(0.5, 2, 6).astype(np.float32),
        },
        "pointwise_norm": {
            "mean": rng.normal(size=4).astype(np.float32),
            "var": rng.uniform(0.5, 2, 4).astype(np.float32),
        },
    }
    with jax.default_matmul_precision("highest"):
        got = np.asarray(module.apply({"params": params, "batch_stats": stats}, jnp.asarray(x)))

    def bn(y, name):
        p, s = params[name], stats[name]
        return (y - s["mean"]) / np.sqrt(s["var"] + 1e-5) * np.asarray(p["scale"]) + np.asarray(p["bias"])

    y = numpy_conv(x, np.asarray(params["depthwise"]["kernel"]), 1, 2, dilation=2, groups=6)
    y = bn(y, "depthwise_norm")  # no ReLU here, as the reference
    y = numpy_conv(y, np.asarray(params["pointwise"]["kernel"]), 1, 0)
    want = np.maximum(bn(y, "pointwise_norm"), 0)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_channel_dropout_drops_whole_channels_only_in_training():
    x = jnp.ones((2, 5, 6, 32))
    drop = layers.channel_dropout(0.5, train=True)
    y = np.asarray(drop.apply({}, x, rngs={"dropout": jax.random.PRNGKey(0)}))
    per_channel = y.reshape(2, 30, 32)
    assert np.all(per_channel.min(axis=1) == per_channel.max(axis=1))  # constant over H, W
    assert set(np.unique(y)) == {0.0, 2.0}
    np.testing.assert_array_equal(layers.channel_dropout(0.5, train=False).apply({}, x), x)


@pytest.mark.parametrize(("stride", "dilation"), [(1, 1), (2, 1), (1, 2)])
def test_conv_bn_relu_matches_conv_then_batchnorm_then_relu(stride, dilation):
    rng = np.random.default_rng(11)
    x = rng.standard_normal((2, 9, 8, 3)).astype(np.float32)
    module = layers.ConvBNReLU(4, 3, stride=stride, dilation=dilation)
    variables = module.init(jax.random.PRNGKey(0), jnp.asarray(x))
    assert set(variables["params"]) == {"conv", "bn"}
    assert "bias" not in variables["params"]["conv"]  # the reference's convs before BN have no bias
    stats = {"mean": rng.normal(size=4).astype(np.float32), "var": rng.uniform(0.5, 2.0, 4).astype(np.float32)}
    gamma, beta = rng.uniform(0.5, 1.5, 4).astype(np.float32), rng.normal(size=4).astype(np.float32)
    params = {"conv": variables["params"]["conv"], "bn": {"scale": gamma, "bias": beta}}
    with jax.default_matmul_precision("highest"):
        got = np.asarray(module.apply({"params": params, "batch_stats": {"bn": stats}}, jnp.asarray(x)))
    y = numpy_conv(x, np.asarray(params["conv"]["kernel"]), stride=stride, pad=dilation, dilation=dilation)
    want = np.maximum((y - stats["mean"]) / np.sqrt(stats["var"] + 1e-5) * gamma + beta, 0.0)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(
    ("stride", "dilation", "kernel_size"), [(1, 1, 3), (2, 1, 3), (1, 4, 3), (1, 12, 3), (2, 1, 7)]
)
def test_im2col_conv_gradient_equals_xla_convolution_gradient(stride, dilation, kernel_size):
    rng = np.random.default_rng(12)
    x = jnp.asarray(rng.standard_normal((2, 11, 9, 3)), jnp.float32)

    def grads(conv_gradient):
        conv = layers.Conv2D(4, kernel_size, stride=stride, dilation=dilation, conv_gradient=conv_gradient)
        params = conv.init(jax.random.PRNGKey(0), x)

        def loss(p, x):
            return jnp.sum(jnp.sin(conv.apply(p, x)))

        with jax.default_matmul_precision("highest"):
            return conv.apply(params, x), jax.grad(loss, argnums=(0, 1))(params, x)

    (out_xla, (dparams_xla, dx_xla)), (out_im2col, (dparams_im2col, dx_im2col)) = grads("xla"), grads("im2col")
    np.testing.assert_array_equal(out_xla, out_im2col)  # same forward op
    np.testing.assert_allclose(dx_im2col, dx_xla, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(
        dparams_im2col["params"]["kernel"], dparams_xla["params"]["kernel"], rtol=1e-4, atol=1e-4
    )


@pytest.mark.parametrize(("batch", "size", "dilation"), [(1, (16, 16), 1), (2, (8, 8), 1), (1, (5, 7), 2)])
def test_small_maps_run_per_tap_on_cpu_with_the_convolutions_results(batch, size, dilation):
    x = jax.random.normal(jax.random.PRNGKey(0), (batch, *size, 8))

    def conv(small_maps):
        return layers.Conv2D(
            4, 3, dilation=dilation, small_maps_implementation=small_maps, dilated_implementation="conv"
        )

    params = conv("conv").init(jax.random.PRNGKey(1), x)
    outputs, jaxprs = {}, {}
    for choice in ("conv", "per_tap", "auto"):
        with jax.default_matmul_precision("highest"):
            loss = lambda p, x: jnp.sum(jnp.sin(conv(choice).apply(p, x)))  # noqa: B023, E731
            outputs[choice] = (conv(choice).apply(params, x), jax.grad(loss, argnums=(0, 1))(params, x))
        jaxprs[choice] = str(jax.make_jaxpr(conv(choice).apply)(params, x))
    for choice in ("per_tap", "auto"):
        for got, want in zip(jax.tree.leaves(outputs[choice]), jax.tree.leaves(outputs["conv"]), strict=True):
            np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
    assert "conv_general_dilated" in jaxprs["conv"] and "conv_general_dilated" not in jaxprs["per_tap"]
    assert jaxprs["auto"] == jaxprs["per_tap"]  # this is a CPU, and the map has at most 256 pixels
    # A larger map keeps XLA's convolution under 'auto'.
    large = jnp.zeros((1, 17, 16, 8))
    assert "conv_general_dilated" in str(jax.make_jaxpr(conv("auto").apply)(params, large))
    # Even kernels shrink the map (PyTorch's symmetric padding): they keep XLA's convolution.
    even = layers.Conv2D(4, 2, small_maps_implementation="per_tap")
    even_params = even.init(jax.random.PRNGKey(1), x)
    assert even.apply(even_params, x).shape == (batch, size[0] - 1, size[1] - 1, 4)
    # bfloat16: the taps are summed in float32 as the convolution's are.
    x16, p16 = x.astype(jnp.bfloat16), params
    tap16 = layers.Conv2D(
        4, 3, dilation=dilation, dtype=jnp.bfloat16, small_maps_implementation="per_tap", dilated_implementation="conv"
    ).apply(p16, x16)
    assert tap16.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(tap16, np.float32), outputs["conv"][0], rtol=0.05, atol=0.05)
    with pytest.raises(ValueError, match="small_maps_implementation must be one of"):
        op_choices.OpChoices(small_maps="taps")


@pytest.mark.parametrize(("size", "dilation"), [((9, 11), 12), ((16, 16), 6), ((7, 5), 2), ((12, 10), 4)])
def test_valid_taps_dilated_conv_equals_convolution_with_gradients(size, dilation):
    rng = np.random.default_rng(13)
    x = jnp.asarray(rng.standard_normal((2, *size, 3)), jnp.float32)

    def run(implementation):
        conv = layers.Conv2D(
            4, 3, dilation=dilation, dilated_implementation=implementation, conv_gradient="xla",
            small_maps_implementation="conv",
        )  # fmt: skip
        params = conv.init(jax.random.PRNGKey(0), x)
        with jax.default_matmul_precision("highest"):
            out = conv.apply(params, x)
            grads = jax.grad(lambda p, x: jnp.sum(jnp.sin(conv.apply(p, x))), argnums=(0, 1))(params, x)
        return out, grads

    (out_conv, (dp_conv, dx_conv)), (out_taps, (dp_taps, dx_taps)) = run("conv"), run("valid_taps")
    np.testing.assert_allclose(out_taps, out_conv, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(dx_taps, dx_conv, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(dp_taps["params"]["kernel"], dp_conv["params"]["kernel"], rtol=1e-4, atol=1e-4)
    # Taps reading only padding are skipped: at dilation >= size only the centre tap (1 of 9) does work.
    fraction = layers._valid_tap_fraction(*size, 3, dilation)
    assert fraction == pytest.approx(1 / 9) if dilation >= max(size) else 1 / 9 < fraction < 1


def _train_mode_logits_and_gradients(model, variables, images):
    """Logits of a train-mode forward and the gradient of sum(logits^2) w.r.t. the parameters."""

    def loss(params):
        outputs, _ = model.apply(
            {"params": params, "batch_stats": variables["batch_stats"]},
            images,
            train=True,
            mutable=["batch_stats"],
            rngs={"dropout": jax.random.PRNGKey(2)},
        )
        return jnp.sum(outputs["logits"] ** 2), outputs["logits"]

    grads, logits = jax.jit(jax.grad(loss, has_aux=True))(variables["params"])
    return np.asarray(logits), [np.asarray(g) for g in jax.tree.leaves(grads)]


def test_split_separable_conv_has_the_fused_forms_gradients() -> None:
    from fastfcn_jax.models import create_model

    # float64: both forms compute the same sums in another order, and in float32 the whole model's gradients
    # (through a batch-2 BatchNorm) differ by up to 6e-4 relative on some CPUs (an AVX2 EPYC), which says
    # nothing about the maths. In float64 they agree to about 1e-14 where the float32 head (classifier and
    # logits, the model's policy) rounds alike in both programs, and to about 1e-6 where XLA:CPU sums its
    # terms in another order in each (the tests' compiler flags, conftest); a wrong tap or border is O(1).
    with jax.enable_x64(True):
        images = jax.random.normal(jax.random.PRNGKey(0), (2, 32, 32, 3), jnp.float64)
        grads = {}
        for separable in ("fused", "split"):
            model = create_model("encnet_jpu_tiny", 5, separable_implementation=separable, dtype=jnp.float64)
            variables = model.init(jax.random.PRNGKey(1), images, train=False)
            variables = jax.tree.map(lambda v: v.astype(jnp.float64), variables)
            grads[separable] = _train_mode_logits_and_gradients(model, variables, images)[1]
    for fused, split in zip(grads["fused"], grads["split"], strict=True):
        assert fused.dtype == split.dtype == np.float64
        np.testing.assert_allclose(split, fused, rtol=1e-5, atol=1e-5 * max(1.0, np.abs(fused).max()))
    with pytest.raises(ValueError, match="separable_implementation must be one of"):
        op_choices.OpChoices(separable="barrier")


@pytest.mark.parametrize("align_corners", [True, False])
@pytest.mark.parametrize(
    ("in_hw", "out_hw"), [((8, 8), (64, 64)), ((5, 7), (33, 20)), ((16, 16), (16, 9)), ((1, 4), (6, 1))]
)
def test_gather_resize_gradient_is_the_interpolation_matrix_transpose(in_hw, out_hw, align_corners) -> None:
    # The gather form has a custom VJP (a K-tap gather instead of a scatter-add); it must be the exact adjoint.
    x = jax.random.normal(jax.random.PRNGKey(0), (2, *in_hw, 3))
    cotangent = jax.random.normal(jax.random.PRNGKey(1), (2, *out_hw, 3))
    grad = jax.grad(lambda x: jnp.sum(resize.resize_bilinear(x, out_hw, "gather", align_corners) * cotangent))(x)
    rows = resize.resize_matrix(in_hw[0], out_hw[0], align_corners)
    cols = resize.resize_matrix(in_hw[1], out_hw[1], align_corners)
    expected = np.einsum("oh,pw,bopc->bhwc", rows, cols, np.asarray(cotangent, np.float64))
    np.testing.assert_allclose(np.asarray(grad), expected, rtol=1e-5, atol=1e-5)
    grad_bf16 = jax.grad(
        lambda x: jnp.sum(resize.resize_bilinear(x, out_hw, "gather").astype(jnp.float32) * cotangent)
    )(x.astype(jnp.bfloat16))
    assert grad_bf16.dtype == jnp.bfloat16


@pytest.mark.parametrize("dilation", [1, 2, 8])
def test_shifted_depthwise_gradients_match_grouped_convolution(dilation) -> None:
    # The shifted form has a custom VJP (the flipped-kernel correlation instead of nine transposed slices).
    x = jax.random.normal(jax.random.PRNGKey(0), (2, 9, 11, 5))
    cotangent = jax.random.normal(jax.random.PRNGKey(1), (2, 9, 11, 5))
    grads = {}
    for implementation in ("shifted", "grouped", "pallas"):
        grad_forms = {"input_grad": "pallas", "kernel_grad": "pallas"} if implementation == "pallas" else {}
        module = depthwise.DepthwiseConv(3, dilation, implementation=implementation, **grad_forms)
        variables = module.init(jax.random.PRNGKey(2), x)
        grads[implementation] = jax.grad(lambda v, x, m=module: jnp.sum(m.apply(v, x) * cotangent), argnums=(0, 1))(
            variables, x
        )
    for implementation in ("shifted", "pallas"):
        for got, grouped in zip(jax.tree.leaves(grads[implementation]), jax.tree.leaves(grads["grouped"]), strict=True):
            np.testing.assert_allclose(np.asarray(got), np.asarray(grouped), rtol=1e-5, atol=5e-5)


@pytest.mark.parametrize("dilation", [1, 3])
def test_depthwise_kernel_gradient_forms_agree(dilation) -> None:
    # The stacked single reduction (GPU) and the nine sums (CPU, TPU) are the same kernel gradient.
    key_x, key_g = jax.random.split(jax.random.PRNGKey(4))
    x = jax.random.normal(key_x, (2, 7, 9, 5), jnp.float32)
    grad = jax.random.normal(key_g, (2, 7, 9, 5), jnp.float32)
    views = depthwise._shifted_views(x, 3, dilation)
    stacked = depthwise._tap_gradients(views, grad, form="stacked")
    separate = depthwise._tap_gradients(views, grad, form="per_tap")
    minor = depthwise._tap_gradients(views, grad, form="stacked_minor")
    assert stacked.shape == separate.shape == minor.shape == (9, 5)
    np.testing.assert_allclose(stacked, separate, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(minor, separate, rtol=1e-5, atol=1e-5)
    # Tap (i, j) pairs the gradient with x shifted by ((i-1)*d, (j-1)*d), zero outside the image.
    padded = np.pad(np.asarray(x), ((0, 0), (dilation, dilation), (dilation, dilation), (0, 0)))
    want = (padded[:, 2 * dilation : 2 * dilation + 7, 0:9] * np.asarray(grad)).sum((0, 1, 2))
    np.testing.assert_allclose(stacked[6], want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dilation", [1, 4])
def test_depthwise_gradient_choices_give_the_same_gradients(dilation) -> None:
    # OpChoices.depthwise_input_grad / depthwise_kernel_grad change how XLA schedules the backward pass
    # (an optimization barrier per branch; one stacked reduction or nine), never its values. The margin
    # case is the JPU's: four branches reading one pre-padded input, their input gradients added.
    x = jax.random.normal(jax.random.PRNGKey(7), (2, 12, 10, 6))
    x = jnp.pad(x, ((0, 0), (8, 8), (8, 8), (0, 0)))
    results = {}
    for input_grad in ("fused", "materialized", "pallas"):
        for kernel_grad in ("stacked", "stacked_minor", "per_tap", "pallas"):
            branches = [
                depthwise.DepthwiseConv(dilation=d, margin=8, input_grad=input_grad, kernel_grad=kernel_grad)
                for d in (dilation, 2 * dilation)
            ]
            params = [b.init(jax.random.PRNGKey(i), x) for i, b in enumerate(branches)]

            def loss(params, x, branches=branches):
                return sum(jnp.sum(jnp.sin(b.apply(p, x))) for b, p in zip(branches, params, strict=True))

            with jax.default_matmul_precision("highest"):
                results[input_grad, kernel_grad] = jax.jit(jax.grad(loss, argnums=(0, 1)))(params, x)
    want = jax.tree.leaves(results["fused", "per_tap"])
    assert float(jnp.abs(want[-1]).max()) > 0
    for key, got in results.items():
        for g, w in zip(jax.tree.leaves(got), want, strict=True):
            np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5, err_msg=str(key))
    with pytest.raises(ValueError, match="depthwise_input_grad_implementation must be one of"):
        op_choices.OpChoices(depthwise_input_grad="barrier")
    with pytest.raises(ValueError, match="depthwise_kernel_grad_implementation must be one of"):
        op_choices.OpChoices(depthwise_kernel_grad="nine")


def test_depthwise_gradient_auto_choices_per_backend() -> None:
    # 'auto' on GPUs: the Pallas kernels (checked on an H200) when they run on each device's examples (one
    # device, or the data mesh as context), else materialized input gradients (an optimization_barrier in the
    # backward program) and the stacked kernel gradient. The forward is a Pallas kernel in training only.
    x = jnp.ones((4, 10, 10, 4))

    def backward_text(backend, *, train=False, mesh=None, **forms):
        module = depthwise.DepthwiseConv(dilation=2, margin=2, **forms)
        variables = module.init(jax.random.PRNGKey(0), x)

        def grad(v, x):
            return jax.grad(lambda v, x: jnp.sum(module.apply(v, x, train=train)), argnums=(0, 1))(v, x)

        with contextlib.ExitStack() as stack:
            stack.enter_context(op_choices.target_backend(backend))
            if mesh is not None:
                stack.enter_context(jax.sharding.use_abstract_mesh(mesh.abstract_mesh))
            return str(jax.make_jaxpr(grad)(variables, x))

    # The tests run on 4 host devices (conftest): without the mesh 'auto' keeps the XLA forms.
    gpu = backward_text("gpu", train=True)
    assert "optimization_barrier" in gpu and "pallas_call" not in gpu
    mesh = sharding.make_mesh()
    assert backward_text("gpu", mesh=mesh).count("pallas_call") == 2  # inference: XLA's forward
    assert backward_text("gpu", train=True, mesh=mesh).count("pallas_call") == 3
    # A program for one of the devices, traced with a one-device mesh (as the benchmark does).
    assert backward_text("gpu", train=True, mesh=sharding.make_mesh(1)).count("pallas_call") == 3
    with op_choices.xla_forms():  # FLOP counting: the XLA forms of the same maths
        assert "pallas_call" not in backward_text("gpu", train=True, mesh=mesh)
    for backend in ("cpu", "tpu"):
        text = backward_text(backend, train=True, mesh=mesh)
        assert "optimization_barrier" not in text and "pallas_call" not in text
    # Chosen explicitly without the mesh, a GPU with several devices would replicate the kernels' operands,
    # which the trace says.
    with pytest.warns(UserWarning, match="replicates its operands"):
        pallas = backward_text("gpu", input_grad="pallas", kernel_grad="pallas")
    assert pallas.count("pallas_call") == 2 and "optimization_barrier" not in pallas
    with pytest.raises(ValueError, match="depthwise_implementation must be one of"):
        depthwise.depthwise_forms("triton", "auto", "auto", train=True)


@pytest.mark.parametrize(
    ("platform_version", "capability", "checked"),
    [("cuda 12080", "9.0", True), ("cuda 12080", "8.0", True), ("cuda 12080", "7.0", False), ("rocm 6.2", None, False)],
)
def test_auto_takes_the_pallas_kernels_only_on_the_gpus_they_were_checked_on(
    monkeypatch, platform_version, capability, checked
) -> None:
    # Triton's bfloat16 needs compute capability 8.0; the kernels were checked on a 9.0 (H200), not on ROCm.
    class Device:
        client = type("Client", (), {"platform_version": platform_version})()
        compute_capability = capability

    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    monkeypatch.setattr(jax, "devices", lambda *args: [Device()])
    monkeypatch.setattr(jax, "device_count", lambda *args: 1)
    assert op_choices.pallas_for_auto() is checked
    assert op_choices.choose_pallas("depthwise_input_grad", "auto", "materialized") == (
        "pallas" if checked else "materialized"
    )


def _float64_train_results(name: str, **overrides) -> tuple[np.ndarray, list[np.ndarray]]:
    """Train-mode logits and parameter gradients of a tiny model computed in float64.

    In float32 the BatchNorm gradients of a train-mode loss carry summation-order noise of up to 5e-4 of
    their largest element, which would hide a real difference as well as a false one."""
    from fastfcn_jax.models import create_model

    with jax.enable_x64(True):
        images = jax.random.normal(jax.random.PRNGKey(0), (2, 32, 32, 3), jnp.float64)
        model = create_model(name, 5, dtype=jnp.float64, **overrides)
        variables = model.init(jax.random.PRNGKey(1), images, train=False)
        variables = jax.tree.map(lambda a: a.astype(jnp.float64), variables)
        return _train_mode_logits_and_gradients(model, variables, images)


def _assert_same_results(got, want) -> None:
    (out_got, grads_got), (out_want, grads_want) = got, want
    # The classifier and the logits stay float32 (the model's policy), everything before them is float64: the
    # head's rounding, which depends on the order the compiled program sums in, bounds the agreement (about
    # 1e-6 relative); a wrong tap, border or resize differs by O(1).
    np.testing.assert_allclose(out_got, out_want, rtol=1e-5, atol=1e-5)
    for g, w in zip(grads_got, grads_want, strict=True):
        assert w.dtype == np.float64
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5 * max(1.0, np.abs(w).max()))


@pytest.mark.parametrize("depthwise", ["shifted", "grouped"])
def test_padded_jpu_input_has_the_fused_forms_outputs_and_gradients(depthwise) -> None:
    results = {
        jpu_input: _float64_train_results(
            "encnet_jpu_tiny", jpu_input_implementation=jpu_input, depthwise_implementation=depthwise
        )
        for jpu_input in ("fused", "padded")
    }
    _assert_same_results(results["padded"], results["fused"])
    with pytest.raises(ValueError, match="jpu_input_implementation must be one of"):
        op_choices.OpChoices(jpu_input="barrier")


def test_pallas_depthwise_kernels_train_like_the_xla_forms_in_the_jpu() -> None:
    # The whole JPU (four branches reading one pre-padded input, their input gradients summed) with every
    # depthwise op a Pallas kernel (interpreted here) against the XLA forms. The kernels round to float32
    # as the shifted form does, in another order, hence a float32-sized tolerance on top of float64. With the
    # per-branch kernels every training BatchNorm of the model also sums in its Pallas kernel
    # (OpChoices.norm_statistics; float64 here, exact to rounding: tests/test_batch_norm_pallas.py).
    pallas = {f"{op}_implementation": "pallas" for op in ("depthwise", "depthwise_input_grad", "depthwise_kernel_grad")}
    (out_x, grads_x) = _float64_train_results("encnet_jpu_tiny", jpu_input_implementation="padded")
    # OpChoices.jpu_depthwise: per branch, or one kernel for all.
    for jpu_depthwise, statistics in (("branches", "pallas"), ("joint", "xla")):
        (out_p, grads_p) = _float64_train_results(
            "encnet_jpu_tiny",
            jpu_input_implementation="padded",
            jpu_depthwise_implementation=jpu_depthwise,
            norm_statistics_implementation=statistics,
            **pallas,
        )
        np.testing.assert_allclose(out_p, out_x, rtol=1e-5, atol=1e-5)
        for g, w in zip(grads_p, grads_x, strict=True):
            np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-4 * max(1.0, np.abs(w).max()))


@pytest.mark.parametrize("implementation", ["shifted", "grouped", "pallas"])
def test_depthwise_conv_on_a_pre_padded_input_equals_padding_inside(implementation) -> None:
    x = jax.random.normal(jax.random.PRNGKey(5), (2, 6, 7, 4))
    # The Pallas forward with the Pallas gradients: every offset of the kernels' zero border is exercised.
    forms = {"input_grad": "pallas", "kernel_grad": "pallas"} if implementation == "pallas" else {}
    inner = depthwise.DepthwiseConv(dilation=2, implementation=implementation, **forms)
    outer = depthwise.DepthwiseConv(dilation=2, implementation=implementation, margin=3, **forms)
    variables = inner.init(jax.random.PRNGKey(0), x)

    def run(module, margin):
        def f(variables, x):
            padded = jnp.pad(x, ((0, 0), (margin, margin), (margin, margin), (0, 0))) if margin else x
            return module.apply(variables, padded)

        with jax.default_matmul_precision("highest"):
            out = f(variables, x)
            grads = jax.grad(lambda v, x: jnp.sum(jnp.sin(f(v, x))), argnums=(0, 1))(variables, x)
        return out, grads

    (out, (dv, dx)), (out_m, (dv_m, dx_m)) = run(inner, 0), run(outer, 3)
    assert out_m.shape == out.shape == x.shape
    np.testing.assert_allclose(out_m, out, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(dx_m, dx, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(dv_m["params"]["kernel"], dv["params"]["kernel"], rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="less than the padding"):
        depthwise.DepthwiseConv(dilation=4, margin=3).init(jax.random.PRNGKey(0), jnp.zeros((1, 12, 12, 2)))


def _trained_looking_variables(model, images):
    """Variables whose BatchNorms are far from identity: the running statistics of real activations
    (tests/model_weights.py, else the logits hardly depend on the image), scales and shifts random."""
    from tests.model_weights import calibrated_variables

    variables = calibrated_variables(model, images.shape[1], seed=1)
    leaves, treedef = jax.tree_util.tree_flatten_with_path(variables)
    keys = jax.random.split(jax.random.PRNGKey(2), len(leaves))
    values = []
    for key, (path, leaf) in zip(keys, leaves, strict=True):
        name = str(getattr(path[-1], "key", path[-1]))
        if path[0].key == "params" and name == "scale":
            leaf = jax.random.uniform(key, leaf.shape, leaf.dtype, 0.5, 2.0)
        elif path[0].key == "params" and name == "bias":
            leaf = 0.3 * jax.random.normal(key, leaf.shape, leaf.dtype)
        values.append(leaf)
    return jax.tree_util.tree_unflatten(treedef, values)


@pytest.mark.parametrize("name", ["encnet_jpu_tiny", "psp_dilated_tiny", "deeplab_jpu_tiny", "encnet_jpux_tiny"])
def test_folded_batch_norm_gives_the_same_outputs(name) -> None:
    from fastfcn_jax.models import create_model

    images = jax.random.normal(jax.random.PRNGKey(0), (2, 32, 32, 3))
    model = create_model(name, 5)
    variables = _trained_looking_variables(model, images)
    folded_model = create_model(name, 5, norm_implementation="folded")
    folded = batch_norm.fold_batch_norm(variables)
    assert jax.tree.structure(folded) == jax.tree.structure(variables)
    with jax.default_matmul_precision("highest"):
        want = model.apply(variables, images, train=False)
        got = folded_model.apply(folded, images, train=False)
    for key in want:
        # In units of the outputs' spread (they reach several hundred here and cross zero): float32 rounding.
        error = np.max(np.abs(np.asarray(got[key]) - np.asarray(want[key]))) / np.std(np.asarray(want[key]))
        assert error < 1e-4, (key, error)

    # The folded model normalises nothing where a convolution precedes the BatchNorm: no rsqrt left for them
    # (EncNet keeps its codeword BatchNorm, JPU_X its GroupNorms).
    def rsqrt_count(m, v):
        return str(jax.make_jaxpr(lambda v, x: m.apply(v, x, train=False))(v, images)).count("rsqrt")

    assert rsqrt_count(folded_model, folded) < rsqrt_count(model, variables)
    if name == "psp_dilated_tiny":
        assert rsqrt_count(folded_model, folded) == 0
    with pytest.raises(ValueError, match="folded into its convolution"):
        folded_model.apply(folded, images, train=True, mutable=["batch_stats"], rngs={"dropout": jax.random.PRNGKey(3)})


def test_fold_batch_norm_folds_conv_pairs_only() -> None:
    from fastfcn_jax.models import create_model

    images = jnp.zeros((1, 32, 32, 3))
    model = create_model("encnet_jpux_tiny", 5)
    variables = _trained_looking_variables(model, images)
    folded = batch_norm.fold_batch_norm(variables)
    bn, bn_folded = variables["params"]["backbone"]["stem1"]["bn"], folded["params"]["backbone"]["stem1"]["bn"]
    stats = variables["batch_stats"]["backbone"]["stem1"]["bn"]
    multiplier = np.asarray(bn["scale"]) / np.sqrt(np.asarray(stats["var"]) + 1e-5)
    np.testing.assert_allclose(
        folded["params"]["backbone"]["stem1"]["conv"]["kernel"],
        np.asarray(variables["params"]["backbone"]["stem1"]["conv"]["kernel"]) * multiplier,
        rtol=1e-6,
    )
    np.testing.assert_allclose(
        bn_folded["bias"], np.asarray(bn["bias"]) - np.asarray(stats["mean"]) * multiplier, rtol=1e-5, atol=1e-6
    )
    np.testing.assert_array_equal(bn_folded["scale"], np.ones_like(bn["scale"]))
    np.testing.assert_array_equal(folded["batch_stats"]["backbone"]["stem1"]["bn"]["var"], np.ones_like(stats["var"]))
    # JPU_X's GroupNorms and EncNet's codeword BatchNorm (no convolution beside it) stay as they were.
    jum = variables["params"]["neck"]["jum_1"]["dilation1"]
    np.testing.assert_array_equal(folded["params"]["neck"]["jum_1"]["dilation1"]["depthwise_norm"]["scale"],
                                  jum["depthwise_norm"]["scale"])  # fmt: skip
    np.testing.assert_array_equal(folded["params"]["decode_head"]["enc_bn"]["scale"],
                                  variables["params"]["decode_head"]["enc_bn"]["scale"])  # fmt: skip
    with pytest.raises(ValueError, match="norm_implementation must be one of"):
        op_choices.OpChoices(norm="merged")


def test_target_backend_resolves_auto_choices_for_another_backend() -> None:
    from fastfcn_jax.models import create_model

    assert op_choices.backend() == jax.default_backend() == "cpu"
    x = jnp.ones((1, 16, 16, 4))
    conv = layers.Conv2D(4, 3, dilation=12)
    variables = conv.init(jax.random.PRNGKey(0), x)
    model = create_model("encnet_jpu_tiny", 5)
    images = jnp.ones((1, 32, 32, 3))
    model_variables = model.init(jax.random.PRNGKey(0), images, train=False)

    def traced():
        return (
            str(jax.make_jaxpr(conv.apply)(variables, x)),
            str(jax.make_jaxpr(lambda v, x: model.apply(v, x, train=False))(model_variables, images)),
        )

    conv_cpu, model_cpu = traced()
    with op_choices.target_backend("gpu"):
        assert op_choices.backend() == "gpu"
        assert op_choices.choose("auto", tpu="matmul", other="gather", gpu="padded") == "padded"
        conv_gpu, model_gpu = traced()
    with op_choices.target_backend("tpu"):
        assert op_choices.choose("auto", tpu="matmul", other="gather") == "matmul"
    assert op_choices.backend() == "cpu"
    # Rate 12 on 16x16: the CPU runs only the taps that read pixels, a GPU the convolution.
    assert "conv_general_dilated" not in conv_cpu and "conv_general_dilated" in conv_gpu
    # The JPU's input is padded once and materialised for GPUs only.
    assert "optimization_barrier" not in model_cpu and "optimization_barrier" in model_gpu
    with pytest.raises(ValueError, match="unknown backend 'cuda'"), op_choices.target_backend("cuda"):
        pass


@pytest.mark.parametrize(
    ("size", "pooled", "kernel_size"),
    [((16, 16), [(1, 1), (2, 2), (3, 3), (6, 6)], 3), ((5, 7), [(6, 6), (1, 1)], 3), ((1, 4), [(2, 3)], 3),
     ((9, 9), [(1, 1)], 1)],
)  # fmt: skip
def test_conv_of_resized_is_the_conv_of_the_upsampled_concatenation(size, pooled, kernel_size) -> None:
    # Includes pooled maps larger than the output (a 6x6 level of a 5x7 map) and a 1-pixel-high output.
    with jax.enable_x64(True):
        inputs = [jax.random.normal(jax.random.PRNGKey(i), (2, *s, 4), jnp.float64) for i, s in enumerate(pooled)]
        kernel = jax.random.normal(jax.random.PRNGKey(9), (kernel_size, kernel_size, 4 * len(pooled), 5), jnp.float64)
        cotangent = jax.random.normal(jax.random.PRNGKey(10), (2, *size, 5), jnp.float64)

        def reference(inputs, kernel):
            upsampled = [
                jnp.einsum(
                    "oh,pw,bhwc->bopc",
                    resize.align_corners_matrix(x.shape[1], size[0]),
                    resize.align_corners_matrix(x.shape[2], size[1]),
                    x,
                )
                for x in inputs
            ]
            pad = kernel_size // 2
            return jax.lax.conv_general_dilated(
                jnp.concatenate(upsampled, -1), kernel, (1, 1), [(pad, pad)] * 2,
                dimension_numbers=("NHWC", "HWIO", "NHWC"), precision="highest",
            )  # fmt: skip

        def low_res(inputs, kernel):
            return resize.conv_of_resized(inputs, kernel, size, jnp.float64)

        want, want_vjp = jax.vjp(reference, inputs, kernel)
        got, got_vjp = jax.vjp(low_res, inputs, kernel)
        assert got.dtype == jnp.float64
        np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)
        for g, w in zip(jax.tree.leaves(got_vjp(cotangent)), jax.tree.leaves(want_vjp(cotangent)), strict=True):
            np.testing.assert_allclose(g, w, rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="resized_implementation must be one of"):
        op_choices.OpChoices(resized="lazy")


@pytest.mark.parametrize("name", ["psp_jpu_tiny", "deeplab_dilated_tiny"])
def test_low_res_pooled_branches_have_the_upsampled_forms_outputs_and_gradients(name) -> None:
    results = {r: _float64_train_results(name, resized_implementation=r) for r in ("low_res", "upsampled")}
    _assert_same_results(results["low_res"], results["upsampled"])


@pytest.mark.parametrize(
    ("shape", "dtype", "ties"),
    [((2, 9, 11, 3), jnp.float32, True), ((1, 8, 8, 5), jnp.float32, False), ((2, 16, 15, 4), jnp.bfloat16, True),
     ((1, 1, 1, 2), jnp.float32, False), ((1, 2, 3, 2), jnp.float32, True)],
)  # fmt: skip
@pytest.mark.parametrize("forward", ["window", "taps"])
def test_max_pool_gradient_goes_to_each_windows_first_maximum_as_autodiffs(shape, dtype, ties, forward):
    # OpChoices.max_pool_grad='taps': the stem's 3x3 stride-2 pool with its gradient as a fused gather equals
    # autodiff's select-and-scatter exactly, ties included (small integers: many equal maxima per window;
    # integer gradients: sums exact in any order). OpChoices.max_pool: either forward gives the same values.
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.integers(0, 3, size=shape) if ties else rng.normal(size=shape), dtype)
    want, want_vjp = jax.vjp(lambda x: nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1))), x)
    got, got_vjp = jax.vjp(lambda x: layers.max_pool(x, 3, 2, 1, forward), x)
    grad = jnp.asarray(rng.integers(1, 8, size=want.shape), dtype)
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(got_vjp(grad)[0], want_vjp(grad)[0])
    assert got_vjp(grad)[0].dtype == dtype


@pytest.mark.parametrize(("window", "stride", "padding"), [(2, 2, 0), (3, 1, 1), (3, 3, 1), (5, 2, 2), (2, 3, 1)])
@pytest.mark.parametrize("forward", ["window", "taps"])
def test_max_pool_gradient_for_other_windows_strides_and_paddings(window, stride, padding, forward):
    # Each of the stride x stride phases of the input sums the taps that reach it (none for some when the
    # stride exceeds the window): every geometry equals autodiff's gradient, ties included.
    rng = np.random.default_rng(window * 10 + stride)
    x = jnp.asarray(rng.integers(0, 3, size=(2, 11, 10, 3)), jnp.float32)
    pads = ((padding, padding), (padding, padding))
    want, want_vjp = jax.vjp(lambda x: nn.max_pool(x, (window, window), strides=(stride, stride), padding=pads), x)
    got, got_vjp = jax.vjp(lambda x: layers.max_pool(x, window, stride, padding, forward), x)
    grad = jnp.asarray(rng.integers(1, 8, size=want.shape), jnp.float32)
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(got_vjp(grad)[0], want_vjp(grad)[0])


@pytest.mark.parametrize(
    ("backend", "choice", "scatters"),
    [("cpu", "auto", 0), ("gpu", "auto", 0), ("tpu", "auto", 1), ("cpu", "select", 1)],
)
def test_the_stem_pool_gradient_follows_the_choice_and_backend(backend, choice, scatters):
    # OpChoices.max_pool_grad: the fused gather on CPUs and GPUs, autodiff's select-and-scatter on TPUs.
    from fastfcn_jax.models.resnet import ResNet

    model = ResNet(stage_sizes=(1, 1, 1, 1), stem_width=4, base_width=4, ops=op_choices.OpChoices(max_pool_grad=choice))
    x = jnp.ones((1, 16, 16, 3))
    variables = model.init(jax.random.PRNGKey(0), x)
    loss = lambda x: sum(jnp.sum(f) for f in model.apply(variables, x))  # noqa: E731
    with op_choices.target_backend(backend):
        jaxpr = str(jax.make_jaxpr(jax.grad(loss))(x))
    assert jaxpr.count("select_and_scatter_add") == scatters


@pytest.mark.parametrize("backend", ["cpu", "tpu"])
def test_the_stem_pool_as_taps_has_no_pooling_window(backend):
    # OpChoices.max_pool='taps' (the ONNX export's): no reduce_window in the forward, and its own gradient
    # (taps) also where max_pool_grad would pick autodiff's select-and-scatter (TPUs).
    from fastfcn_jax.models.resnet import ResNet

    x = jax.random.normal(jax.random.PRNGKey(1), (1, 16, 16, 3))
    outputs = {}
    for form in ("window", "taps"):
        model = ResNet(stage_sizes=(1, 1, 1, 1), stem_width=4, base_width=4, ops=op_choices.OpChoices(max_pool=form))
        variables = model.init(jax.random.PRNGKey(0), x)
        forward = functools.partial(model.apply, variables)
        with op_choices.target_backend(backend):
            jaxpr = str(jax.make_jaxpr(forward)(x))
            grad = str(jax.make_jaxpr(jax.grad(lambda x, f=forward: sum(jnp.sum(c) for c in f(x))))(x))
        assert ("reduce_window_max" in jaxpr) == (form == "window")
        if form == "taps":
            assert "select_and_scatter_add" not in grad
        outputs[form] = model.apply(variables, x)
    for window, taps in zip(outputs["window"], outputs["taps"], strict=True):
        np.testing.assert_array_equal(window, taps)


@pytest.mark.parametrize(
    ("depthwise", "padded"), [("pallas", False), ("shifted", True)], ids=["pallas_forms", "xla_forms"]
)
def test_auto_jpu_input_pads_on_gpus_only_for_the_xla_depthwise_forms(depthwise, padded):
    # OpChoices.jpu_input='auto' traced for a GPU's training step: the per-branch Pallas kernels mask the
    # border themselves (no padded copy of the 1536-channel input, no padded input gradients to add), XLA's
    # forms read the concatenation padded once by the largest dilation.
    from fastfcn_jax.models.jpu import JPU

    forms = dict(depthwise=depthwise, depthwise_input_grad="pallas", depthwise_kernel_grad="pallas")
    if depthwise == "shifted":
        forms.update(depthwise_input_grad="materialized", depthwise_kernel_grad="stacked")
    jpu = JPU(width=8, ops=op_choices.OpChoices(**forms))
    c2, c3, c4 = jnp.ones((1, 8, 8, 4)), jnp.ones((1, 4, 4, 6)), jnp.ones((1, 2, 2, 8))
    variables = jpu.init(jax.random.PRNGKey(0), c2, c3, c4)

    def loss(params):
        out, _ = jpu.apply({**variables, "params": params}, c2, c3, c4, train=True, mutable=["batch_stats"])
        return jnp.sum(out**2)

    with op_choices.target_backend("gpu"), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # four host devices and no mesh: the replication warning
        jaxpr = str(jax.make_jaxpr(jax.grad(loss))(variables["params"]))
    # The concatenation [1, 8, 8, 24] padded by the largest dilation, 8.
    assert ("f32[1,24,24,24]" in jaxpr) == padded
    assert jaxpr.count("pallas_call") == (12 if depthwise == "pallas" else 0)


@pytest.mark.parametrize(
    ("jpu_input", "jpu_depthwise", "kernels"),
    [("padded", "joint", 3), ("fused", "joint", 12), ("padded", "branches", 12)],
)
def test_the_jpu_runs_its_branches_depthwise_kernels_jointly(jpu_input, jpu_depthwise, kernels):
    # OpChoices.jpu_depthwise='joint': with every depthwise form a Pallas kernel and the input padded once, one
    # kernel per pass serves the four branches (depthwise.depthwise_joint: forward, summed input gradient, kernel
    # gradients); without the shared padded input, or with 'branches', each branch has its own three. The
    # parameters are the same either way.
    from fastfcn_jax.models.jpu import JPU

    pallas = dict(depthwise="pallas", depthwise_input_grad="pallas", depthwise_kernel_grad="pallas")
    jpu = JPU(width=8, ops=op_choices.OpChoices(jpu_input=jpu_input, jpu_depthwise=jpu_depthwise, **pallas))
    c2, c3, c4 = jnp.ones((1, 8, 8, 4)), jnp.ones((1, 4, 4, 6)), jnp.ones((1, 2, 2, 8))
    variables = jpu.init(jax.random.PRNGKey(0), c2, c3, c4)
    reference = JPU(width=8).init(jax.random.PRNGKey(0), c2, c3, c4)
    assert jax.tree.structure(variables) == jax.tree.structure(reference)

    def loss(params):
        return jnp.sum(jpu.apply({**variables, "params": params}, c2, c3, c4) ** 2)

    with op_choices.target_backend("gpu"), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # four host devices and no mesh: the replication warning
        jaxpr = str(jax.make_jaxpr(jax.grad(loss))(variables["params"]))
    assert jaxpr.count("pallas_call") == kernels

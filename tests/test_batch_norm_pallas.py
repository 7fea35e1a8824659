"""BatchNorm's per-channel sums as a Pallas kernel (run in Pallas's interpreter here) against NumPy and
against the XLA BatchNorm, and its lowering to Triton for GPUs."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fastfcn_jax import sharding
from fastfcn_jax.models import batch_norm, batch_norm_pallas, depthwise_pallas, op_choices


@pytest.mark.parametrize(
    ("rows", "channels", "dtype"),
    [(1000, 96, jnp.float32), (37, 8, jnp.float32), (3000, 160, jnp.bfloat16), (5, 512, jnp.float32)],
)
def test_channel_sums_match_numpy(rows, channels, dtype) -> None:
    # Rows that are not a multiple of the tile or the band, channel blocks of 32-128, bfloat16 inputs summed
    # in float32; with v (the backward's sum(dy * x)) and without (the forward's moments about a shift).
    keys = jax.random.split(jax.random.PRNGKey(rows), 4)
    u = (3.0 * jax.random.normal(keys[0], (rows, channels)) + 5.0).astype(dtype)
    v = jax.random.normal(keys[1], (rows, channels)).astype(dtype)
    u_shift, v_shift = jax.random.normal(keys[2], (channels,)), jax.random.normal(keys[3], (channels,))
    d = np.asarray(u.astype(jnp.float32), np.float64) - np.asarray(u_shift, np.float64)
    e = np.asarray(v.astype(jnp.float32), np.float64) - np.asarray(v_shift, np.float64)
    per_band = batch_norm_pallas.rows_per_band(
        rows, channels // depthwise_pallas.channel_block(channels, batch_norm_pallas.CHANNEL_BLOCK)
    )
    if rows >= 1000:  # these cases split the rows into several bands, the last one partly past the end
        assert per_band < rows and rows % per_band
    for got, want in (
        (batch_norm_pallas.channel_sums(u, u_shift, interpret=True), (d.sum(0), (d * d).sum(0))),
        (batch_norm_pallas.channel_sums(u, u_shift, v, v_shift, interpret=True), (d.sum(0), (d * e).sum(0))),
    ):
        for g, w in zip(got, want, strict=True):
            assert g.dtype == jnp.float32 and g.shape == (channels,)
            np.testing.assert_allclose(np.asarray(g), w, rtol=2e-6, atol=2e-6 * np.abs(w).max())
    with pytest.raises(ValueError, match="differ"):
        batch_norm_pallas.channel_sums(u, u_shift, v[:-1], v_shift, interpret=True)


def _batch_norm_results(statistics: str, x: jax.Array, mesh=None):
    """Train-mode output, updated running statistics and the gradients (scale, bias, x) of a loss."""
    channels = x.shape[-1]
    module = batch_norm.BatchNorm(use_running_average=False, statistics=statistics)
    params = {"scale": jnp.linspace(0.5, 2.0, channels), "bias": jnp.linspace(-1.0, 1.0, channels)}
    stats = {"mean": jnp.linspace(-0.3, 0.3, channels), "var": jnp.ones(channels)}
    params, stats = jax.tree.map(lambda a: a.astype(x.dtype), (params, stats))

    def loss(params, x):
        y, new_stats = module.apply({"params": params, "batch_stats": stats}, x, mutable=["batch_stats"])
        return jnp.sum(jnp.sin(y)), (y, new_stats)

    step = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))
    if mesh is not None:
        step = jax.jit(sharding.with_mesh(step, mesh))
        x = jax.device_put(x, sharding.batch_sharded(mesh))
        assert "all-gather" not in step.lower(params, x).compile().as_text()  # each device sums its rows
    (_, (y, new_stats)), grads = step(params, x)
    return y, new_stats, grads


def test_pallas_statistics_train_like_the_xla_batch_norm() -> None:
    # OpChoices.norm_statistics='pallas': the same forward, running statistics and gradients as XLA's
    # BatchNorm, to float64 rounding (the same formulas, summed in another order); over a 4-device mesh the
    # sums are added over the devices (the global batch's statistics, as SyncBN).
    with jax.enable_x64(True):
        x = 2.0 * jax.random.normal(jax.random.PRNGKey(0), (4, 5, 7, 16), jnp.float64) + 1.0
        want = _batch_norm_results("xla", x)
        for got in (_batch_norm_results("pallas", x), _batch_norm_results("pallas", x, sharding.make_mesh())):
            for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
                assert g.dtype == w.dtype == jnp.float64
                np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-12, atol=1e-12)
    # bfloat16 activations (the GPU's training dtype): float32 arithmetic and one rounding of each result
    # either way, so the two forms differ by at most one bfloat16 step (2^-7 of a value), and each is as far from the
    # float64 result as the other.
    x = x.astype(jnp.bfloat16)
    with jax.enable_x64(True):
        exact = jax.tree.leaves(_batch_norm_results("xla", x.astype(jnp.float64)))
    got, want = jax.tree.leaves(_batch_norm_results("pallas", x)), jax.tree.leaves(_batch_norm_results("xla", x))

    def error(a, b):
        a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
        return np.abs(a - b).max() / np.abs(b).max()

    for g, w, e in zip(got, want, exact, strict=True):
        assert g.dtype == w.dtype
        assert error(g, w) <= 2.0**-7
        assert error(g, e) <= 1.25 * error(w, e) + 1e-6
    with pytest.raises(ValueError, match="norm_statistics_implementation must be one of"):
        op_choices.OpChoices(norm_statistics="triton")


def test_pallas_statistics_are_traced_where_chosen() -> None:
    # Training only (evaluation reads the running statistics), two kernels per BatchNorm (forward moments,
    # backward sums), none inside xla_forms() (FLOP counting), and a Triton program for CUDA.
    x = jnp.ones((4, 6, 6, 32))
    module = batch_norm.BatchNorm(statistics="pallas")
    variables = module.init(jax.random.PRNGKey(0), x, use_running_average=True)

    def grad(v, x, train):
        def loss(x):
            y, _ = module.apply(v, x, use_running_average=not train, mutable=["batch_stats"])
            return jnp.sum(y)

        return jax.grad(loss)(x)

    assert str(jax.make_jaxpr(lambda v, x: grad(v, x, True))(variables, x)).count("pallas_call") == 2
    assert "pallas_call" not in str(jax.make_jaxpr(lambda v, x: grad(v, x, False))(variables, x))
    with op_choices.xla_forms():
        assert "pallas_call" not in str(jax.make_jaxpr(lambda v, x: grad(v, x, True))(variables, x))
    rows = jax.ShapeDtypeStruct((57600, 512), jnp.bfloat16)
    shift = jax.ShapeDtypeStruct((512,), jnp.float32)
    for function, args in (
        (lambda u, s: batch_norm_pallas.channel_sums(u, s), (rows, shift)),
        (lambda u, s, v, t: batch_norm_pallas.channel_sums(u, s, v, t), (rows, shift, rows, shift)),
    ):
        text = jax.jit(function).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
        assert "triton" in text.lower()


def test_every_channels_last_batch_norm_of_a_model_takes_the_kernel(monkeypatch) -> None:
    # Segmenter(norm_statistics_implementation='pallas'): each training BatchNorm of the backbone, JPU and
    # heads runs the kernel twice, its moments forward and its gradient's sums backward; EncNet's codeword
    # BatchNorm (channels on axis 1) keeps XLA's reductions.
    from fastfcn_jax.models import create_model

    images = jnp.ones((2, 32, 32, 3))
    model = create_model("encnet_jpu_tiny", 5, norm_statistics_implementation="pallas")
    variables = model.init(jax.random.PRNGKey(0), images, train=False)
    paths = [jax.tree_util.keystr(path) for path, _ in jax.tree_util.tree_leaves_with_path(variables["batch_stats"])]
    norms = sum(path.endswith("['mean']") and "enc_bn" not in path for path in paths)
    calls = []
    channel_sums = batch_norm_pallas.channel_sums
    monkeypatch.setattr(batch_norm_pallas, "channel_sums", lambda *a, **k: calls.append(a) or channel_sums(*a, **k))

    def loss(params):
        outputs, _ = model.apply(
            {**variables, "params": params},
            images,
            train=True,
            mutable=["batch_stats"],
            rngs={"dropout": jax.random.PRNGKey(1)},
        )
        return sum(jnp.sum(o) for o in jax.tree.leaves(outputs))

    jax.make_jaxpr(jax.grad(loss))(variables["params"])
    assert norms > 20 and len(calls) == 2 * norms
    assert sum(len(a) == 4 for a in calls) == norms  # the backward's: dy and x

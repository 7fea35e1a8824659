"""Training step, sharding and checkpoint behaviour on a tiny model (4 fake CPU devices, see conftest)."""

from __future__ import annotations

import shutil
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fastfcn_jax import checkpointing, optim, sharding
from fastfcn_jax.models import batch_norm, create_model, op_choices
from fastfcn_jax.train import TrainState, create_train_state, load_pretrained, make_eval_step, make_train_step

NUM_CLASSES = 4
IMAGE_SHAPE = (1, 32, 32, 3)


@pytest.fixture(scope="module")
def setup():
    model = create_model("encnet_jpu_tiny", NUM_CLASSES)
    optimizer = optim.make_optimizer(optim.poly_schedule(0.01, 20))
    step = make_train_step(model, optimizer, aux_weight=0.2, se_weight=0.2)
    return model, optimizer, step


def make_batch(seed: int, batch_size: int = 8) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "image": rng.standard_normal((batch_size, 32, 32, 3)).astype(np.float32),
        "label": rng.integers(-1, NUM_CLASSES, (batch_size, 32, 32)).astype(np.int32),
    }


def jitted_step(step, state, mesh):
    replicated = sharding.replicated(mesh)
    state_sharding = jax.tree_util.tree_map(lambda _: replicated, state)
    return jax.jit(
        step,
        in_shardings=(state_sharding, sharding.batch_sharded(mesh), replicated),
        out_shardings=(state_sharding, replicated),
    )


def run_steps(setup, mesh, batches, state=None):
    model, optimizer, step = setup
    if state is None:
        state = create_train_state(model, optimizer, jax.random.PRNGKey(0), IMAGE_SHAPE, mesh)
    train_step = jitted_step(step, state, mesh)
    terms = None
    for batch in batches:
        state, terms = train_step(state, sharding.global_batch(batch, mesh), jax.random.PRNGKey(1))
    return state, terms


def assert_trees_close(a, b, rtol, atol):
    for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b), strict=True):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=rtol, atol=atol)


def test_four_devices_give_the_same_loss_and_batch_statistics_as_one(setup):
    assert jax.device_count() >= 4
    batch = make_batch(0)
    state1, terms1 = run_steps(setup, sharding.make_mesh(1), [batch])
    state4, terms4 = run_steps(setup, sharding.make_mesh(4), [batch])
    assert float(terms4["loss"]) == pytest.approx(float(terms1["loss"]), rel=1e-5)
    # BatchNorm statistics over the global batch (SyncBN), not per device.
    assert_trees_close(state4.batch_stats, state1.batch_stats, rtol=1e-4, atol=1e-5)
    assert_trees_close(state4.params, state1.params, rtol=1e-4, atol=1e-5)
    assert state4.params["neck"]["conv5"]["conv"]["kernel"].sharding.is_fully_replicated


def test_a_uint8_batch_is_normalised_by_the_step_as_the_pipeline_would(setup):
    # The training pipeline sends uint8 images (normalise=False); the step normalises them itself.
    rng = np.random.default_rng(5)
    pixels = rng.integers(0, 256, (8, 32, 32, 3), dtype=np.uint8)
    label = rng.integers(-1, NUM_CLASSES, (8, 32, 32)).astype(np.int32)
    mean, std = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])  # the reference's Normalize
    normalised = ((pixels / 255.0 - mean) / std).astype(np.float32)
    state_u8, terms_u8 = run_steps(setup, sharding.make_mesh(1), [{"image": pixels, "label": label}])
    state_f32, terms_f32 = run_steps(setup, sharding.make_mesh(1), [{"image": normalised, "label": label}])
    assert float(terms_u8["loss"]) == pytest.approx(float(terms_f32["loss"]), rel=1e-5)
    assert_trees_close(state_u8.params, state_f32.params, rtol=1e-4, atol=1e-6)
    # Not the raw pixel values: the same pixels unnormalised train differently.
    _, terms_raw = run_steps(setup, sharding.make_mesh(1), [{"image": pixels.astype(np.float32), "label": label}])
    assert float(terms_raw["loss"]) != pytest.approx(float(terms_u8["loss"]), rel=1e-3)


def test_training_lowers_the_loss_on_a_fixed_batch(setup):
    batch = make_batch(1)
    _, first = run_steps(setup, sharding.make_mesh(1), [batch])
    _, later = run_steps(setup, sharding.make_mesh(1), [batch] * 12)
    assert float(later["loss"]) < float(first["loss"])


def test_interrupted_and_resumed_run_equals_uninterrupted_run(setup, tmp_path):
    model, optimizer, _ = setup
    batches = [make_batch(10 + i) for i in range(4)]
    mesh = sharding.make_mesh(2)
    uninterrupted, _ = run_steps(setup, mesh, batches)

    half, _ = run_steps(setup, mesh, batches[:2])
    checkpoints = checkpointing.TrainCheckpointer(
        tmp_path, keep=2, info={"model_name": "encnet_jpu_tiny", "num_classes": NUM_CLASSES}
    )
    checkpoints.save(2, half)
    checkpoints.close()

    fresh = create_train_state(model, optimizer, jax.random.PRNGKey(99), IMAGE_SHAPE, mesh)
    reopened = checkpointing.TrainCheckpointer(
        tmp_path, keep=2, info={"model_name": "encnet_jpu_tiny", "num_classes": NUM_CLASSES}
    )
    restored = reopened.restore_latest(fresh)
    reopened.close()
    assert int(restored.step) == 2
    resumed, _ = run_steps(setup, mesh, batches[2:], state=restored)
    assert int(resumed.step) == 4
    assert_trees_close(resumed.params, uninterrupted.params, rtol=1e-6, atol=1e-7)
    assert_trees_close(resumed.opt_state, uninterrupted.opt_state, rtol=1e-6, atol=1e-7)


def test_checkpoint_from_four_devices_restores_on_one(setup, tmp_path):
    model, optimizer, _ = setup
    state4, _ = run_steps(setup, sharding.make_mesh(4), [make_batch(3)])
    info = {"model_name": "encnet_jpu_tiny", "num_classes": NUM_CLASSES}
    writer = checkpointing.TrainCheckpointer(tmp_path, keep=1, info=info)
    writer.save(1, state4)
    writer.close()

    mesh1 = sharding.make_mesh(1)
    target = create_train_state(model, optimizer, jax.random.PRNGKey(5), IMAGE_SHAPE, mesh1)
    reader = checkpointing.TrainCheckpointer(tmp_path, keep=1, info=info)
    restored = reader.restore_latest(target)
    reader.close()
    assert_trees_close(restored.params, state4.params, rtol=0, atol=0)
    leaf = jax.tree_util.tree_leaves(restored.params)[0]
    assert leaf.sharding.mesh.devices.size == 1
    # The same directory also serves restore_variables (one on-disk format).
    variables, restored_info = checkpointing.restore_variables(tmp_path)
    assert restored_info["model_name"] == "encnet_jpu_tiny" and restored_info["step"] == 1
    assert_trees_close(variables["batch_stats"], state4.batch_stats, rtol=0, atol=0)


def test_restore_moves_nothing_aside_when_no_step_can_be_read(tmp_path, monkeypatch):
    # A cause that may pass (memory, a network filesystem) fails every step alike: nothing is set aside and the
    # run does not start from scratch; a newer damaged step is set aside only once an older one restored.
    state = TrainState(
        step=jnp.zeros((), jnp.int32), params={"w": jnp.arange(4.0)}, batch_stats={}, opt_state={"m": jnp.ones(4)}
    )
    info = {"model_name": "encnet_jpu_tiny", "num_classes": NUM_CLASSES}
    writer = checkpointing.TrainCheckpointer(tmp_path, keep=3, info=info)
    for step in (2, 4):
        writer.save(step, state.replace(step=jnp.asarray(step, jnp.int32)))
    writer.close()
    reader = checkpointing.TrainCheckpointer(tmp_path, keep=3, info=info)
    real_restore = reader._restore_step

    def exhausted(step, target):
        raise RuntimeError("RESOURCE_EXHAUSTED: out of memory while restoring")

    monkeypatch.setattr(reader, "_restore_step", exhausted)
    with pytest.raises(ValueError, match=r"(?s)no checkpoint .* can be read.*step 4: RESOURCE_EXHAUSTED.*step 2"):
        reader.restore_latest(state)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir() if p.name[0].isdigit()) == ["2", "4"]

    def newest_damaged(step, target):
        return exhausted(step, target) if step == 4 else real_restore(step, target)

    monkeypatch.setattr(reader, "_restore_step", newest_damaged)
    assert int(reader.restore_latest(state).step) == 2
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir() if p.name[0].isdigit()) == ["2", "4.unreadable"]
    reader.save(4, state.replace(step=jnp.asarray(4, jnp.int32)))  # saved again by the resumed run, damaged again
    reader.wait()
    assert int(reader.restore_latest(state).step) == 2
    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir() if p.name[0].isdigit())
    assert names == ["2", "4.unreadable", "4.unreadable-2"]
    reader.close()
    # Only set-aside steps left: refused, not trained from scratch.
    (tmp_path / "checkpoints" / "2").rename(tmp_path / "checkpoints" / "2.unreadable")
    reader = checkpointing.TrainCheckpointer(tmp_path, keep=3, info=info)
    with pytest.raises(ValueError, match=r"set aside as unreadable \(2.unreadable, 4.unreadable, 4.unreadable-2\)"):
        reader.restore_latest(state)
    reader.close()


def test_best_checkpoint_is_replaced_by_a_resumed_runs_better_step(tmp_path):
    # A run resumed from an older checkpoint re-validates steps an earlier run already saved as the best.
    state = TrainState(
        step=jnp.zeros((), jnp.int32), params={"w": jnp.arange(4.0)}, batch_stats={}, opt_state={"m": jnp.ones(4)}
    )
    info = {"model_name": "encnet_jpu_tiny", "num_classes": NUM_CLASSES}
    checkpoints = checkpointing.TrainCheckpointer(tmp_path, keep=2, info=info)
    checkpoints.save_best(30, state.replace(params={"w": jnp.full(4, 1.0)}), 0.5)
    checkpoints.save_best(30, state.replace(params={"w": jnp.full(4, 2.0)}), 0.7)  # the same step again
    assert checkpoints.best_score() == 0.7
    checkpoints.save_best(25, state.replace(params={"w": jnp.full(4, 3.0)}), 0.9)  # below the saved step
    checkpoints.close()
    variables, best = checkpointing.restore_variables(tmp_path / "best")
    assert best["step"] == 25 and best["score"] == 0.9
    np.testing.assert_array_equal(variables["params"]["w"], np.full(4, 3.0))
    assert sorted(p.name for p in (tmp_path / "best").iterdir() if p.name[0].isdigit()) == ["25"]


def test_one_steps_folder_restores_that_step(tmp_path):
    # config.init_from=WORKDIR/checkpoints/2: evaluate, predict or fine-tune from a step other than the latest.
    state = TrainState(step=jnp.zeros((), jnp.int32), params={"w": jnp.zeros(4)}, batch_stats={}, opt_state={})
    checkpoints = checkpointing.TrainCheckpointer(tmp_path, keep=3, info={"model_name": "m", "num_classes": 2})
    for step in (2, 4):
        checkpoints.save(step, state.replace(params={"w": jnp.full(4, float(step))}))
    checkpoints.close()
    variables, info = checkpointing.restore_variables(tmp_path / "checkpoints" / "2")
    assert info["step"] == 2 and variables["params"]["w"].tolist() == [2.0] * 4
    (tmp_path / "step2").symlink_to(tmp_path / "checkpoints" / "2")
    assert checkpointing.restore_variables(tmp_path / "step2")[1]["step"] == 2
    shutil.copytree(tmp_path / "checkpoints" / "2", tmp_path / "copy_of_2")
    with pytest.raises(FileNotFoundError, match="looks like one step's folder.*give it its step's number"):
        checkpointing.restore_variables(tmp_path / "copy_of_2")
    assert checkpointing.restore_variables(tmp_path)[1]["step"] == 4


def test_imagenet_weights_are_refused_where_a_trained_segmentation_model_is_needed(tmp_path):
    from fastfcn_jax.predict import Predictor

    info = {"model_name": "encnet_jpu_tiny", "num_classes": NUM_CLASSES, "source": "resnet_s"}
    checkpointing.save_variables(tmp_path, {"params": {"w": np.zeros(2)}, "batch_stats": {}}, info)
    expected = r"a backbone.s weights alone \(resnet_s\).*JPU and heads were never trained.*--mode=train"
    with pytest.raises(ValueError, match=expected):
        Predictor.from_checkpoint(tmp_path)


def test_eval_step_counts_only_valid_examples_and_labelled_pixels(setup):
    model, optimizer, _ = setup
    mesh = sharding.make_mesh(2)
    state = create_train_state(model, optimizer, jax.random.PRNGKey(0), IMAGE_SHAPE, mesh)
    batch = make_batch(4, batch_size=4)
    batch["valid"] = np.array([True, True, True, False])
    confusion = jax.jit(make_eval_step(model, NUM_CLASSES))(state, sharding.global_batch(batch, mesh))
    assert confusion.shape == (NUM_CLASSES, NUM_CLASSES)
    assert int(confusion.sum()) == int(np.sum(batch["label"][:3] >= 0))


def test_evaluate_sums_every_batchs_counts(setup):
    # The validation loop reads each batch's counts one batch late: the last one must be counted too.
    from fastfcn_jax.train import evaluate

    model, optimizer, _ = setup
    mesh = sharding.make_mesh(2)
    state = create_train_state(model, optimizer, jax.random.PRNGKey(0), IMAGE_SHAPE, mesh)
    batches = [{**make_batch(seed, batch_size=2), "valid": np.array([True, seed != 2])} for seed in range(3)]
    step = jax.jit(make_eval_step(model, NUM_CLASSES))
    scores = evaluate(step, state, iter(batches), mesh, NUM_CLASSES)
    each = [np.asarray(step(state, sharding.global_batch(batch, mesh)), np.int64) for batch in batches]
    np.testing.assert_array_equal(scores["confusion"], sum(each))
    labelled = sum(int(np.sum(b["label"][b["valid"]] >= 0)) for b in batches)
    assert scores["confusion"].sum() == labelled and all(counts.sum() > 0 for counts in each)


def test_train_state_is_a_pytree_with_variables_view(setup):
    model, optimizer, _ = setup
    state = create_train_state(model, optimizer, jax.random.PRNGKey(0), IMAGE_SHAPE, sharding.make_mesh(1))
    assert isinstance(state, TrainState)
    assert set(state.variables) == {"params", "batch_stats"}
    assert int(state.step) == 0
    assert all(leaf.dtype in (jnp.float32, jnp.int32) for leaf in jax.tree_util.tree_leaves(state))


def test_loss_on_head_logits_trains_as_the_loss_on_upsampled_logits():
    # OpChoices.loss_logits: the GPU default hands the loss the heads' stride-8 logits, which it upsamples
    # itself; one step must give the same loss terms, parameters and statistics as the upsampled form.
    # The loss on head logits runs batch-sharded over four devices, the reference form on one.
    batch = make_batch(2)
    results = {}
    for choice, devices in (("head", 4), ("upsampled", 1)):
        model = create_model("encnet_jpu_tiny", NUM_CLASSES, loss_logits_implementation=choice)
        optimizer = optim.make_optimizer(optim.poly_schedule(0.01, 20))
        step = make_train_step(model, optimizer, aux_weight=0.2, se_weight=0.2)
        results[choice] = run_steps((model, optimizer, step), sharding.make_mesh(devices), [batch])
    (head_state, head_terms), (state, terms) = results["head"], results["upsampled"]
    assert set(head_terms) == set(terms)
    for name in ("ce", "aux_ce", "se_bce", "loss", "grad_norm"):
        assert float(head_terms[name]) == pytest.approx(float(terms[name]), rel=1e-5), name
    assert_trees_close(head_state.params, state.params, rtol=1e-4, atol=1e-5)
    assert_trees_close(head_state.batch_stats, state.batch_stats, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="loss_logits_implementation must be one of"):
        op_choices.OpChoices(loss_logits="full")


def test_a_half_pixel_model_is_trained_on_its_own_upsampling_whatever_the_loss_form():
    # reference='mmseg' models resize with align_corners=False, the loss's own upsampling (loss_logits='head')
    # with the reference's align_corners=True: the step hands such a model's loss its upsampled logits. Were
    # 'head' taken, the two forms would differ by the interpolation.
    batch = make_batch(2)
    results = {}
    for choice in ("head", "upsampled"):
        model = create_model("psp_jpu_tiny", NUM_CLASSES, reference="mmseg", loss_logits_implementation=choice)
        optimizer = optim.make_optimizer(optim.poly_schedule(0.01, 20))
        step = make_train_step(model, optimizer, aux_weight=0.4, se_weight=0.0)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            results[choice] = run_steps((model, optimizer, step), sharding.make_mesh(1), [batch])
        # The explicit choice it does not take is said.
        said = [str(w.message) for w in caught if "loss_logits='head'" in str(w.message)]
        assert bool(said) == (choice == "head"), said
    (head_state, head_terms), (state, terms) = results["head"], results["upsampled"]
    for name in ("ce", "aux_ce", "loss", "grad_norm"):
        assert float(head_terms[name]) == float(terms[name]), name
    assert_trees_close(head_state.params, state.params, rtol=0, atol=0)


def test_init_from_the_other_reference_is_refused_even_where_the_shapes_agree(tmp_path):
    # A tiny PSP+JPU has the same variable shapes in both designs (at full size the stems differ): the reference
    # the checkpoint records decides, so mmseg's weights never run silently in the official design.
    mesh, optimizer = sharding.make_mesh(1), optim.make_optimizer(lambda step: 0.01)
    states = {
        reference: create_train_state(
            create_model("psp_jpu_tiny", NUM_CLASSES, reference=reference), optimizer, key, IMAGE_SHAPE, mesh
        )
        for reference, key in (("mmseg", jax.random.PRNGKey(0)), ("fastfcn", jax.random.PRNGKey(1)))
    }
    info = {"model_name": "psp_jpu_tiny", "num_classes": NUM_CLASSES, "model_overrides": {"reference": "mmseg"}}
    checkpointing.save_variables(tmp_path / "mmseg", states["mmseg"].variables, {**info, "source": "mmseg"})
    with pytest.raises(ValueError, match=r"reference='mmseg' variant.*--config.model.overrides.reference=mmseg"):
        load_pretrained(states["fastfcn"], str(tmp_path / "mmseg"), mesh, reference="fastfcn")
    loaded, _ = load_pretrained(states["fastfcn"], str(tmp_path / "mmseg"), mesh, reference="mmseg")
    assert_trees_close(loaded.params, states["mmseg"].params, rtol=0, atol=0)
    # Messages (evaluation, prediction, export, summary) name the variant.
    assert checkpointing.model_label(info) == "psp_jpu_tiny in mmsegmentation's variant"
    assert checkpointing.model_label({**info, "model_overrides": {}}) == "psp_jpu_tiny"


def test_the_pallas_loss_is_traced_where_chosen():
    # OpChoices.loss_upsample='pallas': the training step's two cross-entropies (main, auxiliary) each run the
    # loss kernel (its values: tests/test_upsampled_loss_pallas.py); xla_forms() traces the fused XLA form.
    batch = make_batch(3, batch_size=2)
    model = create_model("encnet_jpu_tiny", NUM_CLASSES, loss_upsample_implementation="pallas")
    with pytest.warns(UserWarning, match="replicates its operands"):  # four devices in these tests
        assert _train_step_jaxpr(model, batch, "gpu").count("pallas_call") == 2
    with op_choices.xla_forms():
        assert "pallas_call" not in _train_step_jaxpr(model, batch, "gpu")
    with pytest.raises(ValueError, match="loss_upsample_implementation must be one of"):
        op_choices.OpChoices(loss_upsample="triton")


def test_the_loss_form_follows_the_backend_traced_for():
    # OpChoices.loss_logits='auto': the loss on head logits (its one-pass log-sum-exp is a variadic reduce,
    # one per cross-entropy: main and auxiliary) on GPUs and TPUs, the loss on upsampled logits on CPUs.
    model = create_model("encnet_jpu_tiny", NUM_CLASSES)
    for backend, reductions in (("cpu", 0), ("gpu", 2), ("tpu", 2)):
        # A new step function per backend: jax caches traces per function, not per target backend.
        jaxpr = _train_step_jaxpr(model, make_batch(2), backend)
        assert jaxpr.count(" reduce[") == reductions, backend


def test_a_gpu_training_step_takes_the_pallas_kernels_with_its_mesh():
    # 'auto' on GPUs (checked and timed on an H200): the loss kernel for both heads and the depthwise forward,
    # input and kernel gradient kernels for the JPU's four branches, when the step is traced with its data mesh
    # as the training loop does; without it (four devices here) the XLA forms, and no warning.
    model = create_model("encnet_jpu_tiny", NUM_CLASSES)
    batch = make_batch(2, batch_size=4)
    assert _train_step_jaxpr(model, batch, "gpu", mesh=sharding.make_mesh()).count("pallas_call") == 2 + 4 * 3
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert "pallas_call" not in _train_step_jaxpr(model, batch, "gpu")
    assert "pallas_call" not in _train_step_jaxpr(model, batch, "cpu", mesh=sharding.make_mesh())


def _train_step_jaxpr(model, batch, backend: str, mesh=None) -> str:
    """The recipe's training step of ``model`` on ``batch``, traced for ``backend`` (with ``mesh`` as its
    context, as the training loop does), as text."""
    optimizer = optim.make_optimizer(optim.poly_schedule(0.01, 20))
    variables = model.init(jax.random.PRNGKey(0), batch["image"], train=False)
    state = TrainState(
        step=jnp.zeros((), jnp.int32),
        params=variables["params"],
        batch_stats=variables["batch_stats"],
        opt_state=optimizer.init(variables["params"]),
    )
    step = make_train_step(model, optimizer, aux_weight=0.2, se_weight=0.2)
    if mesh is not None:
        step = sharding.with_mesh(step, mesh)
    with op_choices.target_backend(backend):
        return str(jax.make_jaxpr(step)(state, batch, jax.random.PRNGKey(1)))


@pytest.mark.parametrize(("loss_gradient", "narrow"), [("compute", 2), ("float32", 0)])
def test_the_loss_gradient_is_written_in_the_compute_dtype(loss_gradient, narrow):
    # OpChoices.loss_gradient='compute': with the loss on head logits, each head's full-resolution gradient
    # passes an optimization barrier in bfloat16 ([B, H, W, classes]), one per cross-entropy (main, aux).
    model = create_model("encnet_jpu_tiny", NUM_CLASSES, dtype=jnp.bfloat16, loss_gradient_implementation=loss_gradient)
    # Traced for a TPU: the loss on head logits, without the GPU's depthwise barriers.
    jaxpr = _train_step_jaxpr(model, make_batch(2, batch_size=2), "tpu")
    full = f"bf16[2,{IMAGE_SHAPE[1]},{IMAGE_SHAPE[2]},{NUM_CLASSES}]"
    barriers = [line for line in jaxpr.splitlines() if "optimization_barrier" in line]
    assert sum(full in line for line in barriers) == narrow


def test_frozen_batch_norm_trains_scale_and_bias_on_the_running_statistics():
    # FastFCN issue #19: with few images per device, BatchNorm keeps the statistics of the weights trained
    # from; its scale and bias (and everything else) still train.
    model = create_model("encnet_jpu_tiny", NUM_CLASSES, dropout=0.0)
    optimizer = optim.make_optimizer(optim.poly_schedule(0.01, 20))
    mesh = sharding.make_mesh(1)
    state = create_train_state(model, optimizer, jax.random.PRNGKey(0), IMAGE_SHAPE, mesh)
    rng = np.random.default_rng(5)  # running statistics that are not the identity (nor kill every ReLU)
    stats = jax.tree_util.tree_map(lambda v: jnp.asarray(rng.uniform(0.5, 1.5, v.shape), v.dtype), state.batch_stats)
    stats = jax.tree_util.tree_map_with_path(
        lambda path, v: v - 1.0 if path[-1].key == "mean" else v, stats
    )  # means in -0.5..0.5
    state = state.replace(batch_stats=stats)
    batch = make_batch(3, batch_size=2)

    # The frozen training forward is the inference forward (no dropout here).
    variables = {"params": state.params, "batch_stats": stats}
    with batch_norm.frozen_batch_norm():
        frozen, updates = model.apply(variables, batch["image"], train=True, mutable=["batch_stats"])
    inference = model.apply(variables, batch["image"], train=False)
    np.testing.assert_allclose(frozen["logits"], inference["logits"], rtol=1e-5, atol=1e-5)
    assert_trees_close(updates["batch_stats"], stats, rtol=0, atol=0)

    step = make_train_step(model, optimizer, aux_weight=0.2, se_weight=0.2, freeze_batch_norm=True)
    new_state, _ = jitted_step(step, state, mesh)(state, sharding.global_batch(batch, mesh), jax.random.PRNGKey(1))
    assert_trees_close(new_state.batch_stats, stats, rtol=0, atol=0)
    scale = ("decode_head", "conv5", "bn", "scale")
    before, after = state.params, new_state.params
    for key in scale:
        before, after = before[key], after[key]
    change = np.asarray(after) - np.asarray(before)
    assert np.ptp(change) > 1e-6  # the affine parameters learn (not only the uniform weight decay)
    unfrozen = make_train_step(model, optimizer, aux_weight=0.2, se_weight=0.2)
    moved, _ = jitted_step(unfrozen, state, mesh)(state, sharding.global_batch(batch, mesh), jax.random.PRNGKey(1))
    assert not np.allclose(
        moved.batch_stats["backbone"]["layer1_0"]["conv1"]["bn"]["mean"],
        stats["backbone"]["layer1_0"]["conv1"]["bn"]["mean"],
    )


def test_microbatches_average_their_gradients_and_update_batch_norm_in_turn():
    # Gradient accumulation: one update from the mean gradient of the interleaved micro-batches (examples
    # j::k), each normalised by its own BatchNorm statistics, the running statistics updated once per micro-batch.
    model = create_model("encnet_jpu_tiny", NUM_CLASSES, dropout=0.0)
    unit_sgd = optax.sgd(1.0)  # new params = params - gradient
    mesh, mesh4 = sharding.make_mesh(1), sharding.make_mesh(4)
    state = create_train_state(model, unit_sgd, jax.random.PRNGKey(0), IMAGE_SHAPE, mesh)
    batch = make_batch(7, batch_size=8)
    whole = jitted_step(make_train_step(model, unit_sgd, aux_weight=0.2, se_weight=0.2), state, mesh)
    accumulate = make_train_step(model, unit_sgd, aux_weight=0.2, se_weight=0.2, microbatches=2)
    rng = jax.random.PRNGKey(1)

    new, terms = jitted_step(accumulate, state, mesh)(state, sharding.global_batch(batch, mesh), rng)
    first, first_terms = whole(state, sharding.global_batch({k: v[0::2] for k, v in batch.items()}, mesh), rng)
    second_state = state.replace(batch_stats=first.batch_stats)
    second, second_terms = whole(second_state, sharding.global_batch({k: v[1::2] for k, v in batch.items()}, mesh), rng)
    gradient = jax.tree_util.tree_map(lambda p, q: p - q, state.params, new.params)
    mean = jax.tree_util.tree_map(lambda p, a, b: p - (a + b) / 2, state.params, first.params, second.params)
    assert_trees_close(gradient, mean, rtol=1e-4, atol=2e-6)
    assert_trees_close(new.batch_stats, second.batch_stats, rtol=1e-5, atol=1e-6)
    assert float(terms["loss"]) == pytest.approx(
        (float(first_terms["loss"]) + float(second_terms["loss"])) / 2, rel=1e-5
    )
    assert int(new.step) == 1
    # Not one step on the whole batch: the first micro-batch's statistics moved the running averages first.
    assert not np.allclose(new.batch_stats["backbone"]["layer1_0"]["conv1"]["bn"]["var"],
                           first.batch_stats["backbone"]["layer1_0"]["conv1"]["bn"]["var"])  # fmt: skip

    # Sharded over four devices (two examples each, one per micro-batch): the same step.
    state4 = create_train_state(model, unit_sgd, jax.random.PRNGKey(0), IMAGE_SHAPE, mesh4)
    new4, _ = jitted_step(accumulate, state4, mesh4)(state4, sharding.global_batch(batch, mesh4), rng)
    # Unit SGD: the parameters moved by whole gradients (up to about 2 here), summed across devices in another
    # order: float32 rounding of about 1e-4 of a tensor's largest gradient, so each is compared at that scale.
    gradient4 = jax.tree_util.tree_map(lambda p, q: p - q, state4.params, new4.params)
    for g4, g in zip(jax.tree_util.tree_leaves(gradient4), jax.tree_util.tree_leaves(gradient), strict=True):
        np.testing.assert_allclose(g4, g, rtol=0, atol=1e-3 * float(np.abs(g).max()) + 1e-7)
    assert_trees_close(new4.batch_stats, new.batch_stats, rtol=1e-4, atol=1e-5)

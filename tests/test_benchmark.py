"""The latency/FLOPs benchmark: result structure, FLOP sanity and the TensorFlow-free import.

Never asserts on wall-clock time: timings on shared CI machines are noise.
"""

from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from fastfcn_jax import benchmark

REPO = Path(__file__).resolve().parents[1]
PAIR = ("encnet_jpu_tiny", "encnet_dilated_tiny")


@pytest.fixture(scope="module")
def results() -> dict:
    return benchmark.run_benchmark(
        PAIR,
        num_classes=59,
        image_size=(64, 64),
        warmup=1,
        repeats=1,
        log=False,
        train_names=PAIR[:1],
        train_sizes=((48, 48),),
    )


def test_run_benchmark_structure(results: dict) -> None:
    assert set(results) == {"environment", "settings", "peak", "models", "pairs", "train_steps"}
    assert list(results["models"]) == list(PAIR)
    assert results["settings"]["image_size"] == [64, 64]
    assert results["settings"]["num_classes"] == 59
    assert results["settings"]["interleaved"] is True
    env = results["environment"]
    assert env["backend"] and env["device_kind"] and env["jax_version"]
    assert " cores" in env["host_cpu"]
    assert benchmark.format_table(results).startswith(benchmark.describe_device(env) + "; 64x64")
    for name, result in results["models"].items():
        assert result["name"] == name
        assert result["params"] > 0
        assert result["flops"] is not None and result["flops"] > 0
        assert result["compile_s"] >= 0
        latency = result["latency_ms"]
        assert len(latency["runs"]) == 1
        assert math.isfinite(latency["median"]) and latency["median"] > 0
        assert latency["min"] <= latency["median"] <= latency["max"]
        assert result["achieved_gflops_per_s"] == pytest.approx(result["flops"] / latency["median"] * 1e3 / 1e9)
        assert result["fraction_of_peak"] == pytest.approx(
            result["achieved_gflops_per_s"] / results["peak"]["gflops_per_s"]
        )
    # JSON-serialisable as is: the CLI dumps it without a custom encoder.
    json.dumps(results)


def test_pairs_dilated_costs_more_flops(results: dict) -> None:
    (pair,) = results["pairs"]
    assert (pair["jpu"], pair["dilated"]) == PAIR
    jpu, dilated = (results["models"][name] for name in PAIR)
    assert pair["flop_ratio"] == pytest.approx(dilated["flops"] / jpu["flops"])
    assert pair["speedup"] == pytest.approx(dilated["latency_ms"]["median"] / jpu["latency_ms"]["median"])
    # The paper's point: output stride 8 through c3/c4 costs more than JPU's stride-32 backbone.
    assert dilated["flops"] > jpu["flops"]


def test_format_table(results: dict) -> None:
    table = benchmark.format_table(results)
    for name in PAIR:
        assert f"| {name} |" in table
    assert "speed-up" in table and "FLOP ratio" in table
    assert "models timed in turn, round by round" in table


def test_interleaved_timing_runs_the_models_in_turn(monkeypatch) -> None:
    calls = []
    run = benchmark.CompiledForward.run

    def recording_run(self):
        calls.append(self.info["name"])
        return run(self)

    monkeypatch.setattr(benchmark.CompiledForward, "run", recording_run)
    kwargs = dict(num_classes=5, image_size=(32, 32), warmup=1, repeats=3)
    models = benchmark.benchmark_models_interleaved(PAIR, **kwargs)
    # Each model warmed up right after its compilation, then two runs of each per round (the first untimed).
    assert calls == list(PAIR) + [PAIR[0], PAIR[0], PAIR[1], PAIR[1]] * 3
    for name, result in models.items():
        assert result["name"] == name and result["interleaved"] and result["repeats"] == 3
        assert len(result["latency_ms"]["runs"]) == 3 and result["flops"] > 0
    calls.clear()
    results = benchmark.run_benchmark(PAIR, interleave=False, peak=False, log=False, **kwargs)
    assert calls == [PAIR[0]] * 4 + [PAIR[1]] * 4
    assert results["settings"]["interleaved"] is False
    assert not any(result["interleaved"] for result in results["models"].values())
    assert "round by round" not in benchmark.format_table(results)


def test_compare_pairs_skips_unpaired() -> None:
    fake = {"latency_ms": {"median": 2.0}, "flops": 4.0}
    models = {
        "psp_jpu_r50": {"name": "psp_jpu_r50", **fake},
        "psp_jpux_r50": {"name": "psp_jpux_r50", **fake},
        "psp_dilated_r50": {"name": "psp_dilated_r50", **fake},
        "encnet_jpu_r50": {"name": "encnet_jpu_r50", **fake},
        "psp_jpu_r101": {"name": "psp_jpu_r101", **fake},
    }
    pairs = benchmark.compare_pairs(models)
    assert [(p["jpu"], p["dilated"]) for p in pairs] == [
        ("psp_jpu_r50", "psp_dilated_r50"),
        ("psp_jpux_r50", "psp_dilated_r50"),
    ]
    assert all(p["speedup"] == 1.0 and p["flop_ratio"] == 1.0 for p in pairs)


def test_xla_flops_accepts_both_return_forms() -> None:
    class Compiled:
        def __init__(self, analysis: object) -> None:
            self.analysis = analysis

        def cost_analysis(self) -> object:
            return self.analysis

    assert benchmark.xla_flops(Compiled({"flops": 3.0})) == 3.0
    assert benchmark.xla_flops(Compiled([{"flops": 5.0}])) == 5.0
    assert benchmark.xla_flops(Compiled([])) is None
    assert benchmark.xla_flops(Compiled(None)) is None
    assert benchmark.xla_flops(Compiled({"flops": -1.0})) is None


def test_flops_count_convolutions_whatever_their_form() -> None:
    # The count comes from the lowered HLO: a compiled GPU program hides convolutions in cuDNN custom calls
    # its cost analysis skips, so 1x1 convs as convs there counted ~nothing. Here, both forms must agree
    # and a lone convolution must count 2 FLOPs per multiply-add.
    import jax
    import jax.numpy as jnp

    x = jnp.ones((2, 8, 8, 4))
    w = jnp.ones((3, 3, 4, 6))

    def conv(x, w):
        return jax.lax.conv_general_dilated(x, w, (1, 1), "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC"))

    assert benchmark.xla_flops(jax.jit(conv).lower(x, w)) == pytest.approx(2 * 2 * 6 * 6 * 6 * 3 * 3 * 4, rel=0.01)
    kwargs = dict(num_classes=5, image_size=(32, 32), warmup=0, repeats=1)
    dot = benchmark.benchmark_model("encnet_jpu_tiny", ops={"pointwise": "dot"}, **kwargs)
    conv_form = benchmark.benchmark_model("encnet_jpu_tiny", ops={"pointwise": "conv"}, **kwargs)
    assert conv_form["ops"] == {"pointwise": "conv"}
    assert conv_form["flops"] == pytest.approx(dot["flops"], rel=1e-3)


def test_forward_until_a_feature_map_times_a_prefix_of_the_network() -> None:
    kwargs = dict(num_classes=5, image_size=(32, 32), warmup=0, repeats=1)
    flops = {
        until: benchmark.benchmark_model("encnet_jpu_tiny", until=until, **kwargs)["flops"]
        for until in ("c4", "jpu", None)
    }
    assert 0 < flops["c4"] < flops["jpu"] < flops[None]
    with pytest.raises(ValueError, match="no feature map 'jpu'"):
        benchmark.benchmark_model("encnet_dilated_tiny", until="jpu", **kwargs)


def test_constant_weights_time_the_same_program_with_the_weights_compiled_in() -> None:
    kwargs = dict(num_classes=5, image_size=(32, 32), warmup=0, repeats=1)
    as_arguments = benchmark.benchmark_model("encnet_jpu_tiny", **kwargs)
    as_constants = benchmark.benchmark_model("encnet_jpu_tiny", constant_weights=True, **kwargs)
    # FLOPs are counted on the lowered program: the same network whether its weights are inputs or constants.
    assert as_constants["flops"] == as_arguments["flops"] > 0
    assert as_constants["constant_weights"] and not as_arguments["constant_weights"]
    assert as_constants["latency_ms"]["median"] > 0
    prefix = benchmark.benchmark_model("encnet_jpu_tiny", constant_weights=True, until="c4", **kwargs)
    assert 0 < prefix["flops"] < as_constants["flops"]
    results = benchmark.run_benchmark(["encnet_jpu_tiny"], constant_weights=True, peak=False, log=False, **kwargs)
    assert results["settings"]["constant_weights"] is True
    assert "weights compiled in as constants" in benchmark.format_table(results)


def test_unknown_op_choice_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown op"):
        benchmark.run_benchmark(["encnet_jpu_tiny"], ops={"depthwise_conv": "grouped"}, log=False)
    with pytest.raises(ValueError, match="depthwise_implementation must be one of"):
        benchmark.run_benchmark(["encnet_jpu_tiny"], ops={"depthwise": "fft"}, log=False)


def test_synthetic_variables_match_init_and_give_finite_outputs() -> None:
    import functools

    import jax
    import jax.numpy as jnp

    from fastfcn_jax.models import create_model

    model = create_model("encnet_jpu_tiny", 7)
    images = jax.random.normal(jax.random.PRNGKey(0), (2, 32, 32, 3))
    synthetic = benchmark.synthetic_variables(model, images)
    reference = jax.eval_shape(functools.partial(model.init, train=False), jax.random.PRNGKey(0), images)
    assert jax.tree_util.tree_structure(synthetic) == jax.tree_util.tree_structure(reference)
    assert jax.tree.map(lambda a: (a.shape, a.dtype), synthetic) == jax.tree.map(
        lambda a: (a.shape, a.dtype), reference
    )
    logits = model.apply(synthetic, images, train=False)["logits"]
    assert bool(jnp.all(jnp.isfinite(logits))) and float(jnp.std(logits)) > 0


def test_train_steps_alone_need_no_forward_models() -> None:
    results = benchmark.run_benchmark(
        [], train_names=["fcn_jpu_tiny"], train_sizes=((32, 32),), num_classes=5, warmup=0, repeats=1,
        peak=False, log=False,
    )  # fmt: skip
    assert results["models"] == {} and results["pairs"] == []
    assert results["settings"]["image_size"] == [512, 512] and results["settings"]["warmup"] == 0
    (step,) = results["train_steps"]
    assert step["name"] == "fcn_jpu_tiny" and step["image_size"] == [32, 32] and step["flops"] > 0
    assert step["aux"] and (step["warmup"], step["repeats"]) == (0, 1) and step["back_to_back_gflops_per_s"] > 0
    table = benchmark.format_table(results)
    assert "| model |" not in table and "| fcn_jpu_tiny | 32x32 | 2 |" in table
    # The header describes what ran: no forward size or batch, the recipe's aux head even with aux=False.
    assert "; train steps only, 5 classes" in table and "512x512" not in table and "aux on" in table
    no_aux = benchmark.run_benchmark([], train_names=["fcn_jpu_tiny"], train_sizes=((32, 32),), num_classes=5,
                                     warmup=0, repeats=1, peak=False, log=False, aux=False)  # fmt: skip
    assert "aux on" in benchmark.format_table(no_aux)
    with pytest.raises(ValueError, match="norm=folded .* cannot time train steps"):
        benchmark.run_benchmark([], train_names=["fcn_jpu_tiny"], ops={"norm": "folded"}, log=False)
    with pytest.raises(TypeError, match="unknown benchmark option"):
        benchmark.run_benchmark(["fcn_jpu_tiny"], image_sise=(8, 8), log=False)


def test_unknown_model_fails_fast() -> None:
    with pytest.raises(ValueError, match="unknown model"):
        benchmark.run_benchmark(["encnet_jpu_tiny", "encnet_nope_tiny"], log=False)


def test_cli_writes_json(results: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    spec = importlib.util.spec_from_file_location("benchmark_cli", REPO / "experiments" / "benchmark.py")
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    calls = []

    def fake_run(names: list[str], **kwargs: object) -> dict:
        calls.append((names, kwargs))
        return results

    monkeypatch.setattr(cli, "run_benchmark", fake_run)
    output = tmp_path / "bench.json"
    cli.main(["--quick", "--models", "encnet_jpu_r50,encnet_dilated_r50", "--output", str(output)])
    cli.main(["--quick", "--ops", "depthwise=grouped,resize=matmul", "--until", "jpu"])
    (names, kwargs), (_, kwargs_ops) = calls
    assert kwargs_ops["ops"] == {"depthwise": "grouped", "resize": "matmul"} and kwargs_ops["until"] == "jpu"
    assert kwargs["ops"] == {} and kwargs["until"] is None
    assert names == ["encnet_jpu_tiny", "encnet_dilated_tiny"]
    assert kwargs["image_size"] == (64, 64) and kwargs["warmup"] == 1 and kwargs["repeats"] == 2
    assert kwargs["aux"] is True
    assert json.loads(output.read_text()) == json.loads(json.dumps(results))
    assert "| encnet_jpu_tiny |" in capsys.readouterr().out


def test_import_is_tensorflow_free() -> None:
    code = (
        "import sys, fastfcn_jax.benchmark\n"
        "heavy = {'tensorflow', 'tensorflow_datasets', 'ml_collections'} & set(sys.modules)\n"
        "assert not heavy, heavy"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO)


def test_train_step_is_timed_with_its_flops(results: dict) -> None:
    (step,) = results["train_steps"]
    assert step["name"] == PAIR[0] and step["image_size"] == [48, 48] and step["batch_size"] == 2
    forward = results["models"][PAIR[0]]
    # Forward + backward of two 48x48 images costs more than one 64x64 forward pass.
    assert step["flops"] > forward["flops"] * (2 * 48 * 48) / (64 * 64)
    assert len(step["latency_ms"]["runs"]) == 1
    assert step["back_to_back_ms"] > 0
    assert step["back_to_back_images_per_s"] == pytest.approx(2 * 1e3 / step["back_to_back_ms"])
    assert "| back to back (ms) |" in benchmark.format_table(results)


def test_back_to_back_steps_thread_the_state_through_every_step() -> None:
    import jax.numpy as jnp

    calls = []

    def compiled(state, batch, rng):
        calls.append(state)
        return (state + 1, {"loss": 0.0})

    step = benchmark.CompiledTrainStep(None, compiled, 0.0, jnp.int32(0), {}, None)
    state, ms = step.back_to_back_ms(jnp.int32(5), 4)
    assert int(state) == 9 and len(calls) == 4 and ms > 0


def test_matmul_peak_counts_two_flops_per_multiply_add() -> None:
    peak = benchmark.matmul_peak("float32", size=256, repeats=1)
    assert peak["gflops_per_s"] == pytest.approx(2 * 256**3 / (peak["best_ms"] / 1e3) / 1e9)


def test_input_pipeline_throughput_is_measured_on_real_batches(tmp_path) -> None:
    result = benchmark.benchmark_input_pipeline(
        "synthetic_shapes", data_dir=str(tmp_path), batch_size=4, crop_size=48, batches=2, warmup=1
    )
    assert result["crop_size"] == [48, 48] and result["batch_size"] == 4 and result["batches"] == 2
    assert result["images_per_s"] > 0
    text = benchmark.format_table(
        {
            "environment": benchmark.environment(),
            "settings": {
                "image_size": [8, 8],
                "batch_size": 1,
                "num_classes": 2,
                "dtype": "float32",
                "aux": True,
                "repeats": 1,
                "warmup": 0,
            },
            "models": {},
            "pairs": [],
            "input_pipeline": result,
        }
    )
    assert "input pipeline (synthetic_shapes, 48x48 crops, batch 4)" in text


def test_flops_are_counted_on_the_cpu_lowering_whatever_the_backend(capsys) -> None:
    # On an H200 with jax 0.11.2 the GPU lowering's cost analysis skipped cuDNN's work (705 of ~5600 GFLOPs of
    # a train step), so _flops counts the program as lowered for the CPU, from shapes alone, and falls back
    # to the lowered and then the compiled program where that lowering fails.
    import jax
    import jax.numpy as jnp

    def conv(x, w):
        return jax.lax.conv_general_dilated(x, w, (1, 1), "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC"))

    x, w = jnp.ones((2, 8, 8, 4)), jnp.ones((3, 3, 4, 6))
    want = 2 * 2 * 6 * 6 * 6 * 3 * 3 * 4
    assert benchmark._flops(conv, (x, w), None, None) == pytest.approx(want, rel=0.01)

    def unlowerable(x, w):
        raise RuntimeError("no CPU lowering")

    class Counted:
        def __init__(self, flops):
            self.flops = flops

        def cost_analysis(self):
            return {"flops": self.flops}

    assert benchmark._flops(unlowerable, (x, w), Counted(7.0), Counted(9.0)) == 7.0
    assert benchmark._flops(unlowerable, (x, w), Counted(-1.0), Counted(9.0)) == 9.0
    err = capsys.readouterr().err
    assert "CPU lowering by lowering_platforms=('cpu',) failed: RuntimeError: no CPU lowering" in err
    assert "CPU lowering by default_device(cpu) failed: RuntimeError: no CPU lowering" in err


def test_pallas_kernels_are_counted_as_their_xla_forms(capsys) -> None:
    # A Pallas GPU kernel has no CPU lowering ("Only interpret mode is supported on CPU backend" on the
    # H200): its FLOPs are those of the XLA form of the same maths, traced in its place.
    import jax
    import jax.numpy as jnp

    from fastfcn_jax.models import depthwise, op_choices

    x = jnp.ones((2, 12, 12, 8))

    def gradient_program(**forms):
        module = depthwise.DepthwiseConv(dilation=2, **forms)

        def program(v, x):
            return jax.grad(lambda v, x: jnp.sum(module.apply(v, x) ** 2), argnums=(0, 1))(v, x)

        return program

    pallas = gradient_program(implementation="pallas", input_grad="pallas", kernel_grad="pallas")
    xla = gradient_program(implementation="shifted", input_grad="materialized", kernel_grad="stacked")
    arguments = (depthwise.DepthwiseConv(dilation=2).init(jax.random.PRNGKey(0), x), x)
    with op_choices.target_backend("gpu"):  # the Pallas kernels as a GPU traces them: Triton, not interpreted
        # (The tests' 4 host devices also draw the several-devices warning.)
        with pytest.warns(UserWarning, match="replicates its operands"), pytest.raises(ValueError, match="interpret"):
            jax.jit(pallas).trace(*arguments).lower(lowering_platforms=("cpu",))
        counted = benchmark._flops(pallas, arguments, None, None)
        assert counted is not None and counted == benchmark._flops(xla, arguments, None, None)
    elements = 2 * 12 * 12 * 8
    assert counted > 3 * elements * 16  # forward, input and kernel gradients: 9 multiplies, 8 adds per element
    assert "failed" not in capsys.readouterr().err


def test_host_cpu_names_the_model_cores_and_widest_vector_extension(tmp_path) -> None:
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(
        "processor\t: 0\nmodel name\t: Intel(R) Xeon(R) CPU @ 2.20GHz\nflags\t\t: fpu sse2 avx avx2 avx512f\n\n"
        "processor\t: 1\nmodel name\t: Intel(R) Xeon(R) CPU @ 2.20GHz\nflags\t\t: fpu sse2 avx avx2 avx512f\n"
    )
    described = benchmark.host_cpu(str(cpuinfo))
    assert described.startswith("Intel(R) Xeon(R) CPU @ 2.20GHz, ") and described.endswith(" cores, avx512f")
    assert "cores" in benchmark.host_cpu(str(tmp_path / "missing"))  # no /proc (macOS): still the core count
    env = {"backend": "cpu", "device_kind": "cpu", "jax_version": "0.10.2", "host_cpu": described}
    assert benchmark.describe_device(env) == f"{described} (cpu), jax 0.10.2"
    gpu = {"backend": "gpu", "device_kind": "NVIDIA H200", "jax_version": "0.11.2", "host_cpu": described}
    assert benchmark.describe_device(gpu) == "NVIDIA H200 (gpu), jax 0.11.2"

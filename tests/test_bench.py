"""The benchmarks run both strategies on the same noise and they agree (they raise if not); no timings are asserted."""

import json
import subprocess
import sys

import pytest

KEYS = ("reference_examples_per_s", "engine_examples_per_s", "ratio", "grad_ratio", "fraction_of_peak", "device",
        "threads", "torch", "flops_per_example", "reference_flops_per_example", "peak_flops", "grad_fraction_of_peak",
        "load_before")


def _bench(*args):
    proc = subprocess.run([sys.executable, "-m", "pipeline.cli", "bench", "elbo", *args, "--json"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


@pytest.mark.slow
def test_bench_elbo_json_on_the_digits_unet(unet):
    result = _bench("--model", unet, "--examples", "1", "--timesteps", "3", "--repeat", "1")
    for key in KEYS:
        assert key in result, key
    assert result["timesteps"] == 3 and result["classes"] == 10 and result["threads"] == 1
    # The reference runs the whole UNet (17,236,992 FLOPs) per (class, timestep); the engine runs
    # the class-independent 1,451,520 of them once per timestep instead of once per class.
    assert result["reference_flops_per_example"] == 3 * 10 * 17_236_992
    assert result["flops_per_example"] == 3 * (10 * 17_236_992 - 9 * 1_451_520)
    assert result["peak_flops"] > 0 and 0 < result["fraction_of_peak"]
    assert result["logits_max_rel_diff"] < 1e-4 and result["grads_max_rel_diff"] < 1e-3


@pytest.mark.slow
def test_bench_elbo_in_bf16_checks_predictions_against_float32(unet):
    result = _bench("--model", unet, "--examples", "1", "--timesteps", "2", "--repeat", "1", "--no-grad", "--autocast", "bf16",
                    "--agreement-timesteps", "1")
    assert result["dtype"] == "bfloat16" and result["engine"]["autocast"] == "bf16"
    # Held to the bf16 peak, with the float32 one beside it; the reference stays float32.
    assert result["peak"].endswith("bfloat16 matmul, best of 10, before and after the runs")
    assert result["float32_peak_flops"] > 0
    a = result["autocast_agreement"]
    assert a["n"] == 355 and a["timesteps"] == 1 and a["dtype"] == "bf16"
    assert a["agreement"] == 1 - a["disagreements"] / 355 and a["agreement"] >= 0.95
    assert 0 < result["logits_max_rel_diff"] < 2e-2


@pytest.mark.slow
def test_bench_elbo_rejects_an_unknown_compile_mode():
    proc = subprocess.run([sys.executable, "-m", "pipeline.cli", "bench", "elbo", "--compile", "yes"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "--compile must be off, forward or on" in proc.stderr + proc.stdout


@pytest.mark.slow
def test_bench_elbo_json_on_the_optimal_model():
    result = _bench("--model", "optimal", "--examples", "2", "--timesteps", "5", "--repeat", "1", "--no-grad")
    for key in ("reference_examples_per_s", "engine_examples_per_s", "ratio", "fraction_of_peak", "device"):
        assert key in result
    assert result["ratio"] > 0 and result["timesteps"] == 5 and "grad_ratio" not in result


def test_hand_split_covers_every_unit_once():
    from pipeline.bench.scaling import split_by_hand

    for n, parts in [(12, 1), (12, 2), (13, 2), (5, 3), (2, 4)]:
        ranges = split_by_hand(n, parts)
        covered = [u for b, e in ranges for u in range(b, e)]
        assert covered == list(range(n)) and all(e > b for b, e in ranges) and len(ranges) == min(n, parts)


@pytest.mark.slow
def test_bench_scaling_json_ray_and_processes_agree(unet):
    """The whole bench on a tiny job: a local Ray cluster of its own, 2 workers against the hand
    split into 2 processes; it raises unless both give the same predictions and logits for every
    example."""
    proc = subprocess.run([sys.executable, "-m", "pipeline.cli", "bench", "scaling", "--examples", "4", "--shard-size", "2",
                           "--timesteps", "2", "--steps", "1", "--passes", "1", "--workers", "2", "--model", unet, "--json"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert result["units"] == 2 and [r["workers"] for r in result["runs"]] == [2]
    for r in result["runs"]:
        assert r["same_predictions"] is True
        for key in ("ray_seconds", "processes_seconds", "ratio", "overhead_per_unit_s", "ray_examples_per_s"):
            assert key in r


def test_profile_kinds_puts_a_convolution_under_convolutions():
    import torch

    from pipeline.bench.elbo import profile_kinds

    conv = torch.nn.Conv2d(8, 16, 3, padding=1)
    x = torch.randn(32, 8, 16, 16)
    with torch.no_grad():
        p = profile_kinds(lambda: conv(x), torch.device("cpu"))
    assert p["convolution_flops"] == 2 * 32 * 16 * 16 * 16 * 8 * 9
    assert p["convolution"] > 0 and p["convolution_flops_per_s"] > 0
    # The op names of the kinds are right: a lone convolution's time is counted as convolution.
    ops = ("convolution", "matmul_attention", "group_norm", "silu", "copy_cat_gather", "elementwise_other")
    assert p["convolution"] >= 0.8 * sum(p[k] for k in ops)


def test_bench_draws_sets_the_device_path_beside_the_reference_and_the_forward():
    from pipeline.bench.draws import bench_draws, format_draws

    result = bench_draws(repeat=1, timesteps=50, datasets=("digits",))
    c = result["cases"]["digits"]
    assert c["values"] == 50 * 64 and c["shape"] == [1, 8, 8] and not c["compiled"]
    # On a CPU the new draws are the reference's, bit for bit, eager and compiled alike.
    assert c["max_ulps_vs_reference"] == 0 and c["values_differing"] == 0 and c["eager_equals_new"]
    assert c["forward_measured_timesteps"] == 50 and c["forward_seconds"] > c["draw_seconds"] > 0
    assert c["share_of_forward"] == c["draw_seconds"] / c["forward_seconds"]
    assert result["speedup_vs_reference"] == {"digits": c["reference_seconds"] / c["draw_seconds"]}
    assert result["threads"] == 1 and result["processor"]
    assert format_draws(result)[0].startswith("digits (50 x 1x8x8 = 3,200 normals, cpu, 1 thread(s))")


def test_bench_draws_rejects_an_unknown_device():
    from typer.testing import CliRunner

    from pipeline.cli import app

    result = CliRunner().invoke(app, ["bench", "draws", "--device", "tpu"])
    assert result.exit_code == 2 and "--device cpu or cuda; got 3 and 'tpu'" in result.output


def test_bench_edm_times_pruned_rdc_beside_full_rdc():
    """bench_edm on a tiny DDPM++ (the code path of the full-size presets): full and pruned RDC,
    logits and input gradients, each timed, the stages recorded as given."""
    from edm_cases import TINY

    from pipeline.bench.elbo import bench_edm

    result = bench_edm(dict(TINY["ddpmpp-vp"]), timesteps=6, batch=2, grad=True, pruning=[(3, 2), (6, 1)])
    rdc = result["rdc"]
    assert rdc["pruning"] == [[3, 2], [6, 1]] and rdc["timesteps"] == 6 and rdc["classes"] == 4
    for key in ("logits", "logits_and_grads", "pruned_logits", "pruned_logits_and_grads"):
        assert rdc[f"{key}_seconds_per_image"] > 0, key
    assert result["parameters"] > 0 and result["forward_flops"] > 0


def test_bench_elbo_pruning_is_parsed_once_and_refused_off_the_edm_presets():
    from typer.testing import CliRunner

    from pipeline.cli import app

    bad = CliRunner().invoke(app, ["bench", "elbo", "--model", "edm-cifar10-cond-vp", "--pruning", "50:5,500"])
    assert bad.exit_code == 2 and "--pruning: expected stages timesteps:keep" in " ".join(bad.output.split())
    digits = CliRunner().invoke(app, ["bench", "elbo", "--pruning", "50:5,500:1"])
    assert digits.exit_code == 2 and "--pruning is timed on the EDM presets" in " ".join(digits.output.split())


@pytest.mark.slow
def test_bench_attack_times_three_modes_interleaved_and_reports_the_fastest_of_each():
    proc = subprocess.run([sys.executable, "-m", "pipeline.cli", "bench", "attack", "--cases", "rdc-optimal",
                           "--examples", "4", "--per-example", "2", "--repeat", "2", "--json"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert result["threads"] == 1 and result["processor"]
    (row,) = result["cases"]
    assert (row["case"], row["examples"], row["per_example_examples"], row["repeat"]) == ("rdc-optimal", 4, 2, 2)
    for mode in ("batched", "per_example", "library"):
        assert len(row["runs"][mode]) == 2 and row[f"{mode}_seconds"] == min(row["runs"][mode]) > 0
    assert row["speedup_vs_per_example"] == pytest.approx(row["per_example_seconds"] / row["batched_seconds"])
    assert row["overhead_vs_library"] == pytest.approx(row["batched_seconds"] / row["library_seconds"])
    assert 0 <= row["robust_acc"] <= 1
    assert set(row["us_per_evaluation"]) == {"batched", "per_example"} and row["network_us_per_evaluation"]["batched"] is None
    assert row["evaluations_per_example"]["batched"] > 0


@pytest.mark.parametrize("args, message", [
    (["--cases", "rdc-optimal,magic"], "unknown case(s) ['magic']"),
    (["--repeat", "0"], "--repeat >= 1"),
    (["--examples", "1"], "--examples must be >= 2"),
])
def test_bench_attack_refuses_bad_options_before_any_work(args, message):
    from typer.testing import CliRunner

    from pipeline.cli import app

    result = CliRunner().invoke(app, ["bench", "attack", *args])
    assert result.exit_code == 2 and message in result.output, result.output

"""The benchmarks run both strategies on the same noise and they agree (they raise if not); no timings are asserted."""

import json
import subprocess
import sys

KEYS = ("reference_examples_per_s", "engine_examples_per_s", "ratio", "grad_ratio", "fraction_of_peak", "device",
        "threads", "torch", "flops_per_example", "reference_flops_per_example", "peak_flops", "grad_fraction_of_peak",
        "load_before")


def _bench(*args):
    proc = subprocess.run([sys.executable, "-m", "pipeline.cli", "bench", "elbo", *args, "--json"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def test_bench_elbo_json_on_the_digits_unet():
    result = _bench("--examples", "1", "--timesteps", "3", "--repeat", "1")
    for key in KEYS:
        assert key in result, key
    assert result["timesteps"] == 3 and result["classes"] == 10 and result["threads"] == 1
    # The reference runs the whole UNet (17,236,992 FLOPs) per (class, timestep); the engine runs
    # the class-independent 1,451,520 of them once per timestep instead of once per class.
    assert result["reference_flops_per_example"] == 3 * 10 * 17_236_992
    assert result["flops_per_example"] == 3 * (10 * 17_236_992 - 9 * 1_451_520)
    assert result["peak_flops"] > 0 and 0 < result["fraction_of_peak"]
    assert result["logits_max_rel_diff"] < 1e-4 and result["grads_max_rel_diff"] < 1e-3


def test_bench_elbo_json_on_the_optimal_model():
    result = _bench("--model", "optimal", "--examples", "2", "--timesteps", "5", "--repeat", "1", "--no-grad")
    for key in ("reference_examples_per_s", "engine_examples_per_s", "ratio", "fraction_of_peak", "device"):
        assert key in result
    assert result["ratio"] > 0 and result["timesteps"] == 5 and "grad_ratio" not in result

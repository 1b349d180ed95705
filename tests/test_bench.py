"""The ELBO benchmark runs both strategies on the same noise and they agree (it raises if not)."""

import json
import subprocess
import sys


def test_bench_elbo_json():
    proc = subprocess.run([sys.executable, "-m", "pipeline.cli", "bench", "elbo", "--model", "optimal", "--examples", "2",
                           "--timesteps", "5", "--json"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    for key in ("reference_examples_per_s", "engine_examples_per_s", "ratio", "grad_ratio", "device"):
        assert key in result
    assert result["ratio"] > 0 and result["timesteps"] == 5

"""The GPU check (`make gpu-check`): CUDA tests, then the GPU benchmarks, as JSON in one folder.

    python3 scripts/gpu_check.py [OUT_DIR]        (or GPU_CHECK_OUT=DIR; default ./gpu-check)

Runs with whatever python3 the machine has (PYTHON=... to choose another), the repository on
PYTHONPATH, and installs nothing. A step whose packages are missing is skipped with a message
naming them. Steps, in order, within a budget of GPU_CHECK_BUDGET seconds (default 450):

1. `python3 -m pytest -m gpu tests/test_gpu.py`: the engine on CUDA equals the CPU result,
   autocast agreement, draws on CUDA against the CPU's within the stated bound, a Ray worker
   with num_gpus=1 sees its GPU (log: pytest_gpu.txt, junit: pytest_gpu.xml);
2. `python3 -m pipeline.cli bench draws --device cuda --json` -> bench_draws_cuda.json;
3. `python3 -m pipeline.cli bench elbo --device cuda --json` (the digits UNet, every timestep)
   -> bench_elbo_cuda.json;
4. the same with `--model edm-cifar10-cond-vp` (the full-size CIFAR-10 DDPM++, random weights),
   where the checkout's bench has the EDM networks (`bench_edm`) -> bench_elbo_cuda_ddpmpp.json;
5. that network again with input gradients, full and under Li et al.'s pruning (`--grad
   --pruning 50:5,500:1`) -> bench_elbo_cuda_ddpmpp_grads.json.

summary.json lists every step: command, status (ok, failed, skipped, timeout), seconds, reason.
Exit status: 0 when every step that ran passed, 1 when one failed, 2 when there is no CUDA device.
Only the standard library is imported here, so that the check reports what is missing.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PYTHON = os.environ.get("PYTHON", sys.executable)
BUDGET_S = float(os.environ.get("GPU_CHECK_BUDGET", "450"))

# What each step imports (module names as `import` spells them).
CORE = ["torch", "numpy", "typer", "rich", "pydantic", "safetensors", "sklearn"]
STEPS = [
    {"name": "pytest_gpu", "needs": CORE + ["pytest", "scipy"], "timeout": 240,  # the Ray test skips itself without ray
     "args": ["-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider", "tests/test_gpu.py",
              "--junitxml={out}/pytest_gpu.xml"], "log": "pytest_gpu.txt"},
    {"name": "bench_draws_cuda", "needs": CORE, "timeout": 150,
     "args": ["-m", "pipeline.cli", "bench", "draws", "--device", "cuda", "--threads", "0", "--json"],
     "json": "bench_draws_cuda.json"},
    {"name": "bench_elbo_cuda", "needs": CORE, "timeout": 240,
     "args": ["-m", "pipeline.cli", "bench", "elbo", "--device", "cuda", "--examples", "8", "--timesteps", "1000",
              "--threads", "0", "--json"],
     "json": "bench_elbo_cuda.json"},
    # The full-size CIFAR-10 DDPM++ (EDM's class-conditional VP network, random weights): one forward
    # at batch 64 in fp32 and bf16, and RDC seconds per image at all 1000 timesteps.
    {"name": "bench_elbo_cuda_ddpmpp", "needs": CORE, "timeout": 180,
     "requires": ("from pipeline.bench.elbo import bench_edm; from pipeline.models.edm import EDM_PRESETS; "
                  "assert 'edm-cifar10-cond-vp' in EDM_PRESETS"),
     "args": ["-m", "pipeline.cli", "bench", "elbo", "--device", "cuda", "--model", "edm-cifar10-cond-vp",
              "--examples", "1", "--timesteps", "1000", "--forward-batch", "64", "--no-grad", "--threads", "0", "--json"],
     "json": "bench_elbo_cuda_ddpmpp.json"},
    # The same network with input gradients, full and under Li et al.'s pruning (50 timesteps for
    # every class, keep 5, then 500 timesteps, keep 1): seconds per image of what an attack pays.
    {"name": "bench_elbo_cuda_ddpmpp_grads", "needs": CORE, "timeout": 240,
     "requires": "from pipeline.cli.bench import pruning_stages",
     "args": ["-m", "pipeline.cli", "bench", "elbo", "--device", "cuda", "--model", "edm-cifar10-cond-vp",
              "--examples", "1", "--timesteps", "1000", "--forward-batch", "64", "--grad", "--pruning", "50:5,500:1",
              "--threads", "0", "--json"],
     "json": "bench_elbo_cuda_ddpmpp_grads.json"},
]


def missing(modules: list[str]) -> list[str]:
    """The modules of the list that this python cannot import (found by its own interpreter)."""
    code = ("import importlib.util, json, sys; "
            "print(json.dumps([m for m in sys.argv[1:] if importlib.util.find_spec(m) is None]))")
    proc = subprocess.run([PYTHON, "-c", code, *modules], capture_output=True, text=True, timeout=60)
    return json.loads(proc.stdout) if proc.returncode == 0 else modules


def device_info(env: dict) -> dict:
    """torch, CUDA and the GPU as this python sees them (an "error" key where torch does not load)."""
    code = ("import json, torch; c = torch.cuda.is_available(); "
            "print(json.dumps({'torch': torch.__version__, 'cuda': c, 'cuda_version': torch.version.cuda, "
            "'gpu': torch.cuda.get_device_name(0) if c else None, 'gpus': torch.cuda.device_count()}))")
    proc = subprocess.run([PYTHON, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    if proc.returncode != 0:
        return {"error": proc.stderr.strip()[-1000:]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def run_step(step: dict, out: Path, env: dict, seconds_left: float) -> dict:
    args = [a.replace("{out}", str(out)) for a in step["args"]]
    record = {"name": step["name"], "command": " ".join([Path(PYTHON).name, *args])}
    absent = missing(step["needs"])
    if absent:
        return {**record, "status": "skipped", "reason": f"python packages missing here: {', '.join(absent)}"}
    if "requires" in step and subprocess.run([PYTHON, "-c", step["requires"]], capture_output=True, env=env,
                                             cwd=REPO, timeout=120).returncode != 0:
        return {**record, "status": "skipped", "reason": f"this checkout lacks what the step needs: {step['requires']}"}
    timeout = min(step["timeout"], seconds_left)
    if timeout < 20:
        return {**record, "status": "skipped", "reason": f"the check's budget of {BUDGET_S:.0f} s is spent"}
    start = time.perf_counter()
    try:
        proc = subprocess.run([PYTHON, *args], capture_output=True, text=True,
                              timeout=timeout, env=env, cwd=REPO)
    except subprocess.TimeoutExpired as exc:
        text = (exc.stdout or b"").decode(errors="replace") if isinstance(exc.stdout, bytes) else (exc.stdout or "")
        (out / f"{step['name']}.log").write_text(text)
        return {**record, "status": "timeout", "seconds": round(time.perf_counter() - start, 1),
                "reason": f"still running after {timeout:.0f} s"}
    seconds = round(time.perf_counter() - start, 1)
    result = {**record, "status": "ok" if proc.returncode == 0 else "failed", "returncode": proc.returncode,
              "seconds": seconds}
    if "log" in step or proc.returncode != 0:  # a bench's log only when it failed: few files to bring back
        result["log"] = step.get("log", f"{step['name']}.log")
        (out / result["log"]).write_text(proc.stdout + ("\n--- stderr ---\n" + proc.stderr if proc.stderr else ""))
    if "json" in step and proc.returncode == 0:
        try:
            doc = json.loads(proc.stdout)
        except ValueError:
            return {**result, "status": "failed", "reason": "the command's output is not JSON"}
        (out / step["json"]).write_text(json.dumps(doc, indent=2))
        result["json"] = step["json"]
    if proc.returncode != 0:
        result["reason"] = (proc.stderr.strip() or proc.stdout.strip())[-600:]
    return result


def main(argv: list[str]) -> int:
    out = Path(argv[1] if len(argv) > 1 else os.environ.get("GPU_CHECK_OUT", "gpu-check")).resolve()
    out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)}
    began = time.perf_counter()
    summary = {"python": PYTHON, "python_version": platform.python_version(), "machine": platform.machine(),
               "budget_s": BUDGET_S, "steps": []}
    if missing(["torch"]):
        summary["device"] = {"error": f"torch is not installed for {PYTHON}"}
    else:
        summary["device"] = device_info(env)
    status = 0
    if not summary["device"].get("cuda"):
        print(f"gpu-check: no CUDA device for {PYTHON}: {summary['device']}; nothing to check", file=sys.stderr)
        status = 2
    else:
        print(f"gpu-check: {summary['device']['gpu']} (torch {summary['device']['torch']}, "
              f"CUDA {summary['device']['cuda_version']}); results in {out}", file=sys.stderr)
        for step in STEPS:
            left = BUDGET_S - (time.perf_counter() - began)
            result = run_step(step, out, env, left)
            summary["steps"].append(result)
            print(f"gpu-check: {result['name']}: {result['status']}"
                  + (f" ({result['seconds']} s)" if "seconds" in result else "")
                  + (f": {result['reason']}" if result.get("reason") else ""), file=sys.stderr)
            if result["status"] in ("failed", "timeout"):
                status = 1
    summary["seconds"] = round(time.perf_counter() - began, 1)
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    return status


if __name__ == "__main__":
    sys.exit(main(sys.argv))

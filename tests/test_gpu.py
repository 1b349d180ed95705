"""On a CUDA device (`pytest -m gpu`, run by `make gpu-check`; skipped without one): the engine and
the draws on the GPU against the CPU, autocast's agreement, and a Ray worker holding its GPU."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from pipeline import rng
from pipeline.defenses.engine import EngineOptions, autocast_dtype
from pipeline.defenses.rdc import RDC
from pipeline.models.registry import build_model
from pipeline.models.unet import unet_config
from pipeline.rng import Draw, reference_integers, reference_normal, reference_uniform, ulps_apart

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

REPO = Path(__file__).resolve().parents[1]

# The stated bound (docs/math.md, "Randomness"): float64 log and cos of CUDA's math library against
# the CPU's, then a cast: float32 normals at most 1 ulp apart, float64 ones at most 16.
BOUND_ULPS = {torch.float32: 1, torch.float64: 16}


@pytest.fixture
def exact_float32():
    """float32 convolutions and matmuls in full precision (no TF32) for the duration of a test."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def test_draws_on_cuda_equal_the_cpu_ones_within_the_stated_bound():
    d = Draw(5, torch.tensor([0, 1, 7, 2**40 + 3, -9]), torch.tensor([0, 3, 1, 0, 2]))
    ts = torch.arange(0, 1000, 3)
    for shape in ((3, 32, 32), (1, 8, 8), (7,)):
        for dtype, bound in BOUND_ULPS.items():
            gpu = d.normal(rng.ELBO_NOISE, ts, shape, dtype=dtype, device="cuda")
            assert gpu.device.type == "cuda" and gpu.dtype == dtype
            ulps = ulps_apart(gpu.cpu(), reference_normal(d, rng.ELBO_NOISE, ts, shape, dtype=dtype))
            assert int(ulps.max()) <= bound, (shape, dtype, int(ulps.max()), int((ulps > 0).sum()))
    index = torch.arange(-45, 3000).view(-1, 7)
    u = d.uniform(rng.MI_CLASS, index, device="cuda")
    assert u.device.type == "cuda" and torch.equal(u.cpu(), reference_uniform(d, rng.MI_CLASS, index))
    for high in (10, 2**31 - 1, torch.arange(1, 8)):
        k = d.integers(rng.MI_SAMPLE, index, high, device="cuda")
        assert torch.equal(k.cpu(), reference_integers(d, rng.MI_SAMPLE, index, high))


def _rdc(device, timesteps=20, options=None):
    cfg = {k: v for k, v in unet_config("digits").items() if k != "arch"}
    torch.manual_seed(0)
    model = build_model({"arch": "unet", **cfg})
    with torch.no_grad():  # every weight random, the zero-initialised output layers too
        for p in model.parameters():
            p.copy_(0.2 * torch.randn_like(p))
    model = model.to(device).eval().requires_grad_(False)
    return RDC(model, 10, 1, 8, timesteps=timesteps, engine=options or EngineOptions(autocast="off")).to(device)


def test_the_engine_on_cuda_equals_the_cpu_result(exact_float32):
    x = torch.rand(3, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    draw = Draw(0, torch.arange(3), torch.zeros(3, dtype=torch.int64))
    w = torch.randn(3, 10, generator=torch.Generator().manual_seed(2))
    out = {}
    for device in ("cpu", "cuda"):
        xg = x.to(device).requires_grad_(True)
        logits = _rdc(device).evaluate(xg, draw)
        grad, = torch.autograd.grad((logits * w.to(device)).sum(), xg)
        out[device] = logits.detach().cpu(), grad.cpu()
    (l_cpu, g_cpu), (l_gpu, g_gpu) = out["cpu"], out["cuda"]
    assert float((l_gpu - l_cpu).abs().max() / l_cpu.abs().max()) < 1e-4
    assert float((g_gpu - g_cpu).abs().max() / g_cpu.abs().max()) < 1e-3
    assert torch.equal(l_gpu.argmax(1), l_cpu.argmax(1))


def test_autocast_on_cuda_agrees_with_float32():
    from pipeline.bench.elbo import autocast_agreement

    assert autocast_dtype(EngineOptions(), torch.device("cuda")) == torch.bfloat16  # "auto" on a GPU
    for dtype in ("bf16", "fp16"):
        result = autocast_agreement(timesteps=10, dtype=dtype, device="cuda")
        assert result["n"] == 355 and result["agreement"] >= 0.99, result


def test_a_ray_worker_with_one_gpu_sees_it():
    """A fresh local Ray (its own process): the cluster must declare the GPU, and a Worker
    actor and a task asking for num_gpus=1 must find CUDA on it."""
    pytest.importorskip("ray")
    script = textwrap.dedent("""
        import json, ray, torch
        ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
        resources = ray.cluster_resources()
        out = {"resources": {k: v for k, v in resources.items() if k in ("CPU", "GPU")}}
        if resources.get("GPU", 0) >= 1:
            from pipeline.runtime.worker import Worker

            @ray.remote(num_gpus=1, num_cpus=1)
            def probe():
                import os, torch
                return {"cuda": torch.cuda.is_available(), "count": torch.cuda.device_count(),
                        "name": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
                        "visible": os.environ.get("CUDA_VISIBLE_DEVICES"), "gpu_ids": ray.get_gpu_ids()}

            out["task"] = ray.get(probe.remote())
            actor = ray.remote(Worker).options(num_gpus=1, num_cpus=1).remote("gpu-check", "cuda", 1)
            out["worker_device"] = ray.get(actor.__ray_call__.remote(lambda self: str(self.device)))
        ray.shutdown()
        print("RESULT " + json.dumps(out))
    """)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=240, env=env, cwd=REPO)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stdout[-2000:] + proc.stderr[-4000:]
    out = json.loads(lines[-1][len("RESULT "):])
    assert out["resources"].get("GPU", 0) >= 1, f"Ray declares no GPU on this machine: {out['resources']}"
    task = out["task"]
    assert task["cuda"] and task["count"] == 1 and len(task["gpu_ids"]) == 1, task
    assert out["worker_device"] == "cuda", out


@pytest.mark.parametrize("gradient", ["bpda", "exact"])
def test_likelihood_maximization_on_cuda_equals_the_cpu_result(exact_float32, gradient):
    """LM draws its timesteps on the CPU and noises images on the GPU: the purified images and
    their input gradients must match the CPU's."""
    from pipeline.defenses.lm import LikelihoodMaximization

    x = torch.rand(2, 1, 8, 8, generator=torch.Generator().manual_seed(3))
    draw = Draw(0, torch.arange(2), torch.zeros(2, dtype=torch.int64))
    w = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(4))
    out = {}
    for device in ("cpu", "cuda"):
        model = _rdc(device).eps_model
        lm = LikelihoodMaximization(model, 10, steps=2, samples=2, gradient=gradient).to(device)
        xg = x.to(device).requires_grad_(True)
        purified = lm(xg, draw)
        grad, = torch.autograd.grad((purified * w.to(device)).sum(), xg)
        out[device] = purified.detach().cpu(), grad.cpu()
    (p_cpu, g_cpu), (p_gpu, g_gpu) = out["cpu"], out["cuda"]
    assert float((p_gpu - p_cpu).abs().max()) < 1e-4
    assert float((g_gpu - g_cpu).abs().max() / g_cpu.abs().max()) < 1e-3

"""Benchmarks, measured side by side in one process: `robustsweep bench ...`.

`bench_elbo` times RDC logits (and their input gradients) two ways on the same model, inputs
and noise: the reference strategy of the published code (a Python loop over classes,
timesteps in chunks of 64, one example at a time) and robustsweep's engine (all
(example, class, timestep) cells in memory-budgeted batches). Both must give the same logits.
"""

from __future__ import annotations

import platform
import time

import torch

from . import rng
from .data import load_split
from .defenses import build_defense
from .rng import Draw


def _reference_logits(rdc, x: torch.Tensor, draw: Draw, chunk: int = 64) -> torch.Tensor:
    """The published strategy: per example, per class, timesteps in chunks of `chunk`."""
    out = []
    for i in range(x.shape[0]):
        d = draw.subset(torch.tensor([i]))
        noise = rdc.noise(d, rdc.ts, x[i:i + 1])[0]  # (|S|, C, H, W): the engine's noise
        row = []
        for c in range(rdc.num_classes):
            total = 0.0
            for start in range(0, rdc.ts.numel(), chunk):
                t = rdc.ts[start:start + chunk]
                e = noise[start:start + chunk]
                sqrt_a, s = rdc.schedule.coefficients(t, x.dtype)
                x_t = sqrt_a.view(-1, 1, 1, 1) * (2 * x[i:i + 1] - 1) + s.view(-1, 1, 1, 1) * e
                eps = rdc.eps_model(x_t, t, torch.full_like(t, c))
                total = total + (eps - e).pow(2).flatten(1).sum(1).sum()
            row.append(-total / rdc.ts.numel())
        out.append(torch.stack(row))
    return torch.stack(out)


def _timed(fn, repeat: int) -> tuple[float, object]:
    fn()  # warm-up
    start = time.perf_counter()
    for _ in range(repeat):
        result = fn()
    return (time.perf_counter() - start) / repeat, result


def bench_elbo(model: str = "default", examples: int = 8, timesteps: int = 100, repeat: int = 2,
               threads: int | None = None) -> dict:
    """Examples/s of the reference strategy and of the engine, for logits and input gradients."""
    if threads:
        torch.set_num_threads(threads)
    rdc = build_defense({"kind": "rdc", "model": model, "dataset": "digits", "timesteps": timesteps})
    x, _ = load_split("digits", "test")
    x = x[:examples]
    draw = Draw(0, torch.arange(examples), torch.zeros(examples, dtype=torch.int64))
    with torch.no_grad():
        t_ref, ref = _timed(lambda: _reference_logits(rdc, x, draw), repeat)
        t_eng, eng = _timed(lambda: rdc.evaluate(x, draw), repeat)
    if not torch.allclose(ref, eng, atol=1e-3, rtol=1e-4):
        raise AssertionError(f"engine and reference disagree by {float((ref - eng).abs().max()):.3g}")
    w = torch.randn(examples, rdc.num_classes, generator=torch.Generator().manual_seed(0))

    def grad(f):
        xg = x.clone().requires_grad_(True)
        return torch.autograd.grad((f(xg) * w).sum(), xg)[0]

    g_ref_t, g_ref = _timed(lambda: grad(lambda xg: _reference_logits(rdc, xg, draw)), 1)
    g_eng_t, g_eng = _timed(lambda: grad(lambda xg: rdc.evaluate(xg, draw)), 1)
    if not torch.allclose(g_ref, g_eng, atol=1e-3, rtol=1e-3):
        raise AssertionError(f"engine and reference gradients disagree by {float((g_ref - g_eng).abs().max()):.3g}")
    return {
        "model": model, "examples": examples, "timesteps": timesteps, "classes": rdc.num_classes,
        "reference_examples_per_s": examples / t_ref, "engine_examples_per_s": examples / t_eng,
        "ratio": t_ref / t_eng,
        "reference_grad_examples_per_s": examples / g_ref_t, "engine_grad_examples_per_s": examples / g_eng_t,
        "grad_ratio": g_ref_t / g_eng_t,
        "device": "cpu", "threads": torch.get_num_threads(), "torch": torch.__version__,
        "machine": platform.processor() or platform.machine(),
    }

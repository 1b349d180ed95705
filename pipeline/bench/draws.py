"""`robustsweep bench draws`: the cost of RDC's noise against the forward pass it feeds.

One RDC forward on one image draws e_t for every timestep: 1000 x 3x32x32 normals for a CIFAR
image, 1000 x 1x8x8 for a digits one. `bench_draws` times, in one run and alternately, the
device path (`Draw.normal` on the device that consumes the noise; on a CPU, the compiled kernel
for a large field) and the reference (`rng.reference_normal`: hashed on the CPU in int64 passes,
float64, then cast and moved), and beside them the engine's RDC forward for the same image
(random weights: the time does not depend on them). On a CPU the CIFAR forward is measured at
a few timesteps and scaled to 1000: it is linear in the number of (class, timestep) evaluations.
"""

from __future__ import annotations

import math
import os
import platform
import time

import torch

from pipeline import rng
from pipeline.bench.common import best_of
from pipeline.defenses.rdc import RDC
from pipeline.errors import ConfigError
from pipeline.machine import processor_name
from pipeline.models.registry import build_model
from pipeline.models.unet import unet_config
from pipeline.rng import Draw

CASES = {"cifar10": (3, 32, 32), "digits": (1, 8, 8)}


def _forward_seconds(dataset: str, timesteps: int, dev: torch.device, repeat: int) -> float:
    """Seconds of the engine's RDC logits on one image at `timesteps` (systematic subsample), best of repeat."""
    cfg = {k: v for k, v in unet_config(dataset).items() if k != "arch"}
    model = build_model({"arch": "unet", **cfg}).to(dev).eval().requires_grad_(False)
    rdc = RDC(model, cfg["num_classes"], cfg["in_channels"], cfg["image_size"], timesteps=timesteps).to(dev)
    x = torch.rand(1, cfg["in_channels"], cfg["image_size"], cfg["image_size"],
                   generator=torch.Generator().manual_seed(0)).to(dev)
    draw = Draw(0, torch.zeros(1, dtype=torch.int64), torch.zeros(1, dtype=torch.int64))
    with torch.no_grad():
        (seconds, _), = best_of({"forward": lambda: rdc.evaluate(x, draw)}, repeat, dev).values()
    return seconds


def bench_draws(device: str = "cpu", threads: int | None = 1, repeat: int = 3, timesteps: int = 1000,
                forward_timesteps: dict | None = None, forward_repeat: int = 1,
                datasets: tuple[str, ...] = tuple(CASES)) -> dict:
    """Seconds to draw one RDC forward's noise, new path against the reference, beside the forward.

    Per case (cifar10, digits): `draw_seconds` (the device path, best of `repeat` after a warm-up
    that also compiles; `compile_seconds` is that first call), `reference_seconds`,
    `speedup_vs_reference`, `eager_seconds` (the device path without the compiled kernel, what
    a small draw uses), `max_ulps_vs_reference` and `values_differing` (the new draws against
    the reference's, same run), `forward_seconds` (the engine's RDC logits on one image at
    `timesteps`, scaled from `forward_measured_timesteps`) and `share_of_forward`
    (draw_seconds / forward_seconds). forward_timesteps: per case, the timesteps at which the
    forward is measured (default: 100 for cifar10 on a GPU, 1 on a CPU; all for digits).
    datasets: the cases to run (default both).
    """
    if threads:
        torch.set_num_threads(threads)
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("bench draws --device cuda: torch sees no CUDA device")
    load_before = os.getloadavg()
    measured = {"cifar10": min(timesteps, 1 if dev.type == "cpu" else 100), "digits": timesteps, **(forward_timesteps or {})}
    draw = Draw(0, torch.zeros(1, dtype=torch.int64), torch.zeros(1, dtype=torch.int64))
    ts = torch.arange(timesteps)
    cases = {}
    for name in datasets:
        shape = CASES[name]
        def new():
            return draw.normal(rng.ELBO_NOISE, ts, shape, device=dev)

        def reference():
            return rng.reference_normal(draw, rng.ELBO_NOISE, ts, shape, device=dev)

        def eager():
            pre = draw._rows(rng.ELBO_NOISE, ts, dev)
            return rng.normal_field(pre, math.prod(shape), torch.float32)

        start = time.perf_counter()
        new()
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        compile_s = time.perf_counter() - start
        timed = best_of({"new": new, "reference": reference, "eager": eager}, repeat, dev)
        (t_new, z), (t_ref, z_ref), (t_eager, z_eager) = timed["new"], timed["reference"], timed["eager"]
        ulps = rng.ulps_apart(z, z_ref)
        n_forward = measured[name]
        forward = _forward_seconds(name, n_forward, dev, forward_repeat) * timesteps / n_forward
        cases[name] = {
            "shape": list(shape), "timesteps": timesteps, "values": z.numel(),
            "draw_seconds": t_new, "reference_seconds": t_ref, "speedup_vs_reference": t_ref / t_new,
            "eager_seconds": t_eager, "first_call_seconds": compile_s,
            "compiled": dev.type == "cpu" and z.numel() >= rng.COMPILE_MIN_ELEMENTS,
            "max_ulps_vs_reference": int(ulps.max()), "values_differing": int((ulps > 0).sum()),
            "eager_equals_new": bool(torch.equal(z_eager.view_as(z), z)),
            "forward_seconds": forward, "forward_measured_timesteps": n_forward,
            "share_of_forward": t_new / forward,
        }
    return {
        "cases": cases,
        "speedup_vs_reference": {k: c["speedup_vs_reference"] for k, c in cases.items()},
        "share_of_forward": {k: c["share_of_forward"] for k, c in cases.items()},
        "device": str(dev) if dev.type == "cpu" else torch.cuda.get_device_name(dev),
        "processor": processor_name(), "threads": torch.get_num_threads(), "torch": torch.__version__,
        "python": platform.python_version(), "cpus": os.cpu_count(),
        "load_before": [round(v, 2) for v in load_before], "load_after": [round(v, 2) for v in os.getloadavg()],
    }


def format_draws(result: dict) -> list[str]:
    """One line per case, and the machine, for the terminal."""
    lines = []
    for name, c in result["cases"].items():
        lines.append(
            f"{name} ({c['timesteps']} x {'x'.join(map(str, c['shape']))} = {c['values']:,} normals, {result['device']}, "
            f"{result['threads']} thread(s)): {1e3 * c['draw_seconds']:.2f} ms, reference {1e3 * c['reference_seconds']:.1f} ms, "
            f"speedup_vs_reference {c['speedup_vs_reference']:.1f}x; eager {1e3 * c['eager_seconds']:.1f} ms; "
            f"forward {c['forward_seconds']:.3g} s (measured at {c['forward_measured_timesteps']} timesteps), "
            f"draws {100 * c['share_of_forward']:.2f}% of it; {c['values_differing']} values differ from the "
            f"reference (max {c['max_ulps_vs_reference']} ulp)")
    lines.append(f"{result['processor']}; torch {result['torch']}; load average {result['load_before']} before, "
                 f"{result['load_after']} after")
    return lines

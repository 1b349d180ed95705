"""`robustsweep bench grid`: the speedup of grid sharding, measured side by side in one run.

For G = 1, 2 (3 where the machine has the cores) local Ray actors of one thread each, the
seconds of one batch's RDC logits and of one exact input gradient through the whole RDC, with
the grid split over the G actors (the driver only sums). Same model, inputs and draws for
every G; the speedup is seconds(G = 1) / seconds(G).
"""

from __future__ import annotations

import contextlib
import os

import ray
import torch

from pipeline.bench.common import best_seconds, load_average, local_ray, machine_info
from pipeline.config.defense import parse_defense
from pipeline.data import load_split
from pipeline.defenses import build_defense
from pipeline.runtime.grid import Gang, shard
from pipeline.runtime.worker import Worker
from pipeline.training.defaults import prepare_defaults


def bench_grid(*, model: str = "default", timesteps: int = 1000, examples: int = 2, gangs: tuple[int, ...] | None = None,
               repeat: int = 2, progress=None) -> dict:
    """Seconds of RDC logits (B = `examples`) and of their input gradient for each gang size.

    model: "default" (the trained digits UNet) or "optimal". Returns a dict with, per G,
    `logits_seconds_g{G}`, `grad_seconds_g{G}`, `speedup_logits_g{G}`, `speedup_grad_g{G}`.
    """
    cores = os.cpu_count() or 1
    gangs = gangs or tuple(g for g in (1, 2, 3) if g <= max(cores, 2))
    table = {"kind": "rdc", "dataset": "digits", "model": model, "timesteps": timesteps}
    x = load_split("digits", "test")[0][:examples]
    ids = list(range(examples))
    torch.set_num_threads(1)
    spec = parse_defense(table)
    prepare_defaults([spec], progress=False)  # before any actor asks: building never trains
    defense = build_defense(spec)
    out: dict = {"model": model, "timesteps": timesteps, "examples": examples, "gangs": list(gangs),
                 "threads_per_actor": 1, "cores": cores, **machine_info("cpu"), "ray": ray.__version__,
                 "repeat": repeat, "load_before": load_average()}
    reference = {}
    with local_ray(max(gangs)), _unsharded(defense):
        for g in gangs:
            actors = [ray.remote(Worker).options(num_cpus=1).remote(f"bench-{i}", "cpu", 1) for i in range(g)]
            ray.get([a.ping.remote() for a in actors])
            gang = Gang(actors, spec)
            shard(defense, gang)

            def logits():
                defense.bind(ids, seed=0)
                with torch.no_grad():
                    return defense(x)

            def grad():
                defense.bind(ids, seed=0)
                xg = x.clone().requires_grad_(True)
                out_ = defense(xg)
                torch.autograd.grad(out_.logsumexp(1).sum() - out_[:, 0].sum(), xg)

            logits()  # warm-up: every actor builds the defense once
            t_logits = best_seconds(logits, repeat)
            t_grad = best_seconds(grad, repeat)
            shard(defense, None)
            for a in actors:
                ray.kill(a)
            if g == gangs[0]:
                reference = {"logits": t_logits, "grad": t_grad}
            out[f"logits_seconds_g{g}"] = t_logits
            out[f"grad_seconds_g{g}"] = t_grad
            out[f"speedup_logits_g{g}"] = reference["logits"] / t_logits
            out[f"speedup_grad_g{g}"] = reference["grad"] / t_grad
            if progress:
                progress(g, t_logits, t_grad)
    out["load_after"] = load_average()
    return out


@contextlib.contextmanager
def _unsharded(defense):
    """The defense back on its own grid on the way out, whatever happened to the gangs."""
    try:
        yield
    finally:
        shard(defense, None)


def format_grid_step(g: int, t_logits: float, t_grad: float) -> str:
    """The line `robustsweep bench grid` prints as each gang size is measured."""
    return f"G={g}: logits {t_logits:.2f} s, input gradient {t_grad:.2f} s"


def format_grid(result: dict) -> list[str]:
    """The closing lines of `robustsweep bench grid`: the speedups over G = 1."""
    return [f"speedup at G={g}: logits {result[f'speedup_logits_g{g}']:.2f}x, gradient {result[f'speedup_grad_g{g}']:.2f}x"
            for g in result["gangs"][1:]]

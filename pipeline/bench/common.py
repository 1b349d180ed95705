"""What every benchmark shares: one timer, one description of the machine, one local Ray.

- `timed` / `best_of` / `best_seconds`: wall seconds of a call, synchronising a CUDA device
  around it so that queued kernels are counted; the best of several rounds.
- `machine_info`: the processor by name and the flags that decide its speed (AVX-512, bf16,
  AMX), cores, the torch and Python versions and the device; `load_average` the load.
- `local_ray`: a Ray cluster of the benchmark's own on this machine, never one that another
  process started, shut down afterwards (an already initialised Ray is used as it is).
"""

from __future__ import annotations

import contextlib
import os
import platform
import time
from collections.abc import Callable, Iterator
from typing import Any

import torch

from pipeline import machine

# CPU flags that change what the engine's kernels can do: vector width, bf16 dot products, AMX tiles.
CPU_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "avx512_fp16", "amx_tile", "amx_bf16", "amx_int8")


def sync(device: torch.device | str) -> None:
    """Wait for the device's queued work (a no-op on the CPU)."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], Any], device: torch.device | str = "cpu") -> tuple[float, Any]:
    """(wall seconds, result) of one call of fn, the device synchronised before and after."""
    sync(device)
    start = time.perf_counter()
    result = fn()
    sync(device)
    return time.perf_counter() - start, result


def best_of(fns: dict[str, Callable[[], Any]], repeat: int, device: torch.device | str = "cpu",
            warmup: bool = True) -> dict[str, tuple[float, Any]]:
    """{name: (best seconds, last result)}: with `warmup`, each fn once untimed first; then
    `repeat` rounds that run the fns in turn, so that other load on the machine hits all alike."""
    results = {k: fn() for k, fn in fns.items()} if warmup else {}
    best = {k: float("inf") for k in fns}
    for _ in range(max(1, repeat)):
        for k, fn in fns.items():
            seconds, results[k] = timed(fn, device)
            best[k] = min(best[k], seconds)
    return {k: (best[k], results[k]) for k in fns}


def best_seconds(fn: Callable[[], Any], repeat: int, device: torch.device | str = "cpu", warmup: bool = False) -> float:
    """The best wall seconds of `repeat` calls of fn."""
    return best_of({"fn": fn}, repeat, device, warmup)["fn"][0]


def load_average() -> list[float]:
    """The 1, 5 and 15 minute load averages, rounded: how busy the machine was around a run."""
    return [round(v, 2) for v in os.getloadavg()]


def cpu_flags() -> list[str]:
    """The CPU_FLAGS this processor has (empty where they cannot be read)."""
    have = machine.cpu_flags()
    return [flag for flag in CPU_FLAGS if flag in have]


def machine_info(device: torch.device | str = "cpu") -> dict:
    """What a benchmark's figures depend on: device (the GPU's name on CUDA), processor, cpu_flags,
    cpus, torch, python, machine (the architecture). Threads are the benchmark's to report."""
    device = torch.device(device)
    return {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else str(device),
            "processor": machine.processor_name(), "cpu_flags": cpu_flags(), "cpus": os.cpu_count(),
            "torch": torch.__version__, "python": platform.python_version(),
            "machine": platform.machine()}


@contextlib.contextmanager
def local_ray(num_cpus: int) -> Iterator[None]:
    """Ray for a benchmark: a fresh local cluster of `num_cpus` CPUs ("local": never one that
    another process on this machine started), shut down on exit; if this process already has
    Ray initialised, that one is used and left running."""
    import ray

    started = not ray.is_initialized()
    if started:
        ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, logging_level="ERROR",
                 log_to_driver=False)
    try:
        yield
    finally:
        if started:
            ray.shutdown()


__all__ = ["timed", "best_of", "best_seconds", "sync", "load_average", "machine_info",
           "cpu_flags", "local_ray", "CPU_FLAGS"]

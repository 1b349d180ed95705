"""`robustsweep bench attack`: a unit's examples attacked as one batch, against one at a time
and against `pyautoattack` run by itself on the same batch and model, in one run.

Cases (digits, fixed budgets so that the three timings do the same work):

- plain: the digits CNN under AutoAttack standard (APGD-CE, APGD-T, FAB-T, Square);
- mi-pl: Mixup Inference (predicted label) under AutoAttack rand (APGD-CE, APGD-DLR with EOT);
- rdc-optimal: RDC on the closed-form optimal denoiser under AutoAttack rand.

For each: `batched_seconds` (evaluate's attack phase, the batch at once), `per_example_seconds`
(the same per example, on the first `per_example` examples, scaled to the batch), the
library's seconds (`AutoAttack.run_standard_evaluation` on the batch), and
speedup_vs_per_example = per_example / batched, overhead_vs_library = batched / library.
The scoring passes are not timed: they are the same in every mode.
"""

from __future__ import annotations

import platform
import time

import torch

from pipeline.attacks.autoattack import build_autoattack
from pipeline.config.attack import parse_attack
from pipeline.data import load_split
from pipeline.defenses import build_defense
from pipeline.errors import ConfigError
from pipeline.protocol import evaluate

CASES = {
    "plain": ({"kind": "plain"},
              {"kind": "autoattack", "version": "standard", "eps": 32 / 255, "n_iter": 20, "n_target_classes": 3,
               "square_queries": 200}),
    "mi-pl": ({"kind": "mi", "mode": "pl"},
              {"kind": "autoattack", "version": "rand", "eps": 32 / 255, "n_iter": 10, "eot_iter": 4, "passes": 5}),
    "rdc-optimal": ({"kind": "rdc", "model": "optimal", "timesteps": 5},
                    {"kind": "autoattack", "version": "rand", "eps": 32 / 255, "n_iter": 5, "eot_iter": 2, "passes": 3}),
}
"""Each case: (defense table, attack table)."""


def processor() -> str:
    """The CPU model name (from /proc/cpuinfo on Linux), else platform.processor()."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def _library_seconds(defense, table: dict, x: torch.Tensor, y: torch.Tensor, seed: int) -> float:
    """pyautoattack's own run of the same attack on the same batch (no selection, no scoring)."""
    spec = parse_attack(table)
    defense.bind(None, seed=seed)
    aa = build_autoattack(defense, spec, defense.num_classes, seed, x.device)
    _sync(x.device)
    start = time.perf_counter()
    with torch.random.fork_rng(devices=[]):
        aa.run_standard_evaluation(x, y, batch_size=x.shape[0])
    _sync(x.device)
    return time.perf_counter() - start


def bench_case(name: str, *, examples: int = 64, per_example: int = 8, seed: int = 0, device: str = "cpu",
               progress=None) -> dict:
    """Seconds and ratios of one case (see the module docstring)."""
    defense_table, table = CASES[name]
    defense = build_defense({**defense_table, "dataset": "digits"}, device=device)
    x, y = load_split("digits", "test")
    x, y = x[:examples].to(device), y[:examples].to(device)
    ids = torch.arange(examples)
    extras: dict = {}
    records = evaluate(defense, table, x, y, ids, seed, extras=extras)
    batched = extras["attack_seconds"]
    k = min(per_example, examples)
    one: dict = {}
    evaluate(defense, {**table, "batched": False}, x[:k], y[:k], ids[:k], seed, extras=one)
    per_example_seconds = one["attack_seconds"] * examples / k
    library = _library_seconds(defense, table, x, y, seed)
    if progress is not None:
        progress(name)
    return {
        "case": name, "device": str(device), "examples": examples, "per_example_examples": k,
        "batched_seconds": batched, "per_example_seconds": per_example_seconds, "library_seconds": library,
        "speedup_vs_per_example": per_example_seconds / batched, "overhead_vs_library": batched / library,
        "robust_acc": sum(r["adv_vote_correct"] for r in records) / examples,
    }


def bench_attack(*, cases=tuple(CASES), examples: int = 64, per_example: int = 8, threads: int | None = 1,
                 seed: int = 0, device: str = "cpu", progress=None) -> dict:
    """{processor, threads, cases: [bench_case rows]} for the chosen cases."""
    unknown = [c for c in cases if c not in CASES]
    if unknown:
        raise ConfigError(f"bench attack: unknown case(s) {unknown}; choose from {list(CASES)}")
    before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        rows = [bench_case(c, examples=examples, per_example=per_example, seed=seed, device=device, progress=progress)
                for c in cases]
    finally:
        torch.set_num_threads(before)
    gpu = torch.cuda.get_device_name(torch.device(device)) if torch.device(device).type == "cuda" else None
    return {"processor": processor(), "gpu": gpu, "threads": torch.get_num_threads() if not threads else threads, "cases": rows}


def format_attack(result: dict) -> list[str]:
    """The result as lines of text: a heading, then one line per case."""
    lines = [f"bench attack on {result['gpu'] or result['processor']}, {result['threads']} thread(s)"]
    for r in result["cases"]:
        lines.append(f"  {r['case']:12s} n={r['examples']}: batched {r['batched_seconds']:.2f} s, "
                     f"per example {r['per_example_seconds']:.2f} s (from {r['per_example_examples']}), "
                     f"pyautoattack {r['library_seconds']:.2f} s; speedup_vs_per_example "
                     f"{r['speedup_vs_per_example']:.1f}x, overhead_vs_library {r['overhead_vs_library']:.2f}x, "
                     f"robust (vote) {100 * r['robust_acc']:.1f}%")
    return lines

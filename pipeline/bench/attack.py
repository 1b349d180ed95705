"""`robustsweep bench attack`: a unit's examples attacked as one batch, against one at a time
and against `pyautoattack` run by itself on the same batch and model, in one run.

Cases (digits, fixed budgets so that the three timings do the same work):

- plain: the digits CNN under AutoAttack standard (APGD-CE, APGD-T, FAB-T, Square);
- mi-pl: Mixup Inference (predicted label) under AutoAttack rand (APGD-CE, APGD-DLR with EOT);
- rdc-optimal: RDC on the closed-form optimal denoiser under AutoAttack rand.

For each: `batched_seconds` (evaluate's attack phase, the batch at once), `per_example_seconds`
(the same per example, on the first `per_example` examples, scaled to the batch), the
library's seconds (`AutoAttack.run_standard_evaluation` on the batch), and
speedup_vs_per_example = per_example / batched, overhead_vs_library = batched / library,
each time the fastest of `repeat` interleaved runs. The scoring passes are not timed: they
are the same in every mode.

Where the speedup comes from: `evaluations_per_example` (network evaluations, forward and
backward, of the attack) is about the same in both modes, so the speedup is the ratio of
`us_per_evaluation`; `network_us_per_evaluation` is the wrapped network's own cost per
evaluation (a forward and a backward per image, halved) at the batch each mode hands it (MI:
its draws for one example, or for the whole batch): the floor under the evaluations' cost.
"""

from __future__ import annotations

import time

import torch

from pipeline.attacks import Attack
from pipeline.attacks.autoattack import build_autoattack
from pipeline.config import spec
from pipeline.data import load_split
from pipeline.defenses import build_defense
from pipeline.errors import ConfigError
from pipeline.machine import processor_name
from pipeline.protocol import Batch, build_attack, evaluate

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


def _sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def _library_seconds(defense, attack: Attack, x: torch.Tensor, y: torch.Tensor, seed: int) -> float:
    """pyautoattack's own run of the same attack on the same batch (no selection, no scoring)."""
    defense.bind(None, seed=seed)
    aa = build_autoattack(defense, attack.spec, defense.num_classes, seed, x.device)
    _sync(x.device)
    start = time.perf_counter()
    with torch.random.fork_rng(devices=[]):
        aa.run_standard_evaluation(x, y, batch_size=x.shape[0])
    _sync(x.device)
    return time.perf_counter() - start


def _attack_seconds(defense, attack: Attack, x, y, ids, seed: int) -> tuple[float, int]:
    """evaluate's attack phase on (x, y): seconds, and network evaluations (forward + backward)."""
    result = evaluate(defense, attack, Batch(x, y, ids), seed)
    return result.attack_seconds, result.attack.forward + result.attack.backward


def _network_seconds(defense, x: torch.Tensor, images: int, repeat: int) -> float | None:
    """Seconds per evaluation of the network a defense wraps (MI's classifier) at a batch of
    `images`: one forward and backward per image, halved (the cost counters count a backward as
    one more evaluation). The least an evaluation costs, whatever the attack around it. None for
    a defense without one such network."""
    net = getattr(defense, "classifier", None)
    if net is None:
        return None
    batch = x[torch.arange(images) % x.shape[0]].clone().requires_grad_(True)
    best = float("inf")
    for _ in range(repeat + 1):  # the first call is a warm-up
        _sync(x.device)
        start = time.perf_counter()
        torch.autograd.grad(net(batch).logsumexp(1).sum(), batch)
        _sync(x.device)
        best = min(best, time.perf_counter() - start)
    return best / (2 * images)


def bench_case(name: str, *, examples: int = 64, per_example: int = 8, repeat: int = 3, seed: int = 0,
               device: str = "cpu", progress=None) -> dict:
    """Seconds and ratios of one case (see the module docstring).

    Each mode runs once untimed on two examples (first calls allocate and fill caches), then
    `repeat` times interleaved (batched, per example, library), so that a burst of load on a
    shared machine falls on all three; each mode's time is its fastest run, as timeit's.
    """
    defense_table, table = CASES[name]
    defense = build_defense(spec({**defense_table, "dataset": "digits"}), device=device)
    x, y = load_split("digits", "test")
    x, y = x[:examples].to(device), y[:examples].to(device)
    ids = torch.arange(examples)
    k = min(per_example, examples)
    attack = build_attack(spec(table), defense.num_classes)
    one = build_attack(spec({**table, "batched": False}), defense.num_classes)
    _attack_seconds(defense, attack, x[:2], y[:2], ids[:2], seed)
    _attack_seconds(defense, one, x[:2], y[:2], ids[:2], seed)
    _library_seconds(defense, attack, x[:2], y[:2], seed)
    times: dict[str, list[float]] = {"batched": [], "per_example": [], "library": []}
    evaluations = {}
    for _ in range(repeat):
        seconds, evaluations["batched"] = _attack_seconds(defense, attack, x, y, ids, seed)
        times["batched"].append(seconds)
        seconds, count = _attack_seconds(defense, one, x[:k], y[:k], ids[:k], seed)
        times["per_example"].append(seconds * examples / k)
        evaluations["per_example"] = count * examples / k
        times["library"].append(_library_seconds(defense, attack, x, y, seed))
    records = evaluate(defense, attack, Batch(x, y, ids), seed).records
    if progress is not None:
        progress(name)
    batched, per_example_seconds, library = (min(times[m]) for m in ("batched", "per_example", "library"))
    draws = getattr(defense, "n_pl", 0) + getattr(defense, "n_ol", 0) or 1
    network = {mode: _network_seconds(defense, x, draws * n, 5 if n > 1 else 50)
               for mode, n in (("batched", examples), ("per_example", 1))}
    return {
        "case": name, "device": str(device), "examples": examples, "per_example_examples": k, "repeat": repeat,
        "batched_seconds": batched, "per_example_seconds": per_example_seconds, "library_seconds": library,
        "speedup_vs_per_example": per_example_seconds / batched, "overhead_vs_library": batched / library,
        "runs": times, "robust_acc": sum(r.adv_vote_correct for r in records) / examples,
        "evaluations_per_example": {m: c / examples for m, c in evaluations.items()},
        "us_per_evaluation": {m: 1e6 * t / max(evaluations[m], 1) for m, t in
                              (("batched", batched), ("per_example", per_example_seconds))},
        "network_us_per_evaluation": {m: None if t is None else 1e6 * t for m, t in network.items()},
    }


def bench_attack(*, cases=tuple(CASES), examples: int = 64, per_example: int = 8, repeat: int = 3,
                 threads: int | None = 1, seed: int = 0, device: str = "cpu", progress=None) -> dict:
    """{processor, threads, cases: [bench_case rows]} for the chosen cases."""
    unknown = [c for c in cases if c not in CASES]
    if unknown:
        raise ConfigError(f"bench attack: unknown case(s) {unknown}; choose from {list(CASES)}")
    if examples < 2 or per_example < 1 or repeat < 1:
        raise ConfigError(f"bench attack: --examples must be >= 2, --per-example and --repeat >= 1; got "
                          f"{examples}, {per_example} and {repeat}")
    before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        rows = [bench_case(c, examples=examples, per_example=per_example, repeat=repeat, seed=seed, device=device,
                           progress=progress) for c in cases]
    finally:
        torch.set_num_threads(before)
    gpu = torch.cuda.get_device_name(torch.device(device)) if torch.device(device).type == "cuda" else None
    return {"processor": processor_name(), "gpu": gpu, "threads": torch.get_num_threads() if not threads else threads, "cases": rows}


def format_attack(result: dict) -> list[str]:
    """The result as lines of text: a heading, then one line per case."""
    lines = [f"bench attack on {result['gpu'] or result['processor']}, {result['threads']} thread(s)"]
    for r in result["cases"]:
        lines.append(f"  {r['case']:12s} n={r['examples']}, best of {r['repeat']}: batched {r['batched_seconds']:.2f} s, "
                     f"per example {r['per_example_seconds']:.2f} s (from {r['per_example_examples']}), "
                     f"pyautoattack {r['library_seconds']:.2f} s; speedup_vs_per_example "
                     f"{r['speedup_vs_per_example']:.1f}x, overhead_vs_library {r['overhead_vs_library']:.2f}x, "
                     f"robust (vote) {100 * r['robust_acc']:.1f}%")
        per_eval = r["us_per_evaluation"]
        line = (f"  {'':12s} us per network evaluation: batched {per_eval['batched']:.0f}, "
                f"per example {per_eval['per_example']:.0f}")
        net = r["network_us_per_evaluation"]
        if net["batched"] is not None:
            line += (f"; the network alone: {net['batched']:.0f} at the batch's size, "
                     f"{net['per_example']:.0f} at one example's")
        lines.append(line)
    return lines

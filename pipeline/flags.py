"""Sanity flags of a sweep, from robust accuracies per group and eps.

Torch-free and below every layer, so that both the protocol (pipeline.protocol.checks) and
the report (pipeline.analytics) use the same rules.

Per (defense, attack, path, norm):

- accuracy_rises_with_eps: robust accuracy rises between two consecutive eps;
- unbounded_attack_leaves_accuracy: it stays above 10% at eps >= the norm's unbounded limit;
- weaker_than_transfer: at some eps, a transfer attack from a surrogate breaks more;
- oblivious_beats_adaptive: at some eps, the attack on MI's base classifier breaks more
  than the adaptive path, which sees the whole defense.

"More" means by `slack` and two standard errors of the difference.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping

UNBOUNDED = {"Linf": 0.5, "L2": 8.0, "L1": 64.0}
"""eps from which an attack is unbounded in effect (half the pixel range in Linf)."""

FLAGS = ("accuracy_rises_with_eps", "unbounded_attack_leaves_accuracy", "weaker_than_transfer",
         "oblivious_beats_adaptive")

Key = tuple[str, str, str, str]  # (defense, attack, path, norm)


def _rises(a0: float, n0: int, a1: float, n1: int, slack: float) -> bool:
    """a1 above a0 by more than `slack` and two standard errors of the difference."""
    se = math.sqrt(max(a0 * (1 - a0), 1e-12) / n0 + max(a1 * (1 - a1), 1e-12) / n1)
    return a1 > a0 + max(slack, 2 * se)


def flags_of(counts: Mapping[Key, Mapping[float, tuple[int, int]]], *, unbounded: dict | None = None,
             slack: float = 0.02) -> dict[Key, list[str]]:
    """Flags per group from counts {group: {eps: (robust examples k, examples n)}}."""
    limits = {**UNBOUNDED, **(unbounded or {})}
    acc = {key: {e: (k / n, n) for e, (k, n) in by_eps.items() if n} for key, by_eps in counts.items()}
    flags: dict[Key, list[str]] = {}
    for key, by_eps in acc.items():
        found = []
        series = sorted(by_eps.items())
        if any(_rises(a0, n0, a1, n1, slack) for (_, (a0, n0)), (_, (a1, n1)) in zip(series, series[1:])):
            found.append("accuracy_rises_with_eps")
        if any(e >= limits.get(key[3], math.inf) and a > 0.1 for e, (a, _) in series):
            found.append("unbounded_attack_leaves_accuracy")
        if key[2].startswith("adaptive"):
            for name, tag in (("weaker_than_transfer", "transfer:"), ("oblivious_beats_adaptive", "oblivious")):
                others = [o for o in acc if o[0] == key[0] and o[3] == key[3] and o[2].startswith(tag)]
                if any(e in acc[o] and _rises(acc[o][e][0], acc[o][e][1], a, n, slack)
                       for o in others for e, (a, n) in series if e > 0):
                    found.append(name)
        flags[key] = found
    return flags


def sweep_flags(records: Iterable[Mapping], *, unbounded: dict | None = None, slack: float = 0.02,
                measure: str = "adv_vote_correct") -> dict[Key, list[str]]:
    """`flags_of` over record dicts, robust accuracy being the mean of `measure` (the vote over
    the R passes by default: one pass of a stochastic defense is noise)."""
    counts: dict[Key, dict[float, list[int]]] = {}
    for r in records:
        key = (r["defense"], r["attack"], r.get("path", "adaptive"), r["norm"])
        cell = counts.setdefault(key, {}).setdefault(r["eps"], [0, 0])
        cell[0] += bool(r[measure])
        cell[1] += 1
    return flags_of({k: {e: tuple(c) for e, c in v.items()} for k, v in counts.items()}, unbounded=unbounded,
                    slack=slack)

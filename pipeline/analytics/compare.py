"""Paired comparison of two defenses on the same examples.

Rows of defense A and defense B are paired on (attack, norm, eps, example id): the same attack
name at the same budget on the same image (the attack's path may differ, e.g. adaptive for a
plain classifier and adaptive+bpda for RDC). Per (attack, norm, eps) the result gives both
accuracies, their difference A - B, the 2x2 table of agreement, and:

- McNemar's test on the discordant pairs (b = A right and B wrong, c = A wrong and B right).
  `p_value` is the exact two-sided binomial test: under H0 each discordant pair goes either
  way with probability 1/2, p = min(1, 2 P(X <= min(b, c))), X ~ Binomial(b + c, 1/2). It is
  valid at any count (the usual advice is exact below b + c = 25). The continuity-corrected
  chi-square (|b - c| - 1)^2 / (b + c) on one degree of freedom is given too (`chi2`,
  `chi2_p_value`), for comparison with papers that report it.
- A paired bootstrap interval of the difference: examples are resampled with replacement
  (all four kinds of pair together), `resamples` times from a seeded generator, percentile
  interval. Resampling n pairs is a multinomial draw over the four cells, so each resample
  costs O(1) whatever n is; the result is deterministic in `seed`.
"""

from __future__ import annotations

import math

import numpy as np

from pipeline.analytics.source import Source, as_connection, columns_of
from pipeline.errors import InputError, StoreError

METRICS = {"robust": "adv_correct", "clean": "clean_correct", "vote": "adv_vote_correct",
           "worst": "adv_worst_correct"}
"""Which correctness column a comparison pairs: robust (single pass, default), clean, majority
vote over the R passes, worst case over the R passes."""


def mcnemar_exact(b: int, c: int) -> float:
    """Two-sided exact McNemar p-value for discordant counts b and c: min(1, 2 P(X <= min(b, c)))
    with X ~ Binomial(b + c, 1/2). b + c = 0 gives 1.0 (no evidence either way)."""
    if b < 0 or c < 0:
        raise ValueError(f"discordant counts must be >= 0, got b={b}, c={c}")
    n, k = b + c, min(b, c)
    if n == 0:
        return 1.0
    # Sum in log space: C(n, i) / 2^n underflows a float for n in the thousands.
    logs = [math.lgamma(n + 1) - math.lgamma(i + 1) - math.lgamma(n - i + 1) - n * math.log(2) for i in range(k + 1)]
    top = max(logs)
    tail = math.exp(top) * sum(math.exp(v - top) for v in logs)
    return min(1.0, 2.0 * tail)


def mcnemar_chi2(b: int, c: int) -> tuple[float, float]:
    """(statistic, p-value) of McNemar's chi-square with continuity correction, 1 degree of
    freedom: (|b - c| - 1)^2 / (b + c), floored at 0; (0.0, 1.0) when b + c = 0."""
    if b + c == 0:
        return 0.0, 1.0
    stat = max(abs(b - c) - 1, 0) ** 2 / (b + c)
    return stat, math.erfc(math.sqrt(stat / 2))  # chi2(1) survival: P(Z^2 > s) = erfc(sqrt(s / 2))


def bootstrap_difference(n11: int, n10: int, n01: int, n00: int, *, resamples: int = 10_000, seed: int = 0,
                         level: float = 0.95) -> tuple[float, float]:
    """Percentile interval of acc_A - acc_B under the paired bootstrap.

    n11: both right, n10: A right and B wrong, n01: A wrong and B right, n00: both wrong.
    Resampling the n pairs with replacement is a multinomial draw of n over the four cells;
    the difference of a resample is (n10* - n01*) / n. Deterministic in `seed` (numpy PCG64).
    """
    n = n11 + n10 + n01 + n00
    if n == 0:
        return math.nan, math.nan
    if resamples < 1 or not 0 < level < 1:
        raise ValueError(f"need resamples >= 1 and 0 < level < 1, got {resamples}, {level}")
    rng = np.random.Generator(np.random.PCG64(seed))
    draws = rng.multinomial(n, np.array([n11, n10, n01, n00], dtype=np.float64) / n, size=resamples)
    diffs = (draws[:, 1] - draws[:, 2]) / n
    alpha = (1 - level) / 2
    lo, hi = np.quantile(diffs, [alpha, 1 - alpha])
    return float(lo), float(hi)


def paired_counts(source: Source, a: str, b: str, metric: str = "robust", attack: str | None = None) -> list[dict]:
    """The 2x2 tables of defenses `a` and `b`, one per (attack, norm, eps) both were run at.

    Each row: attack, norm, eps, n (paired examples), n11, n10, n01, n00 (A and B right / A
    only / B only / neither), unpaired_a, unpaired_b (examples only one defense has).
    Raises InputError for an unknown defense or metric, or when a defense has two rows for one
    (attack, norm, eps, example) (the same run given twice, or two runs of one defense).
    """
    if metric not in METRICS:
        raise InputError(f"unknown metric {metric!r}; choose from {list(METRICS)}")
    if a == b:
        raise InputError(f"compare needs two different defenses, got {a!r} twice")
    col = METRICS[metric]
    con, owned = as_connection(source)
    try:
        missing = [c for c in ("defense", "attack", "norm", "eps", "example_id", col) if c not in columns_of(con)]
        if missing:
            raise StoreError(f"records table lacks column(s) {missing} needed for a comparison")
        names = {r[0] for r in con.execute("SELECT DISTINCT defense FROM results").fetchall()}
        for d in (a, b):
            if d not in names:
                raise InputError(f"defense {d!r} is not in the results; they hold {sorted(names)}")
        where = "(defense = $a OR defense = $b)" + (" AND attack = $attack" if attack else "")
        params = {"a": a, "b": b, **({"attack": attack} if attack else {})}
        dup = con.execute(f"""
            SELECT defense, attack, norm, eps, example_id, count(*) AS c FROM results
            WHERE ({where}) GROUP BY ALL HAVING count(*) > 1 LIMIT 1
        """, params).fetchall()
        if dup:
            d, att, norm, eps, ex, c = dup[0]
            raise InputError(f"defense {d!r} has {c} rows for attack {att!r} {norm} eps {eps:.6g} example {ex}; "
                             f"pass each run once, and one run per defense, to pair examples")
        found = con.execute(f"""
            WITH x AS (SELECT attack, norm, eps, example_id, defense, {col} AS ok FROM results WHERE ({where})),
                 p AS (SELECT attack, norm, eps, example_id,
                              any_value(ok) FILTER (WHERE defense = $a) AS ok_a,
                              any_value(ok) FILTER (WHERE defense = $b) AS ok_b
                       FROM x GROUP BY ALL)
            SELECT attack, norm, eps,
                   count_if(ok_a AND ok_b), count_if(ok_a AND NOT ok_b),
                   count_if(NOT ok_a AND ok_b), count_if(NOT ok_a AND NOT ok_b),
                   count_if(ok_a IS NOT NULL AND ok_b IS NULL), count_if(ok_a IS NULL AND ok_b IS NOT NULL)
            FROM p GROUP BY ALL ORDER BY attack, norm, eps
        """, params).fetchall()
    finally:
        if owned:
            con.close()
    return [{"attack": att, "norm": norm, "eps": eps, "n": n11 + n10 + n01 + n00, "n11": n11, "n10": n10,
             "n01": n01, "n00": n00, "unpaired_a": ua, "unpaired_b": ub}
            for att, norm, eps, n11, n10, n01, n00, ua, ub in found]


def compare(source: Source, a: str, b: str, *, metric: str = "robust", attack: str | None = None,
            resamples: int = 10_000, seed: int = 0, level: float = 0.95) -> list[dict]:
    """Defense `a` against defense `b` on the examples both were attacked on.

    One row per (attack, norm, eps) with at least one paired example: the `paired_counts`
    fields plus a, b (the names), metric, acc_a, acc_b (fractions over the paired examples),
    diff (acc_a - acc_b), diff_lo, diff_hi (paired bootstrap, `level`, seeded), p_value (exact
    McNemar), chi2, chi2_p_value (continuity-corrected McNemar), test ("mcnemar-exact").
    Groups where only one defense ran are left out (their unpaired counts say why).
    """
    rows = []
    for t in paired_counts(source, a, b, metric, attack):
        n = t["n"]
        if n == 0:
            continue
        lo, hi = bootstrap_difference(t["n11"], t["n10"], t["n01"], t["n00"], resamples=resamples, seed=seed,
                                      level=level)
        chi2, chi2_p = mcnemar_chi2(t["n10"], t["n01"])
        acc_a, acc_b = (t["n11"] + t["n10"]) / n, (t["n11"] + t["n01"]) / n
        rows.append({"a": a, "b": b, "metric": metric, **t, "acc_a": acc_a, "acc_b": acc_b, "diff": acc_a - acc_b,
                     "diff_lo": lo, "diff_hi": hi, "level": level, "p_value": mcnemar_exact(t["n10"], t["n01"]),
                     "test": "mcnemar-exact", "chi2": chi2, "chi2_p_value": chi2_p})
    if not rows:
        raise InputError(f"defenses {a!r} and {b!r} share no (attack, eps, example)"
                         + (f" under attack {attack!r}" if attack else "") + "; nothing to pair")
    return rows

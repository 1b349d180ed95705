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

from pipeline.analytics.render import format_eps
from pipeline.analytics.report import ROBUST_COLUMN
from pipeline.analytics.source import Source, as_connection, columns_of
from pipeline.errors import InputError, StoreError

METRICS = {"robust": ROBUST_COLUMN, "clean": "clean_correct", "vote": "adv_vote_correct",
           "all-passes": "adv_worst_correct"}
"""Which correctness column a comparison pairs: robust (the report's rule: the first of the R
passes, default), clean, the majority vote over the R passes, all R passes right."""

PATHS = ("worst", "adaptive", "oblivious", "transfer")
"""Which gradient paths a comparison reads. worst (default): per example, right only if right on
every path that ran (the report's headline rule); adaptive: the paths through the whole defense
(adaptive, adaptive+bpda, adaptive+exact); oblivious: MI's base classifier; transfer: transfer:*."""
_PATH_SQL = {"worst": "TRUE", "adaptive": "(path = 'adaptive' OR path LIKE 'adaptive+%')",
             "oblivious": "path = 'oblivious'", "transfer": "path LIKE 'transfer:%'"}

ALL_ATTACKS = "all attacks"
"""The attack of the rows that pair each defense's worst case over every attack it ran (at a
norm and eps): the comparison of the report's headline figures, which needs no shared attack."""


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


def paired_counts(source: Source, a: str, b: str, metric: str = "robust", attack: str | None = None,
                  path: str = "worst") -> list[dict]:
    """The 2x2 tables of defenses `a` and `b`, one per (attack, norm, eps) either was run at, and,
    unless `attack` is given, one per (norm, eps) for ALL_ATTACKS (each defense's worst case over
    every attack it ran there).

    Each row: attack, norm, eps, path (the choice), n (paired examples), n11, n10, n01, n00 (A
    and B right / A only / B only / neither), unpaired_a, unpaired_b (examples only one defense
    has: all of them where only one defense ran the attack). An example counts as right when it
    is right on every chosen path that ran on it (PATHS).
    Raises InputError for an unknown defense, metric or path, or when a defense has two rows
    for one (attack, path, norm, eps, example) (the same run given twice, or two runs of one
    defense).
    """
    if metric not in METRICS:
        raise InputError(f"unknown metric {metric!r}; choose from {list(METRICS)}")
    if path not in PATHS:
        raise InputError(f"unknown path {path!r}; choose from {list(PATHS)}")
    if a == b:
        raise InputError(f"compare needs two different defenses, got {a!r} twice")
    col = METRICS[metric]
    con, owned = as_connection(source)
    try:
        missing = [c for c in ("defense", "attack", "path", "norm", "eps", "example_id", col)
                   if c not in columns_of(con)]
        if missing:
            raise StoreError(f"records table lacks column(s) {missing} needed for a comparison")
        names = {r[0] for r in con.execute("SELECT DISTINCT defense FROM results").fetchall()}
        for d in (a, b):
            if d not in names:
                raise InputError(f"defense {d!r} is not in the results; they hold {sorted(names)}")
        where = ("(defense = $a OR defense = $b) AND attack <> 'clean' AND " + _PATH_SQL[path]
                 + (" AND attack = $attack" if attack else ""))
        params = {"a": a, "b": b, **({"attack": attack} if attack else {})}
        dup = con.execute(f"""
            SELECT defense, attack, path, norm, eps, example_id, count(*) AS c FROM results
            WHERE {where} GROUP BY ALL HAVING count(*) > 1 LIMIT 1
        """, params).fetchall()
        if dup:
            d, att, pth, norm, eps, ex, c = dup[0]
            raise InputError(f"defense {d!r} has {c} rows for attack {att!r} ({pth}) {norm} eps {eps:.6g} example "
                             f"{ex}; pass each run once, and one run per defense, to pair examples")
        if path != "worst":
            ran = {d: sorted(p for (p,) in con.execute(
                "SELECT DISTINCT path FROM results WHERE defense = $d AND attack <> 'clean' ORDER BY 1",
                {"d": d}).fetchall()) for d in (a, b)}
            lacking = [d for d in (a, b) if not con.execute(
                f"SELECT count(*) FROM results WHERE defense = $d AND {_PATH_SQL[path]}", {"d": d}).fetchone()[0]]
            if lacking:
                raise InputError(f"--path {path}: defense {lacking[0]!r} was attacked on no such path (its paths: "
                                 f"{', '.join(ran[lacking[0]]) or 'none'}); choose from worst, "
                                 + ", ".join(p for p in PATHS[1:] if p != path))
        # Per defense and example: right on every chosen path (and, for ALL_ATTACKS, every attack).
        # count(*) FILTER, not count_if: count_if of a group whose values are all NULL is NULL.
        def tables(attack_key: str) -> str:
            return f"""
            SELECT attack, norm, eps,
                   count(*) FILTER (WHERE ok_a AND ok_b), count(*) FILTER (WHERE ok_a AND NOT ok_b),
                   count(*) FILTER (WHERE NOT ok_a AND ok_b), count(*) FILTER (WHERE NOT ok_a AND NOT ok_b),
                   count(*) FILTER (WHERE ok_a IS NOT NULL AND ok_b IS NULL),
                   count(*) FILTER (WHERE ok_a IS NULL AND ok_b IS NOT NULL)
            FROM (SELECT {attack_key} AS attack, norm, eps, example_id,
                         bool_and(ok) FILTER (WHERE defense = $a) AS ok_a,
                         bool_and(ok) FILTER (WHERE defense = $b) AS ok_b
                  FROM x GROUP BY ALL)
            GROUP BY ALL"""
        found = con.execute(f"""
            WITH x AS (SELECT attack, norm, eps, example_id, defense, {col} AS ok FROM results WHERE {where})
            SELECT * FROM ({tables("attack")}
                           {"" if attack else f"UNION ALL {tables('$all')}"})
            ORDER BY attack = $all, attack, norm, eps
        """, {**params, "all": ALL_ATTACKS}).fetchall()
    finally:
        if owned:
            con.close()
    rows = [{"attack": att, "norm": norm, "eps": eps, "path": path, "n": n11 + n10 + n01 + n00, "n11": n11,
             "n10": n10, "n01": n01, "n00": n00, "unpaired_a": ua, "unpaired_b": ub}
            for att, norm, eps, n11, n10, n01, n00, ua, ub in found]
    # ALL_ATTACKS repeats the attack's own row where one attack, run on both, is all there is.
    per = {}
    for r in rows:
        if r["attack"] != ALL_ATTACKS:
            per.setdefault((r["norm"], r["eps"]), []).append(r)
    return [r for r in rows if r["attack"] != ALL_ATTACKS or not (
        len(per.get((r["norm"], r["eps"]), [])) == 1
        and not per[(r["norm"], r["eps"])][0]["unpaired_a"] and not per[(r["norm"], r["eps"])][0]["unpaired_b"])]


def compare(source: Source, a: str, b: str, *, metric: str = "robust", attack: str | None = None,
            path: str = "worst", resamples: int = 10_000, seed: int = 0, level: float = 0.95,
            notes: list[str] | None = None) -> list[dict]:
    """Defense `a` against defense `b` on the examples both were attacked on.

    One row per (attack, norm, eps) with at least one paired example (ALL_ATTACKS rows included,
    see `paired_counts`; `path` picks the gradient paths, PATHS): the `paired_counts` fields plus
    a, b (the names), metric, acc_a, acc_b (fractions over the paired examples), diff (acc_a -
    acc_b), diff_lo, diff_hi (paired bootstrap, `level`, seeded), p_value (exact McNemar), chi2,
    chi2_p_value (continuity-corrected McNemar), test ("mcnemar-exact").
    Groups where only one defense ran are left out, each with a line in `notes` when given.
    InputError when nothing pairs.
    """
    rows = []
    for t in paired_counts(source, a, b, metric, attack, path):
        n = t["n"]
        if n == 0:
            if notes is not None:
                only, count = (a, t["unpaired_a"]) if t["unpaired_a"] else (b, t["unpaired_b"])
                notes.append(f"{t['attack']} {t['norm']} eps {format_eps(t['eps'], t['norm'])}: only {only} ran it ({count} examples), "
                             f"nothing to pair")
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

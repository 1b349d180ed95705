"""Accuracy tables of a sweep: one row per (defense, attack, path, norm, eps) with Wilson
intervals, computed by DuckDB over the records table (see pipeline.store.schema)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import duckdb
import pyarrow as pa
from rich.table import Table

from pipeline.errors import StoreError

Z95 = 1.959963984540054
"""Two-sided 95% standard normal quantile."""

GROUP = ("defense", "attack", "path", "norm", "eps")
_NEEDED = GROUP + ("clean_correct", "adv_correct", "adv_vote_correct", "adv_worst_correct",
                   "forward_passes", "backward_passes", "seconds", "flags")


def wilson_interval(k: int, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval for a binomial proportion k/n (two-sided, z=1.96 gives 95%).

    Better than the normal approximation at small n and near 0 or 1, where sweeps live (robust
    accuracy of a broken defense is ~0). n = 0 gives (0.0, 1.0): nothing is known.
    """
    if n < 0 or k < 0 or k > n:
        raise ValueError(f"wilson_interval needs 0 <= k <= n, got k={k}, n={n}")
    if n == 0:
        return 0.0, 1.0
    p = k / n
    z2 = z * z
    denom = 1.0 + z2 / n
    center = (p + z2 / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / denom
    # Clamp: rounding can push the bounds a hair outside [0, 1] at k = 0 or k = n.
    return max(0.0, center - half), min(1.0, center + half)


def summarize(table: pa.Table) -> list[dict]:
    """Accuracies per (defense, attack, path, norm, eps), sorted by defense, attack, norm, eps
    (then path).

    table: records (RECORD_SCHEMA; at least the columns in `_NEEDED`), e.g. Store.read_records().
    Each row: the group keys; n (examples); clean_acc, clean_lo, clean_hi; robust_acc (mean of
    adv_correct), robust_lo, robust_hi (Wilson 95%); vote_acc (adv_vote_correct: majority over
    the R passes); worst_acc (adv_worst_correct: all R passes right); forward_per_example,
    backward_per_example (model passes), seconds_per_example (wall clock); flags {flag: number of
    rows carrying it}. Accuracies are fractions in [0, 1].
    """
    missing = [c for c in _NEEDED if c not in table.column_names]
    if missing:
        raise StoreError(f"records table lacks column(s) {missing} needed for the report")
    keys = ", ".join(GROUP)
    con = duckdb.connect()
    try:
        con.register("results", table.select(list(_NEEDED)))
        groups = con.execute(f"""
            SELECT {keys}, count(*) AS n,
                   count_if(clean_correct) AS clean_k, count_if(adv_correct) AS adv_k,
                   count_if(adv_vote_correct) AS vote_k, count_if(adv_worst_correct) AS worst_k,
                   avg(forward_passes) AS fwd, avg(backward_passes) AS bwd, avg(seconds) AS sec
            FROM results GROUP BY {keys}
            ORDER BY defense, attack, norm, eps, path
        """).fetchall()
        # list_distinct: a flag counts once per row even if a writer repeated it.
        flag_rows = con.execute(f"""
            SELECT {keys}, flag, count(*) AS c
            FROM (SELECT {keys}, unnest(list_distinct(flags)) AS flag FROM results)
            GROUP BY {keys}, flag ORDER BY flag
        """).fetchall()
    finally:
        con.close()
    flags: dict[tuple, dict[str, int]] = {}
    for *key, flag, count in flag_rows:
        flags.setdefault(tuple(key), {})[flag] = int(count)
    rows = []
    for defense, attack, path, norm, eps, n, clean_k, adv_k, vote_k, worst_k, fwd, bwd, sec in groups:
        clean_lo, clean_hi = wilson_interval(clean_k, n)
        robust_lo, robust_hi = wilson_interval(adv_k, n)
        rows.append({
            "defense": defense, "attack": attack, "path": path, "norm": norm, "eps": eps, "n": int(n),
            "clean_acc": clean_k / n, "clean_lo": clean_lo, "clean_hi": clean_hi,
            "robust_acc": adv_k / n, "robust_lo": robust_lo, "robust_hi": robust_hi,
            "vote_acc": vote_k / n, "worst_acc": worst_k / n,
            "forward_per_example": float(fwd), "backward_per_example": float(bwd),
            "seconds_per_example": float(sec),
            "flags": flags.get((defense, attack, path, norm, eps), {}),
        })
    return rows


_HEADERS = ("defense", "attack", "path", "norm", "eps", "n", "clean % [95% CI]", "robust % [95% CI]",
            "vote %", "worst %", "fwd/ex", "bwd/ex", "s/ex", "flags")


def format_eps(eps: float | None, norm: str | None = None) -> str:
    """eps as people write it: k/255 for Linf budgets on that grid (8/255), else 4 significant digits."""
    if eps is None:
        return ""
    if norm == "Linf" and 0 < eps < 1 and abs(eps * 255 - round(eps * 255)) < 1e-6:
        return f"{round(eps * 255)}/255"
    return f"{eps:.4g}"


def _pct(x: float) -> str:
    return f"{100 * x:.1f}"


def _cells(row: dict) -> list[str]:
    flags = ", ".join(f"{name}: {count}" for name, count in sorted(row["flags"].items()))
    return [
        str(row["defense"]), str(row["attack"]), str(row["path"]), str(row["norm"]),
        format_eps(row["eps"], row["norm"]), str(row["n"]),
        f"{_pct(row['clean_acc'])} [{_pct(row['clean_lo'])}, {_pct(row['clean_hi'])}]",
        f"{_pct(row['robust_acc'])} [{_pct(row['robust_lo'])}, {_pct(row['robust_hi'])}]",
        _pct(row["vote_acc"]), _pct(row["worst_acc"]),
        f"{row['forward_per_example']:.1f}", f"{row['backward_per_example']:.1f}",
        f"{row['seconds_per_example']:.3g}", flags,
    ]


def render_table(rows: Sequence[dict], title: str | None = None) -> Table:
    """A rich table of `summarize` rows (percentages with one decimal, intervals as [lo, hi])."""
    table = Table(title=title)
    for h in _HEADERS:
        numeric = h not in ("defense", "attack", "path", "norm", "flags")
        table.add_column(h, justify="right" if numeric else "left", no_wrap=numeric)
    for row in rows:
        table.add_row(*_cells(row))
    return table


def to_markdown(rows: Sequence[dict]) -> str:
    """A GitHub-flavoured Markdown table of `summarize` rows (same cells as `render_table`)."""
    def line(cells):
        return "| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |"

    aligns = ["---" if h in ("defense", "attack", "path", "norm", "flags") else "---:" for h in _HEADERS]
    out = [line(_HEADERS), "| " + " | ".join(aligns) + " |"]
    out += [line(_cells(row)) for row in rows]
    return "\n".join(out) + "\n"


def load_records(uris: Sequence[str], endpoint_url: str | None = None) -> pa.Table:
    """The records of one or more run folders (local or s3://), concatenated."""
    from ..store import Store

    tables = [Store(uri, endpoint_url=endpoint_url).read_records("records") for uri in uris]
    return pa.concat_tables(tables) if len(tables) > 1 else tables[0]

"""The report of a sweep, computed by DuckDB over the records (see pipeline.store.schema).

The headline has one row per (defense, norm, eps): the worst case over attacks and paths.
Every other section has one row per (defense, attack, path, norm, eps) group, sorted by
defense, attack, norm, eps, then path (per class: one row per group and label):

- headline: the fraction of examples that survive every attack and every gradient path that
  ran on them (adaptive, oblivious, transfer, BPDA, exact through LM), as AutoAttack's
  ensemble and adaptive-evaluation practice demand (Croce & Hein 2020; Tramer et al. 2020),
  by the pass rule of `ROBUST_RULE` (the one "robust %"), with the vote over R passes and all R
  passes beside it under their own names;
- summary: n, clean and robust accuracy (`ROBUST_RULE`) with 95% Wilson intervals, the vote and
  all-passes accuracy,
  cost per example, sanity flags with counts, and the sweep's flags of the group
  (pipeline.flags: accuracy_rises_with_eps, weaker_than_transfer, oblivious_beats_adaptive, ...);
- classes: clean and robust accuracy per true label;
- stages: which attack stage broke each example (`broken_by`: the AutoAttack stage, pgd, or
  clean when the clean input was already wrong), and how many survived every stage;
- cost: device-seconds and network calls (forward, backward), attack queries and gradients;
- prediction: per run and (defense, attack, eps), the network evaluations and seconds the run's
  predicted.json (written by `run` from the cost model, runtime/estimate.py) said its committed
  units would spend, against what their records spent, and whether each unit's recorded
  evaluations lie in its predicted range; "not available" for a run folder without one;
- flags: every sanity flag with its count and the fraction of the group's rows.

Accuracies are fractions in [0, 1]. "Robust accuracy" means one thing everywhere (headline,
summary, figures, HTML, exports): `ROBUST_COLUMN` under `ROBUST_RULE`. The functions take a DuckDB connection with the view
`results` (pipeline.analytics.source.connect) or a records table.
"""

from __future__ import annotations

import math
import uuid
from collections.abc import Mapping, Sequence

import duckdb
import pyarrow as pa

from pipeline.analytics.source import Source, as_connection, columns_of, run_stores
from pipeline.errors import ConfigError, StoreError
from pipeline.flags import flags_of

Z95 = 1.959963984540054
"""Two-sided 95% standard normal quantile."""

GROUP = ("defense", "attack", "path", "norm", "eps")
ORDER = "defense, attack, norm, eps, path"
KEYS = ", ".join(GROUP)
SECTIONS = ("headline", "summary", "classes", "stages", "cost", "prediction", "flags")
"""The sections of `build_report`, in the order they are shown."""

STAGE_ORDER = ("clean", "apgd-ce", "apgd-dlr", "apgd-t", "fab", "fab-t", "square", "pgd")
"""Known values of broken_by, in the order of AutoAttack standard (apgd-ce, apgd-t, fab-t,
square) with the other versions' stages fitted in; unknown ones follow alphabetically."""
SURVIVED = "survived"

ROBUST_COLUMN = "adv_correct"
"""The record column every "robust accuracy" counts: the first of the R scoring passes."""
ROBUST_RULE = ("first of the R scoring passes right under every attack and gradient path that ran on the example "
               "(worst case over attacks and paths)")
"""The pass rule of "robust %", stated wherever the figure is shown. One pass is what a stochastic defense
answers when deployed and what AutoAttack and RobustBench score; it does not depend on R. The vote over R
passes is a different, ensembled classifier (it can sit far above one pass), and all R passes right falls
as R grows; both stay available as vote_acc and all_passes_acc."""

_NEEDED = GROUP + ("example_id", "label", "broken_by", "flags", "device", "worker", "clean_correct", "adv_correct",
                   "adv_vote_correct", "adv_worst_correct", "forward_passes", "backward_passes", "queries",
                   "gradients", "seconds")


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


_UNIT_KEYS = ("run_id", "unit_id")
_AGGREGATES = f"""count(*) AS n, count_if(clean_correct) AS clean_k, count_if({ROBUST_COLUMN}) AS adv_k,
               count_if(adv_vote_correct) AS vote_k, count_if(adv_worst_correct) AS worst_k,
               sum(forward_passes) AS fwd, sum(backward_passes) AS bwd, sum(queries) AS q, sum(gradients) AS g,
               sum(seconds) AS sec"""
_CELL_COLUMNS = f"{KEYS}, label, broken_by, flagset, device, worker, n, clean_k, adv_k, vote_k, worst_k, fwd, bwd, q, g, sec"


def _cells(con: duckdb.DuckDBPyConnection, units: bool = False) -> str:
    """Aggregate the records once into a small temp table; returns its name.

    One row per (group, label, broken_by, set of flags, device, worker) with counts and sums:
    every section is computed from it, so the Parquet files are scanned once whatever the number
    of sections (a scan costs the opening of every file, which dominates for runs of many units).
    units: also `{name}_units`, one row per (run_id, unit_id) with its group and sums (what the
    prediction section compares), from the same scan (a second grouping set).
    """
    have = set(columns_of(con))
    missing = [c for c in _NEEDED + (_UNIT_KEYS if units else ()) if c not in have]
    if missing:
        raise StoreError(f"records table lacks column(s) {missing} needed for the report")
    name = f"_report_cells_{uuid.uuid4().hex[:12]}"
    # list_distinct: a flag counts once per row even if a writer repeated it.
    flagset = "list_sort(list_distinct(flags)) AS flagset"
    if not units:
        con.execute(f"CREATE TEMP TABLE {name} AS SELECT {KEYS}, label, broken_by, {flagset}, device, worker, "
                    f"{_AGGREGATES} FROM results GROUP BY ALL")
        return name
    both = f"{name}_both"
    con.execute(f"""
        CREATE TEMP TABLE {both} AS
        SELECT {KEYS}, label, broken_by, {flagset}, device, worker, run_id, unit_id, grouping(run_id) = 0 AS per_unit,
               {_AGGREGATES}
        FROM results GROUP BY GROUPING SETS (({KEYS}, label, broken_by, flagset, device, worker),
                                             (run_id, unit_id, defense, attack, norm, eps))
    """)
    try:
        con.execute(f"CREATE TEMP TABLE {name} AS SELECT {_CELL_COLUMNS} FROM {both} WHERE NOT per_unit")
        con.execute(f"CREATE TEMP TABLE {name}_units AS SELECT run_id, unit_id, defense, attack, norm, eps, n, fwd, "
                    f"bwd, sec FROM {both} WHERE per_unit")
    finally:
        con.execute(f"DROP TABLE IF EXISTS {both}")
    return name


def _with_cells(source: Source, make, units: bool = False):
    """make(con, cells table name) on a connection for `source`; the temp tables are dropped after."""
    con, owned = as_connection(source)
    try:
        name = _cells(con, units)
        try:
            return make(con, name)
        finally:
            con.execute(f"DROP TABLE IF EXISTS {name}")
            con.execute(f"DROP TABLE IF EXISTS {name}_units")
    finally:
        if owned:
            con.close()


def _key(values: Sequence) -> dict:
    return dict(zip(GROUP, values))


def _flag_counts(con: duckdb.DuckDBPyConnection, cells: str) -> dict[tuple, dict[str, int]]:
    found = con.execute(f"""
        SELECT {KEYS}, flag, sum(n) FROM (SELECT {KEYS}, n, unnest(flagset) AS flag FROM {cells})
        GROUP BY ALL ORDER BY flag
    """).fetchall()
    out: dict[tuple, dict[str, int]] = {}
    for *key, flag, count in found:
        out.setdefault(tuple(key), {})[flag] = int(count)
    return out


def _summary(con: duckdb.DuckDBPyConnection, cells: str) -> list[dict]:
    groups = con.execute(f"""
        SELECT {KEYS}, sum(n), sum(clean_k), sum(adv_k), sum(vote_k), sum(worst_k), sum(fwd), sum(bwd), sum(sec)
        FROM {cells} GROUP BY ALL ORDER BY {ORDER}
    """).fetchall()
    flags = _flag_counts(con, cells)
    swept = _sweep_flags(groups)
    rows = []
    for *key, n, clean_k, adv_k, vote_k, worst_k, fwd, bwd, sec in groups:
        n, clean_k, adv_k = int(n), int(clean_k), int(adv_k)
        clean_lo, clean_hi = wilson_interval(clean_k, n)
        robust_lo, robust_hi = wilson_interval(adv_k, n)
        rows.append({
            **_key(key), "n": n,
            "clean_acc": clean_k / n, "clean_lo": clean_lo, "clean_hi": clean_hi,
            "robust_acc": adv_k / n, "robust_lo": robust_lo, "robust_hi": robust_hi,
            "vote_acc": int(vote_k) / n, "all_passes_acc": int(worst_k) / n,
            "forward_per_example": float(fwd) / n, "backward_per_example": float(bwd) / n,
            "seconds_per_example": float(sec) / n,
            "flags": flags.get(tuple(key), {}),
            "sweep_flags": swept.get(tuple(key), []),
        })
    return rows


def _sweep_flags(groups) -> dict[tuple, list[str]]:
    """pipeline.flags over the summary's groups, by the vote over R passes: the flags compare
    accuracies across eps and paths, where the noise of one pass would raise false alarms; they
    are a diagnostic of the attack, not the robust accuracy."""
    counts: dict[tuple, dict[float, tuple[int, int]]] = {}
    for defense, attack, path, norm, eps, n, _, _, vote_k, *_ in groups:
        counts.setdefault((defense, attack, path, norm), {})[eps] = (int(vote_k), int(n))
    found = flags_of(counts)
    return {(d, a, p, nm, e): found[(d, a, p, nm)] for (d, a, p, nm), by_eps in counts.items() for e in by_eps}


def summarize(source: Source) -> list[dict]:
    """Accuracies per (defense, attack, path, norm, eps).

    Each row: the group keys; n (examples); clean_acc, clean_lo, clean_hi; robust_acc (mean of
    ROBUST_COLUMN, the first pass), robust_lo, robust_hi (Wilson 95%); vote_acc (adv_vote_correct:
    majority over the R passes); all_passes_acc (adv_worst_correct: all R passes right); forward_per_example,
    backward_per_example (network passes), seconds_per_example (device-seconds); flags {flag:
    number of rows carrying it}; sweep_flags [flags of the group's sweep over eps and paths].
    """
    return _with_cells(source, _summary)


def _headline(con: duckdb.DuckDBPyConnection, cells: str) -> list[dict]:
    # Per example, AND over every (attack, path) that ran on it at this (defense, norm, eps).
    found = con.execute(f"""
        WITH per AS (
            SELECT defense, norm, eps, example_id, bool_and({ROBUST_COLUMN}) AS s, bool_and(adv_vote_correct) AS v,
                   bool_and(adv_worst_correct) AS w
            FROM results WHERE attack <> 'clean' AND eps > 0 GROUP BY ALL),
        runs AS (
            SELECT defense, norm, eps, list_sort(list_distinct(list(attack || ' (' || path || ')'))) AS attacks
            FROM results WHERE attack <> 'clean' AND eps > 0 GROUP BY ALL)
        SELECT defense, norm, eps, count(*), count_if(s), count_if(v), count_if(w), any_value(attacks)
        FROM per JOIN runs USING (defense, norm, eps) GROUP BY ALL ORDER BY defense, norm, eps
    """).fetchall()
    flagged: dict[tuple, list[str]] = {}
    for r in _summary(con, cells):
        flagged.setdefault((r["defense"], r["norm"], r["eps"]), [])
        flagged[(r["defense"], r["norm"], r["eps"])] += [f for f in r["sweep_flags"]
                                                         if f not in flagged[(r["defense"], r["norm"], r["eps"])]]
    rows = []
    for defense, norm, eps, n, s, v, w, attacks in found:
        n, s = int(n), int(s)
        lo, hi = wilson_interval(s, n)
        rows.append({"defense": defense, "norm": norm, "eps": eps, "n": n, "attacks": list(attacks),
                     "robust_acc": s / n, "robust_lo": lo, "robust_hi": hi, "rule": ROBUST_RULE,
                     "vote_acc": int(v) / n, "all_passes_acc": int(w) / n,
                     "sweep_flags": sorted(flagged.get((defense, norm, eps), []))})
    return rows


def headline(source: Source) -> list[dict]:
    """The worst case over attacks and paths, one row per (defense, norm, eps > 0): n (examples);
    attacks ["attack (path)" that ran]; robust_acc (ROBUST_RULE: the headline figure) with
    robust_lo, robust_hi (Wilson 95%) and rule (ROBUST_RULE in words); vote_acc (the vote over R
    passes right under every attack); all_passes_acc (all R passes right under every attack);
    sweep_flags (of any of its groups)."""
    return _with_cells(source, _headline)


def _classes(con: duckdb.DuckDBPyConnection, cells: str, class_names: Sequence[str] = ()) -> list[dict]:
    found = con.execute(f"""
        SELECT {KEYS}, label, sum(n), sum(clean_k), sum(adv_k) FROM {cells} GROUP BY ALL ORDER BY {ORDER}, label
    """).fetchall()
    rows = []
    for *key, label, n, clean_k, adv_k in found:
        n, adv_k, label = int(n), int(adv_k), int(label)
        lo, hi = wilson_interval(adv_k, n)
        rows.append({**_key(key), "label": label,
                     "class": class_names[label] if 0 <= label < len(class_names) else str(label), "n": n,
                     "clean_acc": int(clean_k) / n, "robust_acc": adv_k / n, "robust_lo": lo, "robust_hi": hi})
    return rows


def per_class(source: Source, class_names: Sequence[str] = ()) -> list[dict]:
    """Accuracy per true label: one row per group and label with class (its name in
    `class_names`, e.g. config.datasets.DATASETS["cifar10"].class_names, else the label as
    text), n, clean_acc, robust_acc and the robust Wilson 95% interval (robust_lo, robust_hi)."""
    return _with_cells(source, lambda con, cells: _classes(con, cells, class_names))


def stage_order(names) -> list[str]:
    """broken_by values in the order the attacks run (STAGE_ORDER), unknown ones after, sorted."""
    known = [s for s in STAGE_ORDER if s in names]
    return known + sorted(set(names) - set(STAGE_ORDER) - {SURVIVED})


def _stages(con: duckdb.DuckDBPyConnection, cells: str) -> list[dict]:
    found = con.execute(f"""
        SELECT {KEYS}, coalesce(broken_by, '{SURVIVED}') AS stage, sum(n)
        FROM {cells} GROUP BY ALL ORDER BY {ORDER}, stage
    """).fetchall()
    by_group: dict[tuple, dict[str, int]] = {}
    for *key, stage, count in found:
        by_group.setdefault(tuple(key), {})[stage] = int(count)
    rows = []
    for key, counts in by_group.items():
        broken = {s: counts[s] for s in stage_order(counts)}
        rows.append({**_key(key), "n": sum(counts.values()), "broken_by": broken, "survived": counts.get(SURVIVED, 0)})
    return rows


def stages(source: Source) -> list[dict]:
    """Which stage broke each example: one row per group with n, broken_by {stage: examples}
    (only stages that broke at least one example, in attack order) and survived (examples no
    stage broke: broken_by is null)."""
    return _with_cells(source, _stages)


def _cost(con: duckdb.DuckDBPyConnection, cells: str) -> list[dict]:
    found = con.execute(f"""
        SELECT {KEYS}, sum(n), sum(sec), sum(fwd), sum(bwd), sum(q), sum(g),
               list_sort(list_distinct(list(device))), count(DISTINCT worker)
        FROM {cells} GROUP BY ALL ORDER BY {ORDER}
    """).fetchall()
    rows = []
    for *key, n, sec, fwd, bwd, q, g, devices, workers in found:
        n = int(n)
        rows.append({**_key(key), "n": n, "device_seconds": float(sec), "seconds_per_example": float(sec) / n,
                     "forward_per_example": float(fwd) / n, "backward_per_example": float(bwd) / n,
                     "calls_per_example": (float(fwd) + float(bwd)) / n, "queries_per_example": float(q) / n,
                     "gradients_per_example": float(g) / n, "devices": list(devices), "workers": int(workers)})
    return rows


def cost(source: Source) -> list[dict]:
    """Cost per group: n; device_seconds (sum of the rows' seconds: each worker holds one
    device); seconds_per_example; forward_per_example, backward_per_example and
    calls_per_example (their sum: network evaluations); queries_per_example and
    gradients_per_example (what the attack asked of the model); devices (distinct, sorted);
    workers (distinct count)."""
    return _with_cells(source, _cost)


NO_PREDICTION = "not available: the run folder holds no predicted.json (a run written before predictions were kept)"


def _range(lo, hi) -> list | None:
    if lo is None or hi is None:
        return None
    return [_count(lo), _count(hi)]


def _count(v):
    v = float(v)
    return int(v) if v.is_integer() else v


def _predicted_table(predictions: Mapping[str, dict | str]) -> pa.Table:
    """The predicted units of every run that has a prediction, as a table DuckDB joins on."""
    cols: dict[str, list] = {k: [] for k in ("run_id", "unit_id", "f_lo", "f_hi", "b_lo", "b_hi", "s_lo", "s_hi")}
    for run_id, doc in predictions.items():
        if not isinstance(doc, Mapping):
            continue
        for u in doc["units"]:
            seconds = u.get("seconds") or (None, None)
            for key, value in zip(cols, (run_id, u["unit_id"], *u["forward"], *u["backward"], *seconds)):
                cols[key].append(value)
    types = [pa.string(), pa.string()] + [pa.float64()] * 6
    return pa.table({k: pa.array(v, type=t) for (k, v), t in zip(cols.items(), types)})


def _prediction(con: duckdb.DuckDBPyConnection, cells: str, predictions: Mapping[str, dict | str] | None) -> list[dict]:
    predictions = predictions or {}
    table = f"_predicted_{uuid.uuid4().hex[:12]}"
    con.register(table, _predicted_table(predictions))
    try:
        found = con.execute(f"""
            SELECT u.run_id, u.defense, u.attack, any_value(u.norm), u.eps, count(*), sum(u.n), count(p.unit_id),
                   sum(u.fwd), sum(u.bwd), sum(u.sec), sum(p.f_lo), sum(p.f_hi), sum(p.b_lo), sum(p.b_hi),
                   count(p.s_lo), sum(p.s_lo), sum(p.s_hi),
                   count_if(p.unit_id IS NOT NULL AND NOT (u.fwd BETWEEN p.f_lo AND p.f_hi AND u.bwd BETWEEN p.b_lo AND p.b_hi))
            FROM {cells}_units u LEFT JOIN {table} p ON u.run_id = p.run_id AND u.unit_id = p.unit_id
            GROUP BY u.run_id, u.defense, u.attack, u.eps ORDER BY u.run_id, u.defense, u.attack, 4, u.eps
        """).fetchall()
    finally:
        con.unregister(table)
    rows = []
    for (run_id, defense, attack, norm, eps, units, n, predicted, fwd, bwd, sec, f_lo, f_hi, b_lo, b_hi, priced, s_lo, s_hi,
         outside) in found:
        doc = predictions.get(run_id, NO_PREDICTION)
        units, predicted, sec = int(units), int(predicted), float(sec)
        whole = isinstance(doc, Mapping) and predicted == units
        profile = doc.get("profile") if isinstance(doc, Mapping) else None
        if not isinstance(doc, Mapping):
            note = doc
        elif not whole:
            note = f"not available: {units - predicted} of {units} units are not in the run's predicted.json"
        elif profile is None:
            note = doc.get("pricing") or "not priced"
        else:
            note = ""
        timed = whole and profile is not None and int(priced) == units
        rows.append({
            "run_id": run_id, "defense": defense, "attack": attack, "norm": norm, "eps": eps, "units": units, "n": int(n),
            "forward_predicted": _range(f_lo, f_hi) if whole else None, "forward_recorded": _count(fwd),
            "backward_predicted": _range(b_lo, b_hi) if whole else None, "backward_recorded": _count(bwd),
            "in_range": (int(outside) == 0) if whole else None, "units_outside": int(outside) if whole else None,
            "seconds_predicted": [float(s_lo), float(s_hi)] if timed else None, "seconds_recorded": sec,
            "seconds_ratio": [sec / float(s_hi) if s_hi else None, sec / float(s_lo) if s_lo else None] if timed else None,
            "device": profile.get("device") if timed else None, "note": note,
        })
    return rows


def prediction(source: Source, predictions: Mapping[str, dict | str] | None = None) -> list[dict]:
    """Predicted against recorded cost, one row per run and (defense, attack, eps) of its records.

    predictions: {run_id: the run's predicted.json (store.verify.read_prediction), or why there is
    none}; a run absent from it has none. Each row: run_id, the group keys and norm; units (with
    records) and n (examples); forward_predicted and backward_predicted [lo, hi] (the sums of those
    units' predicted ranges) beside forward_recorded and backward_recorded (the sums of their
    records' forward_passes / backward_passes); in_range (every unit's recorded evaluations, forward
    and backward, lie in its own predicted range) and units_outside; seconds_predicted [lo, hi] on
    the run's profile (`device`) beside seconds_recorded (the records' seconds) and seconds_ratio
    [recorded / hi, recorded / lo]. Predicted fields are None where the run has no prediction, and
    seconds where it was not priced; `note` says why (empty when all is there)."""
    return _with_cells(source, lambda con, cells: _prediction(con, cells, predictions), units=True)


def _flags(con: duckdb.DuckDBPyConnection, cells: str) -> list[dict]:
    found = con.execute(f"""
        WITH totals AS (SELECT {KEYS}, sum(n) AS total FROM {cells} GROUP BY ALL),
             flagged AS (SELECT {KEYS}, flag, sum(n) AS c
                         FROM (SELECT {KEYS}, n, unnest(flagset) AS flag FROM {cells}) GROUP BY ALL)
        SELECT {KEYS}, flag, c, total FROM flagged JOIN totals USING ({KEYS})
        ORDER BY {ORDER}, flag
    """).fetchall()
    return [{**_key(key), "flag": flag, "count": int(c), "n": int(n), "fraction": int(c) / int(n)}
            for *key, flag, c, n in found]


def flags(source: Source) -> list[dict]:
    """Sanity flags: one row per group and flag with count (rows carrying it, once per row)
    and fraction (of the group's rows). Groups without flags have no row."""
    return _with_cells(source, _flags)


_MAKERS = {"headline": _headline, "summary": _summary, "classes": _classes, "stages": _stages, "cost": _cost, "flags": _flags}


def build_report(source: Source, sections: Sequence[str] = SECTIONS, class_names: Sequence[str] = (),
                 predictions: Mapping[str, dict | str] | None = None) -> dict[str, list[dict]]:
    """{section: rows} for the chosen sections (all by default), in SECTIONS order; the records
    are scanned once. class_names: see `per_class`; predictions: see `prediction`."""
    unknown = [s for s in sections if s not in SECTIONS]
    if unknown:
        raise ConfigError(f"unknown report section(s) {unknown}; choose from {list(SECTIONS)}")

    def make(con, cells):
        out = {}
        for name in (n for n in SECTIONS if n in sections):
            if name == "classes":
                out[name] = _classes(con, cells, class_names)
            elif name == "prediction":
                out[name] = _prediction(con, cells, predictions)
            else:
                out[name] = _MAKERS[name](con, cells)
        return out

    return _with_cells(source, make, units="prediction" in sections)


def load_records(uris: Sequence[str], endpoint_url: str | None = None) -> pa.Table:
    """The records of one or more run folders (local or s3://), concatenated into one table."""
    tables = [store.read_records("records") for store in run_stores(uris, endpoint_url)]
    return pa.concat_tables(tables) if len(tables) > 1 else tables[0]

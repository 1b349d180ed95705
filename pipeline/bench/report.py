"""`robustsweep bench report`: the full report over a million synthetic rows of the real schema.

The rows are written first as a run folder (by default 100 Parquet files, one per defense x
attack x eps group, like a run with large units; `files` sets how many), then the report is
timed from Parquet: listing the files, opening the view, every section's aggregation (one scan),
and rendering the tables as text. Writing the rows is not timed.
"""

from __future__ import annotations

import io
import tempfile
from pathlib import Path

import numpy as np
import pyarrow as pa

from pipeline.analytics.render import render_tables
from pipeline.analytics.report import build_report
from pipeline.analytics.source import connect
from pipeline.bench.common import load_average, machine_info, timed
from pipeline.store import RECORD_SCHEMA, Store

DEFENSES = ("plain-erm", "mi-pl", "mi-ol", "rdc-optimal-lm", "rdc-unet")
ATTACKS = ("aa-standard", "aa-rand", "pgd-eot10", "transfer-pgd-ce")
EPS = tuple(k / 255 for k in (1, 2, 4, 8, 16))
STAGES = ("apgd-ce", "apgd-t", "fab-t", "square")


def synthetic_records(n: int, seed: int = 0, classes: int = 10) -> pa.Table:
    """n records with RECORD_SCHEMA, values plausible rather than meaningful: every column
    filled (logits of `classes` floats, flags on ~2% of rows, broken_by on broken rows), groups
    cycling over DEFENSES x ATTACKS x EPS so that they are evenly sized. Deterministic in seed."""
    rng = np.random.default_rng(seed)
    groups = len(DEFENSES) * len(ATTACKS) * len(EPS)
    g = np.arange(n) % groups
    d_i, rest = np.divmod(g, len(ATTACKS) * len(EPS))
    a_i, e_i = np.divmod(rest, len(EPS))
    example = np.arange(n) // groups
    label = example % classes
    clean = rng.random(n) < 0.95
    adv = clean & (rng.random(n) < 0.9 - 0.1 * e_i)
    vote = adv | (clean & (rng.random(n) < 0.05))
    worst = adv & (rng.random(n) < 0.9)
    wrong = (label + 1 + rng.integers(0, classes - 1, n)) % classes
    passes = np.where(d_i == 0, 1, 10)
    logits = rng.normal(size=(n, classes)).astype(np.float32)
    stage = np.array(STAGES, dtype=object)[rng.integers(0, len(STAGES), n)]
    broken = np.where(~clean, "clean", np.where(~adv, stage, None))
    flag_kind = rng.random(n)
    flags = [["zero_gradient"] if f < 0.01 else ["stochastic_without_eot"] if f < 0.02 else [] for f in flag_kind]
    eps = np.array(EPS)[e_i]
    delta = eps * rng.random(n)

    def names(values, idx):
        return pa.DictionaryArray.from_arrays(pa.array(idx, pa.int32()), pa.array(values)).cast(pa.string())

    def floats_list(matrix):
        offsets = pa.array(np.arange(0, matrix.size + 1, matrix.shape[1], dtype=np.int32))
        return pa.ListArray.from_arrays(offsets, pa.array(matrix.reshape(-1)))

    columns = {
        "run_id": pa.array(np.full(n, "bench", dtype=object), pa.string()),
        "job_hash": pa.array(np.full(n, "bench", dtype=object), pa.string()),
        "unit_id": names([f"u{i:03d}" for i in range(groups)], g),
        "example_id": example, "label": label,
        "defense": names(DEFENSES, d_i), "attack": names(ATTACKS, a_i),
        "path": pa.array(np.full(n, "adaptive", dtype=object), pa.string()),
        "norm": pa.array(np.full(n, "Linf", dtype=object), pa.string()),
        "eps": eps, "seed": np.zeros(n, dtype=np.int64), "passes": passes,
        "clean_pred": np.where(clean, label, wrong), "clean_correct": clean,
        "clean_vote_pred": np.where(clean, label, wrong), "clean_vote_correct": clean,
        "clean_worst_correct": clean, "clean_pass_accuracy": clean.astype(np.float64),
        "adv_pred": np.where(adv, label, wrong), "adv_correct": adv,
        "adv_vote_pred": np.where(vote, label, wrong), "adv_vote_correct": vote,
        "adv_worst_correct": worst, "adv_pass_accuracy": np.where(adv, 0.95, 0.2),
        "clean_logits": floats_list(logits), "adv_logits": floats_list(logits[:, ::-1].copy()),
        "linf": delta, "l2": delta * 8, "l1": delta * 64,
        "broken_by": pa.array(broken, pa.string()),
        "attack_success": pa.array(~adv, pa.bool_()),
        "queries": rng.integers(100, 5000, n), "gradients": rng.integers(50, 2000, n),
        "forward_passes": rng.integers(100, 5000, n), "backward_passes": rng.integers(50, 2000, n),
        "seconds": rng.gamma(2.0, 0.5, n), "worker": names(["w0", "w1"], np.arange(n) % 2),
        "device": pa.array(np.full(n, "cuda", dtype=object), pa.string()),
        "config_hash": names([f"h{i}" for i in range(len(DEFENSES))], d_i),
        "flags": pa.array(flags, pa.list_(pa.string())),
        "iterations": np.full(n, 100, dtype=np.int64), "eot": np.where(d_i == 0, 1, 20),
        "precision": pa.array(np.where(d_i == 0, "float32", "bf16").astype(object), pa.string()),
        "node": names(["node-a", "node-b"], np.arange(n) % 2), "attempt": np.ones(n, dtype=np.int64),
    }
    arrays = [pa.array(columns[f.name], f.type) if not isinstance(columns[f.name], (pa.Array, pa.ChunkedArray))
              else columns[f.name].cast(f.type) for f in RECORD_SCHEMA]
    return pa.Table.from_arrays(arrays, schema=RECORD_SCHEMA)


def write_synthetic_run(folder: str | Path, n: int, seed: int = 0, files: int = 100) -> str:
    """Write `synthetic_records(n, seed)` under `folder`/records/ in the layout of a run:
    records/defense=.../attack=.../unit-{i}.parquet, `files` files of equal size, each within
    one (defense, attack, eps) group when `files` is a multiple of the 100 groups, sealed by the
    store like a unit's file (so that the report checks them as it checks a run's). Returns the
    run folder."""
    table = synthetic_records(n, seed)
    groups = len(DEFENSES) * len(ATTACKS) * len(EPS)
    unit = np.arange(n) % groups
    table = table.take(pa.array(np.argsort(unit, kind="stable")))  # each group's rows together
    root = Path(folder)
    store = Store(str(root))
    bounds = np.linspace(0, n, max(1, min(files, n)) + 1).astype(int)
    for i, (lo, hi) in enumerate(zip(bounds[:-1], bounds[1:])):
        part = table.slice(lo, hi - lo)
        d, a = part.column("defense")[0].as_py(), part.column("attack")[0].as_py()
        store.write_table(f"records/defense={d}/attack={a}/unit-{i:06d}.parquet", part, {"unit_id": f"bench-{i:06d}"})
    return str(root.resolve())


def bench_report(rows: int = 1_000_000, repeats: int = 3, seed: int = 0, files: int = 100,
                 folder: str | None = None) -> dict:
    """Seconds of the full report (every section, rendered as text) over `rows` synthetic rows
    read from `files` Parquet files; the best of `repeats` runs (the first one also warms the
    page cache). folder: where to write the rows (default: a temp folder, deleted after).

    Returns {"rows", "files", "report_seconds" (best run), "runs" (every timing), "sections"
    (rows per section), versions}.
    """
    import duckdb
    from rich.console import Console

    with tempfile.TemporaryDirectory(prefix="robustsweep-bench-") as tmp:
        run = write_synthetic_run(Path(folder or tmp) / "bench-run", rows, seed, files)
        files = len(Store(run).list("records", ".parquet"))

        def full_report() -> dict:
            con = connect([run])
            try:
                report = build_report(con)
            finally:
                con.close()
            console = Console(width=240, file=io.StringIO())
            for table in render_tables(report):
                console.print(table)
            return report

        timings, report = [], None
        for _ in range(max(1, repeats)):
            seconds, report = timed(full_report)
            timings.append(seconds)
    return {
        "rows": rows, "files": files, "report_seconds": round(min(timings), 4),
        "runs": [round(t, 4) for t in timings],
        "sections": {name: len(rows_) for name, rows_ in report.items()},
        "duckdb": duckdb.__version__, "pyarrow": pa.__version__, **machine_info("cpu"), "load_after": load_average(),
    }


def format_report(result: dict) -> list[str]:
    """The line `robustsweep bench report` prints for a result of `bench_report`."""
    return [f"report over {result['rows']} rows in {result['files']} Parquet files: "
            f"{result['report_seconds']:.3f} s (best of {len(result['runs'])}: {result['runs']})"]

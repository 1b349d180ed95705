"""Sweep report: Wilson intervals, grouping and flag counts over a hand-built records table."""

from __future__ import annotations

import json
import math

import pyarrow as pa
import pytest
from rich.console import Console

from pipeline.analytics import format_eps, render_table, summarize, to_markdown, wilson_interval
from pipeline.errors import StoreError
from pipeline.store import records_to_table


def rec(i: int, *, defense="rdc", attack="pgd", path="full", norm="Linf", eps=8 / 255, clean=True, adv=True,
        vote=None, worst=None, fwd=10, bwd=8, seconds=0.5, flags=()) -> dict:
    """A record with chosen correctness; other fields plausible."""
    vote = adv if vote is None else vote
    worst = adv if worst is None else worst
    return {
        "example_id": i, "label": 1, "defense": defense, "attack": attack, "path": path, "norm": norm, "eps": eps,
        "seed": 0, "passes": 2, "clean_pred": 1 if clean else 0, "clean_correct": clean, "clean_vote_pred": 1,
        "clean_vote_correct": clean, "clean_worst_correct": clean, "clean_pass_accuracy": float(clean),
        "adv_pred": 1 if adv else 0, "adv_correct": adv, "adv_vote_pred": 1 if vote else 0, "adv_vote_correct": vote,
        "adv_worst_correct": worst, "adv_pass_accuracy": float(adv), "clean_logits": [0.0, 1.0],
        "adv_logits": [1.0, 0.0], "linf": eps, "l2": eps * 3, "l1": eps * 9, "broken_by": None,
        "attack_success": not adv, "queries": 5, "gradients": 5, "forward_passes": fwd, "backward_passes": bwd,
        "seconds": seconds, "device": "cpu", "flags": list(flags),
    }


def table(records) -> pa.Table:
    return records_to_table(records, run_id="r", job_hash="j", unit_id="u", worker="w", config_hash="h")


def closed_form(k, n, z=1.959963984540054):
    p = k / n
    c = (p + z * z / (2 * n)) / (1 + z * z / n)
    h = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return c - h, c + h


def test_wilson_known_values():
    assert wilson_interval(8, 10) == pytest.approx((0.4902, 0.9433), abs=1e-4)
    lo, hi = wilson_interval(0, 10)
    assert lo == 0.0 and hi == pytest.approx(0.2775, abs=1e-4)
    assert wilson_interval(10, 10) == pytest.approx((0.7225, 1.0), abs=1e-4)
    assert wilson_interval(0, 0) == (0.0, 1.0)
    for k, n in [(1, 3), (37, 100), (500, 1000)]:
        assert wilson_interval(k, n) == pytest.approx(closed_form(k, n), abs=1e-12)
    assert wilson_interval(5, 10, z=1.0) == pytest.approx(closed_form(5, 10, z=1.0))
    with pytest.raises(ValueError):
        wilson_interval(4, 3)


def hand_built() -> pa.Table:
    recs = []
    # rdc / pgd / Linf 8/255: 10 examples, 9 clean right, 8 robust, 6 by vote, 5 worst case.
    for i in range(10):
        recs.append(rec(i, clean=i != 0, adv=i >= 2, vote=i >= 4, worst=i >= 5, fwd=10 + i, seconds=0.1 * i,
                        flags=["zero_gradient"] if i < 3 else []))
    # rdc / pgd / Linf 4/255 (listed after 8/255 on purpose: the report sorts by eps).
    for i in range(4):
        recs.append(rec(i, eps=4 / 255, adv=True))
    # rdc / pgd / other path: its own group.
    for i in range(2):
        recs.append(rec(i, path="bpda", adv=False, flags=["nan_gradient", "zero_gradient"]))
    # mi / apgd-ce / L2 0.5: all broken.
    for i in range(5):
        recs.append(rec(i, defense="mi", attack="apgd-ce", norm="L2", eps=0.5, adv=False, bwd=0,
                        flags=["zero_gradient", "zero_gradient"] if i == 0 else []))
    return table(recs)


def test_summarize_groups_and_accuracies():
    rows = summarize(hand_built())
    keys = [(r["defense"], r["attack"], r["path"], r["norm"], round(r["eps"] * 255, 3)) for r in rows]
    # Sorted by defense, attack, norm, eps; path only breaks ties.
    assert keys == [("mi", "apgd-ce", "full", "L2", 127.5), ("rdc", "pgd", "full", "Linf", 4.0),
                    ("rdc", "pgd", "bpda", "Linf", 8.0), ("rdc", "pgd", "full", "Linf", 8.0)]
    mi, r4, bpda, r8 = rows
    assert r8["n"] == 10
    assert r8["clean_acc"] == pytest.approx(0.9) and r8["robust_acc"] == pytest.approx(0.8)
    assert (r8["robust_lo"], r8["robust_hi"]) == pytest.approx((0.4902, 0.9433), abs=1e-4)
    assert (r8["clean_lo"], r8["clean_hi"]) == pytest.approx(closed_form(9, 10))
    assert r8["vote_acc"] == pytest.approx(0.6) and r8["all_passes_acc"] == pytest.approx(0.5)
    assert r8["forward_per_example"] == pytest.approx(14.5) and r8["backward_per_example"] == pytest.approx(8)
    assert r8["seconds_per_example"] == pytest.approx(0.45)
    assert r8["flags"] == {"zero_gradient": 3}
    assert r4["n"] == 4 and r4["robust_acc"] == 1.0 and r4["flags"] == {}
    assert bpda["n"] == 2 and bpda["flags"] == {"nan_gradient": 2, "zero_gradient": 2}
    assert mi["n"] == 5 and mi["robust_acc"] == 0.0 and mi["robust_hi"] == pytest.approx(closed_form(0, 5)[1])
    assert mi["backward_per_example"] == 0.0
    assert mi["flags"] == {"zero_gradient": 1}  # a repeated flag counts its row once


def test_summarize_empty_and_missing_columns():
    assert summarize(table([])) == []
    with pytest.raises(StoreError, match="adv_correct"):
        summarize(hand_built().drop_columns(["adv_correct"]))


def test_markdown_and_rich_render():
    rows = summarize(hand_built())
    md = to_markdown(rows)
    lines = md.strip().splitlines()
    assert len(lines) == 2 + len(rows)
    assert lines[0].startswith("| defense | attack |")
    r8 = lines[-1]
    assert "| 8/255 |" in r8 and "| 80.0 [49.0, 94.3] |" in r8 and "| 90.0 [" in r8
    assert "| 60.0 | 50.0 |" in r8 and "zero_gradient: 3" in r8
    assert "| 0.5 |" in lines[2] and "0.0 [0.0, 43.4]" in lines[2]
    assert format_eps(0.0, "Linf") == "0" and format_eps(2 / 255, "Linf") == "2/255"
    assert format_eps(0.2, "L2") == "0.2"

    console = Console(width=250, record=True)
    console.print(render_table(rows, title="sweep"))
    text = console.export_text()
    assert "80.0 [49.0, 94.3]" in text and "mi" in text and "sweep" in text


# --- every section, read by DuckDB from Parquet files of a run folder -----------------------------------------

from analytics_data import write_sweep  # noqa: E402

from pipeline.analytics import (build_report, connect, report_markdown, section_markdown, to_csv,  # noqa: E402
                                to_json)


@pytest.fixture(scope="module")
def sweep(tmp_path_factory) -> str:
    return write_sweep(str(tmp_path_factory.mktemp("runs") / "sweep-0001"), images=False)


def by_group(rows, defense, eps):
    return [r for r in rows if r["defense"] == defense and r["eps"] == pytest.approx(eps)]


def test_summary_from_parquet(sweep):
    con = connect([sweep])
    rows = summarize(con)
    con.close()
    assert [(r["defense"], r["norm"], round(r["eps"] * 255, 1)) for r in rows] == [
        ("mi-pl", "L2", 127.5), ("plain-erm", "Linf", 4.0), ("plain-erm", "Linf", 8.0),
        ("rdc-optimal[timesteps=20]", "Linf", 8.0), ("rdc-optimal[timesteps=5]", "Linf", 8.0)]
    expected = {  # (defense, eps): (clean right, robust right, vote right, worst right) of 20
        ("plain-erm", 4 / 255): (19, 16, 18, 16), ("plain-erm", 8 / 255): (19, 10, 15, 10),
        ("rdc-optimal[timesteps=5]", 8 / 255): (20, 12, 16, 10),
        ("rdc-optimal[timesteps=20]", 8 / 255): (20, 14, 17, 12), ("mi-pl", 0.5): (20, 15, 18, 13),
    }
    for (defense, eps), (clean, robust, vote, worst) in expected.items():
        (r,) = by_group(rows, defense, eps)
        assert r["n"] == 20
        assert (r["clean_acc"], r["robust_acc"], r["vote_acc"], r["all_passes_acc"]) == pytest.approx(
            (clean / 20, robust / 20, vote / 20, worst / 20))
        assert (r["robust_lo"], r["robust_hi"]) == pytest.approx(closed_form(robust, 20), abs=1e-12)
        assert (r["clean_lo"], r["clean_hi"]) == pytest.approx(
            closed_form(clean, 20) if clean < 20 else (closed_form(20, 20)[0], 1.0), abs=1e-12)
        assert r["forward_per_example"] == pytest.approx(19.5) and r["backward_per_example"] == 4
    assert by_group(rows, "plain-erm", 8 / 255)[0]["flags"] == {"square_beat_whitebox": 1}
    assert by_group(rows, "mi-pl", 0.5)[0]["flags"] == {"zero_gradient": 2}
    # 14/20: Wilson 95% is [48.1, 85.5]; the table shows it with one decimal.
    assert "| 70.0 [48.1, 85.5] |" in to_markdown(rows)


def test_classes_stages_cost_flags(sweep):
    con = connect([sweep])
    report = build_report(con)
    con.close()
    assert list(report) == ["headline", "summary", "classes", "stages", "cost", "prediction", "flags"]

    classes = by_group(report["classes"], "rdc-optimal[timesteps=20]", 8 / 255)
    assert [c["label"] for c in classes] == list(range(10)) and all(c["n"] == 2 for c in classes)
    # Broken ids 0, 1, 2, 3, 10, 11: labels 0 and 1 lose both examples, labels 2 and 3 one.
    assert [c["robust_acc"] for c in classes] == [0.0, 0.0, 0.5, 0.5] + [1.0] * 6
    assert (classes[2]["robust_lo"], classes[2]["robust_hi"]) == pytest.approx(closed_form(1, 2))
    plain4 = by_group(report["classes"], "plain-erm", 4 / 255)
    # Broken ids 0..3 (id 0 already wrong clean): labels 0..3 keep one of their two examples.
    assert [c["robust_acc"] for c in plain4] == [0.5] * 4 + [1.0] * 6
    assert plain4[0]["clean_acc"] == 0.5 and plain4[1]["clean_acc"] == 1.0

    (st,) = by_group(report["stages"], "plain-erm", 8 / 255)
    assert st["n"] == 20 and st["survived"] == 10
    assert st["broken_by"] == {"clean": 1, "apgd-ce": 6, "apgd-t": 2, "square": 1}
    assert list(st["broken_by"]) == ["clean", "apgd-ce", "apgd-t", "square"]  # attack order, not alphabetical
    (st_mi,) = by_group(report["stages"], "mi-pl", 0.5)
    assert st_mi["broken_by"] == {"pgd": 5} and st_mi["survived"] == 15

    (c,) = by_group(report["cost"], "mi-pl", 0.5)
    assert c["device_seconds"] == pytest.approx(10.0) and c["seconds_per_example"] == pytest.approx(0.5)
    assert c["calls_per_example"] == pytest.approx(19.5 + 4) and c["queries_per_example"] == 100
    assert c["gradients_per_example"] == 50 and c["devices"] == ["cpu"] and c["workers"] == 1

    assert [(f["defense"], f["flag"], f["count"], f["fraction"]) for f in report["flags"]] == [
        ("mi-pl", "zero_gradient", 2, 0.1), ("plain-erm", "square_beat_whitebox", 1, 0.05)]


def test_report_formats(sweep):
    con = connect([sweep])
    report = build_report(con)
    con.close()
    md = report_markdown(report)
    assert md.count("### ") == 7 and "| clean | apgd-ce | apgd-t | square |" in section_markdown(
        "stages", by_group(report["stages"], "plain-erm", 8 / 255))
    # Per-class, pivoted: one column per label; rdc t20 reads 0.0 0.0 50.0 50.0 100.0 ...
    wide = section_markdown("classes", report["classes"]).splitlines()
    assert wide[0].endswith("| n | 0 | 1 | 2 | 3 | 4 | 5 | 6 | 7 | 8 | 9 |")
    assert any("rdc-optimal[timesteps=20]" in line and "| 20 | 0.0 | 0.0 | 50.0 | 50.0 | 100.0 |" in line
               for line in wide)

    csv_text = to_csv(report["stages"]).splitlines()
    header = csv_text[0].split(",")
    assert header[:6] == ["defense", "attack", "path", "norm", "eps", "n"] and "broken_by.square" in header
    mi = next(line.split(",") for line in csv_text[1:] if line.startswith("mi-pl"))
    assert mi[header.index("broken_by.pgd")] == "5" and mi[header.index("broken_by.square")] == "0"
    assert float(mi[header.index("eps")]) == 0.5  # raw values, not "0.5" formatted text

    data = json.loads(to_json(report))
    assert set(data) == set(report) and data["summary"][0]["robust_acc"] == 0.75


def test_combining_runs_and_missing_folders(sweep, tmp_path):
    other = write_sweep(str(tmp_path / "other-run"), images=False, plan=False)
    con = connect([sweep])
    once = summarize(con)
    con.close()
    notes: list[str] = []
    con = connect([sweep, other, sweep], notes=notes)  # a run given twice, or copied, counts once
    rows = summarize(con)
    con.close()
    assert rows == once and all(r["n"] == 20 for r in rows)
    assert notes and all(n.startswith("read once: ") and "other-run" in n for n in notes)

    # A file from a newer writer (an extra column) reads beside the others, in either order.

    newer = tmp_path / "newer-run" / "records"
    newer.mkdir(parents=True)
    table = hand_built()
    from pipeline.store import Store

    Store(str(newer)).write_table("unit-0.parquet", table.append_column("extra", pa.array([1.5] * table.num_rows)),
                                  {"unit_id": "u0"}, schema=None)
    Store(str(newer)).write_table("unit-1.parquet", table, {"unit_id": "u1"})
    newer = newer.parent
    con = connect([str(newer)])
    assert sum(r["n"] for r in summarize(con)) == 2 * table.num_rows
    con.close()
    from pipeline.errors import InputError

    with pytest.raises(InputError, match="not a run folder"):
        connect([str(tmp_path / "nothing-here")])
    empty = tmp_path / "empty-run"
    empty.mkdir()
    (empty / "plan.json").write_text('{"run_id": "empty-run", "job_hash": "j", "units": []}')
    con = connect([str(empty)])  # a run with a plan but no records yet: an empty report
    assert build_report(con)["summary"] == []
    con.close()

"""Sweep report: Wilson intervals, grouping and flag counts over a hand-built records table."""

from __future__ import annotations

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
    return records_to_table(records, run_id="r", unit_id="u", worker="w", config_hash="h")


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
    assert r8["vote_acc"] == pytest.approx(0.6) and r8["worst_acc"] == pytest.approx(0.5)
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

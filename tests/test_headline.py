"""One robust accuracy, defined once (report.ROBUST_RULE), the same in every view; `compare`
across unequal attacks and across MI's two gradient paths."""

from __future__ import annotations

import html as htmllib
import json
import re

import pytest
from analytics_data import N, record, write_sweep
from typer.testing import CliRunner

from pipeline.analytics import connect
from pipeline.analytics.compare import ALL_ATTACKS, compare, paired_counts
from pipeline.analytics.outputs import analyze
from pipeline.analytics.report import ROBUST_RULE
from pipeline.cli import app
from pipeline.errors import InputError
from pipeline.store import Store, records_to_table

EPS = 8 / 255
T5 = "rdc-optimal[timesteps=5]"

# A demo-like run: the plain CNN under AutoAttack standard, RDC under AutoAttack rand through
# BPDA, MI-OL and MI-PL under AutoAttack rand on both of MI's paths, R = 3 passes for the stochastic ones.
DEMO = [  # defense, attack, path, passes, ids the first pass gets wrong
    ("plain-erm", "aa-standard", "adaptive", 1, set(range(10))),
    ("rdc-optimal-lm", "aa-rand", "adaptive+bpda", 3, {0, 1, 2, 3, 12}),
    ("mi-ol", "aa-rand", "adaptive", 3, {0, 1, 4, 5, 6}),
    ("mi-ol", "aa-rand", "oblivious", 3, {0, 7, 8}),
    ("mi-pl", "aa-rand", "adaptive", 3, {0, 1, 2}),
    ("mi-pl", "aa-rand", "oblivious", 3, {9}),
]


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> str:
    store = Store(str(tmp_path_factory.mktemp("runs") / "demo-0001"))
    units = []
    for g, (defense, attack, path, passes, wrong) in enumerate(DEMO):
        uid = f"{g:016x}"
        rel = f"records/defense={defense}/attack={attack}/unit-{uid}.parquet"
        recs = [record(i, defense, attack, path, "Linf", EPS, passes, wrong, {}) for i in range(N)]
        table = records_to_table(recs, run_id="demo-0001", job_hash="j", unit_id=uid, worker="w0", config_hash="h")
        store.write_table(rel, table, {"unit_id": uid, "run_id": "demo-0001", "job_hash": "j"})
        units.append({"unit_id": uid, "defense": defense, "attack": attack, "eps": EPS, "path": rel,
                      "defense_table": {"kind": defense.split("-")[0]}, "example_ids": list(range(N)),
                      "attack_table": {"kind": "autoattack", "norm": "Linf", "eps": EPS}})
    store.write_json("plan.json", {"run_id": "demo-0001", "job_hash": "j", "format": 1, "units": units,
                                   "job": {"name": "demo", "seed": 0, "data": {"dataset": "digits"}}})
    return store.uri


@pytest.fixture(scope="module")
def sweep(tmp_path_factory) -> str:
    return write_sweep(str(tmp_path_factory.mktemp("runs") / "sweep-0001"))


def invoke(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def counts(row):
    return row["n"], row["n11"], row["n10"], row["n01"], row["n00"]


def test_compare_defenses_that_ran_different_attacks(sweep):
    con = connect([sweep])
    try:
        notes: list[str] = []
        # plain-erm ran AutoAttack standard, RDC AutoAttack rand: no attack in common, but each
        # one's worst case over its attacks pairs (plain broken on 0..9, RDC on 0..7).
        (row,) = compare(con, "plain-erm", T5, resamples=500, notes=notes)
        assert row["attack"] == ALL_ATTACKS and (row["norm"], row["eps"]) == ("Linf", EPS)
        assert counts(row) == (20, 10, 0, 2, 8) and (row["acc_a"], row["acc_b"]) == (0.5, 0.6)
        assert row["p_value"] == pytest.approx(0.5)  # 2 discordant pairs, both one way: 2 * 1/4
        assert notes == ["aa-rand Linf eps 8/255: only rdc-optimal[timesteps=5] ran it (20 examples), nothing to pair",
                         "aa-standard Linf eps 4/255: only plain-erm ran it (20 examples), nothing to pair",
                         "aa-standard Linf eps 8/255: only plain-erm ran it (20 examples), nothing to pair",
                         "all attacks Linf eps 4/255: only plain-erm ran it (20 examples), nothing to pair"]
        # The same pair on one attack: nothing in common, said as such.
        with pytest.raises(InputError, match="share no"):
            compare(con, "plain-erm", T5, attack="aa-rand")
    finally:
        con.close()
    result = invoke("compare", sweep, "--a", "plain-erm", "--b", T5, "--format", "json", "--resamples", 200)
    assert result.exit_code == 0, result.output
    (row,) = json.loads(result.stdout)["compare"]
    assert counts(row) == (20, 10, 0, 2, 8)


def test_compare_across_mi_paths(demo):
    con = connect([demo])
    try:
        # Default: right on every path that ran (mi-ol broken on {0, 1, 4, 5, 6} u {0, 7, 8}).
        (row,) = compare(con, "rdc-optimal-lm", "mi-ol", resamples=500)
        assert row["attack"] == "aa-rand" and row["path"] == "worst"
        # RDC wrong on {0, 1, 2, 3, 12}; both wrong {0, 1}; RDC only wrong {2, 3, 12}; MI only {4..8}.
        assert counts(row) == (20, 10, 5, 3, 2)
        (adaptive,) = compare(con, "rdc-optimal-lm", "mi-ol", path="adaptive", resamples=500)
        assert counts(adaptive) == (20, 12, 3, 3, 2)  # adaptive+bpda counts as adaptive
        (obl,) = compare(con, "mi-pl", "mi-ol", path="oblivious", resamples=500)
        assert counts(obl) == (20, 16, 3, 1, 0)  # mi-pl wrong {9}, mi-ol {0, 7, 8}
        with pytest.raises(InputError, match=r"--path oblivious: defense 'rdc-optimal-lm' was attacked on no such "
                                             r"path \(its paths: adaptive\+bpda\)"):
            compare(con, "rdc-optimal-lm", "mi-ol", path="oblivious")
        with pytest.raises(InputError, match="unknown path 'sideways'"):
            paired_counts(con, "mi-pl", "mi-ol", path="sideways")
        # Different attacks on each side, MI on two paths: one row, each one's worst case.
        (row,) = compare(con, "plain-erm", "mi-pl", resamples=500)
        assert row["attack"] == ALL_ATTACKS and counts(row) == (20, 10, 0, 6, 4)  # mi-pl wrong on {0, 1, 2, 9}
    finally:
        con.close()
    # The README's example on a demo-like run.
    result = invoke("compare", demo, "--a", "rdc-optimal-lm", "--b", "mi-ol", "--format", "markdown")
    assert result.exit_code == 0, result.output
    assert "| aa-rand | worst | Linf | 8/255 | 20 |" in result.stdout
    result = invoke("compare", demo, "--a", "rdc-optimal-lm", "--b", "mi-ol", "--path", "adaptive", "--format", "json")
    assert result.exit_code == 0 and json.loads(result.stdout)["compare"][0]["n11"] == 12


def _html_cell(page: str, section: str, defense: str) -> list[str]:
    table = re.search(rf'<table class="report" data-section="{section}">(.*?)</table>', page, re.S).group(1)
    for row in re.findall(r"<tr[^>]*>(.*?)</tr>", table, re.S):
        cells = [htmllib.unescape(re.sub(r"<[^>]+>", "", c)) for c in re.findall(r"<td[^>]*>(.*?)</td>", row, re.S)]
        if cells and cells[0] == defense:
            return cells
    raise AssertionError(f"no {section} row for {defense}")


def test_one_robust_figure_in_every_view(demo, tmp_path):
    out = analyze([demo], html_path=tmp_path / "page.html", robustbench_dir=str(tmp_path / "rb"))
    report = out["report"]
    head = {r["defense"]: r for r in report["headline"]}
    rdc = head["rdc-optimal-lm"]
    # Stochastic (R = 3), one attack on one path: the first pass is wrong on 5 of 20, the vote
    # on 2 (the first half of them), all passes on 7 (those and ids 18, 19).
    assert (rdc["robust_acc"], rdc["vote_acc"], rdc["all_passes_acc"]) == (0.75, 0.9, 0.65)
    assert rdc["rule"] == ROBUST_RULE
    (summary,) = [r for r in report["summary"] if r["defense"] == "rdc-optimal-lm"]
    assert summary["robust_acc"] == rdc["robust_acc"] and summary["vote_acc"] == rdc["vote_acc"]
    page = (tmp_path / "page.html").read_text()
    assert ROBUST_RULE in page
    headers = re.search(r'data-section="headline"><thead><tr>(.*?)</tr>', page).group(1)
    at = [htmllib.unescape(re.sub(r"<[^>]+>", "", h)) for h in re.findall(r"<th[^>]*>(.*?)</th>", headers)]
    assert _html_cell(page, "headline", "rdc-optimal-lm")[at.index("robust % [95% CI]")].startswith("75.0 [")
    doc = json.loads((tmp_path / "rb" / "digits" / "Linf" / "rdc-optimal-lm_eps8_255.json").read_text())
    assert doc["autoattack_acc"] == "75.00" and "external" not in doc and ROBUST_RULE in doc["footnote"]
    # Two paths: the worst over them everywhere (mi-ol broken on 7 ids of 20 by either path).
    mi = head["mi-ol"]
    assert mi["robust_acc"] == 0.65 and mi["attacks"] == ["aa-rand (adaptive)", "aa-rand (oblivious)"]
    assert _html_cell(page, "headline", "mi-ol")[at.index("robust % [95% CI]")].startswith("65.0 [")
    doc = json.loads((tmp_path / "rb" / "digits" / "Linf" / "mi-ol_eps8_255.json").read_text())
    assert doc["autoattack_acc"] == "65.00" and doc["robustsweep"]["robust_acc"] == "65.00"
    assert doc["robustsweep"]["vote_acc"] == f"{100 * mi['vote_acc']:.2f}"

"""The report's headline: per example, the worst case over every attack and path; sweep flags marked."""

from __future__ import annotations

import pytest

from pipeline.analytics import build_report, connect_table
from pipeline.analytics.html import table_html
from pipeline.analytics.render import FLAG_MARK, cells
from pipeline.store import records_to_table

pytestmark = pytest.mark.filterwarnings("ignore")


def rec(i, attack, path, *, eps=16 / 255, adv=True, vote=None, worst=None, defense="mi-pl", norm="Linf"):
    vote = adv if vote is None else vote
    worst = vote if worst is None else worst
    return {
        "example_id": i, "label": 1, "defense": defense, "attack": attack, "path": path, "norm": norm, "eps": eps,
        "seed": 0, "passes": 5, "clean_pred": 1, "clean_correct": True, "clean_vote_pred": 1, "clean_vote_correct": True,
        "clean_worst_correct": True, "clean_pass_accuracy": 1.0, "adv_pred": 1 if adv else 0, "adv_correct": adv,
        "adv_vote_pred": 1 if vote else 0, "adv_vote_correct": vote, "adv_worst_correct": worst,
        "adv_pass_accuracy": 1.0 if vote else 0.2, "clean_logits": [0.0, 1.0], "adv_logits": [0.0, 1.0],
        "linf": eps, "l2": eps, "l1": eps, "broken_by": None, "attack_success": False, "queries": 1, "gradients": 1,
        "forward_passes": 1, "backward_passes": 1, "seconds": 0.1, "device": "cpu", "flags": [],
    }


def sweep():
    """10 examples at 16/255. adaptive aa-rand breaks 0-3 (vote), oblivious pgd breaks 2-6,
    transfer breaks 9; single pass: adaptive also wrong on 7, worst case: adaptive also on 8.
    The clean rows (eps 0) and another eps stay out of the 16/255 headline."""
    rows = []
    for i in range(10):
        rows.append(rec(i, "aa-rand", "adaptive", adv=not (i <= 3 or i == 7), vote=i > 3, worst=i > 3 and i != 8))
        rows.append(rec(i, "pgd-eot4", "oblivious", adv=not 2 <= i <= 6))
        rows.append(rec(i, "transfer-pgd-ce", "transfer:plain", adv=i != 9))
        rows.append(rec(i, "clean", "adaptive", eps=0.0, adv=False))
        rows.append(rec(i, "aa-rand", "adaptive", eps=32 / 255, adv=i % 2 == 0))
    return records_to_table(rows, run_id="r", job_hash="j", unit_id="u", worker="w", config_hash="h")


def test_headline_is_the_per_example_worst_over_attacks_and_paths():
    con = connect_table(sweep())
    report = build_report(con)
    con.close()
    head = {r["eps"]: r for r in report["headline"]}
    assert sorted(head) == [16 / 255, 32 / 255]
    h = head[16 / 255]
    # The first pass (the rule of "robust %"): broken by any of adaptive {0..3, 7}, oblivious
    # {2..6}, transfer {9}: survivor 8.
    assert (h["n"], h["robust_acc"]) == (10, 0.1) and h["rule"].startswith("first of the R scoring passes")
    assert h["vote_acc"] == 0.2  # the vote: 7 survives the adaptive attack
    assert h["all_passes_acc"] == 0.1  # all passes: 8 is broken, 7 survives
    assert h["attacks"] == ["aa-rand (adaptive)", "pgd-eot4 (oblivious)", "transfer-pgd-ce (transfer:plain)"]
    assert h["robust_lo"] < 0.1 < h["robust_hi"]
    # Each attack's own row stays: the adaptive one alone claims 60%.
    own = {(r["attack"], r["eps"]): r["vote_acc"] for r in report["summary"]}
    assert own[("aa-rand", 16 / 255)] == 0.6 and own[("pgd-eot4", 16 / 255)] == 0.5
    assert head[32 / 255]["robust_acc"] == 0.5


def test_a_path_that_sees_less_breaking_more_flags_and_marks_the_rows():
    con = connect_table(sweep())
    report = build_report(con)
    con.close()
    adaptive = next(r for r in report["summary"] if r["attack"] == "aa-rand" and r["eps"] == 16 / 255)
    # 60% adaptive against 50% oblivious at n = 10: within two standard errors, not flagged.
    assert adaptive["sweep_flags"] == []
    rows = [r for r in sweep().to_pylist() if not (r["path"] == "oblivious" and r["example_id"] >= 7)]
    for r in rows:
        if r["path"] == "oblivious":
            r["adv_vote_correct"] = False  # the oblivious attack breaks all 7 examples it ran on
    con = connect_table(records_to_table([{k: v for k, v in r.items() if k not in ("run_id", "job_hash", "unit_id", "worker", "config_hash")}
                                          for r in rows], run_id="r", job_hash="j", unit_id="u", worker="w",
                                         config_hash="h"))
    report = build_report(con)
    con.close()
    adaptive = next(r for r in report["summary"] if r["attack"] == "aa-rand" and r["eps"] == 16 / 255)
    assert adaptive["sweep_flags"] == ["oblivious_beats_adaptive"]
    head = next(r for r in report["headline"] if r["eps"] == 16 / 255)
    assert head["sweep_flags"] == ["oblivious_beats_adaptive"]
    _, _, body = cells("headline", report["headline"])
    # A sweep flag belongs to the group's sweep: both eps of the adaptive group are marked.
    assert [line[0].startswith(FLAG_MARK) for line in body] == [True, True]
    html = table_html("summary", report["summary"])
    assert html.count('<tr class="flagged">') == 2 and html.count("<tr>") == 4


def test_an_attack_on_mi_without_a_path_also_runs_oblivious():
    from pipeline.config.job import parse_job

    doc = {"name": "t", "data": {"dataset": "digits", "split": "test", "limit": 4},
           "defenses": [{"kind": "plain"}, {"kind": "mi", "mode": "pl"}],
           "attacks": [{"kind": "pgd", "eps": 0.1}, {"kind": "pgd", "eps": 0.2, "path": "adaptive", "name": "only"},
                       {"kind": "transfer", "surrogate": {"kind": "plain"}, "attack": {"kind": "pgd"}}]}
    job = parse_job(doc)
    runs = sorted((a.name, a.table.get("path", "adaptive"), a.defenses) for a in job.attacks)
    assert runs == [("only", "adaptive", ("plain-erm", "mi-pl")), ("pgd-ce", "adaptive", ("plain-erm", "mi-pl")),
                    ("pgd-ce", "oblivious", ("mi-pl",)),
                    ("transfer-pgd-ce", "adaptive", ("plain-erm", "mi-pl"))]

"""Batched attacks: the same answers as one example at a time (within sampling error), and
records that depend only on (seed, unit): not on the workers, the order of the units, or a resume."""

from __future__ import annotations


import pytest
import torch

from pipeline.analytics.report import wilson_interval
from pipeline.config.job import parse_job
from pipeline.config.run import RunOptions
from pipeline.data import load_split, select
from pipeline.defenses import build_defense
from pipeline.protocol import evaluate
from pipeline.runtime import plan, run_job
from pipeline.store import Store

PGD = {"kind": "pgd", "eps": 24 / 255, "steps": 10, "loss": "dlr"}


@pytest.mark.slow
def test_batched_and_per_example_agree_within_the_wilson_interval(default_models):
    default_models("erm")
    cnn = build_defense({"kind": "plain", "dataset": "digits"})
    x, y = load_split("digits", "test")
    x, y, ids = x[:128], y[:128], torch.arange(128)
    batched = evaluate(cnn, PGD, x, y, ids, seed=0)
    single = evaluate(cnn, {**PGD, "batched": False}, x, y, ids, seed=0)
    k_b, k_s = (sum(r["adv_correct"] for r in recs) for recs in (batched, single))
    lo_b, hi_b = wilson_interval(k_b, 128)
    lo_s, hi_s = wilson_interval(k_s, 128)
    assert lo_b <= k_s / 128 <= hi_b and lo_s <= k_b / 128 <= hi_s, (k_b, k_s)
    assert 0 < k_b < 100  # the budget breaks many but not all: a comparison that could fail
    assert [r["clean_correct"] for r in batched] == [r["clean_correct"] for r in single]


def job_doc(cnn):
    return {
        "name": "batched", "seed": 3,
        "data": {"dataset": "digits", "split": "test", "limit": 8, "shard_size": 4},
        "defenses": [{"kind": "plain", "model": cnn}, {"kind": "mi", "mode": "pl", "model": cnn}],
        "attacks": [{"kind": "autoattack", "version": "rand", "eps": 0.1, "n_iter": 3, "eot_iter": 2, "passes": 3,
                     "path": "adaptive"}],
    }


DROP = {"seconds", "worker", "run_id"}


def rows(table) -> list[tuple]:
    names = [n for n in table.column_names if n not in DROP]
    data = table.select(names).to_pylist()
    return sorted(tuple((k, str(r[k])) for k in names) for r in data)


@pytest.mark.slow
def test_batched_records_do_not_depend_on_workers_order_or_resume(ray_cluster, cnn, tmp_path):
    job = parse_job(job_doc(cnn))
    one = run_job(job, RunOptions(out=str(tmp_path / "one"), workers=1), progress=False)
    two = run_job(job, RunOptions(out=str(tmp_path / "two"), workers=2), progress=False)
    assert one.ok and two.ok and one.units == 4
    a, b = Store(one.uri).read_records(), Store(two.uri).read_records()
    assert a.num_rows == 16 and rows(a) == rows(b)
    # By hand, units in reverse order, in this process.
    x_all, y_all = load_split("digits", "test")
    units = plan(job, x_all.shape[0])
    by_hand = []
    for u in reversed(units):
        x, y = select(x_all, y_all, list(u.example_ids))
        recs = evaluate(build_defense(u.defense_spec, name=u.defense), u.attack_spec, x, y, list(u.example_ids),
                        job.spec.seed, attack_name=u.attack)
        by_hand += [(r["defense"], r["example_id"], r["adv_logits"], r["linf"], r["broken_by"]) for r in recs]
    ran = sorted(zip(*(a.column(c).to_pylist() for c in ("defense", "example_id", "adv_logits", "linf", "broken_by"))))
    assert sorted(by_hand) == ran
    # A resume recomputes one lost unit and writes the same rows.
    store = Store(two.uri)
    lost = store.list("records", ".parquet")[0]
    store.remove(lost)
    again = run_job(job, RunOptions(out=str(tmp_path / "two"), workers=2), progress=False)
    assert again.ok and again.done == 1 and again.skipped == 3
    assert rows(Store(two.uri).read_records()) == rows(b)

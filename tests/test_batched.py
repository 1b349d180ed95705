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
from pipeline.config import spec
from pipeline.protocol import Batch, build_attack, evaluate
from pipeline.runtime import plan, run_job
from pipeline.store import Store

from conftest import attack_records

PGD = {"kind": "pgd", "eps": 24 / 255, "steps": 10, "loss": "dlr"}
# AutoAttack rand with the smallest budgets that still break many: each case costs seconds, not minutes.
AA_RAND = {"kind": "autoattack", "version": "rand", "n_iter": 2, "eot_iter": 2, "passes": 2}
# (defense, its default model, attack): the plain CNN, MI-PL and RDC-optimal.
AGREEMENT_CASES = {
    "plain-cnn": ({"kind": "plain"}, "erm", PGD),
    "mi-pl": ({"kind": "mi", "mode": "pl"}, "mixup", {**AA_RAND, "eps": 32 / 255}),
    "rdc-optimal": ({"kind": "rdc", "model": "optimal", "timesteps": 10}, None, {**AA_RAND, "eps": 64 / 255}),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", list(AGREEMENT_CASES))
def test_batched_and_per_example_agree_within_the_wilson_interval(default_models, case):
    table, role, attack = AGREEMENT_CASES[case]
    if role is not None:
        default_models(role)
    defense = build_defense(spec({**table, "dataset": "digits"}))
    x, y = load_split("digits", "test")
    n = 128
    x, y, ids = x[:n], y[:n], torch.arange(n)
    batched = attack_records(defense, attack, x, y, ids, seed=0)
    single = attack_records(defense, {**attack, "batched": False}, x, y, ids, seed=0)
    # Scoring passes are seeded by (seed, pass, example id): the clean answers cannot depend on the mode.
    assert [r["clean_correct"] for r in batched] == [r["clean_correct"] for r in single]
    clean = sum(r["clean_correct"] for r in batched)
    k_b, k_s = (sum(r["adv_correct"] for r in recs) for recs in (batched, single))
    (lo_b, hi_b), (lo_s, hi_s) = wilson_interval(k_b, n), wilson_interval(k_s, n)
    # The modes draw differently (unit seed, example seed): their counts differ by sampling error,
    # so the test is that the two 95% intervals overlap.
    assert lo_b <= hi_s and lo_s <= hi_b, (clean, k_b, k_s)
    # The attack did something in both modes (a no-op scores the clean input with the clean passes'
    # draws, hence exactly the clean count): the budget breaks many but not all, a comparison that can fail.
    assert 0 < k_b < 0.8 * clean and 0 < k_s < 0.8 * clean, (clean, k_b, k_s)


def job_doc(cnn):
    return {
        "name": "batched", "seed": 3,
        "data": {"dataset": "digits", "split": "test", "limit": 8, "shard_size": 4},
        "defenses": [{"kind": "plain", "model": cnn}, {"kind": "mi", "mode": "pl", "model": cnn}],
        "attacks": [{"kind": "autoattack", "version": "rand", "eps": 0.1, "n_iter": 3, "eot_iter": 2, "passes": 3,
                     "path": "adaptive"}],
    }


DROP = {"seconds", "worker", "run_id", "node", "attempt"}  # where and by which call, not what


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
        defense = build_defense(u.defense_spec, name=u.defense)
        recs = evaluate(defense, build_attack(u.attack_spec, defense.num_classes, name=u.attack),
                        Batch(x, y, u.example_ids), job.spec.seed).records
        by_hand += [(r.defense, r.example_id, r.adv_logits, r.linf, r.broken_by) for r in recs]
    ran = sorted(zip(*(a.column(c).to_pylist() for c in ("defense", "example_id", "adv_logits", "linf", "broken_by"))))
    assert sorted(by_hand) == ran
    # A resume recomputes one lost unit and writes the same rows.
    store = Store(two.uri)
    lost = store.list("records", ".parquet")[0]
    store.remove(lost)
    again = run_job(job, RunOptions(out=str(tmp_path / "two"), workers=2), progress=False)
    assert again.ok and again.done == 1 and again.skipped == 3
    assert rows(Store(two.uri).read_records()) == rows(b)

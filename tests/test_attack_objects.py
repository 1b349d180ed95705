"""Attacks as objects: budgets read from the configured algorithm, a transfer's eps in its crafting
attack, typed records and worker values, and specs as the only way in."""

from __future__ import annotations

import dataclasses
import pickle
import typing

import pytest
import torch
from pyautoattack import AutoAttack as Library

from pipeline.attacks import PGD, AutoAttack, Transfer
from pipeline.attacks.autoattack import build_autoattack
from pipeline.config import spec
from pipeline.config.attack import PGDSpec, TransferSpec
from pipeline.config.defense import MISpec
from pipeline.config.job import parse_job
from pipeline.defenses import MixupInference, Plain, RDC, build_defense
from pipeline.defenses.lm import LikelihoodMaximization
from pipeline.diffusion.optimal import OptimalEps
from pipeline.errors import ConfigError
from pipeline.protocol import Record, build_attack
from pipeline.protocol.attacking import attacked_model
from pipeline.runtime.plan import plan
from pipeline.runtime.worker import UnitResult, Worker, WorkerContext
from pipeline.store import RECORD_SCHEMA, Store

from conftest import attack_records

CONSTANTS = {"run_id", "job_hash", "unit_id", "worker", "config_hash", "precision", "node", "attempt"}  # what a unit's commit adds to every row


def test_record_fields_are_the_record_schema_less_the_unit_constants():
    fields = dataclasses.fields(Record)
    assert [f.name for f in fields] == [n for n in RECORD_SCHEMA.names if n not in CONSTANTS]
    hints = typing.get_type_hints(Record)
    may_be_null = {f.name for f in fields if type(None) in typing.get_args(hints[f.name])}
    assert may_be_null == {"broken_by", "attack_success"}
    assert may_be_null <= {f.name for f in RECORD_SCHEMA if f.nullable}


@pytest.mark.parametrize("norm", ["Linf", "L2", "L1"])
@pytest.mark.parametrize("version", ["standard", "plus", "rand"])
def test_autoattack_stages_are_the_library_s_own_budget(version, norm):
    # pyautoattack configured by itself, the reference the stages must equal (no defaults retyped).
    lib = Library(None, norm=norm, eps=0.5, version=version, device="cpu")
    lib.verbose = False
    attack = build_attack(spec({"kind": "autoattack", "version": version, "norm": norm, "eps": 0.5}), 10)
    expect = {"apgd-ce": (lib.apgd.n_iter, lib.apgd.n_restarts, 1, lib.apgd.eot_iter),
              "apgd-dlr": (lib.apgd.n_iter, lib.apgd.n_restarts, 1, lib.apgd.eot_iter),
              "apgd-t": (lib.apgd_targeted.n_iter, lib.apgd_targeted.n_restarts, lib.apgd_targeted.n_target_classes,
                         lib.apgd_targeted.eot_iter),
              "fab": (lib.fab.n_iter, lib.fab.n_restarts, 1, 1),
              "fab-t": (lib.fab.n_iter, 1, lib.fab.n_target_classes, 1),
              "square": (lib.square.n_queries, lib.square.n_restarts, 1, 1)}
    assert [s.name for s in attack.stages] == lib.attacks_to_run
    assert {s.name: (s.iterations, s.restarts, s.targets, s.eot) for s in attack.stages} == \
           {name: expect[name] for name in lib.attacks_to_run}
    assert attack.eot == (20 if version == "rand" else 1) and attack.iterations == 100


def test_autoattack_l1_standard_uses_five_target_classes():
    aa_spec = spec({"kind": "autoattack", "norm": "L1", "eps": 12.0})
    configured = build_autoattack(Plain(torch.nn.Flatten(), 10, 1, 8), aa_spec, 10, 0, "cpu")
    assert (configured.apgd_targeted.n_target_classes, configured.fab.n_target_classes) == (5, 9)
    assert (configured.apgd.n_restarts, configured.apgd.use_largereps) == (5, True)
    stages = {s.name: s for s in build_attack(aa_spec, 10).stages}
    assert (stages["apgd-t"].targets, stages["fab-t"].targets, stages["apgd-ce"].restarts) == (5, 9, 5)
    # Linf keeps 9; an override wins; a 4-class defense has 3 classes to target.
    linf = build_autoattack(None, spec({"kind": "autoattack", "eps": 0.1}), 10, 0, "cpu")
    assert linf.apgd_targeted.n_target_classes == 9
    few = build_attack(spec({"kind": "autoattack", "norm": "L1", "eps": 12.0, "n_target_classes": 2}), 10)
    assert {s.targets for s in few.stages if s.name.endswith("-t")} == {2}
    assert {s.targets for s in build_attack(aa_spec, 4).stages if s.name.endswith("-t")} == {3}


def test_scaled_multiplies_iterations_and_eot_in_the_configured_attack():
    pgd = build_attack(spec({"kind": "pgd", "preset": "lee-kim", "restarts": 2}), 10)
    assert isinstance(pgd, PGD) and pgd.scaled(1) is pgd
    assert [(s.iterations, s.eot, s.restarts) for s in pgd.scaled(4).stages] == [(800, 80, 2)]
    assert [(s.iterations, s.eot) for s in pgd.scaled(4, eot=False).stages] == [(800, 20)]
    rand = build_attack(spec({"kind": "autoattack", "version": "rand", "eps": 0.1, "n_iter": 7}), 10)
    doubled = rand.scaled(2)
    configured = build_autoattack(None, doubled.spec, 10, 0, "cpu")  # the doubling is in the library's object
    assert (configured.apgd.n_iter, configured.apgd.eot_iter) == (14, 40)
    assert (doubled.iterations, doubled.eot, rand.scaled(2, eot=False).eot) == (14, 40, 20)


def test_a_transfer_attack_is_its_crafting_attack_on_a_surrogate(linear_classifier):
    surrogate = Plain(linear_classifier, 10, 1, 8)
    surrogate.name = "surrogate"
    table = {"kind": "transfer", "eps": 0.2, "norm": "L2", "surrogate": {"kind": "plain"},
             "attack": {"kind": "pgd", "steps": 5, "eot": 2}}
    parsed = spec(table)
    assert isinstance(parsed, TransferSpec) and isinstance(parsed.attack, PGDSpec)
    assert (parsed.eps, parsed.norm, parsed.attack.eps, parsed.attack.norm) == (0.2, "L2", 0.2, "L2")
    attack = build_attack(parsed, 10, surrogate=surrogate)
    assert isinstance(attack, Transfer) and (attack.eps, attack.norm, attack.name) == (0.2, "L2", "transfer-pgd-eot2")
    assert attack.surrogate is surrogate
    assert attacked_model(Plain(torch.nn.Flatten(), 10, 1, 8), attack) == (surrogate, "transfer:surrogate")
    assert attack.scaled(2).surrogate is surrogate and attack.scaled(2).stages[0].iterations == 10
    with pytest.raises(ConfigError, match="eps is set twice, on the transfer \\(0.2\\) and on its crafting attack"):
        spec({**table, "attack": {"kind": "pgd", "eps": 0.03}})
    with pytest.raises(ConfigError, match="attack.attack: .*'autoattack', 'pgd'"):
        spec({**table, "attack": {"kind": "none"}})
    with pytest.raises(ConfigError, match="a transfer attack needs its surrogate"):
        build_attack(parsed, 10)
    with pytest.raises(ConfigError, match="only a transfer attack takes one, not 'pgd'"):
        build_attack(parsed.attack, 10, surrogate=surrogate)


def test_a_transfer_eps_sweep_attacks_at_each_planned_eps(cnn, tmp_path):
    doc = {"name": "sweep", "seed": 1, "data": {"dataset": "digits", "split": "test", "limit": 3, "shard_size": 3},
           "defenses": [{"kind": "plain", "model": cnn}],
           "attacks": [{"kind": "transfer", "eps": [0.01, 0.05], "surrogate": {"kind": "plain", "model": cnn},
                        "attack": {"kind": "pgd", "steps": 2}, "passes": 1}]}
    job = parse_job(doc)
    units = plan(job, 355)
    assert sorted(u.eps for u in units) == [0.01, 0.05]
    worker, ctx = Worker("w0", "cpu"), WorkerContext("r", job.hash, str(tmp_path), job.spec.seed, job.spec.data)
    results = [worker.run_unit(u, ctx) for u in units]
    assert [r.rows for r in results] == [3, 3]
    rows = Store(str(tmp_path)).read_records("r/records").to_pylist()
    assert sorted({r["eps"] for r in rows}) == [0.01, 0.05]
    by_unit = {u.unit_id: u.eps for u in units}
    assert all(r["eps"] == by_unit[r["unit_id"]] and r["linf"] <= r["eps"] + 1e-6 for r in rows)
    keys = [(r["attack"], r["eps"], r["example_id"]) for r in rows]
    assert len(keys) == len(set(keys)) == 6
    # The crafting attack's eps is the one checked against the image's size.
    from pipeline.config.preflight import preflight

    with pytest.raises(ConfigError, match="attack 'transfer-pgd-ce'.eps: 2 exceeds the largest Linf"):
        preflight(parse_job({**doc, "attacks": [{**doc["attacks"][0], "eps": [0.01, 2.0]}]}))
    # The case, an inner eps beside a swept one, is refused before any work.
    doc["attacks"][0]["attack"]["eps"] = 0.03
    with pytest.raises(ConfigError, match="attacks\\[0\\].*eps is set twice"):
        parse_job(doc)


def test_worker_values_are_frozen_dataclasses_that_survive_pickling(cnn, tmp_path):
    doc = {"name": "w", "data": {"dataset": "digits", "split": "test", "limit": 2, "shard_size": 2},
           "defenses": [{"kind": "plain", "model": cnn}], "attacks": [{"kind": "none", "passes": 1}]}
    job = parse_job(doc)
    ctx = WorkerContext("r", job.hash, str(tmp_path), 0, job.spec.data)
    (unit,) = plan(job, 355)
    result = Worker("w0", "cpu").run_unit(unit, pickle.loads(pickle.dumps(ctx)))
    table = Store(str(tmp_path)).read_table(f"r/{unit.path}")
    passes = sum(table.column("forward_passes").to_pylist()) + sum(table.column("backward_passes").to_pylist())
    assert result == UnitResult(unit.unit_id, 2, result.seconds, "w0", (), 1, evaluations=passes)
    assert pickle.loads(pickle.dumps(result)) == result
    for value in (ctx, result):
        with pytest.raises(dataclasses.FrozenInstanceError):
            value.seed = 1


def test_a_defense_declares_what_an_attacker_may_see(digits):
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 10))
    mi = MixupInference(net, digits.x_train, digits.y_train, 10, mode="pl")
    base = mi.base_classifier()
    assert isinstance(base, Plain) and base.classifier is net and not base.stochastic
    assert mi.likelihood_maximization() is None and mi.stochastic
    model = OptimalEps(digits.x_train, digits.y_train, 10)
    lm = LikelihoodMaximization(model, 10, steps=1)
    rdc = RDC(model, 10, 1, 8, timesteps=2, lm=lm)
    assert rdc.likelihood_maximization() is lm and rdc.base_classifier() is None and rdc.name == "RDC"
    with pytest.raises(ConfigError, match="attack.path: 'oblivious' attacks a defense's base classifier; RDC has none"):
        attack_records(rdc, {"kind": "pgd", "eps": 0.1, "steps": 1, "path": "oblivious"}, digits.x_test[:1],
                       digits.y_test[:1], [0], 0)


def test_specs_are_the_only_way_in():
    assert isinstance(spec({"kind": "mi", "mode": "ol"}), MISpec)
    assert isinstance(build_attack(spec({"kind": "autoattack", "eps": 0.1}), 10), AutoAttack)
    with pytest.raises(ConfigError, match="kind: 'cw' is neither a defense kind .* nor an attack kind"):
        spec({"kind": "cw"})
    with pytest.raises(ConfigError, match="build_defense takes a parsed spec; parse a table with pipeline.config.spec"):
        build_defense({"kind": "plain"})
    with pytest.raises(ConfigError, match="build_attack takes a parsed spec"):
        build_attack({"kind": "pgd"}, 10)


def test_the_stages_predict_the_evaluations_a_pgd_run_spends(linear_classifier, digits):
    plain = Plain(linear_classifier, 10, 1, 8)
    x, y = digits.x_test[:6], digits.y_test[:6]
    keep = (linear_classifier(x).argmax(1) == y).nonzero().flatten()[:4]  # clean-correct: every restart runs on them
    table = {"kind": "pgd", "eps": 1e-4, "steps": 3, "eot": 2, "restarts": 2}
    attack = build_attack(spec(table), 10)
    (stage,) = attack.stages
    records = attack_records(plain, table, x[keep], y[keep], keep.tolist(), 0)
    assert all(r["adv_correct"] for r in records)  # at this eps nothing breaks, so nothing stops early
    # Backward: one input gradient for the masking check, then `eot` per step of every run.
    assert {r["backward_passes"] for r in records} == {1 + stage.runs * stage.iterations * stage.eot}
    # Forward: the masking check, the selection's first judgement, per run its steps plus the last
    # iterate's loss (eot each) and the judgement of incumbent and candidate, then two scoring passes.
    per_run = (stage.iterations + 1) * stage.eot + 2
    assert {r["forward_passes"] for r in records} == {2 + stage.runs * per_run + 2}

"""Attacks and the scoring protocol: success on weak models, valid perturbations, flags, determinism."""

import pytest
import torch

from pipeline.config.attack import parse_attack
from pipeline.protocol import check_perturbation, sweep_flags
from pipeline.defenses import MixupInference, Plain, RDC
from pipeline.defenses.lm import LikelihoodMaximization
from pipeline.diffusion.optimal import OptimalEps
from pipeline.errors import AttackError, ConfigError

from conftest import attack_records, evaluate_table


@pytest.fixture(scope="module")
def data(linear_classifier, digits):
    return linear_classifier, digits.x_train, digits.y_train, digits.x_test[:12], digits.y_test[:12]


def plain(net, name="linear"):
    d = Plain(net, 10, 1, 8)
    d.name = name
    return d


FAST_AA = {"n_iter": 20, "square_queries": 100}


@pytest.mark.parametrize("attack", [
    {"kind": "autoattack", "version": "standard", "norm": "Linf", "eps": 0.5, **FAST_AA},
    {"kind": "autoattack", "version": "standard", "norm": "L2", "eps": 4.0, **FAST_AA},
    {"kind": "autoattack", "version": "standard", "norm": "L1", "eps": 24.0, **FAST_AA},
    {"kind": "autoattack", "version": "custom", "attacks": ["apgd-dlr", "fab"], "eps": 0.5, "n_iter": 20},
    {"kind": "autoattack", "version": "rand", "eps": 0.5, "n_iter": 10, "eot_iter": 2},
    {"kind": "autoattack", "version": "plus", "eps": 0.5, "restarts": 1, **FAST_AA},
    {"kind": "pgd", "eps": 0.5, "steps": 20, "loss": "ce"},
    {"kind": "pgd", "eps": 0.5, "steps": 20, "loss": "dlr"},
    {"kind": "pgd", "norm": "L2", "eps": 4.0, "steps": 20, "loss": "cw", "restarts": 2},
])
def test_every_attack_breaks_a_linear_model_at_large_eps(data, attack):
    net, _, _, x, y = data
    records = attack_records(plain(net), attack, x, y, torch.arange(12), seed=0)
    assert len(records) == 12
    assert sum(r["adv_correct"] for r in records) <= 1
    eps = attack["eps"]
    key = {"Linf": "linf", "L2": "l2", "L1": "l1"}[attack.get("norm", "Linf")]
    assert all(r[key] <= eps * (1 + 1e-5) + 1e-6 for r in records)
    assert all(r["clean_correct"] == (r["clean_pred"] == r["label"]) for r in records)
    assert all(r["passes"] == 1 and r["flags"] == [] for r in records)


def test_small_eps_leaves_accuracy_and_records_the_stage(data):
    net, _, _, x, y = data
    records = attack_records(plain(net), {"kind": "autoattack", "eps": 1 / 255, "n_target_classes": 2, **FAST_AA}, x, y, torch.arange(12), seed=0)
    clean = sum(r["clean_correct"] for r in records)
    assert sum(r["adv_correct"] for r in records) >= clean - 2
    stages = {r["broken_by"] for r in records}
    assert stages <= {None, "clean", "apgd-ce", "apgd-t", "fab-t", "square"}


def test_perturbations_outside_the_ball_or_box_are_errors():
    x = torch.full((2, 1, 2, 2), 0.5)
    check_perturbation(x + 0.1, x, "Linf", 0.1, [0, 1])
    with pytest.raises(AttackError, match="Linf ball"):
        check_perturbation(x + 0.2, x, "Linf", 0.1, [0, 1])
    with pytest.raises(AttackError, match=r"\[0, 1\] box"):
        check_perturbation(x + 0.6, x, "Linf", 1.0, [0, 1])
    with pytest.raises(AttackError, match="L2 ball"):
        check_perturbation(x + 0.1, x, "L2", 0.1, [0, 1])


def test_gradient_masking_raises_the_zero_gradient_flag(data):
    net, _, _, x, y = data

    class Rounded(torch.nn.Module):
        def forward(self, x):
            return net(torch.round(x * 4) / 4)  # piecewise constant: no gradient anywhere

    records = attack_records(plain(Rounded(), "rounded"), {"kind": "pgd", "eps": 0.1, "steps": 5}, x[:3], y[:3], [0, 1, 2], seed=0)
    assert all("zero_gradient" in r["flags"] for r in records)
    # With no gradient to follow, the black-box Square breaks what APGD could not: flagged.
    records = attack_records(plain(Rounded(), "rounded"), {"kind": "autoattack", "version": "custom", "attacks": ["apgd-ce", "square"],
                                                     "eps": 0.3, "n_iter": 10, "square_queries": 300}, x[:6], y[:6], range(6), seed=0)
    by_square = [r for r in records if r["broken_by"] == "square"]
    assert len(by_square) >= 2
    assert all(("square_beat_whitebox" in r["flags"]) == (r["broken_by"] == "square") for r in records)


def test_randomized_defense_without_eot_is_flagged_and_with_eot_is_not(data):
    net, xtr, ytr, x, y = data
    mi = MixupInference(net, xtr, ytr, 10, mode="pl")
    mi.name = "mi-pl"
    no_eot = attack_records(mi, {"kind": "pgd", "eps": 0.1, "steps": 3, "passes": 3}, x[:2], y[:2], [0, 1], seed=0)
    assert all("stochastic_without_eot" in r["flags"] for r in no_eot)
    assert all(r["passes"] == 3 for r in no_eot)
    eot = attack_records(mi, {"kind": "pgd", "eps": 0.1, "steps": 3, "eot": 2, "passes": 3}, x[:2], y[:2], [0, 1], seed=0)
    assert all("stochastic_without_eot" not in r["flags"] for r in eot)
    aa_rand = attack_records(mi, {"kind": "autoattack", "version": "rand", "eps": 0.1, "n_iter": 3, "eot_iter": 2, "passes": 3},
                       x[:2], y[:2], [0, 1], seed=0)
    assert all("stochastic_without_eot" not in r["flags"] for r in aa_rand)
    oblivious = attack_records(mi, {"kind": "pgd", "eps": 0.1, "steps": 3, "path": "oblivious"}, x[:2], y[:2], [0, 1], seed=0)
    assert all(r["path"] == "oblivious" and r["flags"] == [] for r in oblivious)


def test_scoring_votes_and_worst_case_are_consistent(data):
    net, xtr, ytr, x, y = data
    mi = MixupInference(net, xtr, ytr, 10, mode="ol", n_ol=3)
    mi.name = "mi-ol"
    records = attack_records(mi, {"kind": "pgd", "eps": 0.05, "steps": 3, "eot": 2, "passes": 7}, x, y, torch.arange(12), seed=1)
    for r in records:
        assert r["passes"] == 7
        assert r["adv_worst_correct"] <= r["adv_vote_correct"] or r["adv_pass_accuracy"] == 1.0
        assert r["adv_worst_correct"] == (r["adv_pass_accuracy"] == 1.0)
        assert r["clean_worst_correct"] == (r["clean_pass_accuracy"] == 1.0)
        assert r["adv_vote_correct"] == (r["adv_vote_pred"] == r["label"])
        assert r["forward_passes"] > 0 and r["backward_passes"] > 0 and r["seconds"] > 0


def test_per_example_mode_does_not_depend_on_the_batch_and_batched_mode_repeats(data):
    net, xtr, ytr, x, y = data
    mi = MixupInference(net, xtr, ytr, 10, mode="pl", n_pl=4)
    mi.name = "mi-pl"
    attack = {"kind": "autoattack", "version": "rand", "eps": 0.1, "n_iter": 5, "eot_iter": 2, "passes": 3,
              "batched": False}
    ids = torch.arange(40, 44)
    result = evaluate_table(mi, attack, x[:4], y[:4], ids, seed=5)
    together = [r.as_dict() for r in result.records]
    # The attack's evaluations are the records' less the 3 clean and 3 adversarial scoring passes.
    scoring = 4 * 2 * 3 * result.forward_per_prediction
    assert (result.attack.forward, result.attack.backward) == (sum(r["forward_passes"] for r in together) - scoring,
                                                               sum(r["backward_passes"] for r in together))
    assert result.attack.backward > 0
    split = attack_records(mi, attack, x[2:4], y[2:4], ids[2:], seed=5) + attack_records(mi, attack, x[:2], y[:2], ids[:2], seed=5)
    split = split[2:] + split[:2]
    drop = ("seconds",)
    assert [{k: v for k, v in r.items() if k not in drop} for r in together] == \
           [{k: v for k, v in r.items() if k not in drop} for r in split]
    other = attack_records(mi, attack, x[:4], y[:4], ids, seed=6)
    assert [r["adv_logits"] for r in other] != [r["adv_logits"] for r in together]
    batched = {**attack, "batched": True}
    once, again = (attack_records(mi, batched, x[:4], y[:4], ids, seed=5) for _ in range(2))
    assert [{k: v for k, v in r.items() if k not in drop} for r in once] == \
           [{k: v for k, v in r.items() if k not in drop} for r in again]


def test_lm_paths_through_evaluate(data):
    _, xtr, ytr, x, y = data
    model = OptimalEps(xtr, ytr, 10)
    rdc = RDC(model, 10, 1, 8, timesteps=4, lm=LikelihoodMaximization(model, 10, steps=2))
    rdc.name = "rdc-optimal-lm"
    for mode in ("bpda", "exact"):
        records = attack_records(rdc, {"kind": "pgd", "eps": 0.1, "steps": 2, "eot": 2, "passes": 2, "lm_gradient": mode},
                           x[:1], y[:1], [0], seed=0)
        assert records[0]["path"] == f"adaptive+{mode}"
        assert records[0]["flags"] == []
        assert records[0]["linf"] <= 0.1 + 1e-6
    assert rdc.lm.gradient == "bpda"  # restored


def test_transfer_from_a_surrogate(data):
    net, _, _, x, y = data
    target = plain(torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 10)), "target")
    records = attack_records(target, {"kind": "transfer", "surrogate": {"kind": "plain"}, "attack": {"kind": "pgd", "eps": 0.2, "steps": 5}},
                       x[:3], y[:3], [0, 1, 2], seed=0, surrogate=plain(net, "surrogate"))
    assert all(r["path"] == "transfer:surrogate" and r["attack"] == "transfer-pgd-ce" for r in records)


def test_attack_tables_are_validated():
    assert parse_attack({"kind": "pgd", "preset": "lee-kim"}).steps == 200
    spec = parse_attack({"kind": "pgd", "preset": "lee-kim", "eps": 8 / 255})
    assert (spec.eot, spec.step_size) == (20, 0.007)
    with pytest.raises(ConfigError, match="attack.eps"):
        parse_attack({"kind": "pgd", "eps": -1})
    with pytest.raises(ConfigError, match="attack.kind"):
        parse_attack({"kind": "cw"})
    with pytest.raises(ConfigError, match="custom"):
        parse_attack({"kind": "autoattack", "version": "custom"})
    with pytest.raises(ConfigError, match="attack.unknown"):
        parse_attack({"kind": "autoattack", "unknown": 1})


def test_sweep_flags():
    def recs(eps, correct, path="adaptive", attack="a"):
        return [{"defense": "d", "attack": attack, "path": path, "norm": "Linf", "eps": eps, "adv_vote_correct": c}
                for c in correct]

    key = ("d", "a", "adaptive", "Linf")
    healthy = recs(0.01, [1] * 80 + [0] * 20) + recs(0.03, [1] * 50 + [0] * 50) + recs(1.0, [0] * 100)
    assert sweep_flags(healthy)[key] == []
    rising = recs(0.01, [1] * 30 + [0] * 70) + recs(0.03, [1] * 60 + [0] * 40)
    assert sweep_flags(rising)[key] == ["accuracy_rises_with_eps"]
    unbounded = recs(1.0, [1] * 50 + [0] * 50)
    assert sweep_flags(unbounded)[key] == ["unbounded_attack_leaves_accuracy"]
    # A path that sees less (the base classifier, a surrogate) breaks more: the adaptive row is flagged.
    masked = recs(0.03, [1] * 70 + [0] * 30) + recs(0.03, [1] * 40 + [0] * 60, path="oblivious") + \
        recs(0.03, [1] * 68 + [0] * 32, path="transfer:plain", attack="t")
    flags = sweep_flags(masked)
    assert flags[key] == ["oblivious_beats_adaptive"]
    assert flags[("d", "a", "oblivious", "Linf")] == []
    weak = recs(0.03, [1] * 70 + [0] * 30) + recs(0.03, [1] * 30 + [0] * 70, path="transfer:plain", attack="t")
    assert sweep_flags(weak)[key] == ["weaker_than_transfer"]

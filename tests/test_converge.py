"""Budgets that converge: doubled iterations until robust accuracy moves by less than one example."""

import torch

from pipeline.data import load_split
from pipeline.defenses import Plain

from conftest import attack_records


def test_converge_doubles_the_budget_until_accuracy_settles(linear_classifier):
    x, y = load_split("digits", "test")
    x, y = x[:16], y[:16]
    net = Plain(linear_classifier, 10, 1, 8)
    net.name = "linear"
    short = {"kind": "pgd", "eps": 0.5, "steps": 1, "step_size": 0.04, "random_start": False}
    once = attack_records(net, short, x, y, torch.arange(16), seed=0)
    assert all(r["iterations"] == 1 and r["eot"] == 1 for r in once)
    grown = attack_records(net, {**short, "converge": True, "converge_cap": 5}, x, y, torch.arange(16), seed=0)
    used = {r["iterations"] for r in grown}
    assert len(used) == 1 and used.pop() > 1  # one budget for the unit, larger than asked
    assert not any("budget_not_converged" in r["flags"] for r in grown)
    assert sum(r["adv_correct"] for r in grown) < sum(r["adv_correct"] for r in once)
    capped = attack_records(net, {**short, "converge": True, "converge_cap": 1}, x, y, torch.arange(16), seed=0)
    assert all(r["iterations"] == 2 and "budget_not_converged" in r["flags"] for r in capped)

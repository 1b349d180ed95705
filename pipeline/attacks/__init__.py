"""Attacks and the evaluation protocol for stochastic defenses: one record per example."""

from .evaluate import check_perturbation, evaluate, sweep_flags
from .pgd import margin_losses, pgd_attack
from .spec import attack_name, parse_attack

__all__ = ["evaluate", "sweep_flags", "check_perturbation", "pgd_attack", "margin_losses", "parse_attack", "attack_name"]

"""Attacks as objects (base.py: Attack, Stage), one module each: PGD with EOT and best iterate
(pgd.py), AutoAttack through pyautoattack (autoattack.py), transfer from a surrogate
(transfer.py); build.py turns a parsed spec into one."""

from pipeline.attacks.autoattack import AutoAttack
from pipeline.attacks.base import Attack, Clean, Stage
from pipeline.attacks.build import build_attack
from pipeline.attacks.pgd import PGD, margin_losses, pgd_attack
from pipeline.attacks.transfer import Transfer

__all__ = ["Attack", "Stage", "PGD", "AutoAttack", "Transfer", "Clean", "build_attack", "pgd_attack",
           "margin_losses"]

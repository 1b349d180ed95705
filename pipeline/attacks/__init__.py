"""Attacks as objects (base.py: Attack, Stage), one module each: PGD with EOT and best iterate
(pgd.py), AutoAttack through pyautoattack (autoattack.py), transfer from a surrogate
(transfer.py). pipeline.protocol.build_attack builds one from a parsed spec."""

from pipeline.attacks.autoattack import AutoAttack
from pipeline.attacks.base import Attack, Clean, Stage
from pipeline.attacks.pgd import PGD, margin_losses, pgd_attack
from pipeline.attacks.transfer import Transfer

__all__ = ["Attack", "Stage", "PGD", "AutoAttack", "Transfer", "Clean", "pgd_attack", "margin_losses"]

"""Attacks, one module each: PGD with EOT and best iterate (pgd.py), AutoAttack through pyautoattack (autoattack.py)."""

from pipeline.attacks.pgd import margin_losses, pgd_attack

__all__ = ["pgd_attack", "margin_losses"]

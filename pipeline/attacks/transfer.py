"""A transfer attack: a crafting attack (PGD or AutoAttack) run on a surrogate defense; the
points are then scored on the attacked defense. Its eps, norm and budget are the crafting attack's."""

from __future__ import annotations

from torch import nn

from pipeline.attacks.base import Attack
from pipeline.attacks.selection import Selection
from pipeline.config.attack import TransferSpec, attack_name
from pipeline.defenses.base import Defense


class Transfer(Attack):
    def __init__(self, spec: TransferSpec, crafting: Attack, surrogate: Defense, name: str | None = None):
        self.spec, self.crafting, self.surrogate = spec, crafting, surrogate
        self.name = name or attack_name(spec)
        self.stages = crafting.stages

    @property
    def eps(self) -> float:
        return self.crafting.eps

    @property
    def norm(self) -> str:
        return self.crafting.norm

    def scaled(self, k: int, *, eot: bool = True) -> "Transfer":
        return self if k == 1 else Transfer(self.spec, self.crafting.scaled(k, eot=eot), self.surrogate, self.name)

    def run(self, model: nn.Module, select: Selection, seed: int, *, stochastic: bool) -> None:
        self.crafting.run(model, select, seed, stochastic=stochastic)

    def target(self, defense: Defense) -> tuple[Defense, str]:
        return self.surrogate, "transfer:" + self.surrogate.name

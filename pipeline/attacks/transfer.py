"""A transfer attack: a crafting attack (PGD or AutoAttack) run on a surrogate defense; the
points are then scored on the attacked defense. Its eps, norm and budget are the crafting attack's."""

from __future__ import annotations

from torch import nn

from pipeline.attacks.base import Attack
from pipeline.attacks.selection import Selection


class Transfer(Attack):
    def __init__(self, spec, crafting: Attack, surrogate: nn.Module, name: str):
        """spec: a parsed TransferSpec; surrogate: the defense the points are crafted on."""
        self.spec, self.crafting, self.surrogate, self.name = spec, crafting, surrogate, name
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

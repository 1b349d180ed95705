"""What every attack is to the protocol: a name, an eps ball, a budget in stages, and a run.

An attack is built from its parsed spec (`build_attack`) and knows its budget as the configured
algorithm really uses it, stage by stage: a stage runs `restarts` times per target class, each
run `iterations` steps, and each step of a gradient stage averages `eot` input gradients (one
forward and one backward of the attacked model per image each); a query stage (`gradients`
false: Square) spends one forward per iteration. So the network evaluations an attack spends
on one example follow from its stages alone, before anything runs.

The spec's protocol settings (passes, path, lm_gradient, selection_passes, batched, converge)
stay on `attack.spec`; the protocol (pipeline.protocol) reads them there, and decides from the
threat model what the attacker differentiates: the defense, its base classifier, or the
attack's `surrogate` (a transfer's). Attacks know neither specs' parsing nor defenses: an
attack is built from a parsed spec by `pipeline.protocol.build_attack`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

from torch import nn

from pipeline.attacks.selection import Selection


@dataclass(frozen=True)
class Stage:
    """One stage of an attack, with the budget its configured algorithm runs it with."""

    name: str  # what records write in broken_by: "pgd", "apgd-ce", "apgd-dlr", "apgd-t", "fab", "fab-t", "square"
    iterations: int  # steps per run (Square: queries)
    restarts: int = 1  # runs per target class
    targets: int = 1  # target classes (1: untargeted)
    eot: int = 1  # input gradients averaged per step (1 for a stage without EOT)
    gradients: bool = True  # false: a query-only stage (one forward per iteration, no backward)

    @property
    def runs(self) -> int:
        """Runs of the stage on an example that survives them all: restarts times targets."""
        return self.restarts * self.targets


class Attack(ABC):
    """An attack as the protocol runs it. Subclasses set `spec`, `name` and `stages` and
    implement `scaled` and `run`; `eps` and `norm` are the spec's unless a subclass says otherwise."""

    spec: object  # the parsed spec (pipeline.config.attack) it was built from
    name: str  # its name in records (the job's planned name)
    stages: tuple[Stage, ...]
    surrogate: nn.Module | None = None  # the model it crafts on instead of the defense (a transfer's)

    @property
    def eps(self) -> float:
        """The radius of the ball the points stay in (0 when no attack runs)."""
        return self.spec.eps

    @property
    def norm(self) -> str:
        """"Linf", "L2" or "L1"."""
        return self.spec.norm

    @property
    def iterations(self) -> int:
        """Steps per run, as records write them: the most of the gradient stages (of any stage
        when none takes gradients), 0 when no stage runs."""
        chosen = [s for s in self.stages if s.gradients] or list(self.stages)
        return max((s.iterations for s in chosen), default=0)

    @property
    def eot(self) -> int:
        """EOT draws per gradient, as records write them: the most of the gradient stages
        (1 when no stage takes gradients), 0 when no stage runs."""
        if not self.stages:
            return 0
        return max((s.eot for s in self.stages if s.gradients), default=1)

    @property
    def whitebox(self) -> bool:
        """Whether some stage differentiates the model."""
        return any(s.gradients for s in self.stages)

    @abstractmethod
    def scaled(self, k: int, *, eot: bool = True) -> "Attack":
        """The same attack with k times the iterations and, with `eot`, k times the EOT draws
        (a deterministic model gains nothing from more draws); k = 1 gives the attack itself."""

    @abstractmethod
    def run(self, model: nn.Module, select: Selection, seed: int, *, stochastic: bool) -> None:
        """Attack `model` on the examples of `select`, offering every point found to it. seed:
        the run's draws. stochastic: whether a scorer of the points draws afresh per pass (the
        attacked model or the defense behind it), so that best-loss points are offered too."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r}, {self.norm} eps={self.eps:g}, stages={list(self.stages)})"


class Clean(Attack):
    """No attack (kind "none"): the defense is scored on the clean inputs only."""

    def __init__(self, spec, name: str):
        self.spec, self.name, self.stages = spec, name, ()

    @property
    def eps(self) -> float:
        return 0.0

    def scaled(self, k: int, *, eot: bool = True) -> "Clean":
        return self

    def run(self, model, select, seed, *, stochastic) -> None:
        return None

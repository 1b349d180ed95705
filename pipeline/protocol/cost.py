"""The network evaluations a unit will spend, predicted from its defense and attack objects alone.

A record's `forward_passes` / `backward_passes` are the images its group of examples sent
through a network (the defense's `Cost` counter: `cost.forward`, `cost.backward`), shared
evenly among the group's records, plus its share of the R scoring passes. This module
replays `evaluate` (protocol/attacking.py, attacks/*.py, pyautoattack's loops) without running
a network: every call of the attacked model is costed by what the defense object says it does
(`calls`), and every loop runs as many times as the configured attack's `stages` say.

Where the spend depends on outcomes (which examples are still correct when a run starts,
which runs are fooled, Square's early stop, convergence), each count is a range [lo, hi]: lo
when no example needs attacking any more, hi when every example survives every run. Given
the outcome (`attacked`: how many examples the first run attacks), a PGD run with one
restart is exact.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from pipeline.attacks.base import Attack, Stage
from pipeline.defenses.base import Defense
from pipeline.defenses.elbo import ElboEngine
from pipeline.defenses.mi import MixupInference
from pipeline.defenses.plain import Plain
from pipeline.defenses.rdc import RDC
from pipeline.errors import ConfigError
from pipeline.protocol.attacking import attacked_model


@dataclass(frozen=True)
class Span:
    """A count known to lie in [lo, hi] (lo == hi: exact)."""

    lo: float
    hi: float

    @property
    def exact(self) -> bool:
        return self.lo == self.hi

    def __add__(self, other: "Span") -> "Span":
        return Span(self.lo + other.lo, self.hi + other.hi)

    def __contains__(self, value: float) -> bool:
        return self.lo <= value <= self.hi

    def __mul__(self, k: float) -> "Span":
        return Span(self.lo * k, self.hi * k)

    def as_list(self) -> list[float]:
        return [self.lo, self.hi]


ZERO = Span(0, 0)


# --- one call of a defense ------------------------------------------------------------------
def calls(defense: Defense, rows: int, backwards: int = 0, gang: int = 1) -> dict[str, tuple[int, int]]:
    """The network evaluations (forward, backward) of one call of `defense` on `rows` images, by
    what spends them; `backwards`: how many backward passes run through the call's output (0: a
    call without a gradient; FAB's untargeted step runs one per class); `gang`: the actors its
    grid is sharded over (runtime/grid.py), whose members keep no graph: each backward is a VJP
    that evaluates its cells again."""
    if rows == 0:
        return {}
    sharded = gang > 1 and backwards > 0
    if isinstance(defense, Plain):
        return {"classifier": (rows, rows * backwards)}
    if isinstance(defense, MixupInference):
        draws = int(defense.grid().shape[0])
        # The predicted label and Combined's switch take no gradient: their outputs only choose.
        n = rows * draws
        out = {"mi label": (rows, 0), "mi draws": (n + n * backwards if sharded else n, n * backwards)}
        if defense.mode == "combined":
            out["mi switch"] = (rows, 0)
        return out
    if isinstance(defense, RDC):
        out = {}
        if defense.lm is not None:
            n = rows * defense.lm.steps * defense.lm.samples  # each LM step: a forward and a backward per sample
            out["lm steps"] = (n, n)
        # With per-class attack noise the optimal model forms an x_t per class wherever a gradient flows.
        per_class = backwards > 0 and getattr(defense, "attack_noise", "shared") == "per-class"
        n = rows * elbo_evaluations(defense, per_class)
        engine: ElboEngine = defense.elbo
        if backwards == 0:
            out["elbo"] = (n, 0)
        elif not sharded and engine.network() and rows * _pixels(defense) * defense.num_classes <= ElboEngine.JACOBIAN_VALUES:
            out["elbo"] = (n, n)  # input gradients taken in forward, counted once whatever backward does
        else:
            out["elbo"] = (n + n * backwards, n * backwards)  # each backward recomputes its chunks
        return out
    raise ConfigError(f"no cost model for a {type(defense).__name__} defense (pipeline/protocol/cost.py: calls)")


def _pixels(defense: Defense) -> int:
    return defense.in_channels * defense.image_size * defense.image_size


def elbo_evaluations(rdc: RDC, per_class_noise: bool = False) -> int:
    """RDC's network evaluations per image for one logit vector: timesteps x classes, or with
    pruning each stage's timesteps x the classes still in it; the optimal model computes every
    class of an (example, timestep) pair in one evaluation, or of an (example, class, timestep)
    triple when each class draws its own noise."""
    per_class = rdc.elbo.network() or per_class_noise
    if rdc.pruning is None:
        return int(rdc.ts.numel()) * (rdc.num_classes if per_class else 1)
    total, active = 0, rdc.num_classes
    for n, keep in rdc.pruning:
        total += int(rdc.schedule.subsample(n).numel()) * (active if per_class else 1)
        active = min(keep, active)
    return total


def per_prediction(defense: Defense) -> int:
    """Network evaluations of one prediction (one logit vector) of one image, no gradient."""
    return sum(f for f, _ in calls(defense, 1).values())


# --- tallies ----------------------------------------------------------------------------------
@dataclass
class Tally:
    """Network evaluations by (phase, component): forward and backward ranges."""

    parts: dict[tuple[str, str], tuple[Span, Span]] = field(default_factory=dict)

    def add(self, phase: str, model: Defense, rows_lo: int, rows_hi: int, times: int = 1, backwards: int = 0,
            gang: int = 1) -> None:
        """`times` calls of `model`, each on between rows_lo and rows_hi images."""
        lo, hi = calls(model, rows_lo, backwards, gang), calls(model, rows_hi, backwards, gang)
        for comp in set(lo) | set(hi):
            f_lo, b_lo = lo.get(comp, (0, 0))
            f_hi, b_hi = hi.get(comp, (0, 0))
            f, b = self.parts.get((phase, comp), (ZERO, ZERO))
            self.parts[(phase, comp)] = (f + Span(f_lo * times, f_hi * times), b + Span(b_lo * times, b_hi * times))

    def merge(self, other: "Tally", lo_only: bool = False) -> None:
        for key, (f, b) in other.parts.items():
            if lo_only:
                f, b = Span(0, f.hi), Span(0, b.hi)
            f0, b0 = self.parts.get(key, (ZERO, ZERO))
            self.parts[key] = (f0 + f, b0 + b)

    @property
    def forward(self) -> Span:
        return sum((f for f, _ in self.parts.values()), ZERO)

    @property
    def backward(self) -> Span:
        return sum((b for _, b in self.parts.values()), ZERO)

    def as_rows(self) -> list[dict]:
        return [{"phase": p, "component": c, "forward": f.as_list(), "backward": b.as_list()}
                for (p, c), (f, b) in sorted(self.parts.items())]


# --- the attack phase of one group ------------------------------------------------------------
class _Group:
    """The replay of `attack_group` on b rows: the attacked model A, the selection passes S."""

    def __init__(self, defense: Defense, attack: Attack, attacked: Defense, b: int, passes: int, gang: int = 1):
        self.A, self.b, self.tally = attacked, b, Tally()
        self.gang = gang if attacked is defense else 1  # a surrogate or base classifier is not sharded
        self.S = attack.spec.selection_passes or (passes if attacked.stochastic else 1)
        self.stochastic = attacked.stochastic or defense.stochastic

    def select(self, rows_lo: int, rows_hi: int, times: int = 1) -> None:
        """A judgement of rows by the Selection: S fresh passes (one call for a deterministic model)."""
        self.tally.add("selection", self.A, rows_lo, rows_hi, times * (self.S if self.A.stochastic else 1))

    def model(self, phase: str, rows_lo: int, rows_hi: int, times: int = 1, backwards: int = 0) -> None:
        self.tally.add(phase, self.A, rows_lo, rows_hi, times, backwards, self.gang)

    def stage(self, s: Stage, eps: float, first: tuple[int, int]) -> None:
        """One stage of a run, entered by between first[0] and first[1] examples."""
        lo, hi = first
        if hi == 0:
            return
        name, runs = s.name, s.restarts * s.targets
        # Runs after the first one attack the examples still correct: anywhere from none to all.
        later = max(runs - 1, 0)
        if name == "pgd":
            if eps == 0:
                return
            for rows, times in (((lo, hi), 1), ((0, hi), later)):
                self.model(name, *rows, times * s.iterations * s.eot, backwards=1)
                self.model(name, *rows, times * s.eot)  # the last iterate's loss, without a gradient
                self.select(rows[0] * 2, rows[1] * 2, times)
            return
        if name.startswith("apgd") and self.stochastic:
            # protocol restart by restart (attacks/autoattack.py: _apgd_stochastic)
            for rows, times in (((lo, hi), 1), ((0, hi), later)):
                if name == "apgd-t":
                    self.select(*rows, times)  # the target class from mean logits
                self.model(name, *rows, times * (s.iterations + 1) * s.eot, backwards=1)
                self.select(rows[0] * 2, rows[1] * 2, times)
                self.select(0, rows[1] * 2, times)  # the points that fooled one draw, where some did
            return
        self.model(name, lo, hi)  # pyautoattack's perturb: the clean prediction
        for rows, times in (((lo, hi), 1), ((0, hi), later)):
            if name.startswith("apgd"):
                if name == "apgd-t":
                    self.model(name, *rows, times)  # the target class
                self.model(name, *rows, times * (s.iterations + 1) * s.eot, backwards=1)
            elif name.startswith("fab"):
                targeted = name == "fab-t"
                self.model(name, *rows, times * (2 if targeted else 1))  # label (and target) of the run
                self.model(name, *rows, times * s.iterations,
                           backwards=1 if targeted else self.A.num_classes)  # one backward per class
                self.model(name, *rows, times * s.iterations)  # is the iterate adversarial
                self.model(name, *rows, times)  # perturb's check of the run's points
            elif name == "square":
                self.model(name, *rows, times)  # the initial margins
                self.model(name, 0, rows[1], times * s.iterations)  # a query per still-correct example
                self.model(name, *rows, times)  # perturb's check of the run's points
            else:
                raise ConfigError(f"no cost model for the attack stage {name!r} (pipeline/protocol/cost.py)")
        self.select(lo * 2, hi * 2)


def _attack_phase(defense: Defense, attack: Attack, attacked: Defense, b: int, passes: int,
                  attacked_rows: int | None, gang: int = 1) -> Tally:
    g = _Group(defense, attack, attacked, b, passes, gang)
    g.model("gradient check", b, b, backwards=1)
    if not attack.stages:
        return g.tally
    g.select(b, b)
    doublings = attack.spec.converge_cap + 1 if attack.spec.converge else 1
    for k in range(doublings):
        ran = attack.scaled(2 ** k, eot=attacked.stochastic)
        run = _Group(defense, ran, attacked, b, passes, gang)
        for i, s in enumerate(ran.stages):
            if i == 0 and k == 0:
                first = (0, b) if attacked_rows is None else (attacked_rows, attacked_rows)
            else:
                first = (0, b)  # examples left by the stages and runs before
            run.stage(s, ran.eps, first)
        # Convergence stops after the second run at the earliest: the rest may not run.
        g.tally.merge(run.tally, lo_only=k >= 2)
    return g.tally


# --- a unit -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class UnitCost:
    """The predicted network evaluations of one unit of n examples.

    attack: the attack phase (all groups), by (phase, component); scoring: the R passes over
    clean and adversarial inputs; forward / backward: the sums of the unit's records'
    `forward_passes` / `backward_passes` (each record's share rounded as `evaluate` rounds it).
    """

    examples: int
    attack: Tally
    scoring: Tally
    forward: Span
    backward: Span

    @property
    def exact(self) -> bool:
        return self.forward.exact and self.backward.exact

    def as_dict(self) -> dict:
        return {"examples": self.examples, "forward": self.forward.as_list(), "backward": self.backward.as_list(),
                "parts": self.attack.as_rows() + self.scoring.as_rows()}


def unit_cost(defense: Defense, attack: Attack, n: int, *, attacked: int | None = None, gang: int = 1) -> UnitCost:
    """The network evaluations `evaluate(defense, attack, Batch of n examples, seed)` records,
    on `gang` actors (runtime/scheduler.py: gang_size).

    attacked: given the outcome, how many examples the attack's first run attacks (those its
    selection finds correct in some pass); it applies to a batched attack only.
    """
    spec = attack.spec
    passes = spec.passes if defense.stochastic else 1
    model, _ = attacked_model(defense, attack)
    groups = [n] if spec.batched else [1] * n
    given = attacked if spec.batched else None
    tally, per_record = Tally(), []
    for b in (g for g in groups if g):
        t = _attack_phase(defense, attack, model, b, passes, given, gang)
        tally.merge(t)
        per_record.append((b, t))
    scoring = Tally()
    scoring.add("scoring", defense, n, n, 2 * passes)
    share = scoring.forward.lo / max(n, 1)
    # evaluate writes each record round(group's evaluations / b + its scoring share)
    fwd = Span(sum(b * round(t.forward.lo / b + share) for b, t in per_record),
               sum(b * round(t.forward.hi / b + share) for b, t in per_record))
    bwd = Span(sum(b * round(t.backward.lo / b) for b, t in per_record),
               sum(b * round(t.backward.hi / b) for b, t in per_record))
    return UnitCost(n, tally, scoring, fwd, bwd)


__all__ = ["Span", "Tally", "UnitCost", "calls", "elbo_evaluations", "per_prediction", "unit_cost"]

"""The attack phase of one group of examples (a unit's batch, or one example): the attack and its
convergence doublings, decided over fresh passes, with the costs and flags each record keeps."""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass

import torch
from torch import nn

from pipeline import rng
from pipeline.attacks.base import Attack
from pipeline.attacks.selection import Selection, model_score
from pipeline.defenses.base import Defense
from pipeline.errors import ConfigError
from pipeline.protocol.checks import gradient_flags
from pipeline.protocol.predict import predict
from pipeline.protocol.seeds import SELECT


class _Counted(nn.Module):
    """The model an attack sees: counts its calls (queries) and the gradients taken through it."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model, self.queries, self.gradients = model, 0, 0

    def forward(self, x):
        out = self.model(x)
        self.queries += x.shape[0]
        if out.requires_grad:
            def count(grad):
                self.gradients += x.shape[0]
            out.register_hook(count)
        return out


def attacked_model(defense: Defense, attack: Attack) -> tuple[Defense, str]:
    """What the threat model lets the attacker differentiate, and the record's `path` for it: the
    attack's surrogate (transfer), the defense's base classifier (oblivious), or the defense itself
    (adaptive; through its LM with the spec's gradient mode, else the LM's own)."""
    if attack.surrogate is not None:
        return attack.surrogate, "transfer:" + attack.surrogate.name
    if attack.spec.path == "oblivious":
        base = defense.base_classifier()
        if base is None:
            raise ConfigError(f"attack.path: 'oblivious' attacks a defense's base classifier; "
                              f"{type(defense).__name__} has none")
        return base, "oblivious"
    lm = defense.likelihood_maximization()
    return defense, "adaptive" if lm is None else "adaptive+" + (attack.spec.lm_gradient or lm.gradient)


@contextlib.contextmanager
def lm_gradient(defense: Defense, mode: str | None):
    """Temporarily set how gradients cross the defense's likelihood maximization."""
    lm = defense.likelihood_maximization()
    if mode is None or lm is None:
        yield
        return
    before, lm.gradient = lm.gradient, mode
    try:
        yield
    finally:
        lm.gradient = before


@dataclass(frozen=True)
class Row:
    """What the attack phase leaves for one example's record."""

    flags: list[str]
    broken_by: str | None
    attack_success: bool | None
    queries: float
    gradients: float
    forward: float
    backward: float
    seconds: float
    iterations: int
    eot: int
    attacked: bool


def _selection(counted: _Counted, attacked: Defense, x, y, ids, group_seed: int, passes: int, batch_size: int):
    """A Selection judging by `passes` fresh passes of the attacked model (one if deterministic)."""
    if not attacked.stochastic:
        return Selection(x, y, model_score(counted, 1))
    base = rng.seed_of(group_seed, SELECT)

    def score(xs: torch.Tensor, rows: torch.Tensor, k: int) -> torch.Tensor:
        counted.queries += passes * xs.shape[0]
        return torch.stack([predict(attacked, xs, ids[rows.cpu()], seed=rng.seed_of(base, k, s), batch_size=batch_size)
                            for s in range(passes)]).to(xs.device)
    return Selection(x, y, score)


def attack_group(defense: Defense, attack: Attack, attacked: Defense, x, y, ids, seed: int, passes: int,
                 batch_size: int) -> tuple[torch.Tensor, list[Row]]:
    """Attack the rows x (b, ...) together; returns (x_adv, one Row per row)."""
    b, modules = x.shape[0], {defense, attacked}
    for module in modules:
        module.bind(None, seed=seed)
        module.cost.reset()
    counted, start = _Counted(attacked), time.perf_counter()
    flags, group_flags = gradient_flags(counted, x, y), []
    x_adv, broken, attacked_rows, ran = x.clone(), [None] * b, [False] * b, attack
    if attack.stages:
        S = attack.spec.selection_passes or (passes if attacked.stochastic else 1)
        select, before = _selection(counted, attacked, x, y, ids, seed, S, batch_size), None
        if attacked.stochastic and attack.eot == 1:
            group_flags.append("stochastic_without_eot")
        for k in range(attack.spec.converge_cap + 1 if attack.spec.converge else 1):
            ran = attack.scaled(2 ** k, eot=attacked.stochastic)
            ran.run(counted, select, seed if k == 0 else rng.seed_of(seed, 2 ** k),
                    stochastic=attacked.stochastic or defense.stochastic)
            robust = int((select.acc >= 0.5).sum())
            if before is not None and abs(robust - before) < 1:
                break
            before = robust
        else:
            if attack.spec.converge:
                group_flags.append("budget_not_converged")
        x_adv, broken = select.best, select.broken_by()
        attacked_rows = [attack.eps > 0 and float(a) > 0 for a in select.start_acc]
    seconds = (time.perf_counter() - start) / b
    forward, backward = (sum(getattr(m.cost, k) for m in modules) / b for k in ("forward", "backward"))
    rows = [Row(flags[i] + group_flags + (["square_beat_whitebox"] if broken[i] == "square" and attack.whitebox else []),
                broken[i], None if not attack.stages else broken[i] is not None, counted.queries / b,
                counted.gradients / b, forward, backward, seconds, ran.iterations, ran.eot, attacked_rows[i])
            for i in range(b)]
    return x_adv, rows

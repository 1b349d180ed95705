"""AutoAttack (Croce & Hein 2020) through the `pyautoattack` package, one stage at a time.

The ensemble runs as in `AutoAttack.run_standard_evaluation`: each stage attacks the
examples still classified correctly, from the clean input, on the whole batch. Running the
stages here rather than inside the package lets us record which stage broke each example and
judge a stochastic defense over many fresh passes (selection.py) rather than one.

The budget is pyautoattack's own for the version and norm (e.g. L1 "standard": APGD with 5
restarts, APGD-T on 5 target classes, FAB-T on 9), with the spec's overrides applied on top;
`AutoAttack.stages` reads it back from the configured object, never from a copy of its defaults.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from pipeline.attacks.base import Attack, Stage
from pipeline.attacks.selection import Selection

_QUIET = logging.getLogger("robustsweep.autoattack")
_QUIET.addHandler(logging.NullHandler())
_QUIET.propagate = False


def build_autoattack(model: nn.Module | None, spec, num_classes: int, seed: int, device):
    """A configured `pyautoattack.AutoAttack`: version, norm, eps and the budget overrides of spec
    (a parsed pipeline.config.attack.AutoAttackSpec).

    Target classes are the version's own (spec.n_target_classes overrides them), at most the
    K - 1 classes there are. model may be None to read the budget without attacking.
    """
    from pyautoattack import AutoAttack as Library

    custom = spec.version == "custom"
    aa = Library(model, attacks=list(spec.attacks) if custom else None, device=device, eps=spec.eps,
                    norm=spec.norm, seed=seed, version=spec.version)
    aa.verbose = False
    aa.logger = _QUIET
    for attack in (aa.apgd, aa.apgd_targeted):
        attack.logger = _QUIET
    if spec.n_iter is not None:
        for attack in (aa.apgd, aa.apgd_targeted):
            attack.n_iter = attack.n_iter_orig = spec.n_iter
            # APGD's checkpoint schedule is set from n_iter in its constructor.
            attack.n_iter_2 = max(int(0.22 * spec.n_iter), 1)
            attack.n_iter_min = max(int(0.06 * spec.n_iter), 1)
            attack.size_decr = max(int(0.03 * spec.n_iter), 1)
        aa.fab.n_iter = spec.n_iter
    if spec.restarts is not None:
        aa.apgd.n_restarts = aa.fab.n_restarts = spec.restarts
    if spec.eot_iter is not None:
        aa.apgd.eot_iter = aa.apgd_targeted.eot_iter = spec.eot_iter
    if spec.square_queries is not None:
        aa.square.n_queries = spec.square_queries
    for attack in (aa.apgd_targeted, aa.fab):
        attack.n_target_classes = min(spec.n_target_classes or attack.n_target_classes, num_classes - 1)
    return aa


def stages_of(aa) -> tuple[Stage, ...]:
    """The stages `aa` runs, each with the budget its configured sub-attack holds."""
    apgd, targeted, fab, square = aa.apgd, aa.apgd_targeted, aa.fab, aa.square
    budget = {
        "apgd-ce": lambda: Stage("apgd-ce", apgd.n_iter, apgd.n_restarts, 1, apgd.eot_iter),
        "apgd-dlr": lambda: Stage("apgd-dlr", apgd.n_iter, apgd.n_restarts, 1, apgd.eot_iter),
        "apgd-t": lambda: Stage("apgd-t", targeted.n_iter, targeted.n_restarts, targeted.n_target_classes,
                                targeted.eot_iter),
        "fab": lambda: Stage("fab", fab.n_iter, fab.n_restarts),
        # FAB-T runs one restart per target class (_run_stage), whatever fab.n_restarts says.
        "fab-t": lambda: Stage("fab-t", fab.n_iter, 1, fab.n_target_classes),
        "square": lambda: Stage("square", square.n_queries, square.n_restarts, gradients=False),
    }
    return tuple(budget[name]() for name in aa.attacks_to_run)


class AutoAttack(Attack):
    """AutoAttack through pyautoattack, its stages and budget read from the configured object."""

    def __init__(self, spec, num_classes: int, name: str):
        self.spec, self.num_classes, self.name = spec, num_classes, name
        aa = build_autoattack(None, spec, num_classes, 0, "cpu")
        self.stages = stages_of(aa)
        # What `scaled` multiplies: APGD's iterations and the EOT draws of its gradient stages.
        self._apgd = (aa.apgd.n_iter, max(aa.apgd.eot_iter, aa.apgd_targeted.eot_iter))

    def scaled(self, k: int, *, eot: bool = True) -> "AutoAttack":
        if k == 1:
            return self
        n_iter, eot_iter = self._apgd
        update = {"n_iter": n_iter * k, "eot_iter": eot_iter * k if eot else self.spec.eot_iter}
        return AutoAttack(self.spec.model_copy(update=update), self.num_classes, self.name)

    def run(self, model: nn.Module, select: Selection, seed: int, *, stochastic: bool) -> None:
        run_autoattack(build_autoattack(model, self.spec, self.num_classes, seed, select.x.device), select,
                       stochastic=stochastic)


def _run_stage(aa, stage: str, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    if stage in ("apgd-ce", "apgd-dlr"):
        aa.apgd.loss = stage.split("-")[1]
        aa.apgd.seed = aa.seed
        return aa.apgd.perturb(x, y)
    if stage == "apgd-t":
        aa.apgd_targeted.seed = aa.seed
        return aa.apgd_targeted.perturb(x, y)
    if stage in ("fab", "fab-t"):
        aa.fab.targeted = stage == "fab-t"
        if aa.fab.targeted:
            aa.fab.n_restarts = 1
        aa.fab.seed = aa.seed
        return aa.fab.perturb(x, y)
    if stage == "square":
        aa.square.seed = aa.seed
        return aa.square.perturb(x, y)
    raise ValueError(f"unknown AutoAttack stage {stage!r}")


def run_autoattack(aa, select: Selection, *, stochastic: bool) -> None:
    """Run the stages of `aa` on the examples of `select` that some pass still gets right.

    Each stage attacks those examples from their clean input and offers its points to
    `select`, which keeps a point only where fresh passes say it fools more: a stage never
    throws a found point away. For a stochastic model the APGD stages are run restart by
    restart here, so that their best-loss point is offered too, not only a point that fooled
    one draw, and the first restart starts from the best point so far.
    """
    with torch.random.fork_rng(devices=[]):  # the stages reseed torch's global generator
        for stage in aa.attacks_to_run:
            todo = select.todo()
            if todo.numel() == 0:
                break
            xs, ys = select.x[todo].clone(), select.y[todo].clone()
            if stochastic and stage.startswith("apgd"):
                _apgd_stochastic(aa, stage, select, todo)
            else:
                select.offer(_run_stage(aa, stage, xs, ys).to(xs.dtype), todo, stage)


def _apgd_stochastic(aa, stage: str, select: Selection, rows: torch.Tensor) -> None:
    """APGD (Croce & Hein 2020, alg. 1) restart by restart: offers each run's best-loss point
    and, where one draw was fooled, its fooled point."""
    targeted = stage == "apgd-t"
    attack = aa.apgd_targeted if targeted else aa.apgd
    if not targeted:
        attack.loss = stage.split("-")[1]
    attack.seed = aa.seed
    attack.init_hyperparam(select.x[rows])
    torch.random.manual_seed(aa.seed)
    targets = range(2, attack.n_target_classes + 2) if targeted else [None]
    for target_class in targets:
        for restart in range(attack.n_restarts):
            todo = rows[(select.acc[rows.cpu()] > 0).to(rows.device)]
            if todo.numel() == 0:
                return
            xs, ys = select.x[todo].clone(), select.y[todo].clone()
            if targeted:
                attack.y_target = select.mean_logits(xs, todo).sort(dim=1)[1][:, -target_class].to(ys.device)
            found = [o is not None for o in (select.origin[i] for i in todo.tolist())]
            x_init = None
            if restart == 0 and target_class in (None, 2) and any(found):
                x_init = torch.where(torch.tensor(found, device=xs.device).view(-1, 1, 1, 1),
                                     select.best[todo], _apgd_start(attack, xs))
            best_loss, acc, _, fooled = attack.attack_single_run(xs, ys, x_init=x_init)
            select.offer(best_loss.to(xs.dtype), todo, stage)
            hit = (acc == 0).nonzero().flatten()
            if hit.numel():
                select.offer(fooled[hit].to(xs.dtype), todo[hit], stage)


def _apgd_start(attack, x: torch.Tensor) -> torch.Tensor:
    """APGD's random start (as in `attack_single_run`): a point of the ball's surface direction."""
    if attack.norm == "Linf":
        t = 2 * torch.rand(x.shape).to(x.device) - 1
    else:
        t = torch.randn(x.shape).to(x.device)
    if attack.norm == "L1":
        from pyautoattack.autopgd_base import L1_projection

        return (x + t + L1_projection(x, t, attack.eps)).clamp(0, 1)
    return (x + attack.eps * attack.normalize(t)).clamp(0, 1)

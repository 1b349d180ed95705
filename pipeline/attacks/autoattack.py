"""AutoAttack (Croce & Hein 2020) through the `pyautoattack` package, one stage at a time.

The ensemble runs as in `AutoAttack.run_standard_evaluation`: each stage attacks the
examples still classified correctly, from the clean input. Running the stages here rather
than inside the package lets us record which stage broke each example, and keeps each
example's attack a function of its own seed.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

_QUIET = logging.getLogger("robustsweep.autoattack")
_QUIET.addHandler(logging.NullHandler())
_QUIET.propagate = False


def build_autoattack(model: nn.Module, spec, num_classes: int, seed: int, device):
    """A configured `pyautoattack.AutoAttack`: version, norm, eps and the budget overrides of spec."""
    from pyautoattack import AutoAttack

    custom = spec.version == "custom"
    aa = AutoAttack(model, attacks=list(spec.attacks) if custom else None, device=device, eps=spec.eps,
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
    targets = min(spec.n_target_classes or 9, num_classes - 1)
    aa.apgd_targeted.n_target_classes = aa.fab.n_target_classes = targets
    return aa


def eot_iterations(aa) -> int:
    """The EOT iterations the gradient-based stages of `aa` use."""
    return max(aa.apgd.eot_iter, aa.apgd_targeted.eot_iter)


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


def run_autoattack(aa, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, list[str | None]]:
    """(x_adv, broken_by): x (B, C, H, W) in [0, 1]; broken_by[i] names the stage that fooled
    example i in AutoAttack's own single-pass check, or None (robust, or wrong already: "clean")."""
    x_adv = x.clone()
    broken: list[str | None] = [None] * x.shape[0]
    with torch.random.fork_rng(devices=[]):  # the stages reseed torch's global generator
        with torch.no_grad():
            robust = model(x).argmax(1) == y
        for i in (~robust).nonzero().flatten().tolist():
            broken[i] = "clean"
        for stage in aa.attacks_to_run:
            todo = robust.nonzero().flatten()
            if todo.numel() == 0:
                break
            adv = _run_stage(aa, stage, x[todo].clone(), y[todo].clone()).to(x.dtype)
            with torch.no_grad():
                fooled = model(adv).argmax(1) != y[todo]
            for k, i in enumerate(todo.tolist()):
                if fooled[k]:
                    x_adv[i] = adv[k]
                    robust[i] = False
                    broken[i] = stage
    return x_adv, broken

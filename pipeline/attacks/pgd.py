"""PGD (Madry et al. 2018) with expectation over transformation (Athalye et al. 2018).

Each step averages the input gradient of the loss over `eot` calls of the model, each call
a fresh draw of a randomized defense, then takes a steepest-ascent step for the norm:

    Linf: delta <- clip_eps(delta + alpha sign(g))      L2: delta <- proj_eps(delta + alpha g / ||g||_2)

and keeps x + delta in [0, 1]. Restarts begin at random points of the ball; each keeps its
best iterate by the EOT loss, and fresh passes choose among the restarts (selection.py).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.attacks.base import Attack, Stage
from pipeline.attacks.selection import Selection, model_score


def margin_losses(logits: torch.Tensor, y: torch.Tensor, loss: str) -> torch.Tensor:
    """Per-example losses to maximise: "ce", "cw" (max_{i!=y} z_i - z_y), "dlr" (Croce & Hein 2020, eq. 6)."""
    if loss == "ce":
        return F.cross_entropy(logits, y, reduction="none")
    z_y = logits.gather(1, y[:, None]).squeeze(1)
    others = logits.clone()
    others.scatter_(1, y[:, None], float("-inf"))
    best_other = others.max(1).values
    if loss == "cw":
        return best_other - z_y
    top = logits.sort(1, descending=True).values
    return (best_other - z_y) / (top[:, 0] - top[:, 2] + 1e-12)


def _project(delta: torch.Tensor, x: torch.Tensor, eps: float, norm: str) -> torch.Tensor:
    if norm == "Linf":
        delta = delta.clamp(-eps, eps)
    else:
        n = delta.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, 1, 1, 1)
        delta = delta * torch.clamp(eps / n, max=1.0)
    return (x + delta).clamp(0, 1) - x


def _random_start(x: torch.Tensor, eps: float, norm: str, gen: torch.Generator) -> torch.Tensor:
    if norm == "Linf":
        return (torch.rand(x.shape, generator=gen, dtype=x.dtype) * 2 - 1).to(x.device) * eps
    d = torch.randn(x.shape, generator=gen, dtype=x.dtype).to(x.device)
    d = d / d.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, 1, 1, 1)
    r = torch.rand(x.shape[0], generator=gen, dtype=x.dtype).to(x.device) ** (1.0 / x[0].numel())
    return d * (eps * r).view(-1, 1, 1, 1)


def pgd_attack(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, eps: float, norm: str = "Linf",
               steps: int = 100, step_size: float | None = None, eot: int = 1, restarts: int = 1,
               loss: str = "ce", random_start: bool = True, seed: int = 0,
               select: Selection | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(x_adv, fooled): x (B, C, H, W) in [0, 1], y (B,). x_adv stays in the eps ball and in [0, 1].

    Each restart keeps its best iterate by the EOT loss (the mean of the `eot` losses at that
    iterate, the last iterate included); the restarts' points are then offered to `select`,
    which keeps a point only where fresh passes say it fools more (default: a Selection over
    `eot` calls of the model). Restarts go on for examples still correct in some pass.
    `fooled` (B,) says whether the kept point is wrong in most selection passes. Draws come
    from a generator seeded by `seed`.
    """
    alpha = step_size if step_size is not None else 2.5 * eps / steps
    gen = torch.Generator().manual_seed(seed)
    x = x.detach()
    if select is None:
        select = Selection(x, y, model_score(model, eot))
    for _ in range(restarts):
        todo = select.todo()
        if todo.numel() == 0 or eps == 0:
            break
        xs, ys = x[todo], y[todo]
        delta = _random_start(xs, eps, norm, gen) if random_start else torch.zeros_like(xs)
        delta = _project(delta, xs, eps, norm)
        best, best_loss = _best_iterate(model, xs, ys, delta, eps=eps, norm=norm, steps=steps, alpha=alpha,
                                        eot=eot, loss=loss)
        select.offer(best, todo, "pgd")
    return select.best.clone(), torch.tensor([b not in (None, "clean") for b in select.broken_by()], dtype=torch.bool)


def _best_iterate(model, xs, ys, delta, *, eps, norm, steps, alpha, eot, loss):
    """The iterate of one PGD run with the highest EOT loss, and that loss (b,)."""
    best = xs + delta
    best_loss = torch.full((xs.shape[0],), float("-inf"), dtype=torch.float64, device=xs.device)
    for t in range(steps + 1):
        grad = torch.zeros_like(xs)
        value = torch.zeros(xs.shape[0], dtype=torch.float64, device=xs.device)
        for _ in range(eot):
            d = delta.clone().requires_grad_(t < steps)
            with torch.set_grad_enabled(t < steps):
                losses = margin_losses(model(xs + d), ys, loss)
                if t < steps:
                    grad += torch.autograd.grad(losses.sum(), d)[0]
            value += losses.detach().double()
        value /= eot  # the EOT loss: E_draws[L(x + delta)] (Athalye et al. 2018, eq. 3)
        up = value > best_loss
        best = torch.where(up.view(-1, 1, 1, 1), (xs + delta).detach(), best)
        best_loss = torch.where(up, value, best_loss)
        if t == steps:
            break
        if norm == "Linf":
            step = alpha * grad.sign()
        else:
            step = alpha * grad / grad.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, 1, 1, 1)
        delta = _project(delta.detach() + step, xs, eps, norm)
    return best, best_loss


class PGD(Attack):
    """PGD with EOT and restarts, as its spec configures it: one stage "pgd"."""

    def __init__(self, spec, name: str):
        """spec: a parsed PGD spec (pipeline.config.attack.PGDSpec)."""
        self.spec, self.name = spec, name
        self.stages = (Stage("pgd", spec.steps, restarts=spec.restarts, eot=spec.eot),)

    def scaled(self, k: int, *, eot: bool = True) -> "PGD":
        if k == 1:
            return self
        return PGD(self.spec.model_copy(update={"steps": self.spec.steps * k,
                                                "eot": self.spec.eot * (k if eot else 1)}), self.name)

    def run(self, model: nn.Module, select: Selection, seed: int, *, stochastic: bool) -> None:
        s = self.spec
        pgd_attack(model, select.x, select.y, eps=s.eps, norm=s.norm, steps=s.steps, step_size=s.step_size, eot=s.eot,
                   restarts=s.restarts, loss=s.loss, random_start=s.random_start, seed=seed, select=select)

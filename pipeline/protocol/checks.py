"""Sanity checks of an evaluation, apart from the protocol (after AutoAttack's `checks.py`).

Per input: the perturbation lies in its ball and box (a violation raises), and the input
gradient is neither zero nor NaN (gradient masking). Per record: `returned_clean` (a
stochastic defense's adversarial input is the clean input although the attack ran on it) and
`single_pass_optimistic` (the first pass is right but most passes are wrong). Per sweep
(pipeline.flags, torch-free for the report): robust accuracy that rises with eps, stays up under an
unbounded attack, or is higher on a path that sees more than another one
(`weaker_than_transfer`, `oblivious_beats_adaptive`).
"""

from __future__ import annotations

import torch
from torch import nn

from pipeline.errors import AttackError
from pipeline.flags import FLAGS as SWEEP_FLAGS, flags_of, sweep_flags  # noqa: F401 (the sweep's checks)

TOLERANCE = 1e-6  # slack for float rounding when checking the eps ball and the box


def norms(delta: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-example Linf, L2 and L1 norms of perturbations (B, C, H, W)."""
    flat = delta.detach().flatten(1).double()
    return {"linf": flat.abs().max(1).values, "l2": flat.norm(dim=1), "l1": flat.abs().sum(1)}


def check_perturbation(x_adv: torch.Tensor, x: torch.Tensor, norm: str, eps: float, ids) -> None:
    """AttackError unless every x_adv lies in [0, 1] and within eps of x in `norm`."""
    if not torch.isfinite(x_adv).all():
        raise AttackError(f"attack returned NaN or infinite values (examples {list(ids)})")
    x_adv = x_adv.detach()
    lo, hi = float(x_adv.min()), float(x_adv.max())
    if lo < -TOLERANCE or hi > 1 + TOLERANCE:
        raise AttackError(f"attack left the [0, 1] box: values in [{lo:.6g}, {hi:.6g}] (examples {list(ids)})")
    size = norms(x_adv - x)[{"Linf": "linf", "L2": "l2", "L1": "l1"}[norm]]
    bad = (size > eps * (1 + 1e-5) + TOLERANCE).nonzero().flatten().tolist()
    if bad:
        raise AttackError(f"attack left the {norm} ball of eps {eps:.6g}: example {ids[bad[0]]} at {float(size[bad[0]]):.6g}")


def gradient_flags(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> list[list[str]]:
    """Per row of x: zero or NaN input gradient of the CE loss at the clean input (masking)."""
    xg = x.clone().requires_grad_(True)
    with torch.enable_grad():
        loss = torch.nn.functional.cross_entropy(model(xg), y, reduction="sum")
        (g,) = torch.autograd.grad(loss, xg, allow_unused=True)
    if g is None:
        return [["zero_gradient"] for _ in range(x.shape[0])]
    flat = g.flatten(1)
    finite = torch.isfinite(flat).all(1).tolist()
    zero = (flat.abs().amax(1) == 0).tolist()
    return [["nan_gradient"] if not f else ["zero_gradient"] if z else [] for f, z in zip(finite, zero)]


def record_flags(record: dict, *, stochastic: bool, attacked: bool) -> list[str]:
    """Flags of one record: returned_clean (stochastic, attacked, adversarial input = clean)
    and single_pass_optimistic (first pass right, most of the R passes wrong)."""
    found = []
    if stochastic and attacked and record["linf"] == 0.0:
        found.append("returned_clean")
    if record["adv_correct"] and record["adv_pass_accuracy"] < 0.5:
        found.append("single_pass_optimistic")
    return found

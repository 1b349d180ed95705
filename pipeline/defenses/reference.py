"""RDC's logits written as a plain loop: the reference the engine is checked and timed against.

    logit_y(x) = -(1/|S|) sum_{t in S} || eps_theta(sqrt(a_t) (2x - 1) + s_t e_t, t, y) - e_t ||^2 / tau + log p(y)

(Chen et al. 2024, eq. 4-5), computed the way the published code does: one example at a time,
one class at a time, the timesteps in chunks of `chunk`, the model called as loaded. The noise
e_t is the defense's own (rng.ELBO_NOISE of the draw), so the two agree to rounding. The tests
compare the engine's values and gradients with it; `robustsweep bench elbo` times both.
"""

from __future__ import annotations

import torch
from torch import nn

from pipeline import rng
from pipeline.diffusion.schedule import VPSchedule
from pipeline.rng import Draw


def reference_logits(eps_model: nn.Module, x: torch.Tensor, ts: torch.Tensor, draw: Draw, num_classes: int, *,
                     schedule: VPSchedule | None = None, temperature: float = 1.0,
                     log_prior: torch.Tensor | None = None, chunk: int = 64) -> torch.Tensor:
    """Logits (B, num_classes) of RDC on x (B, C, H, W) in [0, 1] at timesteps ts, differentiable in x.

    draw: the draws of the B rows (their e_t); log_prior: log p(y) (num_classes,), None for uniform.
    """
    schedule = schedule or VPSchedule()
    noise = draw.normal(rng.ELBO_NOISE, ts, tuple(x.shape[1:]), dtype=x.dtype, device=x.device)  # (B, |S|, C, H, W)
    ts = ts.to(x.device)
    rows = []
    for i in range(x.shape[0]):
        row = []
        for c in range(num_classes):
            total = 0.0
            for start in range(0, ts.numel(), chunk):
                t, e = ts[start:start + chunk], noise[i, start:start + chunk]
                sqrt_a, s = schedule.coefficients(t, x.dtype)
                x_t = sqrt_a.view(-1, 1, 1, 1) * (2 * x[i:i + 1] - 1) + s.view(-1, 1, 1, 1) * e
                eps = eps_model(x_t, t, torch.full_like(t, c))
                total = total + (eps - e).pow(2).sum()
            row.append(-total / (ts.numel() * temperature))
        rows.append(torch.stack(row))
    logits = torch.stack(rows)
    return logits if log_prior is None else logits + log_prior.to(logits)


__all__ = ["reference_logits"]

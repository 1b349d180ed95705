"""Which candidate point to keep, judged over S fresh passes of a (possibly stochastic) model.

A randomized defense answers differently on every call, so one call cannot tell whether a
point fools it (Athalye et al. 2018; Carlini et al. 2019). Every decision of an attack (is
the example still correct, did a stage break it, which of two points to keep) is taken here
over S passes with fresh draws, scoring the incumbent and the candidate under the same draws
(common random numbers), and a candidate replaces the incumbent only when it is better:

    better = p_c < p_i  or  (p_c = p_i and m_c > m_i)

with p the fraction of passes that predict the label and m the mean margin
max_{k != y} z_k - z_y over the passes (Carlini & Wagner 2017, eq. 6 with kappa = 0). The
clean input is the first incumbent, so a stage can never replace a found point with it.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

Score = Callable[[torch.Tensor, torch.Tensor, int], torch.Tensor]
"""score(x_rows (b, C, H, W), rows (b,) indices into the batch, k) -> logits (S, b, K): S
passes with fresh draws, a function of (rows' examples, k); equal rows in one call share draws."""


def margins(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """max_{k != y} z_k - z_y per row of logits (..., K) with labels y broadcast to (...)."""
    z_y = logits.gather(-1, y.expand(logits.shape[:-1]).unsqueeze(-1)).squeeze(-1)
    others = logits.scatter(-1, y.expand(logits.shape[:-1]).unsqueeze(-1), float("-inf"))
    return others.max(-1).values - z_y


def model_score(model: torch.nn.Module, passes: int = 1) -> Score:
    """A Score from `passes` plain calls of `model` (exact for a deterministic model)."""
    def score(xs: torch.Tensor, rows: torch.Tensor, k: int) -> torch.Tensor:
        with torch.no_grad():
            return torch.stack([model(xs) for _ in range(passes)])
    return score


class Selection:
    """The best point found so far for each example of a batch, and how well it fools.

    x (B, C, H, W) clean inputs, y (B,) labels, score: see `Score`. `acc` (B,) is the fraction
    of passes still correct at the incumbent, `margin` (B,) its mean margin, `origin` the stage
    that produced it (None: the clean input).
    """

    def __init__(self, x: torch.Tensor, y: torch.Tensor, score: Score):
        self.x, self.y, self.score = x.detach(), y, score
        self.k = 0
        self.best = self.x.clone()
        self.origin: list[str | None] = [None] * x.shape[0]
        rows = torch.arange(x.shape[0], device=x.device)
        self.acc, self.margin = self._judge(self.x, rows) if x.shape[0] else (torch.zeros(0), torch.zeros(0))
        self.start_acc = self.acc.clone()

    def _judge(self, xs: torch.Tensor, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self.score(xs, rows, self.k).detach().float()
        self.k += 1
        y = self.y[rows].to(logits.device)
        acc = (logits.argmax(-1) == y).double().mean(0).cpu()
        return acc, margins(logits, y).double().mean(0).cpu()

    def todo(self) -> torch.Tensor:
        """Rows whose incumbent is still correct in some pass (worth attacking further)."""
        return (self.acc > 0).nonzero().flatten().to(self.x.device)

    def mean_logits(self, xs: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """Logits (b, K) averaged over S fresh passes (e.g. to rank target classes)."""
        logits = self.score(xs, rows, self.k).detach()
        self.k += 1
        return logits.mean(0)

    def offer(self, candidate: torch.Tensor, rows: torch.Tensor, stage: str) -> torch.Tensor:
        """Keep candidate (b, C, H, W) for `rows` where it is better; returns which (b,) bool."""
        if rows.numel() == 0:
            return torch.zeros(0, dtype=torch.bool)
        candidate = candidate.detach().to(self.best.dtype)
        b = rows.numel()
        acc, margin = self._judge(torch.cat([self.best[rows], candidate]), torch.cat([rows, rows]))
        acc_i, acc_c, m_i, m_c = acc[:b], acc[b:], margin[:b], margin[b:]
        better = (acc_c < acc_i) | ((acc_c == acc_i) & (m_c > m_i))
        rows_cpu = rows.cpu()
        self.acc[rows_cpu] = torch.where(better, acc_c, acc_i)
        self.margin[rows_cpu] = torch.where(better, m_c, m_i)
        keep = better.nonzero().flatten()
        if keep.numel():
            self.best[rows[keep.to(rows.device)]] = candidate[keep.to(candidate.device)]
            for j in keep.tolist():
                self.origin[int(rows_cpu[j])] = stage
        return better

    def broken_by(self) -> list[str | None]:
        """Per row: "clean" when the clean input is wrong in most passes; else the stage of the
        incumbent when it is wrong in most passes; else None (the example survived)."""
        out: list[str | None] = []
        for i in range(self.x.shape[0]):
            if float(self.start_acc[i]) < 0.5:
                out.append("clean")
            elif float(self.acc[i]) < 0.5:
                out.append(self.origin[i] or "clean")
            else:
                out.append(None)
        return out

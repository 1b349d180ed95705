"""Mixup Inference (Pang, Xu, Zhu, ICLR 2020): average a mixup-trained classifier over mixed inputs.

For an input x with prediction y^ = argmax F(x), each of N draws mixes x with a clean sample
x_s from the pool (the training split) and the outputs are averaged (paper Alg. 1):

    MI-PL:  x_s ~ pool of class y^                              (predicted label)
    MI-OL:  c ~ U({0..K-1} minus {y^}), x_s ~ pool of class c    (other labels)
    p(x)  = (1/N) sum_n softmax F(lambda x + (1 - lambda) x_s^n)

MI-Combined runs both: gap = max softmax F(x) - max p_PL(x); below the threshold it answers
MI-PL, else MI-OL. The output is log p, so attacks see a proper log-probability.
"""

from __future__ import annotations

import torch
from torch import nn

from pipeline import rng
from pipeline.errors import ConfigError
from pipeline.rng import Draw
from pipeline.defenses.base import Defense
from pipeline.defenses.plain import Plain

PL, OL = 0, 1
MODES = ("pl", "ol", "combined")


class MixupInference(Defense):
    """MI logits log p (B, K) for x (B, C, H, W) in [0, 1].

    classifier: x in [0, 1] -> logits; pool_x (N, C, H, W), pool_y (N,): the training split.
    Defaults follow the reference code: lambda 0.5; N 10 (PL), 30 (OL); Combined with
    N_PL 5, N_OL 15 and threshold 0.2.
    """

    stochastic = True
    cell_columns = 2  # (kind, draw)

    def __init__(self, classifier: nn.Module, pool_x: torch.Tensor, pool_y: torch.Tensor, num_classes: int, *,
                 mode: str = "pl", lam: float = 0.5, n_pl: int | None = None, n_ol: int | None = None,
                 threshold: float = 0.2, seed: int = 0):
        super().__init__(num_classes, pool_x.shape[1], pool_x.shape[2], seed)
        if mode not in MODES:
            raise ConfigError(f"mi mode must be one of {MODES}, got {mode!r}")
        if not 0.0 <= lam <= 1.0:
            raise ConfigError(f"lambda must be in [0, 1], got {lam}")
        defaults = {"pl": (10, 0), "ol": (0, 30), "combined": (5, 15)}[mode]
        self.n_pl = defaults[0] if n_pl is None or mode == "ol" else n_pl
        self.n_ol = defaults[1] if n_ol is None or mode == "pl" else n_ol
        if self.n_pl < 0 or self.n_ol < 0 or self.n_pl + self.n_ol == 0:
            raise ConfigError(f"mi needs a positive number of draws, got n_pl={self.n_pl}, n_ol={self.n_ol}")
        self.classifier, self.mode, self.lam, self.threshold = classifier, mode, float(lam), float(threshold)
        order = torch.argsort(pool_y, stable=True)
        counts = torch.bincount(pool_y, minlength=num_classes)
        if (counts == 0).any():
            raise ConfigError(f"the MI pool lacks classes {torch.nonzero(counts == 0).flatten().tolist()}")
        self.register_buffer("pool_x", pool_x[order].contiguous(), persistent=False)
        self.register_buffer("pool_y", pool_y[order].contiguous(), persistent=False)
        self.register_buffer("class_start", (torch.cumsum(counts, 0) - counts), persistent=False)
        self.register_buffer("class_count", counts, persistent=False)

    def base_classifier(self) -> Defense:
        return Plain(self.classifier, self.num_classes, self.in_channels, self.image_size)

    def grid(self) -> torch.Tensor:
        """Cells (N_PL + N_OL, 2): rows (kind, n), kind 0 = PL draw, 1 = OL draw."""
        pl = torch.stack([torch.zeros(self.n_pl, dtype=torch.int64), torch.arange(self.n_pl)], 1)
        ol = torch.stack([torch.ones(self.n_ol, dtype=torch.int64), torch.arange(self.n_ol)], 1)
        return torch.cat([pl, ol])

    def predicted(self, x: torch.Tensor) -> torch.Tensor:
        """y^ = argmax F(x), (B,), without a graph (a label carries no gradient)."""
        with torch.no_grad():
            self.cost.forward += x.shape[0]
            return self.classifier(x).argmax(1).cpu()

    def samples(self, y_hat: torch.Tensor, cells: torch.Tensor, draw: Draw) -> torch.Tensor:
        """Pool indices (B, n_cells) of the mixing partners: pure functions of (seed, id, call, cell)."""
        kind, n = cells[:, 0], cells[:, 1]
        K = self.num_classes
        # OL: a class uniform among the K - 1 others: draw in [0, K-1), skip y^.
        other = draw.integers(rng.MI_CLASS, n, K - 1)
        other = other + (other >= y_hat[:, None]).long()
        cls = torch.where(kind[None, :] == PL, y_hat[:, None], other)
        index = n + kind * (1 << 20)  # PL and OL draws of the same n are independent
        j = draw.integers(rng.MI_SAMPLE, index, self.class_count.cpu()[cls])
        return self.class_start.cpu()[cls] + j

    def partial(self, x: torch.Tensor, cells: torch.Tensor, draw: Draw) -> torch.Tensor:
        """Sums of softmax F(lambda x + (1 - lambda) x_s) per kind: (B, 2, K)."""
        self.check_cells(cells)
        B, n_cells = x.shape[0], cells.shape[0]
        idx = self.samples(self.predicted(x), cells, draw)  # (B, n_cells)
        x_s = self.pool_x[idx.reshape(-1).to(self.pool_x.device)].to(x)
        mixed = self.lam * x.repeat_interleave(n_cells, 0) + (1.0 - self.lam) * x_s  # MI eq. (5)
        probs = torch.softmax(self.cost.count(self.classifier(mixed), B * n_cells), dim=1).view(B, n_cells, -1)
        kind = cells[:, 0].to(x.device)
        return torch.stack([probs[:, kind == PL].sum(1), probs[:, kind == OL].sum(1)], dim=1)

    def finish(self, x: torch.Tensor, total: torch.Tensor, draw: Draw) -> torch.Tensor:
        tiny = torch.finfo(total.dtype).tiny
        p_pl = total[:, PL] / max(self.n_pl, 1)
        p_ol = total[:, OL] / max(self.n_ol, 1)
        if self.mode == "pl":
            return torch.log(p_pl.clamp_min(tiny))
        if self.mode == "ol":
            return torch.log(p_ol.clamp_min(tiny))
        use_pl = (self.gap(x, total) < self.threshold)[:, None]
        return torch.log(torch.where(use_pl, p_pl, p_ol).clamp_min(tiny))

    def gap(self, x: torch.Tensor, total: torch.Tensor) -> torch.Tensor:
        """MI-Combined's switch, (B,): max softmax F(x) - max p_PL(x), from the partial sums `total`
        (B, 2, K) of the grid; below the threshold Combined answers MI-PL, else MI-OL."""
        p_pl = total[:, PL] / max(self.n_pl, 1)
        return torch.softmax(self.cost.count(self.classifier(x), x.shape[0]), 1).max(1).values - p_pl.max(1).values

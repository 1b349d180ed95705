"""The closed-form optimal epsilon model of a finite training set (Chen et al. 2024, section 3).

For a data set D (in model space, 2x - 1) the minimiser of the DDPM loss is

    eps*(x_t, t, y) = sum_{x_i in D_y} (x_t - sqrt(a_t) x_i) / s_t * softmax_i(-||x_t - sqrt(a_t) x_i||^2 / (2 s_t^2))

with D_y the images of class y, or all of D for the null class. Since ||x_t||^2 is the same
for every i, the softmax logits reduce to (2 sqrt(a_t) <x_t, x_i> - a_t ||x_i||^2) / (2 s_t^2):
one matmul, and no cancellation of large squared norms.
"""

from __future__ import annotations

import torch
from torch import nn

from pipeline.errors import InputError
from pipeline.diffusion.schedule import VPSchedule


class OptimalEps(nn.Module):
    """eps*(x_t, t, y) for a fixed training set; no parameters, exact.

    x_train: float (N, C, H, W) in [0, 1]; y_train: int64 (N,) in [0, num_classes).
    Class `num_classes` is the null class (unconditional: the whole set). The softmax logits
    scale as 1/s_t^2 (about 1e4 at t = 0), so the model computes in `precision` (float64 by
    default) and returns the input's dtype: float32 rounding there would make the result
    depend on how cells are batched.
    """

    def __init__(self, x_train: torch.Tensor, y_train: torch.Tensor, num_classes: int,
                 schedule: VPSchedule | None = None, precision: torch.dtype = torch.float64):
        super().__init__()
        if x_train.dim() != 4 or y_train.shape != (x_train.shape[0],):
            raise InputError(f"OptimalEps wants x_train (N,C,H,W) and y_train (N,), got {tuple(x_train.shape)} and {tuple(y_train.shape)}")
        self.num_classes = num_classes
        self.schedule = schedule or VPSchedule()
        self.image_shape = tuple(x_train.shape[1:])
        self.precision = precision
        order = torch.argsort(y_train, stable=True)
        data = (2.0 * x_train[order].to(precision) - 1.0).flatten(1)
        labels = y_train[order]
        counts = torch.bincount(labels, minlength=num_classes)
        if (counts == 0).any():
            raise InputError(f"OptimalEps needs every class in the training set; missing classes {torch.nonzero(counts == 0).flatten().tolist()}")
        # Per-class padded index (K, N_max) into `data`: lets one softmax run over every class at once.
        starts = torch.cumsum(counts, 0) - counts
        n_max = int(counts.max())
        slot = torch.arange(n_max)
        index = starts[:, None] + slot[None, :]
        valid = slot[None, :] < counts[:, None]
        self.register_buffer("data", data)  # (N, P) in [-1, 1]
        self.register_buffer("labels", labels)
        self.register_buffer("sq_norm", (data * data).sum(1))  # ||x_i||^2
        self.register_buffer("class_valid", valid)
        # The data padded per class, (K, N_max, P) with zero rows in the padding, and its norms.
        self.register_buffer("class_data", torch.where(valid[:, :, None], data[torch.where(valid, index, 0)], 0.0))
        self.register_buffer("class_sq_norm", (self.class_data * self.class_data).sum(2))

    def _logits(self, x_t: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Softmax logits over D, (M, N), and the (M, 1) coefficients sqrt(a_t), s_t."""
        sqrt_a, s = self.schedule.coefficients(t, x_t.dtype)
        sqrt_a, s = sqrt_a[:, None], s[:, None]
        data = self.data
        inner = x_t.flatten(1) @ data.T
        # -||x_t - sqrt(a) x_i||^2 / (2 s^2), without the i-independent ||x_t||^2.
        logits = (2.0 * sqrt_a * inner - sqrt_a**2 * self.sq_norm.to(self.precision)[None, :]) / (2.0 * s**2)
        return logits, sqrt_a, s

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """eps* for cells: x_t (M, C, H, W) in model space, t (M,) int64, y (M,) int64 in [0, K]."""
        out_dtype, x_t = x_t.dtype, x_t.to(self.precision)
        logits, sqrt_a, s = self._logits(x_t, t)
        conditional = (y < self.num_classes)[:, None]
        same_class = self.labels[None, :] == y[:, None]
        logits = logits.masked_fill(conditional & ~same_class, float("-inf"))
        x0_hat = torch.softmax(logits, dim=1) @ self.data.to(self.precision)  # E[x_0 | x_t, y]
        eps = (x_t.flatten(1) - sqrt_a * x0_hat) / s
        return eps.view_as(x_t).to(out_dtype)

    def all_classes(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """eps* for every class at once: x_t (M, C, H, W), t (M,) -> (M, K, C, H, W).

        One distance matmul per noisy input against the data padded per class (K, N_max), so
        that each class's softmax and posterior mean are one batched reduction.
        """
        out_dtype, x_t = x_t.dtype, x_t.to(self.precision)
        sqrt_a, s = self.schedule.coefficients(t, x_t.dtype)
        sqrt_a, s = sqrt_a[:, None, None], s[:, None, None]
        K, n_max, P = self.class_data.shape
        inner = (x_t.flatten(1) @ self.class_data.view(K * n_max, P).T).view(-1, K, n_max)
        per_class = (2.0 * sqrt_a * inner - sqrt_a**2 * self.class_sq_norm) / (2.0 * s**2)
        weights = torch.softmax(per_class.masked_fill(~self.class_valid, float("-inf")), dim=2)
        x0_hat = torch.einsum("mkn,knp->mkp", weights, self.class_data)  # E[x_0 | x_t, y] per class
        eps = (x_t.flatten(1)[:, None, :] - sqrt_a * x0_hat) / s
        return eps.view(x_t.shape[0], self.num_classes, *self.image_shape).to(out_dtype)

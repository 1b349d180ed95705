"""The ELBO engine: squared errors ||eps_theta(x_t, t, y) - e_t||^2 of any set of evaluations, and their input gradients.

A diffusion classifier (rdc.py) needs, for every (example, class, timestep) it scores,

    err = || eps_theta(sqrt(a_t) (2x - 1) + s_t e_t, t, y) - e_t ||^2

with one noise e_t per (example, t) shared by all classes (or, for `Evaluations.per_class`,
one per (example, class, t): the RDC authors' gradient path), and a weighted sum of them per
(example, class). `ElboEngine` computes them; the caller says which evaluations and with what
weights (`Evaluations`), and keeps the paper's equations to itself.

Evaluations are ordered by (example, t) "pair" and cut into chunks of whole pairs, at most
`batch_size` network inputs each (fewer on CPU, where a cache-sized chunk is faster:
engine.chunk_size). Per chunk, x_t and everything of the network that does not depend on the
class (the UNet's `shared`, engine.ClassSharing) are computed once per pair, and the rest once
per (pair, class). A model with `all_classes` (the optimal model, engine.AllClasses) computes
every class of a pair from one distance matmul.

Input gradients are exact and memory-bounded. With a network, the forward pass also takes each
evaluation's gradient at the stem output (one backward, chunk by chunk, engine.LinearStem) and
keeps their weighted sums per (example, class), so backward is a contraction with the upstream
gradient (`errors_with_grads`). With `all_classes`, or when B * K images of gradients exceed
`JACOBIAN_VALUES`, backward recomputes chunk by chunk (`errors_vjp`).

How the network itself runs (layouts, autocast, torch.compile, the class-sharing split) is
engine.py's concern; none of it changes what is computed here.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from pipeline import rng
from pipeline.defenses import engine
from pipeline.defenses.base import Cost
from pipeline.defenses.engine import EngineOptions
from pipeline.diffusion.schedule import NoiseSchedule
from pipeline.errors import ConfigError
from pipeline.models.unet import gather_rows
from pipeline.rng import Draw


@dataclass(frozen=True)
class Evaluations:
    """A set of ELBO terms: row ex (E,) of the batch, class cls (E,), timestep ts[j] (E,), weight (E,).

    per_class: each class draws its own noise at (example, t) instead of sharing one.
    """

    ex: torch.Tensor
    cls: torch.Tensor
    j: torch.Tensor
    ts: torch.Tensor
    weight: torch.Tensor
    per_class: bool = False


# --- the order of evaluations ---------------------------------------------------------------
@dataclass(frozen=True)
class Plan:
    """Evaluations in (example, t) pair order, cut into chunks of whole pairs.

    order (E,): evaluation indices sorted by pair; pair (P,): the distinct pair ids
    ex * n_ts + j, ascending; first (P + 1,): where each pair's evaluations start in
    `order`; bounds: chunks as (first pair, end pair).
    """

    order: torch.Tensor
    pair: torch.Tensor
    first: torch.Tensor
    bounds: list[tuple[int, int]]

    def members(self, p0: int, p1: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The evaluations of pairs [p0, p1): idx (E_c,) into the evaluations, and rows (E_c,),
        the pair of each counted from p0."""
        idx = self.order[self.first[p0]:self.first[p1]]
        rows = torch.repeat_interleave(torch.arange(p1 - p0), self.first[p0 + 1:p1 + 1] - self.first[p0:p1])
        return idx, rows


def plan(ex: torch.Tensor, j: torch.Tensor, n_ts: int, step: int, per_pair: int | None = None) -> Plan:
    """Chunks of whole pairs of the evaluations (ex (E,), j (E,)), each of at most `step`
    network inputs and at least one pair. A pair costs its number of evaluations, or
    `per_pair` inputs for a model that computes all classes of a pair in one call."""
    key = ex * n_ts + j
    order = torch.argsort(key, stable=True)
    pair, counts = torch.unique_consecutive(key[order], return_counts=True)
    first = torch.cat([torch.zeros(1, dtype=torch.int64), torch.cumsum(counts, 0)])
    cost = first if per_pair is None else torch.arange(pair.numel() + 1) * per_pair
    bounds, p, n = [], 0, pair.numel()
    while p < n:
        # The last pair boundary within `step` inputs of this chunk's start.
        end = int(torch.searchsorted(cost, cost[p] + step, right=True)) - 1
        end = min(max(end, p + 1), n)
        bounds.append((p, end))
        p = end
    return Plan(order, pair, first, bounds)


# --- the engine -------------------------------------------------------------------------------
class ElboEngine:
    """The squared errors of `Evaluations` on eps_model, their weighted sums and input gradients.

    eps_model(x_t, t, y) -> eps, class `num_classes` the null class; schedule: a_t and s_t;
    batch_size: network inputs per call (the memory budget); options: how the network runs;
    cost: the counter that every network evaluation is added to (the defense's).
    """

    # Per-(example, class) input gradients cost B * K images of memory; above this many
    # values, backward recomputes instead.
    JACOBIAN_VALUES = 1 << 27

    def __init__(self, eps_model: nn.Module, schedule: NoiseSchedule, num_classes: int, batch_size: int,
                 options: EngineOptions | None = None, cost: Cost | None = None):
        if batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
        self.eps_model = eps_model
        self.schedule = schedule
        self.num_classes = num_classes
        self.batch_size = batch_size
        self.options = options or EngineOptions()
        self.cost = Cost() if cost is None else cost

    # --- the sums the caller differentiates -----------------------------------------------
    def weighted_sum(self, x: torch.Tensor, ev: Evaluations, draw: Draw) -> torch.Tensor:
        """out (B, K) = sum over e at (b, k) of weight_e err_e, differentiable in x."""
        return _WeightedSum.apply(x, self, ev, draw)

    def weighted_sum_vjp(self, x: torch.Tensor, ev: Evaluations, draw: Draw, grad_out: torch.Tensor) -> torch.Tensor:
        """grad_out (B, K)^T d weighted_sum / dx, recomputed chunk by chunk."""
        w = grad_out[ev.ex.to(grad_out.device), ev.cls.to(grad_out.device)] * ev.weight.to(grad_out)
        return self.errors_vjp(x, ev, draw, w)

    # --- the noise and the chunks ---------------------------------------------------------
    def noise(self, draw: Draw, ts: torch.Tensor, x: torch.Tensor, per_class: bool = False) -> torch.Tensor:
        """e_t for every row and timestep in ts: (B, len(ts), C, H, W), shared by all classes;
        per_class: (B, K, len(ts), C, H, W), class k's at draw index (k + 1) T + t, apart from the shared ones."""
        shape = tuple(x.shape[1:])
        if not per_class:
            return draw.normal(rng.ELBO_NOISE, ts, shape, dtype=x.dtype, device=x.device)
        K, T = self.num_classes, self.schedule.T
        index = (torch.arange(1, K + 1).view(-1, 1) * T + ts.view(1, -1)).reshape(-1)
        noise = draw.normal(rng.ELBO_NOISE, index, shape, dtype=x.dtype, device=x.device)
        return noise.view(x.shape[0], K, ts.numel(), *shape)

    def _pair_rows(self, ev: Evaluations) -> torch.Tensor:
        """What a "pair" shares an x_t by: the row, or with per-class noise the (row, class)."""
        return ev.ex * self.num_classes + ev.cls if ev.per_class else ev.ex

    def network(self) -> bool:
        """Whether eps_model is a network evaluated per class (not the optimal model's all_classes)."""
        return not isinstance(self.eps_model, engine.AllClasses)

    def chunks(self, ev: Evaluations, x: torch.Tensor) -> Plan:
        """The evaluations in (example, t) order, cut into chunks of whole pairs."""
        rows = self._pair_rows(ev)
        if self.network():
            return plan(rows, ev.j, ev.ts.numel(), engine.chunk_size(self.options, self.batch_size, x))
        # One all_classes call computes every class of a pair: a pair costs K network inputs.
        return plan(rows, ev.j, ev.ts.numel(), min(self.options.chunk or self.batch_size, self.batch_size),
                    per_pair=self.num_classes)

    def _noisy(self, x: torch.Tensor, noise: torch.Tensor, ts: torch.Tensor, pairs: torch.Tensor):
        """x_t = sqrt(a_t) (2x - 1) + s_t e_t, e_t and t for pairs ex * len(ts) + j (with per-class
        noise, (ex * K + class) * len(ts) + j): (M, C, H, W), (M, C, H, W), (M,)."""
        ex, j = (pairs // ts.numel()).to(x.device), (pairs % ts.numel()).to(x.device)
        sqrt_a, s = self.schedule.coefficients(ts.to(x.device), x.dtype)
        shape = (-1,) + (1,) * (x.dim() - 1)
        if noise.dim() == x.dim() + 2:  # per-class noise (B, K, n_ts, ...)
            ex, c = ex // self.num_classes, ex % self.num_classes
            e = noise[ex, c, j]
        else:
            e = noise[ex, j]
        x_t = sqrt_a[j].view(shape) * (2.0 * x[ex] - 1.0) + s[j].view(shape) * e
        return x_t, e, ts.to(x.device)[j]

    def _chunk_errors(self, x: torch.Tensor, noise: torch.Tensor, ev: Evaluations, chunks: Plan,
                      chunk: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Squared errors (E_c,) of the evaluations of one chunk, and their indices (E_c,) into ev."""
        p0, p1 = chunk
        idx, rows = chunks.members(p0, p1)
        rows = rows.to(x.device)
        x_t, e, t = self._noisy(x, noise, ev.ts, chunks.pair[p0:p1])
        y = ev.cls[idx].to(x.device)
        if not self.network():
            eps = self.eps_model.all_classes(x_t, t)  # (M, K, C, H, W)
            return (eps - e.unsqueeze(1)).pow(2).flatten(2).sum(2)[rows, y], idx
        calls = engine.prepare(self.eps_model, self.options, x.device, grad=torch.is_grad_enabled())
        with engine.autocast(self.options, x.device):
            eps = calls["conditional"](calls["shared"](engine.memory_format(self.options, x_t), t), rows, y)
        return (eps.to(x.dtype) - e.index_select(0, rows)).pow(2).flatten(1).sum(1), idx

    # --- errors and their gradients -------------------------------------------------------
    def errors(self, x: torch.Tensor, ev: Evaluations, draw: Draw) -> torch.Tensor:
        """||eps_theta(x_t, t, y) - e_t||^2 for every evaluation, (E,); no graph is kept."""
        noise = self.noise(draw, ev.ts, x, ev.per_class)
        chunks = self.chunks(ev, x)
        err = x.new_zeros(ev.ex.numel())
        for chunk in chunks.bounds:
            e, idx = self._chunk_errors(x, noise, ev, chunks, chunk)
            err[idx.to(x.device)] = e
        self.cost.forward += ev.ex.numel() if self.network() else chunks.pair.numel()
        return err

    def errors_vjp(self, x: torch.Tensor, ev: Evaluations, draw: Draw, w: torch.Tensor) -> torch.Tensor:
        """d/dx sum_e w_e err_e for known weights w (E,), chunk by chunk so memory stays bounded.

        The class-independent part of the network runs once per (example, t) (per (example,
        class, t) with per-class noise) and receives the sum of its classes' gradients.
        """
        noise = self.noise(draw, ev.ts, x, ev.per_class)
        chunks = self.chunks(ev, x)
        grad = torch.zeros_like(x)
        for chunk in chunks.bounds:
            with torch.enable_grad():
                xg = x.detach().requires_grad_(True)
                err, idx = self._chunk_errors(xg, noise, ev, chunks, chunk)
                (g,) = torch.autograd.grad(err, xg, w[idx.to(w.device)].to(err))
            grad += g
        n = ev.ex.numel() if self.network() else chunks.pair.numel()
        self.cost.forward += n
        self.cost.backward += n
        return grad

    def grads_in_forward(self, x: torch.Tensor) -> bool:
        """Whether forward takes the input gradients (a network, and B * K images fit the budget)."""
        return self.network() and x.numel() * self.num_classes <= self.JACOBIAN_VALUES

    def errors_with_grads(self, x: torch.Tensor, ev: Evaluations, draw: Draw) -> tuple[torch.Tensor, torch.Tensor]:
        """err (E,) as `errors`, and jac (B, K, C, H, W) = sum over e at (b, k) of weight_e d err_e / dx_b.

        One forward and one backward per chunk. Each evaluation gets its own copy of its
        pair's stem output h, so one backward gives every d err_e / dh_e; the stem is linear
        and x_t = sqrt(a_t)(2x - 1) + s_t e_t, so d err_e / dx = 2 sqrt(a_t) stem^T(d err_e / dh_e),
        and the weighted sums are taken before the (linear) stem^T.
        """
        noise = self.noise(draw, ev.ts, x, ev.per_class)
        chunks = self.chunks(ev, x)
        B, K = x.shape[0], self.num_classes
        model = self.eps_model
        calls = engine.prepare(model, self.options, x.device, grad=True)
        sqrt_a, _ = self.schedule.coefficients(ev.ts.to(x.device), x.dtype)
        coef = ev.weight.to(x) * 2.0 * sqrt_a[ev.j.to(x.device)]
        ex, cls = ev.ex.to(x.device), ev.cls.to(x.device)
        err = x.new_zeros(ev.ex.numel())
        g_sum = None
        for p0, p1 in chunks.bounds:
            idx, rows = (v.to(x.device) for v in chunks.members(p0, p1))
            x_t, e, t = self._noisy(x, noise, ev.ts, chunks.pair[p0:p1])
            y = cls[idx]
            with torch.no_grad():
                h = engine.stem(model, engine.memory_format(self.options, x_t))
            with torch.enable_grad(), engine.autocast(self.options, x.device):
                # A copy per evaluation (a non-leaf: the gradient stops at it, never reaching h).
                h_e = gather_rows(h.requires_grad_(True), rows)
                eps = calls["trunk"](h_e, t.index_select(0, rows), y)
                err_c = (eps.to(x.dtype) - e.index_select(0, rows)).pow(2).flatten(1).sum(1)
                (g,) = torch.autograd.grad(err_c.sum(), h_e)
            err[idx] = err_c.detach()
            g = g.to(x.dtype) * coef[idx].view((-1,) + (1,) * (g.dim() - 1))
            flat, unflatten = engine.flat_rows(g)
            if g_sum is None:
                g_sum = flat.new_zeros(B * K, flat.shape[1])
            g_sum.index_add_(0, ex[idx] * K + y, flat)
        n = ev.ex.numel()
        self.cost.forward += n
        self.cost.backward += n
        if g_sum is None:
            return err, x.new_zeros(B, K, *x.shape[1:])
        return err, engine.stem_adjoint(model, unflatten(g_sum)).reshape(B, K, *x.shape[1:])


class _WeightedSum(torch.autograd.Function):
    """out (B, K) = sum_e weight_e * err_e at (ex_e, cls_e).

    When x needs a gradient and the engine takes gradients in forward, forward also keeps
    jac[b, k] = d out[b, k] / dx_b (ElboEngine.errors_with_grads) and backward contracts it
    with grad_out; otherwise backward recomputes chunk by chunk (ElboEngine.errors_vjp).
    """

    @staticmethod
    def forward(ctx, x, elbo, ev, draw):
        ctx.elbo, ctx.ev, ctx.draw = elbo, ev, draw
        ctx.jacobian = ctx.needs_input_grad[0] and elbo.grads_in_forward(x)
        if ctx.jacobian:
            err, jac = elbo.errors_with_grads(x.detach(), ev, draw)
            ctx.save_for_backward(jac)
        else:
            ctx.save_for_backward(x)
            with torch.no_grad():
                err = elbo.errors(x, ev, draw)
        out = x.new_zeros(x.shape[0], elbo.num_classes)
        return out.index_put((ev.ex.to(x.device), ev.cls.to(x.device)), ev.weight.to(x) * err, accumulate=True)

    @staticmethod
    def backward(ctx, grad_out):
        (saved,) = ctx.saved_tensors
        if ctx.jacobian:
            return torch.einsum("bk,bk...->b...", grad_out.to(saved), saved), None, None, None
        return ctx.elbo.weighted_sum_vjp(saved, ctx.ev, ctx.draw, grad_out), None, None, None


__all__ = ["ElboEngine", "Evaluations", "Plan", "plan"]

"""The Robust Diffusion Classifier (Chen et al., ICML 2024): a diffusion model as a classifier.

By Bayes' rule with the diffusion ELBO as log p(x | y) (paper eq. 4-5):

    logit_y(x) = -(1/|S|) sum_{t in S} w_t || eps_theta(sqrt(a_t) x + s_t e_t, t, y) - e_t ||^2 / tau + log p(y)

with w_t = 1, S all T timesteps or a systematic subsample, one noise e_t per (example, t)
shared by all classes, tau a temperature (1 in the paper). The schedule gives a_t, s_t and
w_t (diffusion/schedule.py): DDPM's VP schedule with w_t = 1, or the RDC authors' EDM
weighting on a grid of noise levels for EDM denoisers (diffusion/denoiser.py). Likelihood maximization (lm.py)
may run first. Adaptive class pruning (Li et al. 2023) spends few timesteps on every class,
keeps the best, and spends the rest on those.

The engine (engine.py): evaluations are ordered by (example, t) and cut into chunks of whole
(example, t) pairs, at most `batch_size` network inputs each (fewer on CPU, where a
cache-sized chunk is faster); per chunk, x_t and everything of the network that does not
depend on the class (the UNet's `shared`) are computed once per pair, and the rest once per
(pair, class). A model with `all_classes` (the optimal model) computes every class from one
distance matmul. Input gradients are exact and memory-bounded: with a network, the forward
pass also takes each evaluation's gradient at the stem output (one backward, chunk by
chunk) and keeps their sums per (example, class), so backward is a contraction with the
upstream gradient; with `all_classes`, backward recomputes chunk by chunk.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from pipeline import rng
from pipeline.diffusion.schedule import NoiseSchedule, VPSchedule
from pipeline.models.unet import gather_rows
from pipeline.errors import ConfigError
from pipeline.rng import Draw
from pipeline.defenses import engine
from pipeline.defenses.base import Defense
from pipeline.defenses.engine import EngineOptions
from pipeline.defenses.lm import LikelihoodMaximization


@dataclass(frozen=True)
class Evaluations:
    """A set of ELBO terms: row ex (E,) of the batch, class cls (E,), timestep ts[j] (E,), weight (E,)."""

    ex: torch.Tensor
    cls: torch.Tensor
    j: torch.Tensor
    ts: torch.Tensor
    weight: torch.Tensor


class _ElboSum(torch.autograd.Function):
    """out (B, K) = sum_e weight_e * err_e at (ex_e, cls_e).

    When x needs a gradient and the model is a network, forward also returns
    jac[b, k] = d out[b, k] / dx_b (one backward pass per chunk, see `errors_with_grads`) and
    backward contracts it with grad_out; otherwise backward recomputes chunk by chunk.
    """

    @staticmethod
    def forward(ctx, x, rdc, ev, draw):
        ctx.rdc, ctx.ev, ctx.draw = rdc, ev, draw
        ctx.jacobian = ctx.needs_input_grad[0] and rdc.grads_in_forward(x)
        if ctx.jacobian:
            err, jac = rdc.errors_with_grads(x.detach(), ev, draw)
            ctx.save_for_backward(jac)
        else:
            ctx.save_for_backward(x)
            with torch.no_grad():
                err = rdc.errors(x, ev, draw)
        out = x.new_zeros(x.shape[0], rdc.num_classes)
        return out.index_put((ev.ex.to(x.device), ev.cls.to(x.device)), ev.weight.to(x) * err, accumulate=True)

    @staticmethod
    def backward(ctx, grad_out):
        (saved,) = ctx.saved_tensors
        if ctx.jacobian:
            return torch.einsum("bk,bk...->b...", grad_out.to(saved), saved), None, None, None
        ev = ctx.ev
        w = grad_out[ev.ex.to(grad_out.device), ev.cls.to(grad_out.device)] * ev.weight.to(grad_out)
        return ctx.rdc.errors_vjp(saved, ev, ctx.draw, w), None, None, None


class RDC(Defense):
    """RDC logits (B, K) for x (B, C, H, W) in [0, 1].

    eps_model(x_t, t, y) -> eps, with class `num_classes` the null class; schedule: the
    noise schedule and ELBO weights (default DDPM's VP schedule, w_t = 1); timesteps: None
    (all T), an int (systematic subsample) or an explicit list; prior: K probabilities or
    None (uniform); pruning: stages [(n_timesteps, keep), ...]; lm: a LikelihoodMaximization
    or None; batch_size: network inputs per call (the memory budget); engine: how the
    network runs (EngineOptions: chunk, channels_last, autocast, compile, CUDA graphs).
    """

    stochastic = True
    cell_columns = 2  # (class, timestep)

    def __init__(self, eps_model: nn.Module, num_classes: int, in_channels: int, image_size: int, *,
                 schedule: NoiseSchedule | None = None, timesteps=None, prior=None, temperature: float = 1.0,
                 pruning=None, prune_margin: float = 1.0, lm: LikelihoodMaximization | None = None,
                 batch_size: int = 4096, seed: int = 0, engine: EngineOptions | None = None):
        super().__init__(num_classes, in_channels, image_size, seed)
        self.eps_model = eps_model
        self.schedule = schedule or VPSchedule()
        self.ts = self._timesteps(timesteps)
        if temperature <= 0:
            raise ConfigError(f"temperature must be > 0, got {temperature}")
        self.temperature = float(temperature)
        if prior is None:
            log_prior = torch.zeros(num_classes, dtype=torch.float64)
        else:
            p = torch.as_tensor(prior, dtype=torch.float64)
            if p.shape != (num_classes,) or (p <= 0).any():
                raise ConfigError(f"prior must be {num_classes} positive numbers, got {list(p.shape)} values")
            log_prior = torch.log(p / p.sum())
        self.register_buffer("log_prior", log_prior, persistent=False)
        self.pruning = self._stages(pruning)
        self.prune_margin = prune_margin
        self.lm = lm
        if batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
        self.batch_size = batch_size
        self.engine = engine or EngineOptions()

    def _timesteps(self, timesteps) -> torch.Tensor:
        T = self.schedule.T
        if timesteps is None or isinstance(timesteps, int) and not isinstance(timesteps, bool):
            if timesteps is not None and not 1 <= timesteps <= T:
                raise ConfigError(f"timesteps must be in [1, {T}], got {timesteps}")
            return self.schedule.subsample(timesteps)
        ts = torch.as_tensor(list(timesteps), dtype=torch.int64)
        if ts.numel() == 0 or ts.min() < 0 or ts.max() >= T or ts.unique().numel() != ts.numel():
            raise ConfigError(f"timesteps must be distinct integers in [0, {T}), got {list(timesteps)[:8]}...")
        return ts.sort().values

    def _stages(self, pruning):
        if not pruning:
            return None
        stages = []
        for i, stage in enumerate(pruning):
            n, keep = (stage["timesteps"], stage["keep"]) if isinstance(stage, dict) else stage
            if not (1 <= int(n) <= self.schedule.T and 1 <= int(keep) <= self.num_classes):
                raise ConfigError(f"pruning[{i}]: timesteps must be in [1, {self.schedule.T}] and keep in [1, {self.num_classes}], got ({n}, {keep})")
            stages.append((int(n), int(keep)))
        return stages

    # --- the grid --------------------------------------------------------------------
    def grid(self) -> torch.Tensor:
        """Cells (K * |S|, 2): rows (class, timestep)."""
        return torch.cartesian_prod(torch.arange(self.num_classes), self.ts)

    def shards(self, parts: int) -> list[torch.Tensor]:
        """Shards by timestep, every class in each: x_t and its noise are formed by one member
        only, and the optimal model's all-classes pass is not repeated across members."""
        by_t = torch.tensor_split(self.ts, min(parts, self.ts.numel()))
        return [torch.cartesian_prod(torch.arange(self.num_classes), ts) for ts in by_t]

    def purify(self, x: torch.Tensor, draw: Draw, gradient=None) -> torch.Tensor:
        """LM(x), or x without LM; each LM step costs one forward and backward per sample.

        gradient: LM's step gradients computed elsewhere (a gang, which counts their cost).
        """
        if self.lm is None:
            return x
        if gradient is None or self.lm.needs_graph(x):
            n = x.shape[0] * self.lm.steps * self.lm.samples
            self.cost.forward += n
            self.cost.backward += n
        return self.lm(x, draw, gradient)

    def partial(self, x: torch.Tensor, cells: torch.Tensor, draw: Draw) -> torch.Tensor:
        """sum over cells (c, t) of -err(x, c, t) / (|S| tau) + log p(c) / |S|, shape (B, K)."""
        self.check_cells(cells)
        return self.elbo_partial(self.purify(x, draw), cells, draw)

    def grid_partial(self, x_p: torch.Tensor, cells: torch.Tensor, draw: Draw) -> torch.Tensor:
        self.check_cells(cells)
        return self.elbo_partial(x_p, cells, draw)

    def elbo_partial(self, x_lm: torch.Tensor, cells: torch.Tensor, draw: Draw) -> torch.Tensor:
        """The ELBO part of `partial` at an already purified input x_lm (B, C, H, W), shape (B, K)."""
        ev = self._cell_evaluations(x_lm, cells)
        n_total = self.ts.numel()
        out = _ElboSum.apply(x_lm, self, ev, draw)
        prior = torch.zeros(self.num_classes, dtype=torch.float64).index_add_(
            0, cells[:, 0], self.log_prior[cells[:, 0]].cpu() / n_total)
        return out + prior.to(out)

    def grid_partial_vjp(self, x_p: torch.Tensor, cells: torch.Tensor, draw: Draw, grad_total: torch.Tensor) -> torch.Tensor:
        """grad_total^T d grid_partial / dx_p straight from the engine's backward (one recompute, not two)."""
        self.check_cells(cells)
        ev = self._cell_evaluations(x_p, cells)
        w = grad_total[ev.ex.to(grad_total.device), ev.cls.to(grad_total.device)] * ev.weight.to(grad_total)
        return self.errors_vjp(x_p.detach(), ev, draw, w)

    def _cell_evaluations(self, x: torch.Tensor, cells: torch.Tensor) -> Evaluations:
        """Every (row, class, timestep) of `cells` for the rows of x, weighted -w_t / (|S| tau)."""
        ts, j = torch.unique(cells[:, 1], return_inverse=True)
        B, n = x.shape[0], cells.shape[0]
        w_t = self.schedule.weight(ts, x[0].numel())[j]
        return Evaluations(ex=torch.arange(B).repeat_interleave(n), cls=cells[:, 0].repeat(B), j=j.repeat(B), ts=ts,
                           weight=(-w_t / (self.ts.numel() * self.temperature)).repeat(B))

    # --- the engine ------------------------------------------------------------------
    def noise(self, draw: Draw, ts: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """e_t for every row and timestep in ts: (B, len(ts), C, H, W), shared by all classes."""
        return draw.normal(rng.ELBO_NOISE, ts, tuple(x.shape[1:]), dtype=x.dtype, device=x.device)

    def _network(self) -> bool:
        """Whether eps_model is a network evaluated per class (not the optimal model's all_classes)."""
        return not isinstance(self.eps_model, engine.AllClasses)

    def _chunks(self, ev: Evaluations, x: torch.Tensor) -> engine.Plan:
        """The evaluations in (example, t) order, cut into chunks of whole pairs."""
        if self._network():
            return engine.plan(ev.ex, ev.j, ev.ts.numel(), engine.chunk_size(self.engine, self.batch_size, x))
        # One all_classes call computes every class of a pair: a pair costs K network inputs.
        return engine.plan(ev.ex, ev.j, ev.ts.numel(), min(self.engine.chunk or self.batch_size, self.batch_size),
                           per_pair=self.num_classes)

    def _noisy(self, x: torch.Tensor, noise: torch.Tensor, ts: torch.Tensor, pairs: torch.Tensor):
        """x_t = sqrt(a_t) (2x - 1) + s_t e_t, e_t and t for pairs ex * len(ts) + j: (M, C, H, W), (M, C, H, W), (M,)."""
        ex, j = (pairs // ts.numel()).to(x.device), (pairs % ts.numel()).to(x.device)
        sqrt_a, s = self.schedule.coefficients(ts.to(x.device), x.dtype)
        shape = (-1,) + (1,) * (x.dim() - 1)
        e = noise[ex, j]
        x_t = sqrt_a[j].view(shape) * (2.0 * x[ex] - 1.0) + s[j].view(shape) * e
        return x_t, e, ts.to(x.device)[j]

    def _chunk_errors(self, x: torch.Tensor, noise: torch.Tensor, ev: Evaluations, plan: engine.Plan,
                      chunk: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Squared errors (E_c,) of the evaluations of one chunk, and their indices (E_c,) into ev."""
        p0, p1 = chunk
        idx, rows = plan.members(p0, p1)
        rows = rows.to(x.device)
        x_t, e, t = self._noisy(x, noise, ev.ts, plan.pair[p0:p1])
        y = ev.cls[idx].to(x.device)
        if not self._network():
            eps = self.eps_model.all_classes(x_t, t)  # (M, K, C, H, W)
            return (eps - e.unsqueeze(1)).pow(2).flatten(2).sum(2)[rows, y], idx
        calls = engine.prepare(self.eps_model, self.engine, x.device, grad=torch.is_grad_enabled())
        with engine.autocast(self.engine, x.device):
            eps = calls["conditional"](calls["shared"](engine.memory_format(self.engine, x_t), t), rows, y)
        return (eps.to(x.dtype) - e.index_select(0, rows)).pow(2).flatten(1).sum(1), idx

    def errors(self, x: torch.Tensor, ev: Evaluations, draw: Draw) -> torch.Tensor:
        """||eps_theta(x_t, t, y) - e_t||^2 for every evaluation, (E,); no graph is kept."""
        noise = self.noise(draw, ev.ts, x)
        plan = self._chunks(ev, x)
        err = x.new_zeros(ev.ex.numel())
        for chunk in plan.bounds:
            e, idx = self._chunk_errors(x, noise, ev, plan, chunk)
            err[idx.to(x.device)] = e
        self.cost.forward += ev.ex.numel() if self._network() else plan.pair.numel()
        return err

    def errors_vjp(self, x: torch.Tensor, ev: Evaluations, draw: Draw, w: torch.Tensor) -> torch.Tensor:
        """d/dx sum_e w_e err_e for known weights w (E,), chunk by chunk so memory stays bounded.

        The class-independent part of the network runs once per (example, t) and receives
        the sum of its classes' gradients.
        """
        noise = self.noise(draw, ev.ts, x)
        plan = self._chunks(ev, x)
        grad = torch.zeros_like(x)
        for chunk in plan.bounds:
            with torch.enable_grad():
                xg = x.detach().requires_grad_(True)
                err, idx = self._chunk_errors(xg, noise, ev, plan, chunk)
                (g,) = torch.autograd.grad(err, xg, w[idx.to(w.device)].to(err))
            grad += g
        n = ev.ex.numel() if self._network() else plan.pair.numel()
        self.cost.forward += n
        self.cost.backward += n
        return grad

    # Per-(example, class) input gradients cost B * K images of memory; above this many
    # values, backward recomputes instead.
    JACOBIAN_VALUES = 1 << 27

    def grads_in_forward(self, x: torch.Tensor) -> bool:
        """Whether forward takes the input gradients (a network, and B * K images fit the budget)."""
        return self._network() and x.numel() * self.num_classes <= self.JACOBIAN_VALUES

    def errors_with_grads(self, x: torch.Tensor, ev: Evaluations, draw: Draw) -> tuple[torch.Tensor, torch.Tensor]:
        """err (E,) as `errors`, and jac (B, K, C, H, W) = sum over e at (b, k) of weight_e d err_e / dx_b.

        One forward and one backward per chunk. Each evaluation gets its own copy of its
        pair's stem output h, so one backward gives every d err_e / dh_e; the stem is linear
        and x_t = sqrt(a_t)(2x - 1) + s_t e_t, so d err_e / dx = 2 sqrt(a_t) stem^T(d err_e / dh_e),
        and the weighted sums are taken before the (linear) stem^T.
        """
        noise = self.noise(draw, ev.ts, x)
        plan = self._chunks(ev, x)
        B, K = x.shape[0], self.num_classes
        model = self.eps_model
        calls = engine.prepare(model, self.engine, x.device, grad=True)
        sqrt_a, _ = self.schedule.coefficients(ev.ts.to(x.device), x.dtype)
        coef = ev.weight.to(x) * 2.0 * sqrt_a[ev.j.to(x.device)]
        ex, cls = ev.ex.to(x.device), ev.cls.to(x.device)
        err = x.new_zeros(ev.ex.numel())
        g_sum = None
        for p0, p1 in plan.bounds:
            idx, rows = (v.to(x.device) for v in plan.members(p0, p1))
            x_t, e, t = self._noisy(x, noise, ev.ts, plan.pair[p0:p1])
            y = cls[idx]
            with torch.no_grad():
                h = engine.stem(model, engine.memory_format(self.engine, x_t))
            with torch.enable_grad(), engine.autocast(self.engine, x.device):
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

    # --- pruning ---------------------------------------------------------------------
    def evaluate(self, x: torch.Tensor, draw: Draw, cells: torch.Tensor | None = None) -> torch.Tensor:
        if self.pruning is None or cells is not None:
            return super().evaluate(x, draw, cells)
        # Pruning decides each stage's cells from the last one, so it runs here, unsharded.
        return self._pruned(x, draw)

    def _pruned(self, x: torch.Tensor, draw: Draw) -> torch.Tensor:
        """Adaptive class pruning: each stage scores the surviving classes on its own subsample
        and keeps the `keep` best of them, the last stage included.

        A class's logit is its estimate from the last stage it took part in (every evaluation is
        computed once, with its gradient when one is needed); classes outside the last stage's
        `keep` are capped `prune_margin` below the weakest finalist, so the prediction is always a
        finalist and gradients still flow through every estimate.
        """
        x_lm = self.purify(x, draw)
        B, K = x.shape[0], self.num_classes
        all_ts = torch.unique(torch.cat([self.schedule.subsample(n) for n, _ in self.pruning]))
        prior = self.log_prior.to(x)
        active = torch.ones(B, K, dtype=torch.bool)
        raw = x.new_zeros(B, K)
        for n, keep in self.pruning:
            ts = self.schedule.subsample(n)
            ex_c = active.nonzero()  # (A, 2) rows (example, class)
            w_t = self.schedule.weight(ts, x[0].numel())
            ev = Evaluations(ex=ex_c[:, 0].repeat_interleave(n), cls=ex_c[:, 1].repeat_interleave(n),
                             j=torch.searchsorted(all_ts, ts).repeat(ex_c.shape[0]), ts=all_ts,
                             weight=(-w_t / (n * self.temperature)).repeat(ex_c.shape[0]))
            est = _ElboSum.apply(x_lm, self, ev, draw) + prior
            raw = torch.where(active.to(x.device), est, raw)
            ranked = est.detach().cpu().masked_fill(~active, float("-inf"))
            top = torch.topk(ranked, min(keep, int(active.sum(1).max())), dim=1).indices
            active = torch.zeros_like(active).scatter_(1, top, True)
        finalists = active.to(x.device)
        floor = torch.where(finalists, raw, torch.full_like(raw, float("inf"))).min(1, keepdim=True).values
        return torch.where(finalists, raw, torch.minimum(raw, floor - self.prune_margin))

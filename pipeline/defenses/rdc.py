"""The Robust Diffusion Classifier (Chen et al., ICML 2024): a diffusion model as a classifier.

By Bayes' rule with the diffusion ELBO as log p(x | y) (paper eq. 4-5):

    logit_y(x) = -(1/|S|) sum_{t in S} w_t || eps_theta(sqrt(a_t) x + s_t e_t, t, y) - e_t ||^2 / tau + log p(y)

with w_t = 1, S all T timesteps or a systematic subsample, one noise e_t per (example, t)
shared by all classes (under attack, optionally one per (example, class, t), as the RDC
authors' gradient path draws it: `attack_noise`), tau a temperature (1 in the paper). The
schedule gives a_t, s_t and w_t (diffusion/schedule.py): DDPM's VP schedule with w_t = 1, or
the RDC authors' EDM weighting on a grid of noise levels for EDM denoisers
(diffusion/denoiser.py). Likelihood maximization (lm.py: the paper's, or the authors' code's)
may run first. With `draws = "fixed"` every call draws the same numbers, whatever the example
or the call (the authors' code reseeds before every LM and ELBO), so the defense is a
deterministic function of its input and reports itself as not stochastic. Adaptive class
pruning (Li et al. 2023) spends few timesteps on every class, keeps the best, and spends the
rest on those (its noise is always shared by the classes).

The squared errors, their chunking over the network and their input gradients belong to the
ELBO engine (elbo.py: `ElboEngine`); this module turns the paper's grid of (class, timestep)
cells into weighted evaluations for it and adds the prior, pruning and LM around it.
"""

from __future__ import annotations

import torch
from torch import nn

from pipeline.diffusion.schedule import NoiseSchedule, VPSchedule
from pipeline.errors import ConfigError
from pipeline.rng import Draw
from pipeline.defenses.base import Defense
from pipeline.defenses.elbo import ElboEngine, Evaluations
from pipeline.defenses.engine import EngineOptions
from pipeline.defenses.lm import AuthorsLM, LikelihoodMaximization


class RDC(Defense):
    """RDC logits (B, K) for x (B, C, H, W) in [0, 1].

    eps_model(x_t, t, y) -> eps, with class `num_classes` the null class; schedule: the
    noise schedule and ELBO weights (default DDPM's VP schedule, w_t = 1); timesteps: None
    (all T), an int (systematic subsample) or an explicit list; prior: K probabilities or
    None (uniform); pruning: stages [(n_timesteps, keep), ...]; lm: a LikelihoodMaximization
    or None; batch_size: network inputs per call (the memory budget); engine: how the
    network runs (EngineOptions: chunk, channels_last, autocast, compile, CUDA graphs).
    batch_size and engine belong to the ELBO engine, `self.elbo` (its `options`).
    draws: "fresh" (a new draw per call) or "fixed" (one draw for every call and example);
    attack_noise: "shared" or "per-class", the ELBO noise when an input gradient is taken.
    """

    stochastic = True
    cell_columns = 2  # (class, timestep)

    def __init__(self, eps_model: nn.Module, num_classes: int, in_channels: int, image_size: int, *,
                 schedule: NoiseSchedule | None = None, timesteps=None, prior=None, temperature: float = 1.0,
                 pruning=None, prune_margin: float = 1.0, lm: LikelihoodMaximization | AuthorsLM | None = None,
                 batch_size: int = 4096, seed: int = 0, engine: EngineOptions | None = None,
                 draws: str = "fresh", attack_noise: str = "shared"):
        super().__init__(num_classes, in_channels, image_size, seed)
        if draws not in ("fresh", "fixed"):
            raise ConfigError(f"draws must be 'fresh' or 'fixed', got {draws!r}")
        if attack_noise not in ("shared", "per-class"):
            raise ConfigError(f"attack_noise must be 'shared' or 'per-class', got {attack_noise!r}")
        self.fixed_seed = seed if draws == "fixed" else None
        self.stochastic = draws == "fresh"
        self.attack_noise = attack_noise
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
        self.elbo = ElboEngine(eps_model, self.schedule, num_classes, batch_size, engine, self.cost)

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

    def next_draw(self, batch: int) -> Draw:
        """A fresh draw per call; with fixed draws, the job seed's draw of example 0, call 0 for every row."""
        draw = super().next_draw(batch)
        if self.fixed_seed is None:
            return draw
        zeros = torch.zeros(batch, dtype=torch.int64)
        return Draw(self.fixed_seed, zeros, zeros)

    def per_class_noise(self, x: torch.Tensor) -> bool:
        """Whether this ELBO evaluation draws noise per class: attack_noise says so and a gradient flows to x."""
        return self.attack_noise == "per-class" and torch.is_grad_enabled() and x.requires_grad

    # --- the grid --------------------------------------------------------------------
    def grid(self) -> torch.Tensor:
        """Cells (K * |S|, 2): rows (class, timestep)."""
        return torch.cartesian_prod(torch.arange(self.num_classes), self.ts)

    def shards(self, parts: int) -> list[torch.Tensor]:
        """Shards by timestep, every class in each: x_t and its noise are formed by one member
        only, and the optimal model's all-classes pass is not repeated across members."""
        by_t = torch.tensor_split(self.ts, min(parts, self.ts.numel()))
        return [torch.cartesian_prod(torch.arange(self.num_classes), ts) for ts in by_t]

    def likelihood_maximization(self) -> LikelihoodMaximization | None:
        return self.lm

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
        ev = self.cell_evaluations(x_lm, cells, self.per_class_noise(x_lm))
        n_total = self.ts.numel()
        out = self.elbo.weighted_sum(x_lm, ev, draw)
        prior = torch.zeros(self.num_classes, dtype=torch.float64).index_add_(
            0, cells[:, 0], self.log_prior[cells[:, 0]].cpu() / n_total)
        return out + prior.to(out)

    def grid_partial_vjp(self, x_p: torch.Tensor, cells: torch.Tensor, draw: Draw, grad_total: torch.Tensor) -> torch.Tensor:
        """grad_total^T d grid_partial / dx_p straight from the engine's backward (one recompute, not two)."""
        self.check_cells(cells)
        ev = self.cell_evaluations(x_p, cells, self.attack_noise == "per-class")
        return self.elbo.weighted_sum_vjp(x_p.detach(), ev, draw, grad_total)

    def cell_evaluations(self, x: torch.Tensor, cells: torch.Tensor, per_class: bool = False) -> Evaluations:
        """Every (row, class, timestep) of `cells` for the rows of x, weighted -w_t / (|S| tau)."""
        ts, j = torch.unique(cells[:, 1], return_inverse=True)
        B, n = x.shape[0], cells.shape[0]
        w_t = self.schedule.weight(ts, x[0].numel())[j]
        return Evaluations(ex=torch.arange(B).repeat_interleave(n), cls=cells[:, 0].repeat(B), j=j.repeat(B), ts=ts,
                           weight=(-w_t / (self.ts.numel() * self.temperature)).repeat(B), per_class=per_class)

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
            est = self.elbo.weighted_sum(x_lm, ev, draw) + prior
            raw = torch.where(active.to(x.device), est, raw)
            ranked = est.detach().cpu().masked_fill(~active, float("-inf"))
            top = torch.topk(ranked, min(keep, int(active.sum(1).max())), dim=1).indices
            active = torch.zeros_like(active).scatter_(1, top, True)
        finalists = active.to(x.device)
        floor = torch.where(finalists, raw, torch.full_like(raw, float("inf"))).min(1, keepdim=True).values
        return torch.where(finalists, raw, torch.minimum(raw, floor - self.prune_margin))

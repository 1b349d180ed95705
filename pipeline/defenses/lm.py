"""Likelihood maximization (LM), the purification step in front of RDC (Chen et al. 2024, sec. 3.4).

Two variants. `LikelihoodMaximization`, the paper's (sec. 3.4), on RDC's own network:

    x' = argmin_{||x' - x||_inf <= eta} E_{t, eps} || eps_theta(sqrt(a_t) x' + s_t eps, t, null) - eps ||^2

by N steps of momentum sign descent (MI-FGSM style):

    g <- mu g + grad / ||grad||_1,     x' <- clip_{x, eta, [0,1]}(x' - gamma sign(g))

Attacks see LM through BPDA (the identity, Athalye et al. 2018) or through the exact
derivative of the N steps (autograd with create_graph=True). sign() has zero derivative
almost everywhere, so the exact derivative is the Jacobian of the clipping chain: 1 where a
pixel stayed inside the box, 0 where [0, 1] clipped it.

`AuthorsLM`, what the authors' code runs (EDMLM.py, likelihood_maximization_T1), on a separate
unconditional EDM denoiser D(z; sigma) in z = 2x - 1 space:

    L_k(z) = mean_pixels (D(z + sigma_k e_k; sigma_k) - z)^2,   sigma_k ~ U[sigma_lo, sigma_hi], e_k ~ N(0, I)
    z_{k+1} = Adam(lr) step on grad_z L_k(z_k),  k = 0 .. N - 1 (z enters both D's input and the target)
    x' = clip((z_N + 1) / 2, 0, 1)

with no eps-ball (their L2 projection has radius 200, which no step reaches) and no clipping
between steps. The loss is each example's own mean, so an example's steps do not depend on the
rest of the batch (theirs is the batch mean: the same for one example at a time, as they run it).
Attacks see it through BPDA, as the authors' code does.
"""

from __future__ import annotations

import contextlib
import math

import torch
from torch import nn

from pipeline import rng
from pipeline.defenses import engine
from pipeline.defenses.engine import EngineOptions
from pipeline.diffusion.schedule import NoiseSchedule, VPSchedule
from pipeline.errors import ConfigError
from pipeline.rng import Draw


def diffusion_loss(eps_model: nn.Module, schedule: NoiseSchedule, x: torch.Tensor, t: torch.Tensor,
                   noise: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-example w_t ||eps_theta(x_t, t, y) - eps||^2 averaged over m timesteps (DDPM eq. 14),
    w_t the schedule's ELBO weight (1 for VP): the loss RDC's logits are made of.

    x (B, C, H, W) in [0, 1]; t (B, m) int64; noise (B, m, C, H, W); y (B,) class or null.
    Returns (B,), squared error summed over pixels.
    """
    B, m = t.shape
    x0 = (2.0 * x - 1.0).unsqueeze(1).expand(B, m, *x.shape[1:]).reshape(B * m, *x.shape[1:])
    x_t = schedule.add_noise(x0, t.reshape(-1), noise.reshape(B * m, *x.shape[1:]))
    eps = eps_model(x_t, t.reshape(-1).to(x.device), y.repeat_interleave(m).to(x.device))
    err = (eps - noise.reshape_as(eps)).pow(2).flatten(1).sum(1)
    w_t = schedule.weight(t.reshape(-1), x[0].numel()).to(err)
    return (w_t * err).view(B, m).mean(1)


class LikelihoodMaximization(nn.Module):
    """LM with the paper's defaults: N = 10 steps, mu = 1, eta = 8/255, gamma = eta / N.

    timesteps: "random" (each step draws `samples` timesteps per example), an int n (the
    systematic subsample of n timesteps, every step), or "all" (all T, every step).
    gradient: "bpda" or "exact", the path attacks see.
    """

    def __init__(self, eps_model: nn.Module, null_class: int, schedule: NoiseSchedule | None = None, *,
                 steps: int = 10, mu: float = 1.0, eta: float = 8 / 255, gamma: float | None = None,
                 timesteps: str | int = "random", samples: int = 1, gradient: str = "bpda"):
        super().__init__()
        if gradient not in ("bpda", "exact"):
            raise ConfigError(f"lm.gradient must be 'bpda' or 'exact', got {gradient!r}")
        if steps < 0 or eta < 0 or samples < 1:
            raise ConfigError("lm.steps and lm.eta must be >= 0 and lm.samples >= 1")
        self.eps_model = eps_model
        self.null_class = null_class
        self.schedule = schedule or VPSchedule()
        self.steps, self.mu, self.eta = steps, mu, eta
        self.gamma = eta / max(steps, 1) if gamma is None else gamma
        self.gradient = gradient
        if timesteps == "random":
            self.fixed_t = None
            self.samples = samples
        elif timesteps == "all":
            self.fixed_t = torch.arange(self.schedule.T)
        elif isinstance(timesteps, int) and not isinstance(timesteps, bool):
            self.fixed_t = self.schedule.subsample(timesteps)
        else:
            raise ConfigError(f"lm.timesteps must be 'random', 'all' or an integer, got {timesteps!r}")
        if self.fixed_t is not None:
            self.samples = int(self.fixed_t.numel())

    def step_draws(self, draw: Draw, step: int, shape: tuple[int, ...], dtype,
                   device=None) -> tuple[torch.Tensor, torch.Tensor]:
        """Timesteps (B, m, CPU) and noise (B, m, *shape, on device) of LM step `step`: pure functions of the draw."""
        m = self.samples
        index = torch.arange(step * m, (step + 1) * m)
        if self.fixed_t is None:
            t = draw.integers(rng.LM_TIMESTEP, index, self.schedule.T)
        else:
            t = self.fixed_t.unsqueeze(0).expand(draw.batch, m)
        return t, draw.normal(rng.LM_NOISE, index, shape, dtype=dtype, device=device)

    def loss(self, x: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """The unconditional diffusion loss per example, (B,)."""
        null = torch.full((x.shape[0],), self.null_class, dtype=torch.int64)
        return diffusion_loss(self.eps_model, self.schedule, x, t, noise.to(x.device), null)

    def step_gradient(self, x_prime: torch.Tensor, draw: Draw, step: int, samples: torch.Tensor | None = None,
                      create_graph: bool = False) -> torch.Tensor:
        """d/dx' of step `step`'s loss, restricted to `samples` (indices in [0, m)), shape of x'.

        The loss is a mean over the m samples, so the gradients of disjoint sample sets sum to
        the whole step's gradient: a gang splits one step this way.
        """
        t, noise = self.step_draws(draw, step, tuple(x_prime.shape[1:]), x_prime.dtype, x_prime.device)
        if samples is not None:
            t, noise = t[:, samples], noise[:, samples]
        with torch.enable_grad():
            if not create_graph:
                x_prime = x_prime.detach().requires_grad_(True)
            loss = self.loss(x_prime, t, noise).sum() * (t.shape[1] / self.samples)
            (grad,) = torch.autograd.grad(loss, x_prime, create_graph=create_graph)
        return grad

    def run(self, x: torch.Tensor, draw: Draw, create_graph: bool = False, gradient=None) -> torch.Tensor:
        """The N descent steps from x (B, C, H, W) in [0, 1]; differentiable in x iff create_graph.

        gradient(x_prime, step) -> the step's gradient, when it is computed elsewhere (a gang).
        """
        x_prime = x if create_graph else x.detach()
        g = torch.zeros_like(x)
        lower, upper = (x - self.eta).clamp(0, 1), (x + self.eta).clamp(0, 1)
        for n in range(self.steps):
            if gradient is None:
                grad = self.step_gradient(x_prime, draw, n, create_graph=create_graph)
            else:
                grad = gradient(x_prime.detach(), n)
            l1 = grad.abs().flatten(1).sum(1).clamp_min(1e-12).view(-1, 1, 1, 1)
            g = self.mu * g + grad / l1  # momentum on the L1-normalised gradient
            x_prime = torch.minimum(torch.maximum(x_prime - self.gamma * torch.sign(g), lower), upper)
        return x_prime if create_graph else x_prime.detach()

    def needs_graph(self, x: torch.Tensor) -> bool:
        """True when the exact derivative is asked for and a gradient will flow to x."""
        return self.gradient == "exact" and torch.is_grad_enabled() and x.requires_grad

    def forward(self, x: torch.Tensor, draw: Draw, gradient=None) -> torch.Tensor:
        """x' = LM(x); its derivative is the identity (bpda) or exact, as configured.

        gradient: as in `run`, used only when no graph is needed.
        """
        if self.needs_graph(x):
            return self.run(x, draw, create_graph=True)
        x_prime = self.run(x, draw, gradient=gradient)
        return x + (x_prime - x).detach()  # BPDA: identity backward; also exact when no graph is needed


class AuthorsLM(nn.Module):
    """The authors' LM on an unconditional EDM denoiser D(z (B, C, H, W), sigma (B,)) in [-1, 1] space.

    steps N (5), lr (0.1), sigma = (lo, hi) (0.4, 0.6): their defaults. Adam as torch.optim.Adam
    with betas (0.9, 0.999), eps 1e-8, elementwise, so per example:

        m <- b1 m + (1 - b1) g,  v <- b2 v + (1 - b2) g^2
        z <- z - lr / (1 - b1^k) * m / (sqrt(v) / sqrt(1 - b2^k) + eps)
    """

    samples = 1  # one noise level per step and example
    BETAS = (0.9, 0.999)
    EPS = 1e-8

    def __init__(self, denoiser: nn.Module, *, steps: int = 5, lr: float = 0.1, sigma: tuple[float, float] = (0.4, 0.6),
                 options: EngineOptions | None = None):
        super().__init__()
        if steps < 0 or lr <= 0 or not 0 < sigma[0] <= sigma[1]:
            raise ConfigError(f"lm: steps must be >= 0, lr > 0 and 0 < sigma[0] <= sigma[1]; got steps={steps}, "
                              f"lr={lr}, sigma={list(sigma)}")
        self.denoiser = denoiser
        self.steps, self.lr = steps, float(lr)
        self.sigma_lo, self.sigma_hi = float(sigma[0]), float(sigma[1])
        # The defense's engine options: its autocast is the LM network's precision too (their
        # EDM networks run both in fp16 on CUDA); None runs it as loaded.
        self.options = options

    def step_draws(self, draw: Draw, step: int, shape: tuple[int, ...], dtype,
                   device=None) -> tuple[torch.Tensor, torch.Tensor]:
        """sigma (B,) and noise e (B, *shape) of step `step`, on device: pure functions of the draw."""
        index = torch.tensor([step])
        u = draw.uniform(rng.LM_TIMESTEP, index, device)[:, 0]
        sigma = (self.sigma_lo + (self.sigma_hi - self.sigma_lo) * u).to(dtype)
        return sigma, draw.normal(rng.LM_NOISE, index, shape, dtype=dtype, device=device)[:, 0]

    def loss(self, z: torch.Tensor, sigma: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """Per-example mean_pixels (D(z + sigma e; sigma) - z)^2, (B,)."""
        noised = z + sigma.view(-1, *(1,) * (z.dim() - 1)) * noise
        with engine.autocast(self.options, z.device) if self.options else contextlib.nullcontext():
            denoised = self.denoiser(noised, sigma)
        return (denoised.to(z.dtype) - z).pow(2).flatten(1).mean(1)

    def step_gradient(self, z: torch.Tensor, draw: Draw, step: int) -> torch.Tensor:
        """d/dz of step `step`'s loss at z (B, C, H, W) in [-1, 1] space. One sample per step, so a
        gang never splits it (runtime/grid.py splits only LMs with samples >= 2)."""
        sigma, noise = self.step_draws(draw, step, tuple(z.shape[1:]), z.dtype, z.device)
        with torch.enable_grad():
            z = z.detach().requires_grad_(True)
            (grad,) = torch.autograd.grad(self.loss(z, sigma, noise).sum(), z)
        return grad

    def run(self, x: torch.Tensor, draw: Draw) -> torch.Tensor:
        """x' from x (B, C, H, W) in [0, 1], without a graph."""
        b1, b2 = self.BETAS
        z = 2.0 * x.detach() - 1.0
        m, v = torch.zeros_like(z), torch.zeros_like(z)
        for k in range(1, self.steps + 1):
            g = self.step_gradient(z, draw, k - 1)
            m = b1 * m + (1 - b1) * g
            v = b2 * v + (1 - b2) * g * g
            denom = v.sqrt() / math.sqrt(1 - b2**k) + self.EPS
            z = z - (self.lr / (1 - b1**k)) * m / denom
        return ((z + 1.0) / 2.0).clamp(0, 1)

    @property
    def gradient(self) -> str:
        """How attacks cross it: BPDA only (the authors' identity backward)."""
        return "bpda"

    @gradient.setter
    def gradient(self, mode: str) -> None:
        if mode != "bpda":
            raise ConfigError(f"lm_gradient = {mode!r}: the authors' LM (lm.variant = \"authors\") is crossed by BPDA "
                              "only; leave lm_gradient out or set it to \"bpda\"")

    def needs_graph(self, x: torch.Tensor) -> bool:
        return False

    def forward(self, x: torch.Tensor, draw: Draw, gradient=None) -> torch.Tensor:
        """x' = LM(x), differentiated as the identity (BPDA). `gradient` (a gang's) is not used: one sample per step."""
        return x + (self.run(x, draw) - x).detach()

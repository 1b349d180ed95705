"""Noise schedules of the diffusion ELBO: DDPM's VP schedule (Ho et al. 2020), as used by RDC
(Chen et al. 2024, eq. 1), and the EDM-weighted grid of noise levels the RDC authors use with
EDM networks (Karras et al. 2022).

Both are written in the VP form q(x_t | x_0) = N(sqrt(alpha_t) x_0, (1 - alpha_t) I) on
integer timesteps t in [0, T), so RDC, LM and the engine run on either unchanged; the noise
level of a denoiser is sigma_t = sqrt((1 - alpha_t) / alpha_t) (x_t / sqrt(alpha_t) = x_0 +
sigma_t e), and `weight` is the ELBO weight of each timestep.
"""

from __future__ import annotations

import math

import torch


class NoiseSchedule:
    """alpha_t (float64, (T,)) and what follows from it; subclasses set T and alpha."""

    T: int
    alpha: torch.Tensor

    def _derive(self) -> None:
        self.sigma = torch.sqrt(1.0 - self.alpha)  # sigma_t^2 = 1 - alpha_t
        self.sqrt_alpha = torch.sqrt(self.alpha)

    def coefficients(self, t: torch.Tensor, dtype=torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
        """sqrt(alpha_t) and sigma_t for integer timesteps t of any shape, on t's device."""
        t_cpu = t.detach().to("cpu", torch.long)
        return (self.sqrt_alpha[t_cpu].to(t.device, dtype), self.sigma[t_cpu].to(t.device, dtype))

    def noise_level(self, t: torch.Tensor) -> torch.Tensor:
        """A denoiser's sigma_t = sqrt((1 - alpha_t) / alpha_t), float64 on CPU."""
        return self.noise_to_signal[t.detach().to("cpu", torch.long)]

    @property
    def noise_to_signal(self) -> torch.Tensor:
        return torch.sqrt((1.0 - self.alpha) / self.alpha)

    def weight(self, t: torch.Tensor, numel: int) -> torch.Tensor:
        """The ELBO weight lambda_t of ||eps_hat - e||^2 (summed over `numel` values), float64 (len(t),)."""
        return torch.ones(t.shape, dtype=torch.float64)

    def add_noise(self, x0: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        """x_t = sqrt(alpha_t) x_0 + sigma_t eps; x0, eps (B, ...) in model space, t (B,)."""
        sqrt_a, s = (c.to(x0.device) for c in self.coefficients(t, x0.dtype))  # t may live on the CPU
        shape = (-1,) + (1,) * (x0.dim() - 1)
        return sqrt_a.view(shape) * x0 + s.view(shape) * eps

    def subsample(self, n: int | None) -> torch.Tensor:
        """The systematic subsample of n timesteps (every T/n-th, starting at T/(2n)); None: all T."""
        if n is None or n >= self.T:
            return torch.arange(self.T)
        if n < 1:
            raise ValueError(f"timesteps must be >= 1, got {n}")
        stride = self.T / n
        return torch.floor(torch.arange(n, dtype=torch.float64) * stride + stride / 2).long()


class VPSchedule(NoiseSchedule):
    """alpha_t = prod_{s<=t} (1 - beta_s), beta linear from `beta_start` to `beta_end` over T steps.

    Tensors are float64 so that sigma_t at small t keeps its digits; `coefficients` hands
    float32 (or any dtype) copies to the models. Every timestep weighs 1 (Ho et al.'s L_simple).
    """

    def __init__(self, T: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02):
        self.T = T
        self.beta = torch.linspace(beta_start, beta_end, T, dtype=torch.float64)
        self.alpha = torch.cumprod(1.0 - self.beta, dim=0)  # alpha_t (cumulative, "alpha bar")
        self._derive()


class EDMGrid(NoiseSchedule):
    """T noise levels sigma_i on a uniform grid from sigma_lo to sigma_hi (the left ends of T
    intervals of width d sigma), weighted as the RDC authors weight EDM's loss:

        logit_y(x) = - sum_i w_i mean_pixels (D(x_0 + sigma_i e_i; sigma_i, y) - x_0)^2
        w_i = (sigma_i^2 + sigma_data^2) / (sigma_i sigma_data)^2 * p(sigma_i) * d sigma
        p(sigma) = exp(-(ln sigma - P_mean)^2 / 2 * P_std^2) / (sigma P_std sqrt(2 pi))

    p is their code's density, which multiplies by P_std^2 where the log-normal density of
    EDM's training distribution divides; we keep theirs, which produced their published
    figures. With D - x_0 = sigma (e - eps_hat), the term is lambda_i ||eps_hat - e||^2 / T
    with lambda_i = T w_i sigma_i^2 / (C H W): `weight`.

    The levels are sigma_i = sigma_lo + i (sigma_hi - sigma_lo) / T, i = 0 .. T - 1, d sigma =
    (sigma_hi - sigma_lo) / T: the left ends of their linspace(1e-4, 3, T + 1). T = 1000 is their
    classifier's default; their demo passes linspace(1e-4, 3, 126), T = 125 (a job's
    `timesteps = "authors"`, or "authors:N" for T = N).
    """

    def __init__(self, T: int = 1000, sigma_lo: float = 1e-4, sigma_hi: float = 3.0, P_mean: float = -1.2,
                 P_std: float = 1.2, sigma_data: float = 0.5):
        if T < 1 or not 0 < sigma_lo < sigma_hi or P_std <= 0 or sigma_data <= 0:
            raise ValueError(f"EDMGrid: need T >= 1, 0 < sigma_lo < sigma_hi, P_std > 0, sigma_data > 0; got "
                             f"T={T}, sigma_lo={sigma_lo}, sigma_hi={sigma_hi}, P_std={P_std}, sigma_data={sigma_data}")
        self.T = T
        self.P_mean, self.P_std, self.sigma_data = P_mean, P_std, sigma_data
        grid = torch.linspace(sigma_lo, sigma_hi, T + 1, dtype=torch.float64)
        self.levels, self.d_sigma = grid[:-1], grid[1:] - grid[:-1]
        s = self.levels
        p = torch.exp(-((torch.log(s) - P_mean) ** 2) / 2 * P_std**2) / (s * P_std * math.sqrt(2 * math.pi))
        self.w = (s**2 + sigma_data**2) / (s * sigma_data) ** 2 * p * self.d_sigma
        self.alpha = 1.0 / (1.0 + s**2)  # x_t / sqrt(alpha) = x_0 + sigma e
        self._derive()

    @property
    def noise_to_signal(self) -> torch.Tensor:
        return self.levels

    def weight(self, t: torch.Tensor, numel: int) -> torch.Tensor:
        t = t.detach().to("cpu", torch.long)
        return self.T * self.w[t] * self.levels[t] ** 2 / numel


SCHEDULES = {"vp": VPSchedule, "edm": EDMGrid}

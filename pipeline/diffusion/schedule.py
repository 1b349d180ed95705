"""The VP noise schedule of DDPM (Ho et al. 2020), as used by RDC (Chen et al. 2024, eq. 1)."""

from __future__ import annotations

import torch


class VPSchedule:
    """q(x_t | x_0) = N(sqrt(alpha_t) x_0, sigma_t^2 I), alpha_t = prod_{s<=t} (1 - beta_s).

    beta is linear from `beta_start` to `beta_end` over T steps; timesteps are 0-based
    integers in [0, T). Tensors are float64 so that sigma_t at small t keeps its digits;
    `coefficients` hands float32 (or any dtype) copies to the models.
    """

    def __init__(self, T: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02):
        self.T = T
        self.beta = torch.linspace(beta_start, beta_end, T, dtype=torch.float64)
        self.alpha = torch.cumprod(1.0 - self.beta, dim=0)  # alpha_t (cumulative, "alpha bar")
        self.sigma = torch.sqrt(1.0 - self.alpha)  # sigma_t^2 = 1 - alpha_t
        self.sqrt_alpha = torch.sqrt(self.alpha)

    def coefficients(self, t: torch.Tensor, dtype=torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
        """sqrt(alpha_t) and sigma_t for integer timesteps t of any shape, on t's device."""
        t_cpu = t.detach().to("cpu", torch.long)
        return (self.sqrt_alpha[t_cpu].to(t.device, dtype), self.sigma[t_cpu].to(t.device, dtype))

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

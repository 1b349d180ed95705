"""A denoiser D(x; sigma, y) (EDM's networks, x in [-1, 1]) seen as the noise predictor eps(x_t, t, y)
that RDC, LM and the engine evaluate:

    x = x_t / sqrt(alpha_t) = x_0 + sigma_t e,  sigma_t = sqrt((1 - alpha_t) / alpha_t)
    eps_hat(x_t, t, y) = (x - D(x; sigma_t, y)) / sigma_t

(Karras et al. 2022, eq. 3 and the VP column of Table 1: a VP x_t is an EDM x scaled by
sqrt(alpha_t)). Class y in [0, K) is one-hot; y = K, the null class, is the all-zero label
EDM's networks read as "no class".
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.diffusion.schedule import NoiseSchedule


class DenoiserEps(nn.Module):
    """eps_hat(x_t (B, C, H, W), t (B,) int, y (B,) int) from `denoiser` on `schedule`'s timesteps."""

    def __init__(self, denoiser: nn.Module, schedule: NoiseSchedule, num_classes: int):
        super().__init__()
        self.denoiser = denoiser
        self.schedule = schedule
        self.num_classes = num_classes

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        sigma64 = self.schedule.noise_level(t)
        sigma = sigma64.to(x_t.device, torch.float32)
        shape = (-1,) + (1,) * (x_t.dim() - 1)
        x = x_t.float() * torch.sqrt(1.0 + sigma64 ** 2).to(x_t.device, torch.float32).view(shape)
        labels = F.one_hot(y.long(), self.num_classes + 1)[:, :self.num_classes].to(torch.float32)
        D = self.denoiser(x, sigma, labels)
        return ((x - D) / sigma.view(shape)).to(x_t.dtype)

"""EDM's preconditioners: D(x; sigma, y) = c_skip x + c_out F(c_in x; c_noise, y).

(Karras et al. 2022, eq. 7 and Table 1.) x is a noisy image in EDM's [-1, 1] scale,
x = x_0 + sigma n; sigma (B,) or a scalar; class_labels one-hot (B, label_dim), or None for
the all-zero label (no class); augment_labels (B, augment_dim) or None (no augmentation:
the training-time augmentation inputs are zero at test time). F runs in the caller's
precision (autocast, or the weights' dtype); D is returned in float32 as EDM returns it.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from pipeline.models.edm.unets import DhariwalUNet, SongUNet

UNETS = {"SongUNet": SongUNet, "DhariwalUNet": DhariwalUNet}


class Precond(nn.Module):
    """What the three preconditioners share: the wrapped `model` (F) and the call."""

    def __init__(self, img_resolution: int, img_channels: int, label_dim: int = 0, use_fp16: bool = False,
                 model_type: str = "SongUNet", **model_kwargs):
        super().__init__()
        self.img_resolution, self.img_channels, self.label_dim = img_resolution, img_channels, label_dim
        # Kept for the record of how the checkpoint was trained; precision here is the caller's.
        self.use_fp16 = use_fp16
        self.model = UNETS[model_type](img_resolution=img_resolution, in_channels=img_channels,
                                       out_channels=img_channels, label_dim=label_dim, **model_kwargs)

    def coefficients(self, sigma: torch.Tensor) -> tuple:
        """(c_skip, c_out, c_in, c_noise) at noise level sigma."""
        raise NotImplementedError

    def forward(self, x: torch.Tensor, sigma: torch.Tensor | float, class_labels: torch.Tensor | None = None,
                augment_labels: torch.Tensor | None = None) -> torch.Tensor:
        x = x.to(torch.float32)
        sigma = torch.as_tensor(sigma, dtype=torch.float32, device=x.device).reshape(-1, 1, 1, 1)
        if self.label_dim == 0:
            class_labels = None
        elif class_labels is None:
            class_labels = x.new_zeros(x.shape[0], self.label_dim)
        else:
            class_labels = class_labels.to(torch.float32).reshape(-1, self.label_dim)
        c_skip, c_out, c_in, c_noise = self.coefficients(sigma)
        inner = self.model(c_in * x, c_noise.flatten().expand(x.shape[0]), class_labels, augment_labels)
        return c_skip * x + c_out * inner.to(torch.float32)


class VPPrecond(Precond):
    """Variance preserving (Song et al. 2021): sigma(t) = sqrt(exp(beta_d t^2 / 2 + beta_min t) - 1)."""

    def __init__(self, img_resolution: int, img_channels: int, label_dim: int = 0, use_fp16: bool = False,
                 beta_d: float = 19.9, beta_min: float = 0.1, M: int = 1000, epsilon_t: float = 1e-5,
                 model_type: str = "SongUNet", **model_kwargs):
        super().__init__(img_resolution, img_channels, label_dim, use_fp16, model_type, **model_kwargs)
        self.beta_d, self.beta_min, self.M, self.epsilon_t = beta_d, beta_min, M, epsilon_t
        self.sigma_min = math.sqrt(math.expm1(0.5 * beta_d * epsilon_t ** 2 + beta_min * epsilon_t))
        self.sigma_max = math.sqrt(math.expm1(0.5 * beta_d + beta_min))

    def sigma(self, t) -> torch.Tensor:
        t = torch.as_tensor(t)
        return ((0.5 * self.beta_d * t ** 2 + self.beta_min * t).exp() - 1).sqrt()

    def sigma_inv(self, sigma) -> torch.Tensor:
        sigma = torch.as_tensor(sigma)
        return ((self.beta_min ** 2 + 2 * self.beta_d * (1 + sigma ** 2).log()).sqrt() - self.beta_min) / self.beta_d

    def coefficients(self, sigma):
        # EDM Table 1, VP column.
        return 1.0, -sigma, 1 / (sigma ** 2 + 1).sqrt(), (self.M - 1) * self.sigma_inv(sigma)


class VEPrecond(Precond):
    """Variance exploding (Song et al. 2021)."""

    def __init__(self, img_resolution: int, img_channels: int, label_dim: int = 0, use_fp16: bool = False,
                 sigma_min: float = 0.02, sigma_max: float = 100, model_type: str = "SongUNet", **model_kwargs):
        super().__init__(img_resolution, img_channels, label_dim, use_fp16, model_type, **model_kwargs)
        self.sigma_min, self.sigma_max = sigma_min, sigma_max

    def coefficients(self, sigma):
        # EDM Table 1, VE column.
        return 1.0, sigma, 1.0, (0.5 * sigma).log()


class EDMPrecond(Precond):
    """EDM's own preconditioning, unit variance of F's input and target at every sigma."""

    def __init__(self, img_resolution: int, img_channels: int, label_dim: int = 0, use_fp16: bool = False,
                 sigma_min: float = 0.0, sigma_max: float = math.inf, sigma_data: float = 0.5,
                 model_type: str = "DhariwalUNet", **model_kwargs):
        super().__init__(img_resolution, img_channels, label_dim, use_fp16, model_type, **model_kwargs)
        self.sigma_min, self.sigma_max, self.sigma_data = sigma_min, sigma_max, sigma_data

    def coefficients(self, sigma):
        # EDM Table 1, "ours" column.
        s2, d2 = sigma ** 2, self.sigma_data ** 2
        return d2 / (s2 + d2), sigma * self.sigma_data / (s2 + d2).sqrt(), 1 / (s2 + d2).sqrt(), sigma.log() / 4


PRECONDS = {"vp": VPPrecond, "ve": VEPrecond, "edm": EDMPrecond}

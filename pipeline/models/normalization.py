"""Input transforms inside a classifier, in every form RobustBench's model classes apply them.

The model always takes [0, 1] images; its first step is one of:

    "none"        the image as it is (RobustBench's `Standard` WRN-28-10)
    "mu_sigma"    (x - mu) / sigma with `mu` and `sigma` (1, C, 1, 1) buffers that belong to the
                  state dict: a file that holds them overrides the class's constants (Rice2020,
                  Augustin2020, ...), a file without them keeps the constants where RobustBench's
                  loader accepts that (Wong2020Fast, Chen2020Efficient, ...)
    "mean_std"    (x - mean) / std with constants that are not in the state dict (DeepMind's
                  WideResNet and PreActResNet: RobustBench registers them non-persistent)
    "2x-1"        2x - 1, images in [-1, 1] (Hendrycks2019Using)
    "per_image"   each image standardised by its own mean and (unbiased) standard deviation, the
                  deviation floored at 1 / sqrt(C H W) (Ding2020MMA)
"""

from __future__ import annotations

import math

import torch
from torch import nn

from pipeline.errors import ConfigError

NORMALIZATIONS = ("none", "mu_sigma", "mean_std", "2x-1", "per_image")
# CIFAR-10 training-set statistics, the constants most RobustBench classes use.
CIFAR_MU = (0.4914, 0.4822, 0.4465)
CIFAR_SIGMA = (0.2471, 0.2435, 0.2616)


def add_normalization(module: nn.Module, normalization: str, channels: int,
                      mean=None, std=None) -> None:
    """Give `module` the input transform `normalization` (see the module docstring); mean and
    std are its constants (default: CIFAR-10's for 3 channels, 0.5 otherwise)."""
    if normalization not in NORMALIZATIONS:
        raise ConfigError(f"normalization must be one of {NORMALIZATIONS}, got {normalization!r}")
    module.normalization = normalization
    if normalization not in ("mu_sigma", "mean_std"):
        return
    mean = tuple(mean) if mean is not None else (CIFAR_MU if channels == 3 else (0.5,) * channels)
    std = tuple(std) if std is not None else (CIFAR_SIGMA if channels == 3 else (0.5,) * channels)
    if len(mean) != channels or len(std) != channels:
        raise ConfigError(f"normalization constants need {channels} values each, got mean {mean} and std {std}")
    if normalization == "mu_sigma":
        module.register_buffer("mu", torch.tensor(mean).view(1, channels, 1, 1))
        module.register_buffer("sigma", torch.tensor(std).view(1, channels, 1, 1))
    else:
        module.register_buffer("mean", torch.tensor(mean).view(1, channels, 1, 1), persistent=False)
        module.register_buffer("std", torch.tensor(std).view(1, channels, 1, 1), persistent=False)


def normalize(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """x after the module's input transform."""
    kind = getattr(module, "normalization", "none")
    if kind == "mu_sigma":
        return (x - module.mu) / module.sigma
    if kind == "mean_std":
        return (x - module.mean) / module.std
    if kind == "2x-1":
        return 2.0 * x - 1.0
    if kind == "per_image":
        mu = x.mean(dim=(1, 2, 3), keepdim=True)
        sd = x.std(dim=(1, 2, 3), keepdim=True)
        # The floor keeps a constant image finite; it is the deviation of a one-hot image.
        floor = torch.ones_like(sd) / math.sqrt(x[0].numel())
        return (x - mu) / torch.maximum(sd, floor)
    return x


__all__ = ["NORMALIZATIONS", "CIFAR_MU", "CIFAR_SIGMA", "add_normalization", "normalize"]

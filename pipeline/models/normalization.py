"""Input standardisation inside a classifier, in the forms RobustBench's checkpoints carry it.

"none": the model sees [0, 1] images as they are (RobustBench's `Standard` WRN-28-10);
"mu_sigma": (x - mu) / sigma with `mu` and `sigma` (1, C, 1, 1) buffers that the checkpoint
holds (RobustBench's Rice2020, Wong2020Fast, Augustin2020, ...: their state dicts name them so).
"""

from __future__ import annotations

import torch
from torch import nn

from pipeline.errors import ConfigError

NORMALIZATIONS = ("none", "mu_sigma")
# CIFAR-10 training-set statistics, the buffers' initial values until a checkpoint overwrites them.
CIFAR_MU = (0.4914, 0.4822, 0.4465)
CIFAR_SIGMA = (0.2471, 0.2435, 0.2616)


def add_normalization(module: nn.Module, normalization: str, channels: int) -> None:
    """Register `mu` and `sigma` on `module` where `normalization` is "mu_sigma"."""
    if normalization not in NORMALIZATIONS:
        raise ConfigError(f"normalization must be one of {NORMALIZATIONS}, got {normalization!r}")
    if normalization == "mu_sigma":
        mu = CIFAR_MU if channels == 3 else (0.5,) * channels
        sigma = CIFAR_SIGMA if channels == 3 else (0.5,) * channels
        module.register_buffer("mu", torch.tensor(mu).view(1, channels, 1, 1))
        module.register_buffer("sigma", torch.tensor(sigma).view(1, channels, 1, 1))


def normalize(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """x standardised by the module's `mu` and `sigma` buffers, if it has them."""
    if "mu" in module._buffers:
        return (x - module.mu) / module.sigma
    return x


__all__ = ["NORMALIZATIONS", "add_normalization", "normalize"]

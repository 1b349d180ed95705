"""A small VGG-style CNN for the 8x8 digits, the classifier F that Mixup Inference wraps."""

from __future__ import annotations

import torch
from torch import nn

from pipeline.errors import ConfigError, InputError


class SmallCNN(nn.Module):
    """Two conv stages (two 3x3 convs + 2x2 max-pool each) and a two-layer MLP head.

    x float32 (B, C, H, W) in [0, 1] -> logits (B, num_classes). No batch norm, so train and
    eval mode compute the same function (attacks and MI see exactly what was trained) and a
    single example's output does not depend on the rest of its batch. The model keeps its
    JSON-able constructor arguments in `self.config` (with "arch": "cnn").
    """

    def __init__(self, in_channels: int = 1, num_classes: int = 10, image_size: int = 8, width: int = 32):
        super().__init__()
        if image_size % 4:
            raise ConfigError(f"cnn: image_size must be divisible by 4 (two 2x2 poolings), got {image_size}")
        self.config = {"arch": "cnn", "in_channels": int(in_channels), "num_classes": int(num_classes),
                       "image_size": int(image_size), "width": int(width)}
        self.in_channels, self.image_size, self.num_classes = in_channels, image_size, num_classes
        w = width
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, w, 3, padding=1), nn.ReLU(),
            nn.Conv2d(w, w, 3, padding=1), nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(w, 2 * w, 3, padding=1), nn.ReLU(),
            nn.Conv2d(2 * w, 2 * w, 3, padding=1), nn.ReLU(),
            nn.MaxPool2d(2),
        )
        flat = 2 * w * (image_size // 4) ** 2
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(flat, 4 * w), nn.ReLU(), nn.Linear(4 * w, num_classes))
        # Channels-last: on a CPU the NCHW max-pool dominates a large batch (BENCHMARKS.md,
        # "The digits CNN's memory format"); the state dict is the same either way.
        self.features.to(memory_format=torch.channels_last)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or x.shape[1:] != (self.in_channels, self.image_size, self.image_size):
            raise InputError(f"cnn expects x of shape (B, {self.in_channels}, {self.image_size}, {self.image_size}), got {tuple(x.shape)}")
        # Centre [0, 1] inputs on 0 inside the model, so every caller passes plain images.
        return self.head(self.features((2.0 * x - 1.0).contiguous(memory_format=torch.channels_last)))


__all__ = ["SmallCNN"]

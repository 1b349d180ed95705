"""The undefended baseline: a classifier as it is, behind the defense interface."""

from __future__ import annotations

import torch
from torch import nn

from pipeline.rng import Draw
from pipeline.defenses.base import Defense


class Plain(Defense):
    """logits = F(x) for x (B, C, H, W) in [0, 1]; one cell, deterministic."""

    def __init__(self, classifier: nn.Module, num_classes: int, in_channels: int, image_size: int | None):
        super().__init__(num_classes, in_channels, image_size)
        self.classifier = classifier

    def partial(self, x: torch.Tensor, cells: torch.Tensor, draw: Draw) -> torch.Tensor:
        self.check_cells(cells)
        return self.cost.count(self.classifier(x), x.shape[0]) * cells.shape[0]

    def base_classifier(self) -> Defense:
        return Plain(self.classifier, self.num_classes, self.in_channels, self.image_size)

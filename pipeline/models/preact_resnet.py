"""PreAct ResNet-18 (He et al. 2016b) with the parameter names of RobustBench's checkpoints.

A 3x3 stem of 64 channels (no BN after it), four stages of two pre-activation blocks (64, 128,
256, 512 channels, strides 1, 2, 2, 2), global average pooling, one linear layer; names conv1,
layer{1..4}.{i}.{bn1,conv1,bn2,conv2,shortcut.0}, linear, as RobustBench's PreActResNet18.

Two variants of RobustBench's zoo: `shortcut="activation"` projects the block's activated input
rather than its raw input (its PreActBlockV2, and PreActBlock with out_shortcut), and
`bn_before_fc` adds a final BN-ReLU (`bn`) before pooling (Rice2020Overfitting's L2 model,
Addepalli2021Towards_PARN18).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.errors import ConfigError, InputError
from pipeline.models.normalization import add_normalization, normalize

SHORTCUTS = ("input", "activation")


class PreActBlock(nn.Module):
    """BN-ReLU-conv twice, added to the input (or to a 1x1 projection where the shape changes)."""

    def __init__(self, in_planes: int, planes: int, stride: int = 1, shortcut: str = "input"):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.project_activation = shortcut == "activation"
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = F.relu(self.bn1(x))
        if hasattr(self, "shortcut"):
            shortcut = self.shortcut(a if self.project_activation else x)
        else:
            shortcut = x
        return self.conv2(F.relu(self.bn2(self.conv1(a)))) + shortcut


class PreActResNet18(nn.Module):
    """x float32 (B, C, H, W) in [0, 1] -> logits (B, num_classes); normalization as in WideResNet."""

    def __init__(self, num_classes: int = 10, in_channels: int = 3, normalization: str = "none",
                 mean: list | None = None, std: list | None = None, shortcut: str = "input",
                 bn_before_fc: bool = False):
        super().__init__()
        if shortcut not in SHORTCUTS:
            raise ConfigError(f"preact-resnet18: shortcut must be one of {SHORTCUTS}, got {shortcut!r}")
        self.config = {"arch": "preact-resnet18", "num_classes": int(num_classes), "in_channels": int(in_channels),
                       "normalization": normalization}
        if mean is not None:
            self.config.update(mean=list(mean), std=list(std))
        if shortcut != "input":
            self.config["shortcut"] = shortcut
        if bn_before_fc:
            self.config["bn_before_fc"] = True
        self.in_channels, self.num_classes = in_channels, num_classes
        add_normalization(self, normalization, in_channels, mean, std)
        self.conv1 = nn.Conv2d(in_channels, 64, 3, stride=1, padding=1, bias=False)
        layers, in_planes = [], 64
        for planes, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
            layers.append(nn.Sequential(PreActBlock(in_planes, planes, stride, shortcut),
                                        PreActBlock(planes, planes, 1, shortcut)))
            in_planes = planes
        self.layer1, self.layer2, self.layer3, self.layer4 = layers
        if bn_before_fc:
            self.bn = nn.BatchNorm2d(512)
        self.linear = nn.Linear(512, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise InputError(f"preact-resnet18 expects x of shape (B, {self.in_channels}, H, W), got {tuple(x.shape)}")
        out = self.layer4(self.layer3(self.layer2(self.layer1(self.conv1(normalize(self, x))))))
        if hasattr(self, "bn"):
            out = F.relu(self.bn(out))
        return self.linear(out.mean((2, 3)))


__all__ = ["PreActResNet18", "PreActBlock", "SHORTCUTS"]

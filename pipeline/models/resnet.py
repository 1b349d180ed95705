"""ResNet-18 and ResNet-50 (He et al. 2016), CIFAR variant: 3x3 stride-1 stem, no max-pool (as in
Madry et al. 2018, MI and RobustBench's ResNet), with RobustBench's parameter names."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.errors import ConfigError, InputError
from pipeline.models.normalization import NORMALIZATIONS, add_normalization, normalize

# Per-channel CIFAR-10 training-set statistics; the model standardises [0, 1] inputs itself.
CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2470, 0.2435, 0.2616)


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN layers with an identity (or 1x1 conv-BN projection) shortcut (He et al. 2016, eq. 1-2)."""

    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False), nn.BatchNorm2d(planes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNet18(nn.Module):
    """ResNet-18 for 32x32 images: x float32 (B, C, 32, 32) in [0, 1] -> logits (B, num_classes).

    Four stages of two BasicBlocks (64, 128, 256, 512 channels, strides 1, 2, 2, 2), global
    average pooling, one linear layer; 11.2M parameters for 10 classes. Parameter names are
    RobustBench's ResNet-18's. normalization: "cifar" (ours: the CIFAR statistics as constants,
    not in the checkpoint), or RobustBench's "none" and "mu_sigma" (pipeline.models.normalization).
    `self.config` holds the JSON-able constructor arguments (with "arch": "resnet18").
    """

    def __init__(self, num_classes: int = 10, in_channels: int = 3, normalization: str = "cifar",
                 mean: list | None = None, std: list | None = None):
        super().__init__()
        if normalization != "cifar" and normalization not in NORMALIZATIONS:
            raise ConfigError(f"resnet18: normalization must be 'cifar' or one of {NORMALIZATIONS}, got {normalization!r}")
        self.config = {"arch": "resnet18", "num_classes": int(num_classes), "in_channels": int(in_channels)}
        if normalization != "cifar":
            self.config["normalization"] = normalization
        if mean is not None:
            self.config.update(mean=list(mean), std=list(std))
        self.in_channels, self.num_classes = in_channels, num_classes
        if normalization == "cifar":
            mean = CIFAR_MEAN if in_channels == 3 else (0.5,) * in_channels
            std = CIFAR_STD if in_channels == 3 else (0.5,) * in_channels
            # Constants, not state: kept out of the checkpoint so old checkpoints load unchanged.
            self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1), persistent=False)
            self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1), persistent=False)
        else:
            add_normalization(self, normalization, in_channels, mean, std)
        self.conv1 = nn.Conv2d(in_channels, 64, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        layers, in_planes = [], 64
        for planes, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
            layers.append(nn.Sequential(BasicBlock(in_planes, planes, stride), BasicBlock(planes, planes, 1)))
            in_planes = planes
        self.layer1, self.layer2, self.layer3, self.layer4 = layers
        self.linear = nn.Linear(512, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise InputError(f"resnet18 expects x of shape (B, {self.in_channels}, H, W), got {tuple(x.shape)}")
        x = (x - self.mean) / self.std if "mean" in self._buffers else normalize(self, x)
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        return self.linear(torch.flatten(F.adaptive_avg_pool2d(out, 1), 1))


class Bottleneck(nn.Module):
    """1x1 conv-BN down to `planes`, 3x3 conv-BN (the block's stride), 1x1 conv-BN up to 4 planes,
    added to the input (or its 1x1 conv-BN projection), then ReLU."""

    expansion = 4

    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        out = self.expansion * planes
        self.conv1 = nn.Conv2d(in_planes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, out, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != out:
            self.shortcut = nn.Sequential(nn.Conv2d(in_planes, out, 1, stride=stride, bias=False), nn.BatchNorm2d(out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        return F.relu(self.bn3(self.conv3(out)) + self.shortcut(x))


class ResNet50(nn.Module):
    """ResNet-50 for 32x32 images: four stages of 3, 4, 6, 3 Bottlenecks (64, 128, 256, 512
    planes, outputs 4x wider, strides 1, 2, 2, 2) after a 3x3 conv-BN-ReLU stem, global average
    pooling, one linear layer from 2048 features. x in [0, 1] -> logits; normalization as in
    pipeline.models.normalization (Engstrom2019Robustness and Augustin2020Adversarial carry mu/sigma)."""

    def __init__(self, num_classes: int = 10, in_channels: int = 3, normalization: str = "none",
                 mean: list | None = None, std: list | None = None):
        super().__init__()
        self.config = {"arch": "resnet50", "num_classes": int(num_classes), "in_channels": int(in_channels),
                       "normalization": normalization}
        if mean is not None:
            self.config.update(mean=list(mean), std=list(std))
        self.in_channels, self.num_classes = in_channels, num_classes
        add_normalization(self, normalization, in_channels, mean, std)
        self.conv1 = nn.Conv2d(in_channels, 64, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        layers, in_planes = [], 64
        for planes, n, stride in ((64, 3, 1), (128, 4, 2), (256, 6, 2), (512, 3, 2)):
            blocks = []
            for i in range(n):
                blocks.append(Bottleneck(in_planes, planes, stride if i == 0 else 1))
                in_planes = planes * Bottleneck.expansion
            layers.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3, self.layer4 = layers
        self.linear = nn.Linear(512 * Bottleneck.expansion, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise InputError(f"resnet50 expects x of shape (B, {self.in_channels}, H, W), got {tuple(x.shape)}")
        out = F.relu(self.bn1(self.conv1(normalize(self, x))))
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        return self.linear(out.mean((2, 3)))


__all__ = ["ResNet18", "ResNet50", "BasicBlock", "Bottleneck"]

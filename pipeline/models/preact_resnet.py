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

    def __init__(self, in_planes: int, planes: int, stride: int = 1, shortcut: str = "input", act=F.relu):
        super().__init__()
        self.act = act
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.project_activation = shortcut == "activation"
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.act(self.bn1(x))
        if hasattr(self, "shortcut"):
            shortcut = self.shortcut(a if self.project_activation else x)
        else:
            shortcut = x
        return self.conv2(self.act(self.bn2(self.conv1(a)))) + shortcut


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


class PreActGroup(nn.Module):
    def __init__(self, n: int, in_planes: int, planes: int, stride: int, act):
        super().__init__()
        self.layer = nn.Sequential(*(PreActBlock(in_planes if i == 0 else planes, planes, stride if i == 0 else 1,
                                                 "activation", act) for i in range(n)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x)


class RobustResNet(nn.Module):
    """Huang et al. 2022's RobustResNet in its basic-block form (RobustBench's
    Huang2022Revisiting_WRN-A4): a 3x3 stem `stem_conv` to widths[0], groups `blocks.{i}.layer`
    of depths[i] pre-activation blocks (shortcut from the activation, stride 1 then 2, 2), a
    final BN (`norm1`) and activation, global average pooling, `fc`. activation "relu" or
    "silu". Its mu/sigma buffers are (C, 1, 1), as the publisher's class holds them."""

    def __init__(self, widths: list = (16, 160, 448, 384), depths: list = (27, 28, 13), num_classes: int = 10,
                 in_channels: int = 3, activation: str = "silu", normalization: str = "mu_sigma",
                 mean: list | None = None, std: list | None = None):
        super().__init__()
        if len(widths) != len(depths) + 1:
            raise ConfigError(f"robust-resnet: widths needs one entry more than depths, got {list(widths)} and {list(depths)}")
        if activation not in ("relu", "silu"):
            raise ConfigError(f"robust-resnet: activation must be relu or silu, got {activation!r}")
        if normalization not in ("none", "mu_sigma"):
            raise ConfigError(f"robust-resnet: normalization must be none or mu_sigma, got {normalization!r}")
        self.config = {"arch": "robust-resnet", "widths": [int(w) for w in widths], "depths": [int(d) for d in depths],
                       "num_classes": int(num_classes), "in_channels": int(in_channels), "activation": activation,
                       "normalization": normalization}
        if mean is not None:
            self.config.update(mean=list(mean), std=list(std))
        self.in_channels, self.num_classes = in_channels, num_classes
        self.act = F.relu if activation == "relu" else F.silu
        add_normalization(self, normalization, in_channels, mean, std)
        if normalization == "mu_sigma":
            self.mu, self.sigma = self.mu.view(in_channels, 1, 1), self.sigma.view(in_channels, 1, 1)
        self.stem_conv = nn.Conv2d(in_channels, widths[0], 3, stride=1, padding=1, bias=False)
        self.blocks = nn.ModuleList(PreActGroup(n, widths[i], widths[i + 1], 1 if i == 0 else 2, self.act)
                                    for i, n in enumerate(depths))
        self.norm1 = nn.BatchNorm2d(widths[-1])
        self.fc = nn.Linear(widths[-1], num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise InputError(f"robust-resnet expects x of shape (B, {self.in_channels}, H, W), got {tuple(x.shape)}")
        out = self.stem_conv(normalize(self, x))
        for group in self.blocks:
            out = group(out)
        return self.fc(self.act(self.norm1(out)).mean((2, 3)))


__all__ = ["PreActResNet18", "PreActBlock", "RobustResNet", "SHORTCUTS"]

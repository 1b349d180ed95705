"""WideResNet (Zagoruyko & Komodakis 2016) with the parameter names of RobustBench's checkpoints.

WRN-d-k: a 3x3 stem of 16 channels, three groups of (d - 4) / 6 pre-activation blocks of
16k, 32k, 64k channels (strides 1, 2, 2), BN-ReLU, global average pooling, one linear layer.
State-dict names follow RobustBench (conv1, block{1,2,3}.layer.{i}.{bn1,conv1,bn2,conv2,
convShortcut}, bn1, fc), so its files load with strict=True. Some RobustBench WRNs (TRADES,
Carmon2019, ...) carry an unused `sub_block1` group; `sub_block1=True` gives it a place.
`head="cosine"` is Pang2020Boosting's classifier: features and the rows of a bias-free `fc`
both scaled to unit length, so each logit is a cosine. `GroupedWideResNet` is the same block
with free widths and depths per group (Huang2021Exploring's WRN-34-R).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.errors import ConfigError, InputError
from pipeline.models.normalization import add_normalization, normalize

HEADS = ("linear", "cosine")
WRN_ACTIVATIONS = ("relu", "pssilu")


class PSSiLU(nn.Module):
    """Dai et al. 2022's parametric shifted SiLU: x (sigmoid(|alpha| x) - |beta|) / (1 - |beta|)."""

    def __init__(self):
        super().__init__()
        self.alpha = nn.Parameter(torch.tensor([1.0]))
        self.beta = nn.Parameter(torch.tensor([1e-8]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        beta = self.beta.abs()
        return x * (torch.sigmoid(self.alpha.abs() * x) - beta) / (1 - beta)


class WideBasicBlock(nn.Module):
    """BN-ReLU-conv twice; where the width or stride changes, the shortcut is a 1x1 conv of the activated input.
    activation: a module in place of ReLU (registered as `activation`, as RobustBench's PAF blocks hold it)."""

    def __init__(self, in_planes: int, out_planes: int, stride: int, activation: nn.Module | None = None):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        if activation is not None:
            self.activation = activation
        self.conv1 = nn.Conv2d(in_planes, out_planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_planes)
        self.conv2 = nn.Conv2d(out_planes, out_planes, 3, stride=1, padding=1, bias=False)
        self.equal = in_planes == out_planes
        self.convShortcut = None if self.equal else nn.Conv2d(in_planes, out_planes, 1, stride=stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        act = self.activation if hasattr(self, "activation") else F.relu
        a = act(self.bn1(x))
        out = self.conv2(act(self.bn2(self.conv1(a))))
        return (x if self.equal else self.convShortcut(a)) + out


class WideGroup(nn.Module):
    """n blocks of one width, held under `layer` as RobustBench's NetworkBlock holds them."""

    def __init__(self, n: int, in_planes: int, out_planes: int, stride: int, activation: nn.Module | None = None):
        super().__init__()
        self.layer = nn.Sequential(*(WideBasicBlock(in_planes if i == 0 else out_planes, out_planes, stride if i == 0 else 1,
                                                    activation) for i in range(n)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x)


class WideResNet(nn.Module):
    """WRN-depth-widen_factor: x float32 (B, C, H, W) in [0, 1] -> logits (B, num_classes).

    normalization: one of pipeline.models.normalization's input transforms, with its constants
    mean and std where it has them. `self.config` holds the JSON-able constructor arguments.
    """

    def __init__(self, depth: int = 28, widen_factor: int = 10, num_classes: int = 10, in_channels: int = 3,
                 sub_block1: bool = False, normalization: str = "none", mean: list | None = None,
                 std: list | None = None, head: str = "linear", activation: str = "relu"):
        super().__init__()
        if depth < 10 or (depth - 4) % 6:
            raise ConfigError(f"wrn: depth must be 6n + 4 with n >= 1, got {depth}")
        if head not in HEADS:
            raise ConfigError(f"wrn: head must be one of {HEADS}, got {head!r}")
        if activation not in WRN_ACTIVATIONS:
            raise ConfigError(f"wrn: activation must be one of {WRN_ACTIVATIONS}, got {activation!r}")
        self.config = {"arch": "wrn", "depth": int(depth), "widen_factor": int(widen_factor), "num_classes": int(num_classes),
                       "in_channels": int(in_channels), "sub_block1": bool(sub_block1), "normalization": normalization}
        if mean is not None:
            self.config.update(mean=list(mean), std=list(std))
        if head != "linear":
            self.config["head"] = head
        if activation != "relu":
            self.config["activation"] = activation
        self.in_channels, self.num_classes, self.head = in_channels, num_classes, head
        # PSSiLU is one module shared by every block and the head (Dai2021Parameterizing): the
        # state dict names it once per place, and loading gives it the values named last (`activation.*`).
        shared = PSSiLU() if activation == "pssilu" else None
        add_normalization(self, normalization, in_channels, mean, std)
        n = (depth - 4) // 6
        widths = [16, 16 * widen_factor, 32 * widen_factor, 64 * widen_factor]
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, stride=1, padding=1, bias=False)
        self.block1 = WideGroup(n, widths[0], widths[1], 1, shared)
        if sub_block1:
            self.sub_block1 = WideGroup(n, widths[0], widths[1], 1, shared)  # stored by some checkpoints, never run
        self.block2 = WideGroup(n, widths[1], widths[2], 2, shared)
        self.block3 = WideGroup(n, widths[2], widths[3], 2, shared)
        self.bn1 = nn.BatchNorm2d(widths[3])
        if shared is not None:
            self.activation = shared
        self.fc = nn.Linear(widths[3], num_classes, bias=head == "linear")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise InputError(f"wrn expects x of shape (B, {self.in_channels}, H, W), got {tuple(x.shape)}")
        out = self.block3(self.block2(self.block1(self.conv1(normalize(self, x)))))
        act = self.activation if hasattr(self, "activation") else F.relu
        features = act(self.bn1(out)).mean((2, 3))
        if self.head == "cosine":
            return F.linear(F.normalize(features, dim=1), F.normalize(self.fc.weight, dim=1))
        return self.fc(features)


class GroupedWideResNet(nn.Module):
    """A WRN whose groups have their own widths and depths: stem `stem_conv` to widths[0], then
    group i (blocks[i], depths[i] blocks, stride 1 for the first group and 2 after) to
    widths[i + 1], BN-ReLU, global average pooling, `fc`. x in [0, 1] -> logits."""

    def __init__(self, widths: list = (16, 160, 320, 640), depths: list = (5, 5, 5), num_classes: int = 10,
                 in_channels: int = 3, normalization: str = "none", mean: list | None = None, std: list | None = None):
        super().__init__()
        if len(widths) != len(depths) + 1:
            raise ConfigError(f"wrn-grouped: widths needs one entry more than depths, got {list(widths)} and {list(depths)}")
        self.config = {"arch": "wrn-grouped", "widths": [int(w) for w in widths], "depths": [int(d) for d in depths],
                       "num_classes": int(num_classes), "in_channels": int(in_channels), "normalization": normalization}
        if mean is not None:
            self.config.update(mean=list(mean), std=list(std))
        self.in_channels, self.num_classes = in_channels, num_classes
        add_normalization(self, normalization, in_channels, mean, std)
        self.stem_conv = nn.Conv2d(in_channels, widths[0], 3, stride=1, padding=1, bias=False)
        self.blocks = nn.ModuleList(WideGroup(n, widths[i], widths[i + 1], 1 if i == 0 else 2)
                                    for i, n in enumerate(depths))
        self.bn1 = nn.BatchNorm2d(widths[-1])
        self.fc = nn.Linear(widths[-1], num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise InputError(f"wrn-grouped expects x of shape (B, {self.in_channels}, H, W), got {tuple(x.shape)}")
        out = self.stem_conv(normalize(self, x))
        for group in self.blocks:
            out = group(out)
        return self.fc(F.relu(self.bn1(out)).mean((2, 3)))


__all__ = ["WideResNet", "GroupedWideResNet", "HEADS"]

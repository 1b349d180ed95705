"""DeepMind's WideResNet and PreActResNet (Gowal et al. 2020, Rebuffi et al. 2021), as
RobustBench's zoo holds them, with their parameter names.

What sets them apart from the TRADES-style WRN of pipeline.models.wide_resnet:

- the activation is a constructor choice: "relu", "swish" (x sigmoid(x), the Gowal/Rebuffi
  models) or "silu" (torch's fused SiLU, the Wang2023/Bartoldson2024 models); both compute the same
  function, each is kept so that the logits follow the publisher's arithmetic;
- every 3x3 convolution that opens a block is unpadded and preceded by an explicit pad: one
  pixel on each side at stride 1, but at stride 2 only on the right and bottom (TensorFlow's
  `SAME` for even inputs), which shifts the sampling grid against a symmetric pad;
- the input is standardised by mean/std constants that are not part of the state dict
  (normalization "mean_std"; CIFAR-10's or CIFAR-100's statistics, given by the zoo entry);
- the final pooling is an 8x8 (WRN) or 4x4 (PreActResNet) average, global for 32x32 images.

`meansparse=True` is Amini et al. 2024's MeanSparse WRN: after every BatchNorm of a block, after
each block's sum and after the final BatchNorm, a feature within threshold * sqrt(running_var)
of its channel's running_mean is replaced by that mean (`meansparse_{0,1,2}`, `meansparse_end`;
buffers running_mean, running_var, threshold, flag_update_statistics, batch_num; a threshold of
0 passes the features through).

Names: DMWideResNet: init_conv, layer.{g}.block.{i}.{batchnorm_0, conv_0, batchnorm_1, conv_1,
shortcut}, batchnorm, logits. DMPreActResNet: conv_2d, layer_{s}.{i}.{batchnorm_0, conv_2d_1,
batchnorm_1, conv_2d_2, shortcut}, batchnorm, logits. The PreAct shortcut is a 3x3 stride-s
convolution of the raw (not activated) block input, padded like the block's first convolution.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.errors import ConfigError, InputError
from pipeline.models.normalization import add_normalization, normalize

ACTIVATIONS = ("relu", "swish", "silu")
PREACT_DEPTHS = {18: (2, 2, 2, 2), 34: (3, 4, 6, 3)}


def activation_fn(name: str):
    """The elementwise function of an activation name."""
    if name == "relu":
        return F.relu
    if name == "swish":
        return lambda x: x * torch.sigmoid(x)
    if name == "silu":
        return F.silu
    raise ConfigError(f"activation must be one of {ACTIVATIONS}, got {name!r}")


def same_pad(x: torch.Tensor, stride: int) -> torch.Tensor:
    """The padding a 3x3 convolution of this stride gets before it runs unpadded."""
    if stride == 1:
        return F.pad(x, (1, 1, 1, 1))
    if stride == 2:
        return F.pad(x, (0, 1, 0, 1))
    raise ConfigError(f"DeepMind blocks have stride 1 or 2, got {stride}")


class MeanSparse(nn.Module):
    """Features near their channel's running mean (|x - mean| < threshold * sqrt(var)) set to that mean."""

    def __init__(self, planes: int):
        super().__init__()
        self.register_buffer("running_mean", torch.zeros(planes))
        self.register_buffer("running_var", torch.zeros(planes))
        self.register_buffer("threshold", torch.tensor(0.0))
        # Kept so that the publisher's files load; a file that sets it is refused at loading
        # (pipeline.models.robustbench_zoo): it would make inference update the statistics.
        self.register_buffer("flag_update_statistics", torch.tensor(0))
        self.register_buffer("batch_num", torch.tensor(0.0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.threshold == 0:
            return x
        mean = self.running_mean.view(1, -1, 1, 1)
        band = self.threshold * torch.sqrt(self.running_var).view(1, -1, 1, 1)
        return torch.where((x - mean).abs() < band, mean * torch.ones_like(x), x)


def _identity(x: torch.Tensor) -> torch.Tensor:
    return x


class DMWideBlock(nn.Module):
    """Pre-activation block; where the width changes, the shortcut is a 1x1 conv of the activated input."""

    def __init__(self, in_planes: int, out_planes: int, stride: int, act, meansparse: bool = False):
        super().__init__()
        self.act, self.stride = act, stride
        self.batchnorm_0 = nn.BatchNorm2d(in_planes)
        self.conv_0 = nn.Conv2d(in_planes, out_planes, 3, stride=stride, padding=0, bias=False)
        self.batchnorm_1 = nn.BatchNorm2d(out_planes)
        self.conv_1 = nn.Conv2d(out_planes, out_planes, 3, stride=1, padding=1, bias=False)
        self.shortcut = nn.Conv2d(in_planes, out_planes, 1, stride=stride, bias=False) if in_planes != out_planes else None
        if meansparse:
            self.meansparse_0, self.meansparse_1 = MeanSparse(in_planes), MeanSparse(out_planes)
            self.meansparse_2 = MeanSparse(out_planes)
        self.sparse = meansparse

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s0, s1, s2 = ((self.meansparse_0, self.meansparse_1, self.meansparse_2) if self.sparse
                      else (_identity, _identity, _identity))
        a = self.act(s0(self.batchnorm_0(x)))
        out = self.conv_1(self.act(s1(self.batchnorm_1(self.conv_0(same_pad(a, self.stride))))))
        return s2((x if self.shortcut is None else self.shortcut(a)) + out)


class DMWideGroup(nn.Module):
    def __init__(self, n: int, in_planes: int, out_planes: int, stride: int, act, meansparse: bool = False):
        super().__init__()
        self.block = nn.Sequential(*(DMWideBlock(in_planes if i == 0 else out_planes, out_planes,
                                                 stride if i == 0 else 1, act, meansparse) for i in range(n)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block(x)


class DMWideResNet(nn.Module):
    """DeepMind's WRN-depth-width: x float32 (B, C, 32, 32) in [0, 1] -> logits (B, num_classes)."""

    def __init__(self, depth: int = 28, width: int = 10, num_classes: int = 10, in_channels: int = 3,
                 activation: str = "swish", normalization: str = "mean_std", mean: list | None = None,
                 std: list | None = None, meansparse: bool = False):
        super().__init__()
        if depth < 10 or (depth - 4) % 6:
            raise ConfigError(f"dm-wrn: depth must be 6n + 4 with n >= 1, got {depth}")
        act = activation_fn(activation)
        self.config = {"arch": "dm-wrn", "depth": int(depth), "width": int(width), "num_classes": int(num_classes),
                       "in_channels": int(in_channels), "activation": activation, "normalization": normalization}
        if mean is not None:
            self.config.update(mean=list(mean), std=list(std))
        if meansparse:
            self.config["meansparse"] = True
        self.in_channels, self.num_classes, self.act = in_channels, num_classes, act
        add_normalization(self, normalization, in_channels, mean, std)
        n = (depth - 4) // 6
        widths = [16, 16 * width, 32 * width, 64 * width]
        self.init_conv = nn.Conv2d(in_channels, widths[0], 3, stride=1, padding=1, bias=False)
        self.layer = nn.Sequential(DMWideGroup(n, widths[0], widths[1], 1, act, meansparse),
                                   DMWideGroup(n, widths[1], widths[2], 2, act, meansparse),
                                   DMWideGroup(n, widths[2], widths[3], 2, act, meansparse))
        self.batchnorm = nn.BatchNorm2d(widths[3])
        if meansparse:
            self.meansparse_end = MeanSparse(widths[3])
        self.logits = nn.Linear(widths[3], num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise InputError(f"dm-wrn expects x of shape (B, {self.in_channels}, H, W), got {tuple(x.shape)}")
        out = self.batchnorm(self.layer(self.init_conv(normalize(self, x))))
        if hasattr(self, "meansparse_end"):
            out = self.meansparse_end(out)
        out = F.avg_pool2d(self.act(out), 8)
        return self.logits(out.reshape(-1, out.shape[1]))


class DMPreActBlock(nn.Module):
    def __init__(self, in_planes: int, out_planes: int, stride: int, act):
        super().__init__()
        self.act, self.stride = act, stride
        self.batchnorm_0 = nn.BatchNorm2d(in_planes)
        self.conv_2d_1 = nn.Conv2d(in_planes, out_planes, 3, stride=stride, padding=0, bias=False)
        self.batchnorm_1 = nn.BatchNorm2d(out_planes)
        self.conv_2d_2 = nn.Conv2d(out_planes, out_planes, 3, stride=1, padding=1, bias=False)
        if stride != 1 or in_planes != out_planes:
            self.shortcut = nn.Conv2d(in_planes, out_planes, 3, stride=stride, padding=0, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.act(self.batchnorm_0(x))
        shortcut = self.shortcut(same_pad(x, self.stride)) if hasattr(self, "shortcut") else x
        out = self.conv_2d_2(self.act(self.batchnorm_1(self.conv_2d_1(same_pad(a, self.stride)))))
        return out + shortcut


class DMPreActResNet(nn.Module):
    """DeepMind's PreActResNet-18 or -34 (64..512 channels): x in [0, 1] -> logits (B, num_classes)."""

    def __init__(self, depth: int = 18, num_classes: int = 10, in_channels: int = 3, activation: str = "swish",
                 normalization: str = "mean_std", mean: list | None = None, std: list | None = None):
        super().__init__()
        if depth not in PREACT_DEPTHS:
            raise ConfigError(f"dm-preact-resnet: depth must be one of {sorted(PREACT_DEPTHS)}, got {depth}")
        act = activation_fn(activation)
        self.config = {"arch": "dm-preact-resnet", "depth": int(depth), "num_classes": int(num_classes),
                       "in_channels": int(in_channels), "activation": activation, "normalization": normalization}
        if mean is not None:
            self.config.update(mean=list(mean), std=list(std))
        self.in_channels, self.num_classes, self.act = in_channels, num_classes, act
        add_normalization(self, normalization, in_channels, mean, std)
        self.conv_2d = nn.Conv2d(in_channels, 64, 3, stride=1, padding=1, bias=False)
        in_planes = 64
        for s, (planes, stride, n) in enumerate(zip((64, 128, 256, 512), (1, 2, 2, 2), PREACT_DEPTHS[depth])):
            blocks = [DMPreActBlock(in_planes if i == 0 else planes, planes, stride if i == 0 else 1, act) for i in range(n)]
            setattr(self, f"layer_{s}", nn.Sequential(*blocks))
            in_planes = planes
        self.batchnorm = nn.BatchNorm2d(512)
        self.logits = nn.Linear(512, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise InputError(f"dm-preact-resnet expects x of shape (B, {self.in_channels}, H, W), got {tuple(x.shape)}")
        out = self.conv_2d(normalize(self, x))
        out = self.layer_3(self.layer_2(self.layer_1(self.layer_0(out))))
        out = F.avg_pool2d(self.act(self.batchnorm(out)), 4)
        return self.logits(out.reshape(out.shape[0], -1))


__all__ = ["DMWideResNet", "DMPreActResNet", "ACTIVATIONS"]

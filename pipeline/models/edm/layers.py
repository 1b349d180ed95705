"""The layers of EDM's networks (Karras et al. 2022, NVlabs/edm `training/networks.py`).

Parameter and buffer names follow the published checkpoints, so their state dicts load
with strict=True: Linear/Conv2d hold `weight` and `bias`, a resampling Conv2d holds its FIR
filter as the buffer `resample_filter`, GroupNorm `weight` and `bias`, the Fourier
embedding its random frequencies as the buffer `freqs`.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from pipeline.models.unet import group_norm


def draw_init(shape: list[int], fans: dict) -> torch.Tensor:
    """A random tensor of `shape` drawn by the named initialisation (xavier/kaiming, uniform/normal)."""
    mode, fan_in, fan_out = fans["mode"], fans["fan_in"], fans["fan_out"]
    if mode == "xavier_uniform":
        return math.sqrt(6 / (fan_in + fan_out)) * (torch.rand(*shape) * 2 - 1)
    if mode == "xavier_normal":
        return math.sqrt(2 / (fan_in + fan_out)) * torch.randn(*shape)
    if mode == "kaiming_uniform":
        return math.sqrt(3 / fan_in) * (torch.rand(*shape) * 2 - 1)
    if mode == "kaiming_normal":
        return math.sqrt(1 / fan_in) * torch.randn(*shape)
    raise ValueError(f"unknown init mode {mode!r}")


class Linear(nn.Module):
    """y = x W^T + b."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, init_mode: str = "kaiming_normal",
                 init_weight: float = 1.0, init_bias: float = 0.0):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        fans = dict(mode=init_mode, fan_in=in_features, fan_out=out_features)
        self.weight = nn.Parameter(draw_init([out_features, in_features], fans) * init_weight)
        self.bias = nn.Parameter(draw_init([out_features], fans) * init_bias) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


def fir_filter(taps: list[int]) -> torch.Tensor:
    """The separable 2-d FIR filter f f^T / (sum f)^2, shape (1, 1, k, k)."""
    f = torch.as_tensor(taps, dtype=torch.float32)
    return (torch.outer(f, f) / f.sum().square()).reshape(1, 1, len(taps), len(taps))


class Conv2d(nn.Module):
    """A k x k convolution (k = 0: none) with optional 2x FIR up- or downsampling.

    Unfused: resample, then convolve. Fused (NCSN++'s residual encoder path): downsampling
    convolves first with the padding of both, then filters with stride 2; upsampling filters
    first, then convolves.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel: int, bias: bool = True, up: bool = False,
                 down: bool = False, resample_filter=(1, 1), fused_resample: bool = False,
                 init_mode: str = "kaiming_normal", init_weight: float = 1.0, init_bias: float = 0.0):
        if up and down:
            raise ValueError("Conv2d: up and down are exclusive")
        super().__init__()
        self.in_channels, self.out_channels = in_channels, out_channels
        self.up, self.down, self.fused_resample = up, down, fused_resample
        fans = dict(mode=init_mode, fan_in=in_channels * kernel * kernel, fan_out=out_channels * kernel * kernel)
        self.weight = nn.Parameter(draw_init([out_channels, in_channels, kernel, kernel], fans) * init_weight) if kernel else None
        self.bias = nn.Parameter(draw_init([out_channels], fans) * init_bias) if kernel and bias else None
        self.register_buffer("resample_filter", fir_filter(list(resample_filter)) if up or down else None)

    def _up(self, x: torch.Tensor, pad: int) -> torch.Tensor:
        # Transposed depthwise FIR at stride 2; gain 4 keeps the mean of a constant image.
        f = (self.resample_filter * 4).to(x.dtype).tile([x.shape[1], 1, 1, 1])
        return F.conv_transpose2d(x, f, groups=x.shape[1], stride=2, padding=pad)

    def _down(self, x: torch.Tensor, pad: int) -> torch.Tensor:
        f = self.resample_filter.to(x.dtype).tile([x.shape[1], 1, 1, 1])
        return F.conv2d(x, f, groups=x.shape[1], stride=2, padding=pad)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        w_pad = w.shape[-1] // 2 if w is not None else 0
        f_pad = (self.resample_filter.shape[-1] - 1) // 2 if self.resample_filter is not None else 0
        if self.fused_resample and self.up and w is not None:
            x = F.conv2d(self._up(x, max(f_pad - w_pad, 0)), w, padding=max(w_pad - f_pad, 0))
        elif self.fused_resample and self.down and w is not None:
            x = self._down(F.conv2d(x, w, padding=w_pad + f_pad), 0)
        else:
            if self.up:
                x = self._up(x, f_pad)
            if self.down:
                x = self._down(x, f_pad)
            if w is not None:
                x = F.conv2d(x, w, padding=w_pad)
        if self.bias is not None:
            x = x + self.bias.to(x.dtype).reshape(1, -1, 1, 1)
        return x


class GroupNorm(nn.Module):
    """Group normalisation with min(32, C / 4) groups."""

    def __init__(self, num_channels: int, num_groups: int = 32, min_channels_per_group: int = 4, eps: float = 1e-5):
        super().__init__()
        self.num_groups = min(num_groups, num_channels // min_channels_per_group)
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(num_channels))
        self.bias = nn.Parameter(torch.zeros(num_channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return group_norm(x, self.num_groups, self.weight.to(x.dtype), self.bias.to(x.dtype), self.eps)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """softmax(q^T k / sqrt(d)) applied to v, for (N, d, positions) tensors (Vaswani et al. 2017, eq. 1)."""
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    return out.transpose(1, 2)


class UNetBlock(nn.Module):
    """The residual block of DDPM++, NCSN++ and ADM, with optional 2x resampling and self-attention.

    x -> conv0(silu(norm0(x))) -> the embedding enters (a bias, or ADM's adaptive scale and
    shift) -> conv1(dropout(silu(norm1(.)))) -> + skip(x), times skip_scale; then, with
    attention, + proj(attention(qkv(norm2(.)))), times skip_scale again.
    """

    def __init__(self, in_channels: int, out_channels: int, emb_channels: int, up: bool = False, down: bool = False,
                 attention: bool = False, num_heads: int | None = None, channels_per_head: int = 64,
                 dropout: float = 0.0, skip_scale: float = 1.0, eps: float = 1e-5, resample_filter=(1, 1),
                 resample_proj: bool = False, adaptive_scale: bool = True, init: dict | None = None,
                 init_zero: dict | None = None, init_attn: dict | None = None):
        super().__init__()
        init = init or {}
        init_zero = init_zero if init_zero is not None else dict(init_weight=0)
        self.in_channels, self.out_channels, self.emb_channels = in_channels, out_channels, emb_channels
        if not attention:
            self.num_heads = 0
        else:
            self.num_heads = num_heads if num_heads is not None else out_channels // channels_per_head
        self.dropout = dropout
        self.skip_scale = skip_scale
        self.adaptive_scale = adaptive_scale

        self.norm0 = GroupNorm(in_channels, eps=eps)
        self.conv0 = Conv2d(in_channels, out_channels, 3, up=up, down=down, resample_filter=resample_filter, **init)
        self.affine = Linear(emb_channels, out_channels * (2 if adaptive_scale else 1), **init)
        self.norm1 = GroupNorm(out_channels, eps=eps)
        self.conv1 = Conv2d(out_channels, out_channels, 3, **init_zero)
        self.skip = None
        if out_channels != in_channels or up or down:
            kernel = 1 if resample_proj or out_channels != in_channels else 0
            self.skip = Conv2d(in_channels, out_channels, kernel, up=up, down=down, resample_filter=resample_filter, **init)
        if self.num_heads:
            self.norm2 = GroupNorm(out_channels, eps=eps)
            self.qkv = Conv2d(out_channels, out_channels * 3, 1, **(init_attn if init_attn is not None else init))
            self.proj = Conv2d(out_channels, out_channels, 1, **init_zero)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        orig = x
        x = self.conv0(F.silu(self.norm0(x)))
        params = self.affine(emb).unsqueeze(2).unsqueeze(3).to(x.dtype)
        if self.adaptive_scale:
            scale, shift = params.chunk(2, dim=1)
            x = F.silu(torch.addcmul(shift, self.norm1(x), scale + 1))
        else:
            x = F.silu(self.norm1(x + params))
        x = self.conv1(F.dropout(x, p=self.dropout, training=self.training))
        x = (x + (self.skip(orig) if self.skip is not None else orig)) * self.skip_scale
        if self.num_heads:
            B, C, H, W = x.shape
            # The published qkv channels are ordered (head, channel, q/k/v).
            q, k, v = self.qkv(self.norm2(x)).reshape(B * self.num_heads, C // self.num_heads, 3, H * W).unbind(2)
            a = attention(q, k, v)
            x = (self.proj(a.reshape(B, C, H, W)) + x) * self.skip_scale
        return x


class PositionalEmbedding(nn.Module):
    """[cos(x w_i), sin(x w_i)] with w_i = (1 / max_positions)^(i / (n/2 - endpoint)), i < n/2 (DDPM++, ADM)."""

    def __init__(self, num_channels: int, max_positions: int = 10000, endpoint: bool = False):
        super().__init__()
        self.num_channels, self.max_positions, self.endpoint = num_channels, max_positions, endpoint

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        half = self.num_channels // 2
        freqs = torch.arange(half, dtype=torch.float32, device=x.device) / (half - (1 if self.endpoint else 0))
        freqs = (1 / self.max_positions) ** freqs
        x = torch.outer(x, freqs.to(x.dtype))
        return torch.cat([x.cos(), x.sin()], dim=1)


class FourierEmbedding(nn.Module):
    """[cos(2 pi x f_i), sin(2 pi x f_i)] with fixed random f_i ~ N(0, scale^2) (NCSN++)."""

    def __init__(self, num_channels: int, scale: float = 16):
        super().__init__()
        self.register_buffer("freqs", torch.randn(num_channels // 2) * scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.outer(x, (2 * np.pi * self.freqs).to(x.dtype))
        return torch.cat([x.cos(), x.sin()], dim=1)

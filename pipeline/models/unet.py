"""A class-conditional epsilon-prediction UNet in the style of DDPM (Ho et al. 2020) and ADM
(Dhariwal & Nichol 2021), with classifier-free-guidance style label dropout support
(Ho & Salimans 2022): class index `num_classes` is the NULL class, the unconditional branch.

The forward pass is split into a class-independent `stem` (the input convolution) and the
class-dependent `trunk`, so a diffusion classifier can compute the stem once per noisy image
and reuse it for every class: forward(x, t, y) == trunk(stem(x), t, y).

The class enters only through the embedding, as a per-channel bias after each ResBlock's
first conv. So more than the stem is class-independent: the time embedding, the first
ResBlock's conv1 (and its skip), and, in the last ResBlock, the half of conv1 and of the skip
conv that reads the stem's skip connection. `shared(x, t)` computes all of it once per noisy
image and `conditional(shared, rows, y)` the rest per (image, class):
conditional(shared(x, t), rows, y) == forward(x[rows], t[rows], y).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.config.datasets import dataset_info
from pipeline.errors import ConfigError, InputError


def _num_groups(channels: int) -> int:
    """GroupNorm groups: 32 as in DDPM for wide layers, at least 4 channels a group for narrow ones."""
    for g in (32, 16, 8, 4, 2, 1):
        if channels % g == 0 and channels // g >= 4:
            return g
    return 1


def channels_last(v: torch.Tensor) -> bool:
    """Whether v is a 4-d tensor laid out channels_last (and not also plain NCHW-contiguous)."""
    return v.dim() == 4 and not v.is_contiguous() and v.is_contiguous(memory_format=torch.channels_last)


def group_norm(x: torch.Tensor, groups: int, weight: torch.Tensor, bias: torch.Tensor, eps: float) -> torch.Tensor:
    """F.group_norm, avoiding one slow CPU kernel.

    ATen's bf16/fp16 GroupNorm on a channels_last tensor is much slower than on the same
    tensor in NCHW on CPU (BENCHMARKS.md, "The engine in bf16"), so there the input is
    normalised in NCHW and handed back in channels_last. Compiled graphs generate their own kernel instead.
    """
    if (x.device.type == "cpu" and x.dtype in (torch.bfloat16, torch.float16) and channels_last(x)
            and not torch.compiler.is_compiling()):
        out = F.group_norm(x.contiguous(), groups, weight, bias, eps)
        return out.contiguous(memory_format=torch.channels_last)
    return F.group_norm(x, groups, weight, bias, eps)


class GroupNorm(nn.GroupNorm):
    """nn.GroupNorm (same parameters and values) through `group_norm`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return group_norm(x, self.num_groups, self.weight, self.bias, self.eps)


def gather_rows(v: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """v[rows] in v's memory format (index_select alone would return a channels_last tensor
    as NCHW, and the next op with a channels_last operand would copy it back)."""
    if channels_last(v):
        return v.permute(0, 2, 3, 1).index_select(0, rows).permute(0, 3, 1, 2)
    return v.index_select(0, rows)


def _zero(module: nn.Module) -> nn.Module:
    """Zero-initialise a layer so that each residual branch starts as the identity (ADM)."""
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


class TimestepEmbedding(nn.Module):
    """Sinusoidal embedding of the integer timestep (Vaswani et al. 2017, sec. 3.5; DDPM appendix B)."""

    def __init__(self, dim: int, max_period: float = 10000.0):
        super().__init__()
        half = dim // 2
        freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32) / half)
        # A buffer, not a parameter: fixed, and not stored in checkpoints (persistent=False).
        self.register_buffer("freqs", freqs, persistent=False)
        self.dim = dim

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        """t (B,) integer timesteps -> (B, dim) float embedding."""
        args = t.to(self.freqs.dtype)[:, None] * self.freqs[None, :]
        emb = torch.cat([torch.cos(args), torch.sin(args)], dim=1)
        if self.dim % 2:
            emb = F.pad(emb, (0, 1))
        return emb


class ResBlock(nn.Module):
    """GroupNorm-SiLU-conv, + projected (time, class) embedding, GroupNorm-SiLU-dropout-conv, + skip."""

    def __init__(self, in_ch: int, out_ch: int, emb_ch: int, dropout: float):
        super().__init__()
        self.norm1 = GroupNorm(_num_groups(in_ch), in_ch)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.emb_proj = nn.Linear(emb_ch, out_ch)
        self.norm2 = GroupNorm(_num_groups(out_ch), out_ch)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = _zero(nn.Conv2d(out_ch, out_ch, 3, padding=1))
        self.skip = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        return self.skip(x) + self.outer(self.inner(x), emb)

    def inner(self, x: torch.Tensor) -> torch.Tensor:
        """conv1(silu(norm1(x))): the part before the embedding enters, free of the class."""
        return self.conv1(F.silu(self.norm1(x)))

    def outer(self, h: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        """The residual branch from the first conv's output h on."""
        # The embedding enters after the first conv, as a per-channel bias (DDPM).
        h = h + self.emb_proj(F.silu(emb))[:, :, None, None]
        return self.conv2(self.dropout(F.silu(self.norm2(h))))

    def splits_at(self, start: int) -> bool:
        """Whether input channel `start` is a GroupNorm group boundary, so that inner() of a
        channel concatenation is the sum of the inner_part()s of its pieces."""
        group = self.norm1.num_channels // self.norm1.num_groups
        return start % group == 0

    def inner_part(self, x: torch.Tensor, start: int, bias: bool) -> torch.Tensor:
        """The term of inner() that reads input channels [start, start + x.shape[1]).

        GroupNorm normalises each group on its own, so when the piece covers whole groups
        (splits_at) its normalisation needs no other channel and conv1 is linear in its input
        channels: inner(cat(a, b)) == inner_part(a, 0, True) + inner_part(b, len(a), False).
        """
        c = x.shape[1]
        group = self.norm1.num_channels // self.norm1.num_groups
        u = group_norm(x, c // group, self.norm1.weight[start:start + c], self.norm1.bias[start:start + c], self.norm1.eps)
        return F.conv2d(F.silu(u), self.conv1.weight[:, start:start + c], self.conv1.bias if bias else None,
                        padding=self.conv1.padding)

    def skip_part(self, x: torch.Tensor, start: int, bias: bool) -> torch.Tensor:
        """The term of the 1x1 skip conv that reads input channels [start, start + x.shape[1])."""
        c = x.shape[1]
        return F.conv2d(x, self.skip.weight[:, start:start + c], self.skip.bias if bias else None)


class AttentionBlock(nn.Module):
    """Self-attention over the H*W positions (DDPM at 16x16), residual, heads of <= 64 channels."""

    def __init__(self, channels: int):
        super().__init__()
        self.heads = max(1, channels // 64)
        self.norm = GroupNorm(_num_groups(channels), channels)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj = _zero(nn.Conv2d(channels, channels, 1))

    # Up to this many positions, CPU attention runs as two matmuls: on short maps the fused
    # CPU kernel's backward is the slower of the two in bf16, on 16x16 the faster
    # (BENCHMARKS.md, "The engine in bf16").
    SHORT = 64

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(B, 3, self.heads, C // self.heads, H * W).unbind(1)
        if x.is_cuda or H * W > self.SHORT:
            # (B, heads, HW, d): softmax(q k^T / sqrt(d)) v (Vaswani et al. 2017, eq. 1).
            out = F.scaled_dot_product_attention(q.transpose(-1, -2), k.transpose(-1, -2), v.transpose(-1, -2))
            return x + self.proj(out.transpose(-1, -2).reshape(B, C, H, W))
        # The same equation as two matmuls.
        a = torch.softmax(q.transpose(-1, -2) @ k / math.sqrt(C // self.heads), dim=-1)  # (B, heads, HW, HW)
        return x + self.proj((v @ a.transpose(-1, -2)).reshape(B, C, H, W))


class Downsample(nn.Module):
    """Strided 3x3 conv halving H and W."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class Upsample(nn.Module):
    """Nearest-neighbour 2x upsampling followed by a 3x3 conv (avoids checkerboard artefacts)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class UNet(nn.Module):
    """eps_theta(x_t, t, y): predicts the noise of x_t = sqrt(alpha_t) x_0 + sigma_t eps (DDPM eq. 14).

    x (B, C, H, W) in model space (data 2x-1 in [-1, 1] plus noise), t int64 (B,) in [0, T),
    y int64 (B,) in [0, num_classes]; y == num_classes is the NULL (unconditional) class.
    Returns eps prediction (B, C, H, W). All constructor arguments are JSON-able and kept in
    `self.config`, from which `pipeline.models.registry.build_model` rebuilds the model.
    """

    def __init__(
        self,
        in_channels: int = 1,
        image_size: int = 8,
        num_classes: int = 10,
        base_channels: int = 32,
        channel_mult: tuple[int, ...] = (1, 2),
        num_res_blocks: int = 1,
        attn_resolutions: tuple[int, ...] = (),
        dropout: float = 0.0,
    ):
        super().__init__()
        channel_mult = tuple(int(m) for m in channel_mult)
        attn_resolutions = tuple(int(r) for r in attn_resolutions)
        if image_size % (2 ** (len(channel_mult) - 1)):
            raise ConfigError(
                f"unet: image_size {image_size} is not divisible by 2**{len(channel_mult) - 1} "
                f"(one halving per level of channel_mult {channel_mult})"
            )
        self.config = {
            "arch": "unet",
            "in_channels": int(in_channels),
            "image_size": int(image_size),
            "num_classes": int(num_classes),
            "base_channels": int(base_channels),
            "channel_mult": list(channel_mult),
            "num_res_blocks": int(num_res_blocks),
            "attn_resolutions": list(attn_resolutions),
            "dropout": float(dropout),
        }
        self.in_channels = in_channels
        self.image_size = image_size
        self.num_classes = num_classes
        self.null_class = num_classes
        emb_ch = 4 * base_channels

        self.time_embed = TimestepEmbedding(base_channels)
        self.time_mlp = nn.Sequential(nn.Linear(base_channels, emb_ch), nn.SiLU(), nn.Linear(emb_ch, emb_ch))
        self.class_embed = nn.Embedding(num_classes + 1, emb_ch)

        self.conv_in = nn.Conv2d(in_channels, base_channels, 3, padding=1)

        # Encoder: num_res_blocks ResBlocks per level, halving between levels; every output is a skip.
        self.down = nn.ModuleList()
        skip_chs = [base_channels]
        ch, res = base_channels, image_size
        for level, mult in enumerate(channel_mult):
            for _ in range(num_res_blocks):
                out = base_channels * mult
                self.down.append(self._level_block(ch, out, emb_ch, dropout, res in attn_resolutions))
                ch = out
                skip_chs.append(ch)
            if level != len(channel_mult) - 1:
                self.down.append(nn.ModuleList([Downsample(ch)]))
                res //= 2
                skip_chs.append(ch)

        self.mid = nn.ModuleList([ResBlock(ch, ch, emb_ch, dropout), AttentionBlock(ch), ResBlock(ch, ch, emb_ch, dropout)])

        # Decoder: one more block per level than the encoder, each eating one skip (DDPM).
        self.up = nn.ModuleList()
        for level, mult in reversed(list(enumerate(channel_mult))):
            for _ in range(num_res_blocks + 1):
                out = base_channels * mult
                self.up.append(self._level_block(ch + skip_chs.pop(), out, emb_ch, dropout, res in attn_resolutions))
                ch = out
            if level != 0:
                self.up.append(nn.ModuleList([Upsample(ch)]))
                res *= 2

        self.norm_out = GroupNorm(_num_groups(ch), ch)
        self.conv_out = _zero(nn.Conv2d(ch, in_channels, 3, padding=1))

    @staticmethod
    def _level_block(in_ch: int, out_ch: int, emb_ch: int, dropout: float, attn: bool) -> nn.ModuleList:
        layers = [ResBlock(in_ch, out_ch, emb_ch, dropout)]
        if attn:
            layers.append(AttentionBlock(out_ch))
        return nn.ModuleList(layers)

    def embed(self, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """(time, class) embedding (B, 4*base_channels); the two are summed, as in ADM."""
        return self.time_mlp(self.time_embed(t)) + self.class_embed(y)

    def stem(self, x: torch.Tensor) -> torch.Tensor:
        """The class-independent input conv: x (B, C, H, W) -> h (B, base_channels, H, W)."""
        if x.dim() != 4 or x.shape[1] != self.in_channels or x.shape[-1] != self.image_size or x.shape[-2] != self.image_size:
            raise InputError(
                f"unet expects x of shape (B, {self.in_channels}, {self.image_size}, {self.image_size}), got {tuple(x.shape)}"
            )
        return self.conv_in(x)

    def trunk(self, h: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Everything after the stem: h (B, base_channels, H, W), t (B,), y (B,) -> eps (B, C, H, W).

        h may be an expanded (stride-0) view of a stem output shared by several classes.
        """
        if t.shape != (h.shape[0],) or y.shape != (h.shape[0],):
            raise InputError(f"unet expects t and y of shape ({h.shape[0]},), got {tuple(t.shape)} and {tuple(y.shape)}")
        return self._body(h, self.embed(t, y))

    def _body(self, h: torch.Tensor, emb: torch.Tensor, pre: dict | None = None) -> torch.Tensor:
        """The network after the stem. pre: class-independent terms from `shared`, gathered
        per row, that replace their computation here (see `shared` for the keys)."""
        pre = pre or {}
        skips = [h]
        for i, layers in enumerate(self.down):
            for k, layer in enumerate(layers):
                if i == k == 0 and "first" in pre:
                    h = pre.get("first_skip", h) + layer.outer(pre["first"], emb)
                else:
                    h = layer(h, emb) if isinstance(layer, ResBlock) else layer(h)
            skips.append(h)
        for layer in self.mid:
            h = layer(h, emb) if isinstance(layer, ResBlock) else layer(h)
        for i, layers in enumerate(self.up):
            rest = layers
            if isinstance(layers[0], ResBlock):
                skip = skips.pop()
                if i == len(self.up) - 1 and "last" in pre:
                    # cat(h, stem skip) split at the group boundary: only h's terms are computed here.
                    block, rest = layers[0], layers[1:]
                    inner = block.inner_part(h, 0, bias=False) + pre["last"]
                    h = block.skip_part(h, 0, bias=False) + pre["last_skip"] + block.outer(inner, emb)
                else:
                    h = torch.cat([h, skip], dim=1)
            for layer in rest:
                h = layer(h, emb) if isinstance(layer, ResBlock) else layer(h)
        return self.conv_out(F.silu(self.norm_out(h)))

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """eps_theta(x, t, y); see the class docstring for shapes and ranges."""
        return self.trunk(self.stem(x), t, y)

    # --- class-independent work, computed once per noisy image ------------------------
    def shared(self, x: torch.Tensor, t: torch.Tensor) -> dict[str, torch.Tensor]:
        """Every term of forward(x, t, y) that does not depend on y, for M noisy images.

        x (M, C, H, W) in model space, t (M,) int64. Returns tensors with M rows: h0 (the
        stem), temb (the time embedding); first, first_skip (the first ResBlock's conv1
        output before the class enters, and its skip unless that is the identity); last, last_skip (in the last
        ResBlock, the conv1 and skip-conv terms of its stem-skip input channels, biases
        included), where the GroupNorm groups allow the split.
        """
        h0 = self.stem(x)
        if t.shape != (x.shape[0],):
            raise InputError(f"unet expects t of shape ({x.shape[0]},), got {tuple(t.shape)}")
        out = {"h0": h0, "temb": self.time_mlp(self.time_embed(t))}
        first = self.down[0][0]
        if isinstance(first, ResBlock):
            out["first"] = first.inner(h0)
            if not isinstance(first.skip, nn.Identity):
                out["first_skip"] = first.skip(h0)
        last = self.up[-1][0]
        start = last.norm1.num_channels - h0.shape[1]
        if isinstance(last.skip, nn.Conv2d) and last.splits_at(start):
            out["last"] = last.inner_part(h0, start, bias=True)
            out["last_skip"] = last.skip_part(h0, start, bias=True)
        return out

    def conditional(self, shared: dict[str, torch.Tensor], rows: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """eps_theta for E (image, class) pairs from `shared` of M images.

        rows int64 (E,) in [0, M): the image of each pair; y int64 (E,) in [0, num_classes].
        Equals forward(x[rows], t[rows], y) up to float rounding.
        """
        if rows.dim() != 1 or y.shape != rows.shape:
            raise InputError(f"unet.conditional expects rows and y of one shape (E,), got {tuple(rows.shape)} and {tuple(y.shape)}")
        pre = {k: gather_rows(v, rows) for k, v in shared.items() if k not in ("h0", "temb")}
        emb = shared["temb"].index_select(0, rows) + self.class_embed(y)
        return self._body(gather_rows(shared["h0"], rows), emb, pre)

    def stem_adjoint(self, g: torch.Tensor) -> torch.Tensor:
        """The transpose of the stem's linear map: g (E, base_channels, H, W) -> (E, C, H, W).

        The stem is a conv, linear in x up to its bias, so d<g, stem(x)>/dx = stem_adjoint(g).
        """
        return F.conv_transpose2d(g, self.conv_in.weight, padding=self.conv_in.padding)


def unet_config(dataset: str) -> dict:
    """The default UNet config of a dataset: a tiny CPU-trainable one for digits, DDPM's for CIFAR.

    digits (8x8, 1 channel): two levels (8x8 at 24 channels, 4x4 at 48), one ResBlock a level,
    attention only in the 4x4 middle block: small enough to train on a CPU with the recipe in
    training/diffusion.py (DEFAULT_TRAINING), and as a diffusion classifier as accurate as wider
    ones, which only cost more per forward pass (BENCHMARKS.md, "Default models (training)").
    cifar10/cifar100: the DDPM CIFAR-10 model (Ho et al. 2020, appendix B), 35.7M parameters.
    """
    if dataset not in ("digits", "cifar10", "cifar100"):
        raise ConfigError(f"no default unet config for dataset {dataset!r}; expected 'digits', 'cifar10' or 'cifar100'")
    info = dataset_info(dataset)
    shape = {"arch": "unet", "in_channels": info.channels, "image_size": info.size, "num_classes": info.classes}
    if dataset == "digits":
        return {**shape, "base_channels": 24, "channel_mult": [1, 2], "num_res_blocks": 1, "attn_resolutions": [],
                "dropout": 0.0}
    return {**shape, "base_channels": 128, "channel_mult": [1, 2, 2, 2], "num_res_blocks": 2, "attn_resolutions": [16],
            "dropout": 0.1}


__all__ = ["UNet", "unet_config", "gather_rows", "channels_last", "group_norm", "GroupNorm", "TimestepEmbedding", "ResBlock", "AttentionBlock"]

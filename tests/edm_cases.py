"""Tiny EDM configurations and a machine-independent weight fill, shared by tests/test_edm.py and
the reference outputs in tests/fixtures/edm_tiny.safetensors (computed once by NVlabs/edm's own
networks with these configs, these weights and these inputs)."""

from __future__ import annotations

import math

import torch

from pipeline import rng

_SONG = dict(model_type="SongUNet", img_resolution=8, img_channels=3, label_dim=4, augment_dim=9,
             model_channels=16, channel_mult=[1, 2], num_blocks=1, attn_resolutions=[4], dropout=0.0)
DDPMPP = dict(_SONG, embedding_type="positional", encoder_type="standard", decoder_type="standard",
              channel_mult_noise=1, resample_filter=[1, 1])
NCSNPP = dict(_SONG, embedding_type="fourier", encoder_type="residual", decoder_type="standard",
              channel_mult_noise=2, resample_filter=[1, 3, 3, 1])
# The remaining SongUNet options: the skip encoder and the skip decoder (an output head per level).
SKIP = dict(_SONG, channel_mult=[1, 1, 2], attn_resolutions=[2], embedding_type="fourier", encoder_type="skip",
            decoder_type="skip", channel_mult_noise=2, resample_filter=[1, 3, 3, 1])
ADM = dict(model_type="DhariwalUNet", img_resolution=8, img_channels=3, label_dim=4, augment_dim=9,
           model_channels=64, channel_mult=[1, 2], num_blocks=1, attn_resolutions=[4], dropout=0.0)

# ADM gives an attention block width // 64 heads and none below 64 channels: widths 32 (no attention
# although its resolution asks for it), 64 (one head) and 96 (one head of 96 channels). Its reference
# outputs are tests/fixtures/edm_adm_narrow.safetensors (NVlabs' EDMPrecond, these weights, these inputs).
ADM_NARROW = dict(ADM, model_channels=32, channel_mult=[1, 2, 3], attn_resolutions=[8, 4, 2], precond="edm")

TINY = {f"{arch}-{precond}": dict(cfg, precond=precond)
        for arch, cfg in (("ddpmpp", DDPMPP), ("ncsnpp", NCSNPP), ("adm", ADM)) for precond in ("vp", "ve", "edm")}
TINY["skip-edm"] = dict(SKIP, precond="edm")

B = 3
SIGMA = torch.tensor([0.05, 0.7, 9.0])


def fill_weights(net: torch.nn.Module, seed: int = 7) -> None:
    """Overwrite every parameter and buffer but the FIR filters with uniform values (torch's CPU
    Mersenne Twister, seeded per tensor: the same bits on every machine), scaled by 1/sqrt(fan-in)."""
    state = net.state_dict()
    with torch.no_grad():
        for k, name in enumerate(sorted(state)):
            if name.endswith("resample_filter"):
                continue
            t = state[name]
            g = torch.Generator().manual_seed(seed * 100_003 + k)
            u = 2.0 * torch.rand(t.numel(), generator=g, dtype=torch.float64) - 1.0
            scale = math.sqrt(3.0 / (t[0].numel())) if t.dim() > 1 else 0.5
            offset = 1.0 if "norm" in name and name.endswith("weight") else 0.0
            t.copy_((offset + scale * u).reshape(t.shape).to(t.dtype))


def inputs(cfg: dict, seed: int = 11) -> dict[str, torch.Tensor]:
    """x (B, C, H, W) as a noisy image at SIGMA, one-hot class labels, augmentation labels."""
    C, R, L = cfg["img_channels"], cfg["img_resolution"], cfg["label_dim"]
    x0 = 2.0 * rng.uniform(seed, 0, torch.arange(B * C * R * R)).reshape(B, C, R, R) - 1.0
    n = torch.erfinv(2.0 * rng.uniform(seed, 1, torch.arange(B * C * R * R)) - 1.0).reshape(B, C, R, R) * math.sqrt(2)
    labels = torch.nn.functional.one_hot(torch.arange(B) % L, L).double()
    aug = 2.0 * rng.uniform(seed, 2, torch.arange(B * cfg["augment_dim"])).reshape(B, -1) - 1.0
    return {"x": (x0 + SIGMA.double().view(-1, 1, 1, 1) * n).float(), "sigma": SIGMA.clone(),
            "class_labels": labels.float(), "augment_labels": aug.float()}

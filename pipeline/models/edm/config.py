"""`build_edm(config)`: an EDM network from EDM's own constructor arguments, checked first.

config = the preconditioner's and the UNet's keyword arguments, as NVlabs/edm's train.py
passes them (img_resolution, img_channels, label_dim, model_type, model_channels,
channel_mult, num_blocks, attn_resolutions, ...), plus `precond` ("vp", "ve" or "edm"),
or {"preset": NAME, ...overrides}. Every field is range-checked before any tensor is
allocated, so a wrong config costs a ConfigError naming the field, not 300M parameters.
"""

from __future__ import annotations

import math
import numbers

from torch import nn

from pipeline.errors import ConfigError

_DDPMPP = dict(model_type="SongUNet", embedding_type="positional", encoder_type="standard", decoder_type="standard",
               channel_mult_noise=1, resample_filter=[1, 1], model_channels=128, channel_mult=[2, 2, 2])
_NCSNPP = dict(model_type="SongUNet", embedding_type="fourier", encoder_type="residual", decoder_type="standard",
               channel_mult_noise=2, resample_filter=[1, 3, 3, 1], model_channels=128, channel_mult=[2, 2, 2])
_ADM = dict(model_type="DhariwalUNet", model_channels=192, channel_mult=[1, 2, 3, 4])
_CIFAR = dict(img_resolution=32, img_channels=3, augment_dim=9, dropout=0.13)

# NVlabs/edm train.py's configurations of the published networks (--arch, --precond, --cond,
# --augment 0.12 -> augment_dim 9). The RDC authors load their CIFAR files (edm_cifar_cond_vp.pt,
# edm_cifar100_cond_vp.pt) into this DDPM++ network under EDM's preconditioning: the
# "rdc-" presets; the preconditioners hold no tensors, so every CIFAR DDPM++ file fits both.
EDM_PRESETS: dict[str, dict] = {
    "edm-cifar10-cond-vp": dict(precond="vp", label_dim=10, **_CIFAR, **_DDPMPP),
    "edm-cifar100-cond-vp": dict(precond="vp", label_dim=100, **_CIFAR, **_DDPMPP),
    "edm-cifar10-cond-ve": dict(precond="ve", label_dim=10, **_CIFAR, **_NCSNPP),
    "edm-imagenet64-cond-adm": dict(precond="edm", img_resolution=64, img_channels=3, label_dim=1000,
                                    augment_dim=0, dropout=0.10, use_fp16=True, **_ADM),
    "rdc-cifar10-cond-edm": dict(precond="edm", label_dim=10, **_CIFAR, **_DDPMPP),
    "rdc-cifar100-cond-edm": dict(precond="edm", label_dim=100, **_CIFAR, **_DDPMPP),
    # Their unconditional files (edm_cifar_uncond_vp.pt, edm_cifar100_uncond_vp.pt), the network
    # of their likelihood maximization.
    "rdc-cifar10-uncond-edm": dict(precond="edm", label_dim=0, **_CIFAR, **_DDPMPP),
    "rdc-cifar100-uncond-edm": dict(precond="edm", label_dim=0, **_CIFAR, **_DDPMPP),
}

_COMMON = {"img_resolution", "img_channels", "label_dim", "use_fp16", "model_type", "precond",
           "augment_dim", "model_channels", "channel_mult", "channel_mult_emb", "num_blocks", "attn_resolutions",
           "dropout", "label_dropout"}
_SONG = {"embedding_type", "channel_mult_noise", "encoder_type", "decoder_type", "resample_filter"}
_PRECOND_FIELDS = {"vp": {"beta_d", "beta_min", "M", "epsilon_t"}, "ve": {"sigma_min", "sigma_max"},
                   "edm": {"sigma_min", "sigma_max", "sigma_data"}}
_CHOICES = {"precond": ("vp", "ve", "edm"), "model_type": ("SongUNet", "DhariwalUNet"),
            "embedding_type": ("positional", "fourier"), "encoder_type": ("standard", "skip", "residual"),
            "decoder_type": ("standard", "skip")}
# Fields whose absence would silently pick a default that changes the network's shape.
_REQUIRED = ("img_resolution", "img_channels", "precond", "model_type")
# A guard against typos that would allocate more than any published EDM network by far.
MAX_PARAMETERS = 4_000_000_000


def resolve(config: dict) -> dict:
    """The full config: a preset's fields under the given overrides, "arch" dropped."""
    if not isinstance(config, dict):
        raise ConfigError(f"edm config must be a table, got {type(config).__name__}")
    config = {k: v for k, v in config.items() if k != "arch"}
    if "preset" in config:
        name = config.pop("preset")
        if name not in EDM_PRESETS:
            raise ConfigError(f"edm config: preset {name!r} is unknown; expected one of {sorted(EDM_PRESETS)}")
        config = {**EDM_PRESETS[name], **config}
    return config


def _int(config: dict, key: str, low: int, high: int | None = None) -> None:
    v = config[key]
    if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < low or (high is not None and v > high):
        bound = f"an integer >= {low}" + (f" and <= {high}" if high is not None else "")
        raise ConfigError(f"edm config: {key} must be {bound}, got {v!r}")


def _int_list(config: dict, key: str, low: int, nonempty: bool = True) -> None:
    v = config[key]
    if not isinstance(v, (list, tuple)) or (nonempty and not v) or any(
            isinstance(e, bool) or not isinstance(e, numbers.Integral) or e < low for e in v):
        raise ConfigError(f"edm config: {key} must be a {'non-empty ' if nonempty else ''}list of integers >= {low}, got {v!r}")


def _number(config: dict, key: str, low: float, high: float = math.inf, open_low: bool = False) -> None:
    v = config[key]
    if isinstance(v, bool) or not isinstance(v, numbers.Real) or math.isnan(v) or v < low or v > high or (open_low and v == low):
        raise ConfigError(f"edm config: {key} must be a number {'>' if open_low else '>='} {low}"
                          + (f" and <= {high}" if high != math.inf else "") + f", got {v!r}")


def validate(config: dict) -> dict:
    """The resolved config, checked field by field; raises ConfigError naming the first bad field."""
    config = resolve(config)
    for key in _REQUIRED:
        if key not in config:
            raise ConfigError(f"edm config: {key} is required")
    for key, choices in _CHOICES.items():
        if key in config and config[key] not in choices:
            raise ConfigError(f"edm config: {key} must be one of {list(choices)}, got {config[key]!r}")
    known = _COMMON | _PRECOND_FIELDS[config["precond"]] | (_SONG if config["model_type"] == "SongUNet" else set())
    unknown = sorted(set(config) - known)
    if unknown:
        raise ConfigError(f"edm config: unknown field(s) {unknown} for precond {config['precond']!r} and "
                          f"model_type {config['model_type']!r}; expected some of {sorted(known)}")
    song = config["model_type"] == "SongUNet"
    defaults = dict(label_dim=0, augment_dim=0, model_channels=128 if song else 192,
                    channel_mult=[1, 2, 2, 2] if song else [1, 2, 3, 4], channel_mult_emb=4,
                    num_blocks=4 if song else 3, attn_resolutions=[16] if song else [32, 16, 8],
                    dropout=0.10, label_dropout=0.0)
    if song:
        defaults.update(channel_mult_noise=1, resample_filter=[1, 1])
    full = {**defaults, **config}
    _int(full, "img_resolution", 1, 4096)
    _int(full, "img_channels", 1, 64)
    _int(full, "label_dim", 0, 100_000)
    _int(full, "augment_dim", 0, 1024)
    _int(full, "model_channels", 1, 4096)
    _int(full, "channel_mult_emb", 1, 64)
    _int(full, "num_blocks", 1, 64)
    _int_list(full, "channel_mult", 1)
    _int_list(full, "attn_resolutions", 1, nonempty=False)
    _number(full, "dropout", 0.0, 1.0)
    _number(full, "label_dropout", 0.0, 1.0)
    levels = len(full["channel_mult"])
    res = full["img_resolution"]
    if levels > 12 or res % (1 << (levels - 1)) != 0:
        raise ConfigError(f"edm config: img_resolution {res} must be divisible by 2^(len(channel_mult) - 1) = "
                          f"{1 << min(levels - 1, 62)} (channel_mult has {levels} levels)")
    widths = [full["model_channels"] * m for m in full["channel_mult"]] + [full["model_channels"]]
    if song:
        _int(full, "channel_mult_noise", 1, 64)
        _int_list(full, "resample_filter", 1)
        noise_channels = full["model_channels"] * full["channel_mult_noise"]
        if noise_channels % 2:
            raise ConfigError(f"edm config: model_channels * channel_mult_noise must be even (the noise embedding "
                              f"is [sin, cos] halves), got {noise_channels}")
    else:
        if full["model_channels"] % 2:
            raise ConfigError(f"edm config: model_channels must be even for the positional embedding, got {full['model_channels']}")
        for w in widths:
            # ADM's heads have 64 channels; a width not a multiple of 64 cannot be split into them.
            if w % 64 and any((res >> lv) in full["attn_resolutions"] or lv == levels - 1 for lv in range(levels)):
                raise ConfigError(f"edm config: DhariwalUNet attention splits channels into heads of 64; "
                                  f"model_channels * channel_mult gives {w}, not a multiple of 64")
    for w in widths:
        if w // 4 < 1:
            raise ConfigError(f"edm config: channel width {w} is below 4 (GroupNorm needs 4 channels a group)")
    for key in ("beta_d", "beta_min", "sigma_data"):
        if key in full:
            _number(full, key, 0.0, open_low=True)
    if "M" in full:
        _int(full, "M", 2)
    if "epsilon_t" in full:
        _number(full, "epsilon_t", 0.0, 1.0, open_low=True)
    for key in ("sigma_min", "sigma_max"):
        if key in full:
            _number(full, key, 0.0)
    if "use_fp16" in full and not isinstance(full["use_fp16"], bool):
        raise ConfigError(f"edm config: use_fp16 must be true or false, got {full['use_fp16']!r}")
    estimate = _parameter_estimate(full)
    if estimate > MAX_PARAMETERS:
        raise ConfigError(f"edm config: about {estimate:,} parameters, above the limit of {MAX_PARAMETERS:,}; "
                          "check model_channels, channel_mult and num_blocks")
    return config


def _parameter_estimate(c: dict) -> int:
    """An upper-bound-ish count of the conv weights (3x3, two per block), enough to catch typos."""
    widths = [c["model_channels"] * m for m in c["channel_mult"]]
    return sum(2 * 9 * (2 * w) * w * (2 * c["num_blocks"] + 3) for w in widths)


def build_edm(config: dict) -> nn.Module:
    """A randomly initialised EDM network (a VPPrecond, VEPrecond or EDMPrecond) from `config`.

    Called as EDM's networks are: net(x, sigma, class_labels) -> D(x; sigma, y) for x in
    [-1, 1] (see precond.py). Its state_dict has the published checkpoints' keys and shapes.
    """
    from pipeline.models.edm.precond import PRECONDS

    config = validate(config)
    kwargs = {k: v for k, v in config.items() if k != "precond"}
    for key in ("channel_mult", "attn_resolutions", "resample_filter"):
        if key in kwargs:
            kwargs[key] = list(kwargs[key])
    return PRECONDS[config["precond"]](**kwargs)


__all__ = ["build_edm", "validate", "resolve", "EDM_PRESETS"]

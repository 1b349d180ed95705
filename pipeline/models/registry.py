"""Build a model from its JSON config: the one place that maps config["arch"] to a class.

Checkpoints store only a config and tensors (see pipeline.models.checkpoint); this function is the
`build` that `load_checkpoint` calls.
"""

from __future__ import annotations

import inspect
import math

from torch import nn

from pipeline.errors import ConfigError

ARCHS = ("unet", "cnn", "resnet18", "resnet50", "wrn", "wrn-grouped", "preact-resnet18", "dm-wrn", "dm-preact-resnet",
         "robust-resnet", "edm")


# Bounds on a config's sizes (widths, channels, classes, blocks): far above any model here, far
# below what would allocate gigabytes before a shape check could object.
SIZE_MAX = 4096
PARAMETERS_MAX = 500_000_000
DROPOUT_FIELDS = ("dropout",)
# An input transform's constants (pipeline.models.normalization): per-channel floats.
CONSTANT_FIELDS = ("mean", "std")


def check_config(config: dict) -> None:
    """ConfigError naming the field unless every size in `config` is an integer in [1, SIZE_MAX]
    (lists of them too), every rate in [0, 1), and the model it builds has at most
    PARAMETERS_MAX parameters; nothing is allocated (the model is built on the meta device).
    A field whose default in the class's signature is a string or a boolean is a named option or
    a switch, the class's to check; EDM configs are checked field by field by build_edm itself."""
    if not isinstance(config, dict) or "arch" not in config:
        raise ConfigError(f"model config needs an 'arch' field (one of {ARCHS}), got {config!r}")
    options = _options(config["arch"])
    for key, value in config.items():
        if key == "arch" or config["arch"] == "edm" or key in options:
            continue
        if key in CONSTANT_FIELDS:
            if not isinstance(value, (list, tuple)) or not all(
                    isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
                    and (key == "mean" or v > 0) for v in value):
                raise ConfigError(f"model config {key}: expected a list of finite numbers"
                                  f"{' > 0' if key == 'std' else ''}, got {value!r}")
            continue
        if key in DROPOUT_FIELDS:
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1:
                raise ConfigError(f"model config {key}: expected a rate in [0, 1), got {value!r}")
            continue
        for item in value if isinstance(value, (list, tuple)) else [value]:
            if isinstance(item, bool) or not isinstance(item, int) or not 1 <= item <= SIZE_MAX:
                raise ConfigError(f"model config {key}: expected integers in [1, {SIZE_MAX}], got {value!r}")
    import torch

    with torch.device("meta"):
        model = _build(config)
    n = sum(p.numel() for p in model.parameters())
    if n > PARAMETERS_MAX:
        raise ConfigError(f"model config builds {n:,} parameters, more than {PARAMETERS_MAX:,}; check its sizes")


def build_model(config: dict) -> nn.Module:
    """A fresh (randomly initialised) model from `config`, a dict with "arch" and the kwargs of
    its class, range-checked first (check_config)."""
    check_config(config)
    return _build(config)


def _options(arch: str) -> set[str]:
    """The keyword arguments of `arch`'s class whose defaults are strings or booleans."""
    if arch == "edm":
        return set()
    params = inspect.signature(_class(arch)).parameters.values()
    return {p.name for p in params if isinstance(p.default, (str, bool))}


def _build(config: dict) -> nn.Module:
    arch = config["arch"]
    if arch == "edm":
        # EDM's own constructor arguments (pipeline.models.edm.config), checked there.
        from pipeline.models.edm import build_edm

        return build_edm(config)
    kwargs = {k: v for k, v in config.items() if k != "arch"}
    cls = _class(arch)
    try:
        return cls(**kwargs)
    except (TypeError, ValueError, RuntimeError) as exc:
        raise ConfigError(f"model config for arch {arch!r} has invalid fields: {exc}") from None


def arch_class(arch: str) -> type[nn.Module]:
    """The class `arch` names (its signature's defaults fill the fields a config leaves out)."""
    return _class(arch)


def _class(arch: str) -> type[nn.Module]:
    if arch == "unet":
        from pipeline.models.unet import UNet as cls
    elif arch == "cnn":
        from pipeline.models.cnn import SmallCNN as cls
    elif arch == "resnet18":
        from pipeline.models.resnet import ResNet18 as cls
    elif arch == "resnet50":
        from pipeline.models.resnet import ResNet50 as cls
    elif arch == "wrn":
        from pipeline.models.wide_resnet import WideResNet as cls
    elif arch == "wrn-grouped":
        from pipeline.models.wide_resnet import GroupedWideResNet as cls
    elif arch == "robust-resnet":
        from pipeline.models.preact_resnet import RobustResNet as cls
    elif arch == "dm-wrn":
        from pipeline.models.dm_resnet import DMWideResNet as cls
    elif arch == "dm-preact-resnet":
        from pipeline.models.dm_resnet import DMPreActResNet as cls
    elif arch == "preact-resnet18":
        from pipeline.models.preact_resnet import PreActResNet18 as cls
    else:
        raise ConfigError(f"model config: unknown arch {arch!r}; expected one of {ARCHS}")
    return cls


__all__ = ["build_model", "check_config", "arch_class", "ARCHS"]

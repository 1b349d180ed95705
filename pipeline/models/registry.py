"""Build a model from its JSON config: the one place that maps config["arch"] to a class.

Checkpoints store only a config and tensors (see pipeline.models.checkpoint); this function is the
`build` that `load_checkpoint` calls.
"""

from __future__ import annotations

from torch import nn

from pipeline.errors import ConfigError

ARCHS = ("unet", "cnn", "resnet18", "wrn", "preact-resnet18", "edm")


def build_model(config: dict) -> nn.Module:
    """A fresh (randomly initialised) model from `config`, a dict with "arch" and the kwargs of its class."""
    if not isinstance(config, dict) or "arch" not in config:
        raise ConfigError(f"model config needs an 'arch' field (one of {ARCHS}), got {config!r}")
    arch = config["arch"]
    if arch == "edm":
        # EDM's own constructor arguments (pipeline.models.edm.config), checked there.
        from pipeline.models.edm import build_edm

        return build_edm(config)
    kwargs = {k: v for k, v in config.items() if k != "arch"}
    if arch == "unet":
        from pipeline.models.unet import UNet as cls
    elif arch == "cnn":
        from pipeline.models.cnn import SmallCNN as cls
    elif arch == "resnet18":
        from pipeline.models.resnet import ResNet18 as cls
    elif arch == "wrn":
        from pipeline.models.wide_resnet import WideResNet as cls
    elif arch == "preact-resnet18":
        from pipeline.models.preact_resnet import PreActResNet18 as cls
    else:
        raise ConfigError(f"model config: unknown arch {arch!r}; expected one of {ARCHS}")
    try:
        return cls(**kwargs)
    except TypeError as exc:
        raise ConfigError(f"model config for arch {arch!r} has invalid fields: {exc}") from exc


__all__ = ["build_model", "ARCHS"]

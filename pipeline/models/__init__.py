"""Architectures, their registry, checkpoints (safetensors + JSON), published-checkpoint import and
the default-model cache."""

from pathlib import Path

from torch import nn

from pipeline.models.checkpoint import load_checkpoint
from pipeline.models.edm import EDM_PRESETS, build_edm
from pipeline.models.importer import import_model, import_to_folder
from pipeline.models.registry import build_model


def load(folder: str | Path) -> nn.Module:
    """The model of a checkpoint folder (ours, or one `import-model` wrote), in eval mode on CPU."""
    return load_checkpoint(folder, build_model)[0]


__all__ = ["build_model", "build_edm", "EDM_PRESETS", "load", "import_model", "import_to_folder"]

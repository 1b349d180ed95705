"""Architectures, their registry, checkpoints (safetensors + JSON) and the default-model cache."""

from pipeline.models.edm import EDM_PRESETS, build_edm
from pipeline.models.registry import build_model

__all__ = ["build_model", "build_edm", "EDM_PRESETS"]

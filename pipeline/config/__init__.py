"""Job, defense and attack tables parsed once into types at the boundary; nothing above re-parses strings."""

from pipeline.config.specs import spec

__all__ = ["spec"]

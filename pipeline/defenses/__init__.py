"""Defenses as nn.Modules from images in [0, 1] to logits, each exposing the grid protocol."""

from .base import Defense, check_input
from .build import build_defense, defense_name, parse_defense
from .lm import LikelihoodMaximization
from .mi import MixupInference
from .plain import Plain
from .rdc import RDC

__all__ = ["Defense", "RDC", "LikelihoodMaximization", "MixupInference", "Plain", "build_defense",
           "parse_defense", "defense_name", "check_input"]

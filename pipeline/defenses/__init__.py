"""Defenses as nn.Modules from images in [0, 1] to logits, each exposing the grid protocol."""

from pipeline.defenses.base import Defense, check_input
from pipeline.defenses.build import build_defense
from pipeline.defenses.lm import LikelihoodMaximization
from pipeline.defenses.mi import MixupInference
from pipeline.defenses.plain import Plain
from pipeline.defenses.rdc import RDC

__all__ = ["Defense", "RDC", "LikelihoodMaximization", "MixupInference", "Plain", "build_defense", "check_input"]

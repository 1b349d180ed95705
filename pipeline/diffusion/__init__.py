"""Diffusion models: the VP schedule, epsilon models, training."""

from pipeline.diffusion.schedule import VPSchedule

__all__ = ["VPSchedule"]

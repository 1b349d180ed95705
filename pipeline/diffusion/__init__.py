"""Diffusion models: the VP schedule, epsilon models, training."""

from .schedule import VPSchedule

__all__ = ["VPSchedule"]

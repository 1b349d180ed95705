"""EDM's networks (Karras et al. 2022): SongUNet (DDPM++ / NCSN++), DhariwalUNet (ADM) and the
VP, VE and EDM preconditioners, with the published checkpoints' parameter names."""

from pipeline.models.edm.config import EDM_PRESETS, build_edm
from pipeline.models.edm.precond import EDMPrecond, VEPrecond, VPPrecond
from pipeline.models.edm.unets import DhariwalUNet, SongUNet

__all__ = ["build_edm", "EDM_PRESETS", "SongUNet", "DhariwalUNet", "VPPrecond", "VEPrecond", "EDMPrecond"]

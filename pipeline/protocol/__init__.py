"""The evaluation protocol: how a unit's examples are attacked and judged, one record per example."""

from pipeline.protocol.build import build_attack
from pipeline.protocol.checks import check_perturbation, sweep_flags
from pipeline.protocol.evaluate import evaluate
from pipeline.protocol.predict import predict
from pipeline.protocol.result import Batch, Evaluation, Record, Spent

__all__ = ["evaluate", "build_attack", "Batch", "Evaluation", "Record", "Spent", "sweep_flags", "check_perturbation", "predict"]

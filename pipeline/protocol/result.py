"""The typed values of an evaluation: the batch it takes, one Record per example, the result.

`Record`'s fields are the record schema's columns (pipeline.store.schema) less the constants a
unit's commit adds (run_id, job_hash, unit_id, worker, config_hash); tests/test_protocol.py holds
the two equal, since the protocol sits below the store.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Batch:
    """Images x (B, C, H, W) in [0, 1], labels y (B,), and the example ids (B,) that seed each
    example's draws (any sequence of ints; kept as an int64 tensor)."""

    x: torch.Tensor
    y: torch.Tensor
    ids: torch.Tensor

    def __post_init__(self):
        object.__setattr__(self, "ids", torch.as_tensor(self.ids, dtype=torch.int64).reshape(-1).cpu())


@dataclass(frozen=True)
class Record:
    """One example's result; store/schema.py `COLUMNS` says what each field means."""

    example_id: int
    label: int
    defense: str
    attack: str
    path: str
    norm: str
    eps: float
    seed: int
    passes: int
    clean_pred: int
    clean_correct: bool
    clean_vote_pred: int
    clean_vote_correct: bool
    clean_worst_correct: bool
    clean_pass_accuracy: float
    adv_pred: int
    adv_correct: bool
    adv_vote_pred: int
    adv_vote_correct: bool
    adv_worst_correct: bool
    adv_pass_accuracy: float
    clean_logits: list[float]
    adv_logits: list[float]
    linf: float
    l2: float
    l1: float
    broken_by: str | None
    attack_success: bool | None
    queries: int
    gradients: int
    forward_passes: int
    backward_passes: int
    seconds: float
    device: str
    flags: list[str]
    iterations: int
    eot: int

    def as_dict(self) -> dict:
        """The record as store/schema.py `records_to_table` takes it."""
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class Spent:
    """Network evaluations (images through a network), forward and backward."""

    forward: int
    backward: int


@dataclass(frozen=True)
class Evaluation:
    """What `evaluate` returns.

    records: one per example, in the batch's order. x_adv (B, C, H, W): the adversarial inputs as
    scored. attack: the attack's network evaluations over all rows (scoring excluded).
    forward_per_prediction: network evaluations of one scoring pass on one input.
    attack_seconds: wall-clock seconds of the attack phase (scoring excluded).
    """

    records: tuple[Record, ...]
    x_adv: torch.Tensor
    attack: Spent
    forward_per_prediction: float
    attack_seconds: float

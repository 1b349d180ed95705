"""A worker: one Ray actor pinned to one GPU (or one CPU) that evaluates units and commits them.

Models load once per actor, cached by the hash of their defense table; the data split is
loaded once per actor too. A unit's rows are written by the worker itself (one atomic
Parquet commit), so results never travel through the driver.
"""

from __future__ import annotations

import time

import torch

from ..attacks import evaluate
from ..data import load_split, select
from ..defenses import build_defense
from ..store import Store, records_to_table
from . import faults
from .plan import Unit
from .spec import content_hash


class Worker:
    """Evaluates units; `device` is "cuda" (the GPU Ray assigned) or "cpu"."""

    def __init__(self, name: str, device: str, threads: int = 1):
        self.name = name
        self.device = device
        torch.set_num_threads(max(1, threads))
        self.defenses: dict[str, torch.nn.Module] = {}
        self.splits: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}

    def _defense(self, table: dict):
        key = content_hash(table)
        if key not in self.defenses:
            self.defenses[key] = build_defense(table, device=self.device)
        return self.defenses[key], key

    def _split(self, data: dict):
        key = (data["dataset"], data["split"], data.get("root"))
        if key not in self.splits:
            self.splits[key] = load_split(data["dataset"], data["split"], root=data.get("root"))
        return self.splits[key]

    def run_unit(self, unit: dict, ctx: dict) -> dict:
        """Evaluate one unit and commit its Parquet file; returns a summary (rows, seconds)."""
        start = time.perf_counter()
        u = Unit.from_dict(unit)
        faults.inject(u.unit_id)
        defense, config_hash = self._defense(u.defense_table)
        x, y = select(*self._split(ctx["data"]), list(u.example_ids))
        records = evaluate(defense, u.attack_table, x.to(self.device), y.to(self.device), list(u.example_ids),
                           ctx["seed"])
        table = records_to_table(records, run_id=ctx["run_id"], unit_id=u.unit_id, worker=self.name,
                                 config_hash=config_hash)
        store = Store(ctx["out"], endpoint_url=ctx.get("endpoint_url"))
        store.write_table(f"{ctx['run_id']}/{u.path}", table, {"unit_id": u.unit_id, "run_id": ctx["run_id"]})
        return {"unit_id": u.unit_id, "rows": table.num_rows, "seconds": time.perf_counter() - start,
                "worker": self.name}

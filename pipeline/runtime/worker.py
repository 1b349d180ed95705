"""A worker: one Ray actor pinned to one GPU (or one CPU) that evaluates units and commits them.

Models load once per actor, cached by the hash of their defense table; the data split is
loaded once per actor too. A unit's rows are written by the worker itself (one atomic
Parquet commit), so results never travel through the driver.
"""

from __future__ import annotations

import time

import torch

from pipeline.protocol import evaluate
from pipeline.data import load_split, select
from pipeline.defenses import build_defense
from pipeline.store import Store, records_to_table
from pipeline.store.unit import commit_unit
from pipeline.runtime import faults
from pipeline.runtime.grid import Gang, member_call, shard
from pipeline.runtime.plan import Unit
from pipeline.config.job import content_hash


def visible_device(want_gpu: bool) -> str:
    """"cuda" (the GPU Ray made visible to this process) when one is asked for and present, else "cpu".

    Ray sets CUDA_VISIBLE_DEVICES to the actor's GPU, so "cuda" is that GPU; a cluster that
    declares GPU resources without CUDA (the tests' fake GPUs) gets the CPU.
    """
    return "cuda" if want_gpu and torch.cuda.is_available() else "cpu"


class Worker:
    """Evaluates units and answers gang calls; `device` is "cuda" (the GPU Ray assigned) or "cpu"."""

    def __init__(self, name: str, device: str, threads: int = 1):
        self.name = name
        self.device = visible_device(device == "cuda")
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

    def ping(self) -> str:
        return self.name

    def grid_call(self, table: dict, kind: str, x: torch.Tensor, cells: torch.Tensor, draw, extra):
        """One gang call (runtime/grid.py `member_call`) on this actor's copy of the defense."""
        defense, _ = self._defense(table)
        return member_call(defense, kind, x.to(self.device), cells, draw,
                           extra.to(self.device) if isinstance(extra, torch.Tensor) else extra)

    def run_unit(self, unit: dict, ctx: dict, peers: list | None = None) -> dict:
        """Evaluate one unit and commit its Parquet file; returns a summary (rows, seconds, lost peers).

        peers: actor handles reserved for this unit; with them the defense's grid is sharded
        over a gang of this actor and its peers.
        """
        start = time.perf_counter()
        u = Unit.from_dict(unit)
        faults.inject(u.unit_id)
        defense, config_hash = self._defense(u.defense_table)
        x, y = select(*self._split(ctx["data"]), list(u.example_ids))
        gang = Gang(peers, u.defense_table, local=defense) if peers else None
        shard(defense, gang)
        extras: dict = {}
        try:
            records = evaluate(defense, u.attack_table, x.to(self.device), y.to(self.device), list(u.example_ids),
                               ctx["seed"], extras=extras)
        finally:
            shard(defense, None)
        table = records_to_table(records, run_id=ctx["run_id"], job_hash=ctx["job_hash"], unit_id=u.unit_id, worker=self.name,
                                 config_hash=config_hash)
        store = Store(ctx["out"], endpoint_url=ctx.get("endpoint_url"))
        commit_unit(store, f"{ctx['run_id']}/{u.path}", table, u.example_ids, extras, unit_id=u.unit_id,
                    run_id=ctx["run_id"], job_hash=ctx["job_hash"])
        return {"unit_id": u.unit_id, "rows": table.num_rows, "seconds": time.perf_counter() - start,
                "worker": self.name, "lost_peers": gang.lost() if gang else [], "gang": gang.size if gang else 1}

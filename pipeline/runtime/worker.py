"""A worker: one Ray actor pinned to one GPU (or one CPU) that evaluates units and commits them.

Defenses (and transfer surrogates) are built once per actor on its device from the parsed specs a
unit carries, cached by spec and name; the data split is loaded once per actor too. A unit's rows are written by the worker itself (one atomic
Parquet commit), so results never travel through the driver.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from pipeline.config.defense import DefenseSpec
from pipeline.config.job import DataSpec, content_hash
from pipeline.data import load_split, select
from pipeline.defenses import build_defense
from pipeline.protocol import Batch, build_attack, evaluate
from pipeline.runtime import faults
from pipeline.runtime.grid import Gang, member_call, shard
from pipeline.runtime.plan import Unit
from pipeline.store import Store, records_to_table
from pipeline.store.unit import commit_unit


@dataclass(frozen=True)
class WorkerContext:
    """What every unit of a run shares, sent to the workers with each unit."""

    run_id: str
    job_hash: str
    out: str  # the results folder or s3:// prefix
    seed: int
    data: DataSpec  # the job's data: dataset, split, root
    endpoint_url: str | None = None


@dataclass(frozen=True)
class UnitResult:
    """What a worker reports of a committed unit (its rows are in the store, not here)."""

    unit_id: str
    rows: int
    seconds: float
    worker: str
    lost_peers: tuple[int, ...] = ()  # positions, in the unit's peer list, of gang members lost on the way
    gang: int = 1
    committed: bool = True  # False: another attempt had committed the unit first; its file was left as it was
    evaluations: int = 0  # network evaluations its records count (forward + backward passes): the run's measured speed


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

    def _defense(self, spec: DefenseSpec, name: str | None = None):
        """The defense of a parsed spec on this actor's device, built once."""
        key = content_hash([spec.model_dump(), name])
        if key not in self.defenses:
            self.defenses[key] = build_defense(spec, device=self.device, name=name)
        return self.defenses[key]

    def _split(self, data: DataSpec):
        key = (data.dataset, data.split, data.root)
        if key not in self.splits:
            self.splits[key] = load_split(data.dataset, data.split, root=data.root)
        return self.splits[key]

    def ping(self) -> str:
        return self.name

    def grid_call(self, spec: DefenseSpec, kind: str, x: torch.Tensor, cells: torch.Tensor, draw, extra):
        """One gang call (runtime/grid.py `member_call`) on this actor's copy of the defense."""
        defense = self._defense(spec)
        return member_call(defense, kind, x.to(self.device), cells, draw,
                           extra.to(self.device) if isinstance(extra, torch.Tensor) else extra)

    def run_unit(self, u: Unit, ctx: WorkerContext, peers: list | None = None, attempt: int = 1) -> UnitResult:
        """Evaluate one unit and commit its Parquet file; returns a summary (rows, seconds, lost
        peers, whether this call's commit is the one that holds).

        peers: actor handles reserved for this unit; with them the defense's grid is sharded
        over a gang of this actor and its peers. attempt: the driver's number of this call,
        recorded with the node in every row.
        """
        start = time.perf_counter()
        faults.inject(u.unit_id)
        defense = self._defense(u.defense_spec, u.defense)
        surrogate = self._defense(u.surrogate_spec) if u.surrogate_spec is not None else None
        attack = build_attack(u.attack_spec, defense.num_classes, surrogate=surrogate, name=u.attack)
        x, y = select(*self._split(ctx.data), list(u.example_ids))
        gang = Gang(peers, u.defense_spec, local=defense) if peers else None
        shard(defense, gang)
        try:
            result = evaluate(defense, attack, Batch(x.to(self.device), y.to(self.device), u.example_ids), ctx.seed)
        finally:
            shard(defense, None)
        table = records_to_table([r.as_dict() for r in result.records], run_id=ctx.run_id, job_hash=ctx.job_hash,
                                 unit_id=u.unit_id, worker=self.name, config_hash=content_hash(u.defense_table),
                                 precision=defense.precision(self.device), node=node_id(), attempt=attempt)
        store = Store(ctx.out, endpoint_url=ctx.endpoint_url)
        faults.before_commit(u.unit_id)
        wrote = commit_unit(store, f"{ctx.run_id}/{u.path}", table, u.example_ids,
                            {"x_adv": result.x_adv, "forward_per_prediction": result.forward_per_prediction},
                            unit_id=u.unit_id, run_id=ctx.run_id, job_hash=ctx.job_hash, attempt=attempt)
        faults.after_commit(u.unit_id, attempt, wrote)
        return UnitResult(u.unit_id, table.num_rows, time.perf_counter() - start, self.name,
                          tuple(gang.lost()) if gang else (), gang.size if gang else 1, committed=wrote,
                          evaluations=sum(r.forward_passes + r.backward_passes for r in result.records))

    def probe(self, ctx: WorkerContext) -> str:
        """Write, read back and remove a small file in the run folder, as a unit's commit would:
        the store is reachable with this worker's credentials. Returns the node id."""
        store = Store(ctx.out, endpoint_url=ctx.endpoint_url)
        rel = f"{ctx.run_id}/.probe-{self.name}-{node_id()[:12]}.json"
        store.write_json(rel, {"worker": self.name})
        store.read_json(rel)
        store.remove(rel)
        return node_id()


def node_id() -> str:
    """The Ray node this process runs on ("" outside Ray)."""
    import ray

    return ray.get_runtime_context().get_node_id() if ray.is_initialized() else ""

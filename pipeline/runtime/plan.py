"""The planner: a job -> units (defense, attack, eps, example shard), each with a stable id.

A unit's id is the hash of everything that determines its rows (the defense and attack
tables, the data, the example ids, the seed), so a rerun of the same job finds the units it
committed before, and a changed job never mistakes old files for new ones.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from pipeline.config.attack import AttackSpec, TransferSpec, parse_attack
from pipeline.config.defense import DefenseSpec, parse_defense, surrogate_spec
from pipeline.config.job import Job, content_hash
from pipeline.data import make_shards
from pipeline.defenses.build import planned_precision
from pipeline.names import safe_name as _safe

FORMAT = 2  # bump when the meaning of a unit's rows changes (2: batched attacks, decisions over fresh passes)


@dataclass(frozen=True)
class Unit:
    """One (defense, attack, eps, shard) as planned: the names records carry, the parsed specs the
    worker builds from, and the tables as written (what the id hashes, what plan.json keeps)."""

    unit_id: str
    defense: str  # planned name, sweep suffix included
    attack: str  # planned name, sweep suffix included
    eps: float
    defense_table: dict
    attack_table: dict
    example_ids: tuple[int, ...]
    grid_workers: int | str = 1  # not part of the id: it changes how the rows are computed, not what they are
    defense_spec: DefenseSpec = field(kw_only=True, compare=False)
    attack_spec: AttackSpec = field(kw_only=True, compare=False)
    surrogate_spec: DefenseSpec | None = field(default=None, kw_only=True, compare=False)  # transfer attacks only

    @property
    def path(self) -> str:
        """Where the unit's Parquet file goes, relative to the run folder."""
        return f"records/defense={_safe(self.defense)}/attack={_safe(self.attack)}/unit-{self.unit_id}.parquet"

    def as_dict(self) -> dict:
        """The unit as plan.json and failure notes keep it: tables, not parsed specs."""
        return {"unit_id": self.unit_id, "defense": self.defense, "attack": self.attack, "eps": self.eps,
                "defense_table": self.defense_table, "attack_table": self.attack_table,
                "example_ids": list(self.example_ids), "grid_workers": self.grid_workers, "path": self.path}

    @classmethod
    def from_dict(cls, d: dict) -> "Unit":
        """A unit read back from plan.json: its tables are parsed again, as when the job was planned."""
        defense_spec, attack_spec = parse_defense(d["defense_table"]), parse_attack(d["attack_table"])
        surrogate = surrogate_spec(attack_spec.surrogate, defense_spec) if isinstance(attack_spec, TransferSpec) else None
        return cls(d["unit_id"], d["defense"], d["attack"], d["eps"], d["defense_table"], d["attack_table"],
                   tuple(d["example_ids"]), d.get("grid_workers", 1), defense_spec=defense_spec,
                   attack_spec=attack_spec, surrogate_spec=surrogate)


def plan(job: Job, n_examples: int) -> list[Unit]:
    """Every unit of the job, in a stable order: defense, attack, eps, shard."""
    data = job.spec.data
    shards = make_shards(n_examples, data.shard_size, ids=data.ids, limit=data.limit)
    units = []
    for d in job.defenses:
        for a in job.attacks:
            if d.name not in a.defenses:
                continue
            for shard in shards:
                key = {"defense": d.table, "attack": a.table, "dataset": data.dataset, "split": data.split,
                       "root": data.root, "ids": list(shard.example_ids), "seed": job.spec.seed, "format": FORMAT}
                # The eps the attack runs at: a transfer's is its crafting attack's.
                units.append(Unit(content_hash(key), d.name, a.name, float(a.spec.eps), d.table, a.table,
                                  tuple(shard.example_ids), d.grid_workers, defense_spec=d.spec, attack_spec=a.spec,
                                  surrogate_spec=a.surrogates.get(d.name)))
    return units


def run_id_for(job: Job, fresh: bool = False, run_id: str | None = None) -> str:
    """The run id: `run_id` if given, else the job's name and hash; `fresh` adds the time so
    nothing is reused (to either)."""
    base = run_id or f"{job.spec.name}-{job.hash[:8]}"
    return base + time.strftime("-%Y%m%d-%H%M%S") if fresh else base


def plan_document(job: Job, units: list[Unit], run_id: str, models: dict | None = None) -> dict:
    """plan.json: the job as validated, its hash, every unit, and what each defense's model is
    (`models`: {defense name: model card}, see models/zoo.py `model_card`), and the precision
    each defense's network runs in on a CPU and on CUDA (`precision`: {defense name: {"cpu":
    ..., "cuda": ...}}, from the job alone; each record names the one its unit ran in)."""
    return {"run_id": run_id, "job_hash": job.hash, "source": job.source, "job": job.spec.model_dump(),
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "format": FORMAT,
            "units": [u.as_dict() for u in units], "models": models or {},
            "precision": {d.name: planned_precision(d.spec) for d in job.defenses}}

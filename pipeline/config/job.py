"""Job specs: a TOML file that names a dataset, defenses, attacks and the sweep over them.

    name = "demo"
    seed = 0

    [data]
    dataset = "digits"
    split = "test"
    limit = 64            # or: ids = [0, 5, 9]
    shard_size = 16

    [[defenses]]
    kind = "rdc"
    model = "optimal"
    timesteps = 10
    [defenses.sweep]      # every combination of these values becomes its own defense
    temperature = [0.5, 1.0]

    [[attacks]]
    kind = "autoattack"
    version = "rand"
    eps = [0.0157, 0.0314]    # an eps list sweeps eps
    defenses = ["rdc-*"]       # which defenses (names, shell patterns); default: all

Defense tables are those of pipeline.config.defense, attack tables those of pipeline.config.attack.
Each table is parsed here, once: the planner hands the parsed specs and the planned names (with
their sweep suffix) to the workers, and the records carry those names.
"""

from __future__ import annotations

import fnmatch
import hashlib
import itertools
import json
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from pipeline.config.attack import AttackSpec, attack_name, exact_fractions, parse_attack
from pipeline.config.datasets import DatasetName
from pipeline.config.defense import DefenseSpec, defense_name, parse_defense, surrogate_spec
from pipeline.config.tables import MAX_DEPTH, too_deep
from pipeline.errors import ConfigError, config_error
from pipeline.names import NAME_MAX, NAME_PATTERN


class DataSpec(BaseModel):
    # strict: a boolean or a string is not a number (lax pydantic takes true as 1 and "4" as 4)
    model_config = ConfigDict(extra="forbid", strict=True)
    dataset: DatasetName
    split: Literal["train", "test"] = "test"
    root: str | None = Field(None, description="folder or s3:// URI of a CIFAR dataset")
    limit: int | None = Field(None, ge=1)
    ids: list[int] | None = None
    shard_size: int = Field(16, ge=1)

    @field_validator("ids")
    @classmethod
    def _ids(cls, value):
        if value is not None and (any(i < 0 for i in value) or len(set(value)) != len(value)):
            raise ValueError("ids must be distinct non-negative integers")
        return value


class JobSpec(BaseModel):
    """A validated job, before its sweeps are expanded."""

    model_config = ConfigDict(extra="forbid", strict=True)
    name: str = Field("job", pattern=NAME_PATTERN, max_length=NAME_MAX)
    seed: int = Field(0, ge=0, le=2**63 - 1)
    data: DataSpec
    defenses: list[dict] = Field(min_length=1)
    attacks: list[dict] = Field(min_length=1)
    # The most device-hours `run` may start (runtime/estimate.py, its upper estimate); None: no limit.
    max_gpu_hours: float | None = Field(None, gt=0, allow_inf_nan=False)

    @field_validator("attacks", mode="before")
    @classmethod
    def _fractions(cls, value):
        # "8/255" becomes its float here, once: the plan, the job hash and the records see the number.
        return [exact_fractions(t) for t in value] if isinstance(value, list) else value


@dataclass(frozen=True)
class PlannedDefense:
    """A defense as the job planned it: one sweep variant, its name, table and parsed spec."""

    name: str  # the planned name: the spec's, plus the sweep suffix
    table: dict  # as written (with the job's dataset, root and seed filled in): what unit ids hash
    spec: DefenseSpec
    grid_workers: int | str = 1  # a gang of this many actors per unit, or "auto" (see runtime.scheduler.gang_size)


@dataclass(frozen=True)
class PlannedAttack:
    """An attack as the job planned it: one sweep variant at one eps, and the defenses it targets."""

    name: str  # the planned name: the spec's, plus the sweep suffix
    table: dict  # one eps
    spec: AttackSpec
    defenses: tuple[str, ...]
    surrogates: dict[str, DefenseSpec] = field(default_factory=dict)  # transfer: the surrogate per attacked defense


@dataclass(frozen=True)
class Job:
    """A job with its sweeps expanded: what the planner turns into units."""

    spec: JobSpec
    defenses: tuple[PlannedDefense, ...]
    attacks: tuple[PlannedAttack, ...]
    source: str

    @property
    def hash(self) -> str:
        """The job's hash, without grid_workers or the budget: how a unit is computed, or whether it
        may start, does not change its rows."""
        doc = self.spec.model_dump()
        doc.pop("max_gpu_hours")
        doc["defenses"] = [{k: v for k, v in d.items() if k != "grid_workers"} for d in doc["defenses"]]
        return content_hash(doc)


def canonical(obj: Any) -> str:
    """Canonical JSON (sorted keys, no spaces): the input of every content hash."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)


def content_hash(obj: Any, n: int = 16) -> str:
    return hashlib.sha256(canonical(obj).encode()).hexdigest()[:n]


def _sweep(table: dict, where: str, extra_lists: tuple[str, ...] = ()) -> list[tuple[dict, str]]:
    """Expand `sweep` (and the fields in extra_lists given as lists) into (table, suffix) pairs."""
    table = dict(table)
    sweep = table.pop("sweep", {})
    if not isinstance(sweep, dict):
        raise ConfigError(f"{where}.sweep: expected a table of lists, got {type(sweep).__name__}")
    for key in extra_lists:
        if isinstance(table.get(key), list):
            sweep = {key: table.pop(key), **sweep}
    for key, values in sweep.items():
        if not isinstance(values, list) or not values:
            raise ConfigError(f"{where}.sweep.{key}: expected a non-empty list of values, got {values!r}")
    keys = list(sweep)
    out = []
    for combo in itertools.product(*(sweep[k] for k in keys)):
        values = dict(zip(keys, combo))
        suffix = ",".join(f"{k}={v}" for k, v in values.items() if k not in extra_lists)
        out.append(({**table, **values}, f"[{suffix}]" if suffix else ""))
    return out


def _reprefix(exc: ConfigError, old: str, new: str) -> ConfigError:
    """The error with its field paths under `new` instead of `old` ("attack." -> "attacks[0]."); a
    clause about the whole table ("attack: ...") is moved the same way."""
    whole, under = old.rstrip(".") + ":", new.rstrip(".") + ":"
    return ConfigError("; ".join(p.replace(old, new, 1) if p.startswith(old) else
                                 p.replace(whole, under, 1) if p.startswith(whole) else p for p in str(exc).split("; ")))


def _grid_workers(value, where: str) -> int | str:
    if value == "auto" or (isinstance(value, int) and not isinstance(value, bool) and value >= 1):
        return value
    raise ConfigError(f"{where}.grid_workers: expected a positive integer or \"auto\", got {value!r}")


def expand(spec: JobSpec, source: str = "<job>") -> Job:
    """Validate every defense and attack table and expand the sweeps."""
    defenses: list[PlannedDefense] = []
    for i, raw in enumerate(spec.defenses):
        where = f"defenses[{i}]"
        raw = dict(raw)
        grid_workers = _grid_workers(raw.pop("grid_workers", 1), where)
        for table, suffix in _sweep(raw, where):
            if table.setdefault("dataset", spec.data.dataset) != spec.data.dataset:
                raise ConfigError(f"{where}.dataset: {table['dataset']!r} differs from data.dataset {spec.data.dataset!r}")
            if spec.data.root and "data_root" not in table:
                table["data_root"] = spec.data.root
            table.setdefault("seed", spec.seed)
            try:
                parsed = parse_defense(table)
            except ConfigError as exc:
                raise _reprefix(exc, "defense.", f"{where}.") from None
            name = defense_name(parsed) + ("" if parsed.name else suffix)
            if any(d.name == name for d in defenses):
                raise ConfigError(f"{where}.name: two defenses are named {name!r}; give them distinct names")
            defenses.append(PlannedDefense(name, table, parsed, grid_workers))
    names = [d.name for d in defenses]
    attacks: list[PlannedAttack] = []
    for i, raw in enumerate(spec.attacks):
        where = f"attacks[{i}]"
        raw = dict(raw)
        patterns = raw.pop("defenses", ["*"])
        if isinstance(patterns, str):
            patterns = [patterns]
        if not isinstance(patterns, list) or not all(isinstance(p, str) for p in patterns):
            raise ConfigError(f"{where}.defenses: expected a list of defense names or patterns, got {patterns!r}")
        targets = tuple(n for n in names if any(fnmatch.fnmatchcase(n, p) for p in patterns))
        if not targets:
            raise ConfigError(f"{where}.defenses: {patterns} match no defense; defenses are {names}")
        for table, suffix in _sweep(raw, where, extra_lists=("eps",)):
            try:
                parsed = parse_attack(table)
            except ConfigError as exc:
                raise _reprefix(exc, "attack.", f"{where}.") from None
            name = attack_name(parsed) + ("" if parsed.name else suffix)
            if any(a.name == name and a.table.get("eps") == table.get("eps") and set(a.defenses) & set(targets)
                   and a.table.get("path", "adaptive") == table.get("path", "adaptive") for a in attacks):
                raise ConfigError(f"{where}.name: two attacks are named {name!r} at the same eps; give them distinct names")
            if getattr(parsed, "lm_gradient", None) == "exact":
                authors = [d.name for d in defenses if d.name in targets and d.spec.kind == "rdc"
                           and d.spec.lm is not None and d.spec.lm.variant == "authors"]
                if authors:
                    raise ConfigError(f"{where}.lm_gradient: \"exact\" differentiates LM's steps, but defense "
                                      f"{authors[0]!r} runs the authors' LM, which attacks cross by BPDA only; "
                                      "leave lm_gradient out or limit the attack's `defenses`")
            surrogates = {}
            if parsed.kind == "transfer":
                by_name = {d.name: d.spec for d in defenses}
                surrogates = {t: surrogate_spec(parsed.surrogate, by_name[t], f"{where}.surrogate") for t in targets}
            attacks.append(PlannedAttack(name, table, parsed, targets, surrogates))
            # MI's adaptive gradient is partly masked (the mixing label is drawn without one), so an
            # attack on MI that names no path also runs on its base classifier (oblivious).
            mixup = tuple(d.name for d in defenses if d.name in targets and d.spec.kind == "mi")
            if mixup and "path" not in table and parsed.kind in ("autoattack", "pgd"):
                oblivious = {**table, "path": "oblivious"}
                attacks.append(PlannedAttack(name, oblivious, parse_attack(oblivious), mixup))
    return Job(spec, tuple(defenses), tuple(attacks), source)


def parse_job(doc: dict, source: str = "<job>") -> Job:
    """A Job from a parsed TOML document; ConfigError names every bad field."""
    if not isinstance(doc, dict):
        raise ConfigError(f"{source}: a job is a table of fields, got {type(doc).__name__}")
    if (where := too_deep(doc)) is not None:
        raise ConfigError(f"{where}: nested more than {MAX_DEPTH} arrays or tables deep in {source}; a job needs far "
                          f"fewer")
    try:
        spec = JobSpec.model_validate(doc)
    except ValidationError as exc:
        raise config_error(exc, "") from None
    return expand(spec, source)


def load_job(path: str | Path) -> Job:
    """Read and validate a TOML job file."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read job file {path}: {exc.strerror or exc}") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"job file {path} is not text (UTF-8 TOML): byte {exc.start} is {exc.object[exc.start]:#04x}") from None
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"job file {path} is not valid TOML: {exc}") from None
    except RecursionError:  # tomllib parses nested arrays recursively
        raise ConfigError(f"job file {path} nests its arrays or tables too deeply (a job needs at most "
                          f"{MAX_DEPTH} levels)") from None
    return parse_job(doc, str(path))

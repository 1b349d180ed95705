"""A run folder is bound to one job: its plan.json records the job and its hash, and a driver
that comes with another job under the same run id is refused before it writes anything."""

from __future__ import annotations

from typing import Any

from pipeline.errors import BadFileError, RunMismatchError
from pipeline.store.io import Store

PLAN = "plan.json"


def read_plan(store: Store, rel: str = PLAN) -> dict | None:
    """The plan.json at `rel` (None when there is none), checked for the fields every reader
    relies on: run_id and job_hash (text), units (a list of {unit_id, path, example_ids}).

    BadFileError naming the file and the first field that does not fit (a plan of another
    shape, `[]`, a plan without units), so that no reader trips over it with a traceback.
    """
    if not store.exists(rel):
        return None
    doc = store.read_json(rel)
    problem = _plan_problem(doc)
    if problem:
        raise BadFileError(f"{store.join(rel)} is not a run plan: {problem}. It is written once by `robustsweep "
                           f"run`; restore it, or start a new run (--fresh or another --run-id)", {store.join(rel): problem})
    return doc


def _plan_problem(doc: Any) -> str | None:
    if not isinstance(doc, dict):
        return f"it holds a JSON {type(doc).__name__}, not an object"
    for key in ("run_id", "job_hash"):
        if not isinstance(doc.get(key), str):
            return f"field {key!r} is {_shown(doc.get(key))}, not text"
    units = doc.get("units")
    if not isinstance(units, list):
        return f"field 'units' is {_shown(units)}, not a list"
    for i, unit in enumerate(units):
        if not isinstance(unit, dict):
            return f"units[{i}] is {_shown(unit)}, not an object"
        for key, kind in (("unit_id", str), ("path", str), ("example_ids", list)):
            if not isinstance(unit.get(key), kind):
                return f"units[{i}].{key} is {_shown(unit.get(key))}, not {'text' if kind is str else 'a list'}"
    return None


def _shown(value: Any) -> str:
    if value is None:
        return "absent"
    text = repr(value)
    return text if len(text) <= 40 else text[:40] + "..."


def check_binding(store: Store, run_id: str, job_hash: str, job: dict) -> dict | None:
    """The plan of `{run_id}/plan.json` when it is of this job, None when the run is new.

    job_hash, job: the job's hash and its validated document (plan.json's "job").
    RunMismatchError, naming the fields that differ (at most 10) and the ways out (a new run
    id, or --fresh, which makes one), when the run holds another job. The caller writes the
    plan of a new run (under the run's lease, so that nothing comes in between).
    """
    rel = f"{run_id}/{PLAN}"
    stored = read_plan(store, rel)
    if stored is None:
        return None
    if stored.get("job_hash") == job_hash:
        return stored
    diffs = differences(stored.get("job"), job)
    shown = "; ".join(diffs[:10]) + (f"; and {len(diffs) - 10} more" if len(diffs) > 10 else "")
    raise RunMismatchError(
        f"run {run_id} at {store.join(run_id)} holds another job (job hash {stored.get('job_hash')}, this job "
        f"{job_hash}): {shown or 'the plan format differs'}. Give another --run-id, or --fresh for a new run")


def differences(old: Any, new: Any, where: str = "") -> list[str]:
    """"field: old -> new" for every leaf that differs between two JSON values."""
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for key in sorted(set(old) | set(new), key=str):
            sub = f"{where}.{key}" if where else str(key)
            if key not in old:
                out.append(f"{sub}: (absent) -> {new[key]!r}")
            elif key not in new:
                out.append(f"{sub}: {old[key]!r} -> (absent)")
            else:
                out += differences(old[key], new[key], sub)
        return out
    if isinstance(old, list) and isinstance(new, list) and len(old) == len(new):
        return [d for i, (a, b) in enumerate(zip(old, new)) for d in differences(a, b, f"{where}[{i}]")]
    return [] if old == new else [f"{where or 'job'}: {old!r} -> {new!r}"]

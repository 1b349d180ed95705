"""Which record files of one or more run folders a reader may count: every file is checked
against its seal (pipeline.store.seal) and each unit is read once.

A file that fails (truncated, corrupted, foreign, another schema) is refused by name
(BadFileError) unless the caller skips bad files, and then it is listed. Two files holding the
same unit (its id in the footer: a copy beside the original, or the same run given twice or
copied to another folder) count once: the first folder's, there the file under the unit's own
name (`unit-{id}.parquet`); the others are listed.

A run folder with a plan.json also vouches for whose rows it holds: each file's footer must
name the plan's run id and job hash and one of its units, with that unit's number of rows. A
file copied from another run or job, or a records/ that links to another run's, is refused by
name like any other bad file. (A folder of records without a plan, written by hand, is only
checked against its seals, and so is a folder whose plan.json is damaged, with --skip-bad.)

Besides records/, a run folder holds plan.json, failures/, the driver's lease and, from the
first driver that sized its pool, predicted.json (runtime/estimate.py: `prediction_document`):
the cost model's prediction of every planned unit, which the report sets beside what the
records spent. It is no record file: nothing here counts it, and `read_prediction` reads it for
the report, taking only one of this run (its run id and job hash those of plan.json).
"""

from __future__ import annotations

import posixpath
from collections.abc import Sequence
from dataclasses import dataclass, field

from pipeline.errors import BadFileError, StoreError
from pipeline.store.binding import read_plan
from pipeline.store.io import Store

RECORDS = "records"
PREDICTED = "predicted.json"
PREDICTION_FORMATS = (1,)  # the layouts of predicted.json this version reads
ABSENT = "does not exist (a run written before predictions were kept)"  # how read_prediction ends when there is none


@dataclass
class Verified:
    """The outcome for a set of run folders.

    files: (store, rel) of every file to read, one per unit. units: the unit id of each (its
        footer's; the file's URI where the footer names none).
    bad: {file URI: why it fails}. duplicates: {file URI left out: the URI read instead}.
    """

    files: list[tuple[Store, str]] = field(default_factory=list)
    units: list[str] = field(default_factory=list)
    bad: dict[str, str] = field(default_factory=dict)
    duplicates: dict[str, str] = field(default_factory=dict)

    def notes(self) -> list[str]:
        """One line per file left out, for the person reading the output."""
        return ([f"skipped {uri}: {why}" for uri, why in self.bad.items()]
                + [f"read once: {uri} holds the same unit as {kept}" for uri, kept in self.duplicates.items()])

    def refuse_bad(self) -> None:
        """BadFileError naming every bad file (the first 10 in the message, all in `.files`)."""
        if not self.bad:
            return
        items = list(self.bad.items())
        shown = "; ".join(f"{uri} ({why})" for uri, why in items[:10])
        more = f"; and {len(items) - 10} more" if len(items) > 10 else ""
        raise BadFileError(f"{len(items)} record file(s) fail their checks: {shown}{more}. Delete or move them "
                           f"(a rerun of the job redoes their units), or pass --skip-bad to go on without them",
                           self.bad)


def foreign(footer, plan: dict, units: dict[str, dict]) -> str | None:
    """Why a sealed file's rows are not of the run whose plan is `plan` (None when they are);
    units: the plan's units by id."""
    run_id, job_hash, unit_id = footer.get("run_id"), footer.get("job_hash"), footer.get("unit_id")
    if run_id != plan["run_id"]:
        return f"rows of run {run_id!r}, not of this run {plan['run_id']!r} (a file of another run)"
    if job_hash != plan["job_hash"]:
        return f"rows of job {job_hash!r}, not of this run's job {plan['job_hash']!r} (a file of another job)"
    unit = units.get(unit_id)
    if unit is None:
        return f"unit {unit_id!r} is not in this run's plan.json"
    if footer.rows != len(unit["example_ids"]):
        return f"holds {footer.rows} rows, its unit in plan.json has {len(unit['example_ids'])} examples"
    return None


def verify_runs(stores: Sequence[Store], *, skip_bad: bool = False) -> Verified:
    """Check every Parquet file under each store's records/ (see the module docstring).

    skip_bad: leave bad files out (listed in `.bad`) instead of raising BadFileError.
    """
    out = Verified()
    kept: dict[str, str] = {}  # unit id -> URI of the file read for it
    for store in stores:
        try:
            plan = read_plan(store)
        except BadFileError as exc:
            if not skip_bad:
                raise BadFileError(f"{exc} (or pass --skip-bad to read its records by their seals alone)",
                                   exc.files) from None
            out.bad.update(exc.files)
            plan = None
        units = {u["unit_id"]: u for u in plan["units"]} if plan is not None else {}
        rels = store.list(RECORDS, ".parquet")
        good = []
        for rel, (reason, footer) in store.check(rels, keep=True).items():
            if reason is None and plan is not None:
                reason = foreign(footer, plan, units)
            if reason is not None:
                out.bad[store.join(rel)] = reason
            else:
                good.append((rel, footer.get("unit_id") or store.join(rel)))  # no unit id: counts on its own
        # The file under the unit's own name first, so that a copy beside it is the one left out.
        good.sort(key=lambda g: (posixpath.basename(g[0]) != f"unit-{g[1]}.parquet", g[0]))
        for rel, unit in good:
            uri = store.join(rel)
            if unit in kept:
                out.duplicates[uri] = kept[unit]
                continue
            kept[unit] = uri
            out.files.append((store, rel))
            out.units.append(unit)
    if not skip_bad:
        out.refuse_bad()
    return out


def read_prediction(store: Store, plan: dict | None = None) -> tuple[dict | None, str | None]:
    """(predicted.json, None) of a run folder, or (None, why not) when it has none (a run folder
    written before predictions were kept, or whose cost model failed), when it is damaged, or
    when it is of another run or job than `plan` (the folder's plan.json). Never raises for
    the file's content: a report without a prediction is still a report."""
    try:
        if not store.exists(PREDICTED):
            return None, f"not available: {store.join(PREDICTED)} {ABSENT}"
        doc = store.read_json(PREDICTED)
    except StoreError as exc:
        return None, f"not available: {exc}"
    problem = _prediction_problem(doc, plan)
    if problem:
        return None, f"not available: {store.join(PREDICTED)} {problem}"
    return doc, None


def _pair(value) -> bool:
    return (isinstance(value, list) and len(value) == 2 and all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                                                for v in value) and value[0] <= value[1])


def _prediction_problem(doc, plan: dict | None) -> str | None:
    if not isinstance(doc, dict):
        return "is not a JSON object"
    if doc.get("format") not in PREDICTION_FORMATS:
        return f"has format {doc.get('format')!r}, which this version does not read"
    if plan is not None and (doc.get("run_id"), doc.get("job_hash")) != (plan["run_id"], plan["job_hash"]):
        return (f"is of run {doc.get('run_id')!r} (job {doc.get('job_hash')!r}), not of this run's plan.json "
                f"({plan['run_id']!r}, job {plan['job_hash']!r})")
    profile = doc.get("profile")
    if profile is not None and not (isinstance(profile, dict) and isinstance(profile.get("device"), str)):
        return "has a 'profile' that is neither null nor an object with a device"
    units = doc.get("units")
    if not isinstance(units, list):
        return "has no list of 'units'"
    for i, u in enumerate(units):
        if not (isinstance(u, dict) and isinstance(u.get("unit_id"), str) and _pair(u.get("forward"))
                and _pair(u.get("backward"))):
            return f"units[{i}] is not a unit's prediction (unit_id, forward [lo, hi], backward [lo, hi])"
        for key in ("flops", "seconds"):
            if u.get(key) is not None and not _pair(u[key]):
                return f"units[{i}].{key} is neither null nor [lo, hi]"
    return None

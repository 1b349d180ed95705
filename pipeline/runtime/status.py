"""The state of a run from its folder alone: plan, committed units, failures, throughput."""

from __future__ import annotations

from pipeline.errors import InputError, RobustsweepError
from pipeline.runtime.estimate import progress
from pipeline.runtime.plan import Unit
from pipeline.store import Store
from pipeline.store.binding import read_plan
from pipeline.store.lease import current_holder
from pipeline.store.verify import verify_runs


def run_status(uri: str, endpoint_url: str | None = None, *, skip_bad: bool = False) -> dict:
    """{"run_id", "units", "done", "failed", "left", "rows", "worker_seconds", "examples_per_worker_second",
    "cost", "skipped", "driver"}; cost: network evaluations spent / estimated / left and an ETA in
    worker-seconds at the run's own speed (runtime/estimate.py: progress); driver: who holds the run folder's lease (host, pid, since), None when no
    driver is running it. Every record file is checked (pipeline.store.verify): a bad one raises
    BadFileError naming it unless skip_bad, and is then listed in "skipped" and not done."""
    store = Store(uri, endpoint_url=endpoint_url)
    doc = read_plan(store)
    if doc is None:
        raise InputError(f"{store.uri} is not a run folder: it has no plan.json (expected {{out}}/{{run_id}}, "
                         f"e.g. results/demo-759353b7)")
    units = doc["units"]  # as plan.json keeps them
    planned = {u["unit_id"] for u in units}
    # Failure notes are named unit-{id}.json; anything else in failures/ is not one of ours.
    failed = {name[5:-5] for name in (p.rsplit("/", 1)[-1] for p in store.list("failures", ".json"))
              if name.startswith("unit-")} & planned
    verified = verify_runs([store], skip_bad=skip_bad)
    # A unit is done when a file that passed its checks (its footer names the unit) is read for it.
    done_ids = set(verified.units) & planned
    good = {rel for _, rel in verified.files}
    table = store.read_records("records", columns=["unit_id", "seconds", "forward_passes", "backward_passes"],
                               rels=sorted(good))
    rows = table.num_rows
    total = {c: float(sum(v for v in table.column(c).to_pylist() if v is not None)) if rows else 0.0
             for c in ("seconds", "forward_passes", "backward_passes")}
    seconds = total["seconds"]
    try:
        cost = progress([Unit.from_dict(u) for u in units], done_ids, total["forward_passes"], total["backward_passes"],
                        seconds)
    except RobustsweepError as exc:  # a plan this version cannot cost: the counts above still stand
        cost = {"error": str(exc)}
    return {"run_id": doc["run_id"], "units": len(units), "done": len(done_ids), "failed": len(failed - done_ids),
            "left": len(units) - len(done_ids), "rows": rows, "worker_seconds": round(seconds, 2),
            "examples_per_worker_second": round(rows / seconds, 3) if seconds else None,
            "cost": cost, "skipped": verified.notes(), "driver": current_holder(store)}

"""The state of a run from its folder alone: plan, committed units, failures, throughput."""

from __future__ import annotations

from pipeline.store import Store


def run_status(uri: str, endpoint_url: str | None = None) -> dict:
    """{"run_id", "units", "done", "failed", "left", "rows", "worker_seconds", "examples_per_worker_second"}."""
    store = Store(uri, endpoint_url=endpoint_url)
    doc = store.read_json("plan.json")
    units = doc["units"]  # as plan.json keeps them: the path and the example count are all this needs
    failed = {p.rsplit("unit-", 1)[1][:-5] for p in store.list("failures", ".json")}
    done = [u for u in units if store.committed(u["path"], len(u["example_ids"]))]
    table = store.read_records("records", columns=["seconds"])
    rows = table.num_rows
    seconds = float(sum(v for v in table.column("seconds").to_pylist() if v is not None)) if rows else 0.0
    done_ids = {u["unit_id"] for u in done}
    return {"run_id": doc["run_id"], "units": len(units), "done": len(done), "failed": len(failed - done_ids),
            "left": len(units) - len(done), "rows": rows, "worker_seconds": round(seconds, 2),
            "examples_per_worker_second": round(rows / seconds, 3) if seconds else None}

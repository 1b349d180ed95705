"""The checks `validate` and `run` make before any work: the job's (pipeline.config.preflight),
the run's options, and every model a defense or transfer surrogate names, each for what its kind
is and against its dataset (pipeline.models.check: a folder's config builds without allocating,
a published file reads and its names and shapes fit; resolution, channels and classes fit the
dataset)."""

from __future__ import annotations

from pipeline.config.job import Job
from pipeline.config.preflight import check_output, check_workers, model_refs, preflight
from pipeline.models.check import check_model
from pipeline.names import check_name
from pipeline.runtime.plan import run_id_for


def preflight_job(job: Job) -> None:
    """ConfigError (or CheckpointError) naming the field for anything in `job` a run would fail on."""
    preflight(job)
    checked = set()
    for where, ref, dataset, classes in model_refs(job):
        if (ref, dataset, classes) not in checked:  # four defenses on one 200 MB file: its index is read once
            check_model(ref, dataset, where, classes=classes)
            checked.add((ref, dataset, classes))


def preflight_run(job: Job, out: str, *, workers: int | None = None, run_id: str | None = None) -> None:
    """preflight_job, and the run's options: output URI, worker count, run id."""
    if run_id is not None:
        check_name(run_id, "run_id (--run-id)")
    check_output(out, run_id if run_id is not None else run_id_for(job))
    check_workers(workers)
    preflight_job(job)

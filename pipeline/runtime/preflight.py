"""The checks `validate` and `run` make before any work: the job's (pipeline.config.preflight),
the run's options, and each checkpoint folder a defense names (it exists, and its config is
range-checked and builds without allocating; its weights are not read)."""

from __future__ import annotations

from pathlib import Path

from pipeline.config.job import Job
from pipeline.config.preflight import check_output, check_workers, checkpoint_folders, preflight, safe_name
from pipeline.errors import CheckpointError, ConfigError
from pipeline.models.checkpoint import read_config
from pipeline.models.registry import check_config
from pipeline.runtime.plan import run_id_for


def preflight_job(job: Job) -> None:
    """ConfigError (or CheckpointError) naming the field for anything in `job` a run would fail on."""
    preflight(job)
    for where, folder in checkpoint_folders(job):
        if "://" in folder:
            continue  # a remote checkpoint is checked where it is loaded
        if not Path(folder).is_dir():
            raise ConfigError(f"{where}: checkpoint folder {folder!r} does not exist (or is not a folder); expected "
                              f"'default', 'optimal' or a folder with model.safetensors and config.json")
        config, _ = read_config(folder)
        try:
            check_config(config)
        except ConfigError as exc:
            raise CheckpointError(f"{where}: checkpoint {folder}: {exc}") from None


def preflight_run(job: Job, out: str, *, workers: int | None = None, run_id: str | None = None) -> None:
    """preflight_job, and the run's options: output URI, worker count, run id."""
    if run_id is not None:
        safe_name(run_id, "run_id (--run-id)")
    check_output(out, run_id if run_id is not None else run_id_for(job))
    check_workers(workers)
    preflight_job(job)

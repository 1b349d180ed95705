"""The pipeline: job specs, the planner, Ray workers and the task queue."""

from .plan import Unit, plan, run_id_for
from .run import RunResult, run_job
from .spec import Job, load_job, parse_job

__all__ = ["Job", "load_job", "parse_job", "plan", "Unit", "run_id_for", "run_job", "RunResult"]

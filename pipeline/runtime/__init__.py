"""Running a job: the planner (units), Ray workers, the scheduler, grid gangs, submission to a cluster."""

from pipeline.runtime.plan import Unit, plan, run_id_for
from pipeline.runtime.run import RunResult, run_job

__all__ = ["plan", "Unit", "run_id_for", "run_job", "RunResult"]

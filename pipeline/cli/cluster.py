"""`robustsweep submit | logs | stop`: jobs handed to a running Ray cluster through the Ray Jobs API."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional

import typer

from pipeline.cli.common import console, fails_cleanly, notes
from pipeline.cli.jobs import EFFICIENCY_HELP
from pipeline.config.run import DEFAULT_OUT, RunOptions
from pipeline.errors import ConfigError


def env_pairs(pairs: list[str]) -> dict[str, str]:
    env = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ConfigError(f"--env: expected KEY=VALUE, got {pair!r}")
        env[key] = value
    return env


def follow(address: str, submission_id: str) -> dict:
    from pipeline.runtime.submit import follow_job

    def write(text: str) -> None:
        sys.stdout.write(text)
        sys.stdout.flush()

    try:
        return follow_job(address, submission_id, write)
    except KeyboardInterrupt:
        console.print(f"stopped following; {submission_id} goes on (robustsweep stop {submission_id} --address {address})")
        raise typer.Exit(130)


@fails_cleanly
def submit_cmd(
    job: Path = typer.Argument(..., help="job file (TOML) inside the working dir"),
    address: str = typer.Option(..., help="the cluster's dashboard URL, http://HEAD:8265"),
    out: str = typer.Option(DEFAULT_OUT, help="output URI as the cluster sees it, e.g. s3://bucket/prefix; a relative folder is under the head's home (default: ~/results on the head)"),
    workers: Optional[int] = typer.Option(None, help="worker actors (default: one per GPU of the cluster, else per CPU)"),
    run_id: Optional[str] = typer.Option(None, help="run id (default: job name and hash)"),
    fresh: bool = typer.Option(False, metavar="", help="start a new run instead of resuming"),
    endpoint_url: Optional[str] = typer.Option(None, help="S3 endpoint as the cluster sees it"),
    report: bool = typer.Option(True, metavar="", help="print the report at the end of the job's log"),
    gpus_per_worker: float = typer.Option(1.0, help="GPUs per worker actor, in (0, 1]"),
    min_gpus: int = typer.Option(0, help="the run waits until the cluster has this many GPUs (workers joining late)"),
    wait: bool = typer.Option(True, metavar="", help="follow the job's logs until it ends; exit 0 if it succeeded, else 1"),
    python: Optional[str] = typer.Option(None, help="the head's interpreter that has the dependencies (default: the first of this interpreter's path, python3, python that imports the package there; checked before submitting)"),
    working_dir: Path = typer.Option(Path("."), help="the project folder that travels to the cluster"),
    env: list[str] = typer.Option([], "--env", help="KEY=VALUE for the job's environment (repeatable)"),
    exclude: list[str] = typer.Option([], "--exclude", help="a path pattern that stays here (repeatable; .venv, .git, results, caches and *.parquet always do)"),
    forward_aws: bool = typer.Option(True, metavar="", help="pass the AWS_* variables set here (credentials, region, endpoint) to the job"),
    unit_timeout: Optional[float] = typer.Option(None, help="seconds a unit may run; past it its actor is replaced and the unit requeued (default: no limit)"),
    speculate: bool = typer.Option(False, metavar="", help="run a second copy of the last stragglers on idle actors; the first commit wins"),
    max_gpu_hours: Optional[float] = typer.Option(None, help="refuse (exit 2, before submitting) a job whose estimate is above this many device-hours (default: the job file's max_gpu_hours); the run on the cluster checks it again"),
    device: str = typer.Option("h100", help="the device profile the budget is counted on (see `robustsweep plan`)"),
    efficiency: Optional[float] = typer.Option(None, help=EFFICIENCY_HELP),
):
    """Submit a job to a running Ray cluster (Ray Jobs API); prints the submission id."""
    from pipeline.runtime.estimate import device_profile
    from pipeline.runtime.submit import aws_variables, resolve_out, submit_job

    options = RunOptions(out=out, workers=workers, gpus_per_worker=gpus_per_worker, min_gpus=min_gpus,
                         endpoint_url=endpoint_url, run_id=run_id, fresh=fresh, report=report,
                         unit_timeout=unit_timeout, speculate=speculate, max_gpu_hours=max_gpu_hours, device=device,
                         efficiency=efficiency)
    if max_gpu_hours is not None or device.lower() != "cpu":  # cpu: measured on the cluster, maybe not here
        device_profile(device, efficiency)  # a wrong profile name or efficiency: exit 2 here, not on the cluster
    found: list = []
    said: list[str] = []
    submission_id = submit_job(job, address, options, working_dir=working_dir, python=python, env=env_pairs(env),
                               forward_aws=forward_aws, excludes=exclude, found=found, notes=said)
    notes(said)
    print(submission_id, flush=True)
    head = found[0]
    console.print(f"on the head: {head.python}")
    if forward_aws and (names := aws_variables()):
        console.print(f"passed to the job: {', '.join(names)} (values not shown)")
    if not ("://" in options.out or Path(options.out).is_absolute()):
        console.print(f"[yellow]note:[/] results go to {resolve_out(options.out, head.home)} on the head node (a "
                      f"relative --out is under the head's home, so that a resubmitted job resumes); give --out "
                      f"s3://bucket/prefix to share them")
    if not wait:
        console.print(f"submitted {submission_id}: robustsweep status|logs|stop {submission_id} --address {address}")
        return
    st = follow(address, submission_id)
    console.print(f"job {submission_id}: {st['status']}" + (f" ({st['message']})" if st["status"] != "SUCCEEDED" else ""))
    if st["status"] != "SUCCEEDED":
        raise typer.Exit(1)


@fails_cleanly
def logs_cmd(
    submission_id: str = typer.Argument(..., help="the id `submit` printed (raysubmit_...)"),
    address: str = typer.Option(..., help="the cluster's dashboard URL, http://HEAD:8265"),
    follow_: bool = typer.Option(False, "--follow/--no-follow", "-f", metavar="", help="stream until the job ends; exit 0 if it succeeded, else 1"),
):
    """The logs of a submitted job."""
    from pipeline.runtime.submit import job_logs

    if not follow_:
        sys.stdout.write(job_logs(address, submission_id))
        return
    st = follow(address, submission_id)
    if st["status"] != "SUCCEEDED":
        console.print(f"job {submission_id}: {st['status']}")
        raise typer.Exit(1)


@fails_cleanly
def stop_cmd(
    submission_id: str = typer.Argument(..., help="the id `submit` printed (raysubmit_...)"),
    address: str = typer.Option(..., help="the cluster's dashboard URL, http://HEAD:8265"),
    wait: bool = typer.Option(True, metavar="", help="wait (at most 60 s) until the job has stopped"),
):
    """Stop a submitted job; committed units stay, a later submit of the same job resumes."""
    from pipeline.runtime.submit import stop_job

    print(json.dumps(stop_job(address, submission_id, wait=wait), indent=2))

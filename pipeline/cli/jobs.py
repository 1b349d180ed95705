"""`robustsweep validate | run | status`: check a job, run it on a Ray cluster, follow its progress."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from pipeline.cli.analytics import print_summary
from pipeline.cli.common import SKIP_BAD_HELP, console, fails_cleanly, load_job_file, no_bool_words, notes
from pipeline.config.run import DEADLINE_FACTOR, DEADLINE_FLOOR, DEFAULT_OUT, RunOptions
from pipeline.errors import ConfigError


@fails_cleanly
def validate_cmd(
    job: Path = typer.Argument(..., help="job file (TOML)"),
    out: Optional[str] = typer.Option(None, help="also check this output folder or s3://bucket/prefix"),
):
    """Check a job file (everything `run` checks before it starts) and print what it expands to (stdout, so it pipes); writes nothing."""
    from pipeline.analytics.render import format_eps
    from pipeline.config.attack import crafting
    from pipeline.config.defense import defense_name
    from pipeline.data import load_split
    from pipeline.runtime.plan import plan, run_id_for
    from pipeline.runtime.preflight import preflight_job, preflight_run

    spec = load_job_file(job)
    preflight_job(spec) if out is None else preflight_run(spec, out)
    x, _ = load_split(spec.spec.data.dataset, spec.spec.data.split, root=spec.spec.data.root)
    units = plan(spec, x.shape[0])
    if not units:
        raise ConfigError("the job selects no examples (data.ids / data.limit): nothing to run")
    # The expansion is the command's output (stdout, plain text: names carry sweep suffixes such
    # as [temperature=0.5], which are no markup).
    print(f"ok {job}: run id {run_id_for(spec)}, {len(spec.defenses)} defenses, {len(spec.attacks)} attacks, "
          f"{len(units)} units")
    for d in spec.defenses:
        print(f"  defense {d.name}")
    for a in spec.attacks:
        surrogates = sorted({defense_name(s) for s in a.surrogates.values()})
        inner = crafting(a.spec) if a.spec.kind != "none" else None
        eps = format_eps(inner.eps, inner.norm) if inner is not None else "0"
        print(f"  attack  {a.name} eps={eps} on {', '.join(a.defenses)}"
              + (f" (surrogate {', '.join(surrogates)})" if surrogates else ""))


EFFICIENCY_HELP = "the fraction of the device's dense peak a run reaches, in (0, 1] (default 0.3 for GPUs)"


@fails_cleanly
def plan_cmd(
    job: Path = typer.Argument(..., help="job file (TOML)"),
    device: str = typer.Option("h100", help="device profile: h100, h200, a100 (dense bf16), h100-tf32, h200-tf32, "
                                            "a100-tf32, or cpu (measured by `robustsweep bench cost`)"),
    efficiency: Optional[float] = typer.Option(None, help=EFFICIENCY_HELP),
    workers: int = typer.Option(1, help="devices the job runs on, for the wall time"),
    calibration: Optional[str] = typer.Option(None, metavar="RUN_URI", help="also predict seconds and wall time at the "
                                              "speed a run's records show (the same job resumed, or a similar one "
                                              "on the same machines)"),
    calibration_wall: Optional[float] = typer.Option(None, metavar="SECONDS", help="that run's wall seconds, for its "
                                                     "start-up (default: start-up not counted)"),
    endpoint_url: Optional[str] = typer.Option(None, help="S3 endpoint of --calibration (default: AWS_ENDPOINT_URL)"),
    as_json: bool = typer.Option(False, "--json/--no-json", metavar="", help="print the estimate as JSON"),
):
    """What a job will cost before it runs: per (defense, attack, eps), its units, network evaluations
    (forward / backward; a range where outcomes decide), PFLOP and device-hours; with --calibration,
    also the seconds a run of it would take at a measured speed; writes nothing."""
    from pipeline.runtime.estimate import device_profile, estimate_units, format_estimate, split_size
    from pipeline.runtime.plan import plan

    profile = device_profile(device, efficiency)
    if workers < 1:
        raise ConfigError(f"workers (--workers) must be >= 1, got {workers}")
    if calibration_wall is not None and (calibration is None or not calibration_wall > 0):
        raise ConfigError(f"--calibration-wall must be a positive number of seconds and goes with --calibration; "
                          f"got {calibration_wall!r}")
    spec = load_job_file(job)  # the model files and data may live on the cluster only
    n, note = split_size(spec)
    notes([note] if note else [])
    units = plan(spec, n)
    estimate = estimate_units(units, profile, workers)
    calibrated = None
    if calibration is not None:
        from pipeline.runtime.calibration import calibrate_on, format_calibrated, predict_units

        fitted = calibrate_on(calibration, calibration_wall or 0.0, endpoint_url)
        calibrated = (predict_units(units, fitted, workers), fitted)
    if as_json:
        doc = estimate.as_dict()
        if calibrated is not None:
            prediction, fitted = calibrated
            doc["calibrated"] = {"on": fitted.what, **{k: prediction[k] for k in ("startup", "makespan", "wall", "unknown")},
                                 "unit_seconds": {u: p["seconds"] for u, p in prediction["units"].items()}}
        print(json.dumps(doc, indent=2))
    else:
        print(format_estimate(estimate))
        if calibrated is not None:
            print("\n".join(format_calibrated(units, *calibrated)))


@fails_cleanly
def run_cmd(
    job: Path = typer.Argument(..., help="job file (TOML)"),
    out: str = typer.Option(DEFAULT_OUT, help="output folder or s3://bucket/prefix"),
    workers: Optional[int] = typer.Option(None, help="worker actors (default: one per GPU, else per CPU)"),
    address: Optional[str] = typer.Option(None, help="Ray cluster: none starts a local one; 'auto'; ray://host:port"),
    run_id: Optional[str] = typer.Option(None, help="run id (default: job name and hash)"),
    fresh: bool = typer.Option(False, metavar="", help="start a new run instead of resuming"),
    endpoint_url: Optional[str] = typer.Option(None, help="S3 endpoint (default: AWS_ENDPOINT_URL)"),
    report: bool = typer.Option(True, metavar="", help="print the report at the end"),
    gpus_per_worker: float = typer.Option(1.0, help="GPUs per worker actor; 0.5 or 0.25 pack small models several to a GPU"),
    min_gpus: int = typer.Option(0, help="wait (up to 10 min) until the cluster has this many GPUs before starting workers"),
    lease_wait: float = typer.Option(0.0, help="seconds to wait while another driver holds the run folder (default: refuse at once, exit 2)"),
    unit_timeout: Optional[float] = typer.Option(None, help="seconds a unit may run; past it its actor is replaced and the unit requeued (default: a deadline from the cost model, see --deadline-factor)"),
    speculate: bool = typer.Option(False, metavar="", help="run a second copy of the last stragglers on idle actors; the first commit wins"),
    deadline_factor: float = typer.Option(DEADLINE_FACTOR, help="without --unit-timeout, a unit may run this many times its predicted network evaluations x the seconds per evaluation measured on this run's committed units of its defense"),
    deadline_floor: float = typer.Option(DEADLINE_FLOOR, help="seconds: the cost-model deadline is never shorter"),
    max_gpu_hours: Optional[float] = typer.Option(None, help="refuse (exit 2, before any work) a job whose estimate is above this many device-hours (default: the job file's max_gpu_hours)"),
    device: str = typer.Option("h100", help="the device profile the budget is counted on (see `robustsweep plan`)"),
    efficiency: Optional[float] = typer.Option(None, help=EFFICIENCY_HELP),
):
    """Run a job on a Ray cluster (resuming committed units) and print its report."""
    from pipeline.runtime.estimate import device_profile
    from pipeline.runtime.run import run_job

    if max_gpu_hours is not None or device.lower() != "cpu":  # cpu: a measured profile, which may be absent
        device_profile(device, efficiency)  # the prediction prices on it: a wrong name or efficiency exits 2 here

    options = RunOptions(out=out, workers=workers, gpus_per_worker=gpus_per_worker, address=address, min_gpus=min_gpus,
                         endpoint_url=endpoint_url, run_id=run_id, fresh=fresh, report=report,
                         unit_timeout=unit_timeout, speculate=speculate, max_gpu_hours=max_gpu_hours, device=device,
                         efficiency=efficiency, deadline_factor=deadline_factor, deadline_floor=deadline_floor)
    spec = load_job_file(job)
    result = run_job(spec, options, progress=True, lease_wait=lease_wait)
    console.print(f"run {result.run_id}: {result.done} units done, {result.skipped} already committed, "
                  f"{len(result.failed)} failed; {result.rows} rows in {result.seconds:.1f} s -> {result.uri}", markup=False)
    if result.lost or result.replaced or result.timed_out:
        console.print(f"cluster: {result.lost} actors lost, {result.replaced} replaced, {result.timed_out} units past "
                      f"their deadline, {result.requeued} units requeued", highlight=False, markup=False)
    if options.report:
        print_summary([result.uri], options.endpoint_url)
    if result.failed:
        console.print(f"{len(result.failed)} units failed; see {result.uri}/failures/", style="bold red", markup=False)
        raise typer.Exit(1)


@fails_cleanly
def status_cmd(
    uri: str = typer.Argument(..., metavar="RUN_URI|SUBMISSION_ID",
                              help="a run folder ({out}/{run_id}, local or s3://), or with --address a submission id"),
    endpoint_url: Optional[str] = typer.Option(None, help="S3 endpoint (default: AWS_ENDPOINT_URL)"),
    address: Optional[str] = typer.Option(None, help="a cluster's dashboard URL (http://HEAD:8265): the argument is then a submission id"),
    skip_bad: bool = typer.Option(False, "--skip-bad/--no-skip-bad", metavar="", help=SKIP_BAD_HELP),
):
    """Units done / failed / left, rows and throughput of a run; with --address, the state of a submitted job."""
    from pipeline.runtime.status import run_status
    from pipeline.runtime.submit import job_status

    no_bool_words([uri])
    if address is not None:
        st = job_status(address, uri)
    elif uri.startswith("raysubmit_") and not Path(uri).exists():
        raise ConfigError(f"{uri} looks like a submission id: pass --address http://HEAD:8265 to ask its cluster")
    else:
        st = run_status(uri, endpoint_url=endpoint_url, skip_bad=skip_bad)
    print(json.dumps(st, indent=2))

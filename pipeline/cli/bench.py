"""`robustsweep bench ...`: benchmarks; each one's measurement and formatting live in pipeline/bench/."""

from __future__ import annotations

import json
from typing import Optional

import typer

from pipeline.cli.common import fails_cleanly, say
from pipeline.errors import ConfigError

bench_app = typer.Typer(help="Benchmarks measured side by side in one run.", no_args_is_help=True)


def positive_ints(text: str, option: str, example: str) -> tuple[int, ...]:
    """Parse a comma-separated list of positive integers given to OPTION."""
    try:
        values = tuple(int(v) for v in text.split(","))
        if not values or min(values) < 1:
            raise ValueError
    except ValueError:
        raise ConfigError(f"{option}: expected positive integers, e.g. {example}; got {text!r}") from None
    return values


def show(result: dict, as_json: bool, format_lines) -> None:
    """A benchmark's result: JSON with --json, else its formatter's lines for a person."""
    if as_json:
        print(json.dumps(result, indent=2))
    else:
        say(format_lines(result))


def pruning_stages(text: str) -> list[tuple[int, int]]:
    """Parse --pruning "T1:K1,T2:K2" (timesteps:keep per stage) into [(T1, K1), (T2, K2)]."""
    try:
        stages = [tuple(int(v) for v in stage.split(":")) for stage in text.split(",")]
        if not stages or any(len(st) != 2 or min(st) < 1 for st in stages):
            raise ValueError
    except ValueError:
        raise ConfigError(f"--pruning: expected stages timesteps:keep, e.g. 50:5,500:1 (Li et al.); got {text!r}") from None
    return stages


@bench_app.command("elbo")
@fails_cleanly
def bench_elbo_cmd(
    model: str = typer.Option("default", help="'default' (the digits UNet), 'optimal', a checkpoint folder of a "
                              "digits UNet, or an EDM preset (e.g. edm-cifar10-cond-vp: full size, random weights, "
                              "random CIFAR-shaped images)"),
    examples: int = typer.Option(2, help="digits test examples"),
    timesteps: int = typer.Option(1000, help="RDC timesteps (systematic subsample; 1000 = all)"),
    repeat: int = typer.Option(2, help="timed rounds after a warm-up; the best round counts"),
    threads: Optional[int] = typer.Option(1, help="torch threads (0: torch's default)"),
    device: str = typer.Option("cpu", help="cpu or cuda"),
    chunk: Optional[int] = typer.Option(None, help="engine: network inputs per call (default: the device's)"),
    channels_last: bool = typer.Option(True, "--channels-last/--no-channels-last", metavar="", help="engine: channels_last layout"),
    compile: str = typer.Option("off", help="engine: torch.compile 'off', 'forward' (logits only) or 'on' (also gradients)"),
    autocast: str = typer.Option("auto", help="engine: autocast 'auto' (bf16 on CUDA, float32 on a CPU), 'off', 'bf16' or 'fp16'"),
    agreement_timesteps: int = typer.Option(100, help="with bf16/fp16: timesteps of the fp32 agreement check on the digits test split"),
    grad: bool = typer.Option(True, "--grad/--no-grad", metavar="", help="also time input gradients"),
    profile: bool = typer.Option(False, "--profile/--no-profile", metavar="", help="also profile one example: seconds by kind of operator"),
    forward_batch: int = typer.Option(64, help="EDM presets: batch of the timed single forward (fp32 and bf16 autocast)"),
    pruning: Optional[str] = typer.Option(None, help="EDM presets: also time RDC with adaptive class pruning, stages "
                                          "timesteps:keep (Li et al.: 50:5,500:1)"),
    as_json: bool = typer.Option(False, "--json/--no-json", metavar="", help="print JSON"),
):
    """RDC logits and gradients: the reference strategy (class loop, 64-timestep chunks, one example at a time) vs the engine,
    with FLOPs against a matmul peak measured in the same run. With an EDM preset as --model: one forward of the
    full-size network at --forward-batch in fp32 and bf16, and the engine's RDC seconds per image."""
    compiled = {"off": False, "forward": "forward", "on": True}.get(compile)
    if compiled is None:
        raise ConfigError(f"--compile must be off, forward or on; got {compile!r}")
    from pipeline.models.edm import EDM_PRESETS

    stages = pruning_stages(pruning) if pruning is not None else None
    if stages is not None and model not in EDM_PRESETS:
        raise ConfigError(f"--pruning is timed on the EDM presets ({', '.join(EDM_PRESETS)}), not on {model!r}")
    if model in EDM_PRESETS:
        from pipeline.bench.elbo import bench_edm, format_edm

        result = bench_edm(model, timesteps, examples=examples, batch=forward_batch, repeat=max(1, repeat - 1),
                           threads=threads or None, device=device, autocast=autocast, grad=grad, pruning=stages)
        show(result, as_json, format_edm)
        return
    from pipeline.bench.elbo import bench_elbo, format_elbo

    result = bench_elbo(model, examples, timesteps, repeat=repeat, threads=threads or None, device=device, chunk=chunk,
                        channels_last=channels_last, compile=compiled, autocast=autocast, grad=grad, profile=profile,
                        agreement_timesteps=agreement_timesteps)
    show(result, as_json, format_elbo)


@bench_app.command("draws")
@fails_cleanly
def bench_draws_cmd(
    device: str = typer.Option("cpu", help="cpu or cuda: where the draws and the forward run"),
    threads: Optional[int] = typer.Option(1, help="torch threads (0: torch's default)"),
    repeat: int = typer.Option(3, help="timed rounds of the draws after a warm-up; the best round counts"),
    as_json: bool = typer.Option(False, "--json/--no-json", metavar="", help="print JSON"),
):
    """The noise of one RDC forward (1000 timesteps; a CIFAR image and a digits one): the device path against the
    reference CPU hashing, and its share of the engine's forward."""
    if repeat < 1 or device not in ("cpu", "cuda"):
        raise ConfigError(f"--repeat must be >= 1 and --device cpu or cuda; got {repeat} and {device!r}")
    from pipeline.bench.draws import bench_draws, format_draws

    result = bench_draws(device=device, threads=threads or None, repeat=repeat)
    show(result, as_json, format_draws)


@bench_app.command("scaling")
@fails_cleanly
def bench_scaling_cmd(
    examples: int = typer.Option(48, help="digits test examples in the job"),
    shard_size: int = typer.Option(4, help="examples per unit"),
    timesteps: int = typer.Option(10, help="RDC timesteps of the job's defense"),
    model: str = typer.Option("default", help="the defense's diffusion model: 'default' (the digits UNet) or a "
                              "checkpoint folder of a digits UNet"),
    steps: int = typer.Option(5, help="PGD steps of the job's attack"),
    passes: int = typer.Option(2, help="scoring passes"),
    workers: str = typer.Option("1,2", help="worker counts, comma-separated"),
    repeat: int = typer.Option(1, help="rounds per figure; the best is kept"),
    as_json: bool = typer.Option(False, "--json/--no-json", metavar="", help="print JSON"),
):
    """The same job through Ray (run_job, 1 and 2 actors, one thread each) and split by hand into independent processes."""
    counts = positive_ints(workers, "--workers", "1,2")
    if min(examples, shard_size, timesteps, steps, passes, repeat) < 1:
        raise ConfigError("--examples, --shard-size, --timesteps, --steps, --passes and --repeat must be >= 1")
    from pipeline.bench.scaling import bench_scaling, format_scaling

    result = bench_scaling(examples, shard_size, timesteps, steps, passes, workers=counts, repeat=repeat, model=model)
    show(result, as_json, format_scaling)


@bench_app.command("grid")
@fails_cleanly
def bench_grid_cmd(
    model: str = typer.Option("default", help="'default' (the digits UNet), 'optimal', or an EDM preset "
                              "(e.g. edm-cifar10-cond-vp: full size, random weights, random CIFAR-shaped images)"),
    timesteps: int = typer.Option(1000, help="RDC timesteps (systematic subsample)"),
    examples: int = typer.Option(2, help="digits test examples in the batch"),
    gangs: Optional[str] = typer.Option(None, help="gang sizes, comma-separated (default 1,2 and 3 where cores allow)"),
    repeat: int = typer.Option(2, help="timed runs per figure; the best is kept"),
    as_json: bool = typer.Option(False, "--json/--no-json", metavar="", help="print JSON"),
):
    """Grid sharding: seconds of one batch's RDC logits and of one exact input gradient for G = 1, 2, 3 actors."""
    sizes = positive_ints(gangs, "--gangs", "1,2,3") if gangs else None
    if sizes is not None and sizes[0] != 1:
        raise ConfigError(f"--gangs: expected positive integers starting with 1, e.g. 1,2,3; got {gangs!r}")
    if examples < 1 or repeat < 1:
        raise ConfigError(f"--examples and --repeat must be >= 1, got {examples} and {repeat}")
    from pipeline.bench.grid import bench_grid, format_grid, format_grid_step

    result = bench_grid(model=model, timesteps=timesteps, examples=examples, gangs=sizes, repeat=repeat,
                        progress=None if as_json else lambda *step: say([format_grid_step(*step)]))
    show(result, as_json, format_grid)


@bench_app.command("report")
@fails_cleanly
def bench_report_cmd(
    rows: int = typer.Option(1_000_000, help="synthetic records (all columns of the record schema)"),
    files: int = typer.Option(100, help="Parquet files they are written to (like units of a run)"),
    repeats: int = typer.Option(3, help="timed runs; the best is reported"),
    as_json: bool = typer.Option(False, "--json/--no-json", metavar="", help="print JSON"),
):
    """The full report (every section, rendered) over ROWS synthetic records read from Parquet."""
    if rows < 1 or repeats < 1 or files < 1:
        raise ConfigError(f"--rows, --files and --repeats must be >= 1, got {rows}, {files} and {repeats}")
    from pipeline.bench.report import bench_report, format_report

    result = bench_report(rows, repeats=repeats, files=files)
    show(result, as_json, format_report)


@bench_app.command("attack")
@fails_cleanly
def bench_attack_cmd(
    cases: str = typer.Option("plain,mi-pl,rdc-optimal", help="comma-separated cases: plain, mi-pl, rdc-optimal"),
    examples: int = typer.Option(64, help="digits test examples in the batch (one unit)"),
    per_example: int = typer.Option(8, help="examples timed one at a time (scaled to the batch)"),
    repeat: int = typer.Option(3, help="interleaved timed runs of each mode (the fastest counts)"),
    threads: Optional[int] = typer.Option(1, help="torch threads (0: torch's default)"),
    device: str = typer.Option("cpu", help="cpu or cuda"),
    as_json: bool = typer.Option(False, "--json/--no-json", metavar="", help="print JSON"),
):
    """A unit attacked as one batch against one example at a time and against pyautoattack on the same batch and model."""
    from pipeline.bench.attack import bench_attack, format_attack

    result = bench_attack(cases=tuple(c.strip() for c in cases.split(",") if c.strip()), examples=examples,
                          per_example=per_example, repeat=repeat, threads=threads or None, device=device)
    show(result, as_json, format_attack)


@bench_app.command("scheduler")
@fails_cleanly
def bench_scheduler_cmd(
    units: int = typer.Option(100_000, help="units to dispatch"),
    actors: int = typer.Option(1024, help="simulated actors"),
    gangs: str = typer.Option("1,2,4,8", help="gang sizes, comma-separated: one block of units each"),
    seed: int = typer.Option(0, help="seed of the simulated durations, errors and losses"),
    ray_units: int = typer.Option(2000, help="units through a real local Ray cluster (0: skip that part)"),
    ray_actors: int = typer.Option(3, help="real Ray actors (one CPU each) for --ray-units"),
    as_json: bool = typer.Option(False, "--json/--no-json", metavar="", help="print JSON"),
):
    """The run's scheduler over simulated actors (gangs, losses, retries), then through real Ray actors: the driver's
    seconds a unit and peak memory."""
    sizes = positive_ints(gangs, "--gangs", "1,2,4,8")
    if units < 1 or actors < 1 or max(sizes) > actors:
        raise ConfigError(f"--units and --actors must be >= 1 and every gang at most --actors; got {units}, {actors}, {gangs}")
    if ray_units < 0 or ray_actors < 1:
        raise ConfigError(f"--ray-units must be >= 0 and --ray-actors >= 1; got {ray_units}, {ray_actors}")
    from pipeline.bench.scheduler import bench_scheduler, bench_scheduler_ray, format_scheduler, format_scheduler_ray

    result = bench_scheduler(units=units, actors=actors, gangs=sizes, seed=seed)
    if ray_units:
        result["ray"] = bench_scheduler_ray(units=ray_units, actors=ray_actors, seed=seed)
    show(result, as_json, lambda r: format_scheduler(r) + (format_scheduler_ray(r["ray"]) if "ray" in r else []))


@bench_app.command("cost")
@fails_cleanly
def cost_cmd(
    run: Optional[str] = typer.Argument(None, metavar="[RUN_URI]", help="only calibrate the `cpu` profile (FLOP/s) on this "
                                        "run's records, as before"),
    predict: Optional[str] = typer.Option(None, metavar="JOB", help="with RUN_URI: then estimate this job on the calibrated profile"),
    job: str = typer.Option("jobs/demo.toml", help="the job whose wall time is predicted, run and compared"),
    calibration: Optional[str] = typer.Option(None, metavar="RUN_URI", help="an existing calibration run (of another job) "
                                              "instead of running the built-in one; needs --calibration-wall"),
    calibration_wall: Optional[float] = typer.Option(None, metavar="SECONDS", help="wall seconds of --calibration"),
    measured: Optional[str] = typer.Option(None, metavar="RUN_URI", help="an existing complete run of --job instead of "
                                           "running it; needs --measured-wall"),
    measured_wall: Optional[float] = typer.Option(None, metavar="SECONDS", help="wall seconds of --measured"),
    workers: Optional[int] = typer.Option(None, help="worker actors of both runs (default: one per CPU, as `run`)"),
    out: Optional[str] = typer.Option(None, help="where the runs go (default: a new temporary folder)"),
    save: bool = typer.Option(True, metavar="", help="keep the profile for `plan --device cpu` (model cache, profiles.json)"),
    endpoint_url: Optional[str] = typer.Option(None, help="S3 endpoint (default: AWS_ENDPOINT_URL)"),
    as_json: bool = typer.Option(False, "--json/--no-json", metavar="", help="print JSON"),
):
    """Predict a job's wall time (default jobs/demo.toml) from a run of another job on this machine, run it, and print
    both with per (defense, attack) seconds. With RUN_URI: only this machine's speed in FLOP/s, the `cpu` profile."""
    from pathlib import Path

    if run is not None:
        given = [o for o, v in (("--calibration", calibration), ("--measured", measured)) if v is not None]
        if given:
            raise ConfigError(f"{given[0]} is for the wall-time prediction; RUN_URI only calibrates the cpu profile: give one or the other")
        from pipeline.cli.common import load_job_file
        from pipeline.data import load_split
        from pipeline.runtime.calibration import calibrate
        from pipeline.runtime.estimate import device_profile, estimate_job, format_estimate, save_measured_profile

        profile = calibrate(run, endpoint_url)
        say([f"cpu: {profile['flops_per_second'] / 1e9:.4g} GFLOP/s ({profile['what']})"])
        if save:
            save_measured_profile(profile)
        if predict is not None:
            target = load_job_file(Path(predict))
            data = target.spec.data
            n = load_split(data.dataset, data.split, root=data.root)[0].shape[0]
            say(format_estimate(estimate_job(target, n, device_profile("cpu", measured=profile))).splitlines())
        return
    if predict is not None:
        raise ConfigError("--predict needs RUN_URI (it estimates on the FLOP/s profile); the wall-time prediction uses --job")
    for name, uri, wall in (("--calibration", calibration, calibration_wall), ("--measured", measured, measured_wall)):
        if (uri is None) != (wall is None):
            raise ConfigError(f"{name} and {name}-wall go together: the wall seconds of a finished run are not in its "
                              f"folder; got {name} {uri!r} and {name}-wall {wall!r}")
        if wall is not None and not wall > 0:
            raise ConfigError(f"{name}-wall must be a positive number of seconds, got {wall!r}")
    if workers is not None and workers < 1:
        raise ConfigError(f"--workers must be >= 1, got {workers}")
    if not Path(job).is_file():
        raise ConfigError(f"--job: no job file at {job}")
    from pipeline.bench.cost import bench_cost, format_cost

    result = bench_cost(job, calibration=calibration, calibration_wall=calibration_wall, measured=measured,
                        measured_wall=measured_wall, workers=workers, out=out, endpoint_url=endpoint_url, save=save)
    show(result, as_json, format_cost)

"""The `robustsweep` command line: it parses, then calls the library."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console

from pipeline.errors import (BadFileError, CheckpointError, ConfigError, DatasetError, InputError, LeaseHeldError,
                             RobustsweepError)

app = typer.Typer(help="Robustness sweeps of inference-time defenses (RDC, Mixup Inference).", no_args_is_help=True,
                  pretty_exceptions_enable=False)
train_app = typer.Typer(help="Train the models the defenses stand on.", no_args_is_help=True)
app.add_typer(train_app, name="train")
console = Console(stderr=True, soft_wrap=True)

BAD_INPUT = (ConfigError, InputError, DatasetError, CheckpointError, BadFileError, LeaseHeldError)
SKIP_BAD_HELP = "leave out record files that fail their checks (each is listed) instead of refusing them (exit 2)"


def _fail(exc: Exception) -> None:
    console.print(f"[bold red]error:[/] {exc}")
    raise typer.Exit(2 if isinstance(exc, BAD_INPUT) else 1)


def _notes(notes: list[str]) -> None:
    for note in notes:
        console.print(f"[yellow]note:[/] {note}")


@train_app.command("diffusion")
def train_diffusion_cmd(
    dataset: str = typer.Option("digits", help="dataset to train on (its train split)"),
    out: Path = typer.Option(..., help="checkpoint folder to write (model.safetensors + config.json)"),
    seed: int = typer.Option(0, help="seed of all training draws"),
):
    """Train the default class-conditional UNet of DATASET (DDPM loss, label dropout 0.1, EMA)."""
    from pipeline.training.diffusion import train_default_diffusion

    try:
        _, meta = train_default_diffusion(dataset, out, progress=True, seed=seed)
    except RobustsweepError as exc:
        _fail(exc)
    console.print(f"saved {out}: {meta['steps']} steps, loss {meta['loss']:.4f}, {meta['seconds']:.0f} s")


@train_app.command("classifier")
def train_classifier_cmd(
    dataset: str = typer.Option("digits", help="dataset to train on (its train split)"),
    method: str = typer.Option("erm", help="erm, mixup, iat (interpolated AT) or pgd_at"),
    out: Path = typer.Option(..., help="checkpoint folder to write"),
    seed: int = typer.Option(0, help="seed of all training draws"),
):
    """Train the default classifier of DATASET with METHOD."""
    from pipeline.training.classifier import train_default_classifier

    try:
        _, meta = train_default_classifier(dataset, method, out, progress=True, seed=seed)
    except RobustsweepError as exc:
        _fail(exc)
    console.print(f"saved {out}: " + ", ".join(f"{k} {v}" for k, v in meta.items() if k in ("method", "seconds", "test_accuracy")))


@app.command("accuracy")
def accuracy_cmd(
    defense: str = typer.Argument(..., help='a defense table as JSON, e.g. \'{"kind": "rdc", "model": "optimal", "timesteps": 100}\''),
    split: str = typer.Option("test", help="split to evaluate"),
    limit: Optional[int] = typer.Option(None, help="only the first LIMIT examples"),
    seed: int = typer.Option(0, help="seed of the defense's draws"),
    batch_size: int = typer.Option(64, help="examples per call"),
):
    """Clean accuracy of one defense on a split (no attack)."""
    from rich.progress import Progress

    from pipeline.data import load_split
    from pipeline.defenses import build_defense
    from pipeline.protocol.predict import predict

    try:
        table = json.loads(defense)
    except json.JSONDecodeError as exc:
        _fail(ConfigError(f"defense: not valid JSON ({exc})"))
    try:
        module = build_defense(table)
        x, y = load_split(module.spec["dataset"], split, root=module.spec.get("data_root"))
        if limit is not None:
            x, y = x[:limit], y[:limit]
        start = time.perf_counter()
        with Progress(console=console, transient=True) as bar:
            task = bar.add_task(f"{module.name} on {split}", total=len(x))
            logits = predict(module, x, seed=seed, batch_size=batch_size, progress=lambda n: bar.update(task, completed=n))
        seconds = time.perf_counter() - start
    except RobustsweepError as exc:
        _fail(exc)
    acc = float((logits.argmax(1) == y).float().mean())
    print(json.dumps({"defense": module.name, "split": split, "n": len(y), "accuracy": acc, "seconds": round(seconds, 2)}))


def _job(path: Path):
    from pipeline.config.job import load_job

    try:
        return load_job(path)
    except RobustsweepError as exc:
        _fail(exc)


@app.command("validate")
def validate_cmd(job: Path = typer.Argument(..., help="job file (TOML)")):
    """Check a job file and print what it expands to (defenses, attacks, units); writes nothing."""
    from pipeline.data import load_split
    from pipeline.runtime.plan import plan, run_id_for

    spec = _job(job)
    try:
        x, _ = load_split(spec.spec.data.dataset, spec.spec.data.split, root=spec.spec.data.root)
        units = plan(spec, x.shape[0])
    except RobustsweepError as exc:
        _fail(exc)
    console.print(f"[green]ok[/] {job}: run id {run_id_for(spec)}, {len(spec.defenses)} defenses, "
                  f"{len(spec.attacks)} attacks, {len(units)} units")
    for d in spec.defenses:
        console.print(f"  defense {d.name}")
    for a in spec.attacks:
        console.print(f"  attack  {a.name} eps={a.table.get('eps', 0):.6g} on {', '.join(a.defenses)}")


@app.command("run")
def run_cmd(
    job: Path = typer.Argument(..., help="job file (TOML)"),
    out: str = typer.Option("results", help="output folder or s3://bucket/prefix"),
    workers: Optional[int] = typer.Option(None, help="worker actors (default: one per GPU, else per CPU)"),
    address: Optional[str] = typer.Option(None, help="Ray cluster: none starts a local one; 'auto'; ray://host:port"),
    run_id: Optional[str] = typer.Option(None, help="run id (default: job name and hash)"),
    fresh: bool = typer.Option(False, help="start a new run instead of resuming"),
    endpoint_url: Optional[str] = typer.Option(None, help="S3 endpoint (default: AWS_ENDPOINT_URL)"),
    report: bool = typer.Option(True, help="print the report at the end"),
    gpus_per_worker: float = typer.Option(1.0, help="GPUs per worker actor; 0.5 or 0.25 pack small models several to a GPU"),
    min_gpus: int = typer.Option(0, help="wait (up to 10 min) until the cluster has this many GPUs before starting workers"),
    lease_wait: float = typer.Option(0.0, help="seconds to wait while another driver holds the run folder (default: refuse at once, exit 2)"),
):
    """Run a job on a Ray cluster (resuming committed units) and print its report."""
    from pipeline.runtime.run import run_job

    spec = _job(job)
    try:
        result = run_job(spec, out, workers=workers, address=address, run_id=run_id, fresh=fresh,
                         endpoint_url=endpoint_url, progress=True, gpus_per_worker=gpus_per_worker,
                         min_gpus=min_gpus, lease_wait=lease_wait)
    except RobustsweepError as exc:
        _fail(exc)
    console.print(f"run {result.run_id}: {result.done} units done, {result.skipped} already committed, "
                  f"{len(result.failed)} failed; {result.rows} rows in {result.seconds:.1f} s -> {result.uri}")
    if report:
        try:
            _print_report([result.uri], endpoint_url, "table")
        except RobustsweepError as exc:
            _fail(exc)
    if result.failed:
        console.print(f"[bold red]{len(result.failed)} units failed[/]; see {result.uri}/failures/")
        raise typer.Exit(1)


@app.command("status")
def status_cmd(
    uri: str = typer.Argument(..., metavar="RUN_URI|SUBMISSION_ID",
                              help="a run folder ({out}/{run_id}, local or s3://), or with --address a submission id"),
    endpoint_url: Optional[str] = typer.Option(None, help="S3 endpoint (default: AWS_ENDPOINT_URL)"),
    address: Optional[str] = typer.Option(None, help="a cluster's dashboard URL (http://HEAD:8265): the argument is then a submission id"),
    skip_bad: bool = typer.Option(False, "--skip-bad", help=SKIP_BAD_HELP),
):
    """Units done / failed / left, rows and throughput of a run; with --address, the state of a submitted job."""
    from pipeline.runtime.status import run_status
    from pipeline.runtime.submit import job_status

    try:
        if address is not None:
            st = job_status(address, uri)
        elif uri.startswith("raysubmit_") and not Path(uri).exists():
            raise ConfigError(f"{uri} looks like a submission id: pass --address http://HEAD:8265 to ask its cluster")
        else:
            st = run_status(uri, endpoint_url=endpoint_url, skip_bad=skip_bad)
    except RobustsweepError as exc:
        _fail(exc)
    print(json.dumps(st, indent=2))


def _env_pairs(pairs: list[str]) -> dict[str, str]:
    env = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ConfigError(f"--env: expected KEY=VALUE, got {pair!r}")
        env[key] = value
    return env


def _follow(address: str, submission_id: str) -> dict:
    from pipeline.runtime.submit import follow_job

    def write(text: str) -> None:
        sys.stdout.write(text)
        sys.stdout.flush()

    try:
        return follow_job(address, submission_id, write)
    except KeyboardInterrupt:
        console.print(f"stopped following; {submission_id} goes on (robustsweep stop {submission_id} --address {address})")
        raise typer.Exit(130)


@app.command("submit")
def submit_cmd(
    job: Path = typer.Argument(..., help="job file (TOML) inside the working dir"),
    address: str = typer.Option(..., help="the cluster's dashboard URL, http://HEAD:8265"),
    out: Optional[str] = typer.Option(None, help="output URI as the cluster sees it, e.g. s3://bucket/prefix (default: results/ in the job's working dir on the head)"),
    workers: Optional[int] = typer.Option(None, help="worker actors (default: one per GPU of the cluster, else per CPU)"),
    run_id: Optional[str] = typer.Option(None, help="run id (default: job name and hash)"),
    fresh: bool = typer.Option(False, help="start a new run instead of resuming"),
    endpoint_url: Optional[str] = typer.Option(None, help="S3 endpoint as the cluster sees it"),
    report: bool = typer.Option(True, help="print the report at the end of the job's log"),
    gpus_per_worker: Optional[float] = typer.Option(None, help="GPUs per worker actor, in (0, 1] (default 1)"),
    min_gpus: int = typer.Option(0, help="the run waits until the cluster has this many GPUs (workers joining late)"),
    wait: bool = typer.Option(True, help="follow the job's logs until it ends; exit 0 if it succeeded, else 1"),
    python: str = typer.Option("python", help="the interpreter on the head node that has Ray and the dependencies"),
    working_dir: Path = typer.Option(Path("."), help="the project folder that travels to the cluster"),
    env: list[str] = typer.Option([], "--env", help="KEY=VALUE for the job's environment (repeatable)"),
    exclude: list[str] = typer.Option([], "--exclude", help="a path pattern that stays here (repeatable; .venv, .git, results, caches and *.parquet always do)"),
    forward_aws: bool = typer.Option(True, help="pass the AWS_* variables set here (credentials, region, endpoint) to the job"),
):
    """Submit a job to a running Ray cluster (Ray Jobs API); prints the submission id."""
    from pipeline.runtime.submit import aws_variables, submit_job

    try:
        submission_id = submit_job(job, address, out=out, workers=workers, run_id=run_id, fresh=fresh,
                                   endpoint_url=endpoint_url, report=report, working_dir=working_dir, python=python,
                                   env=_env_pairs(env), forward_aws=forward_aws, excludes=exclude,
                                   gpus_per_worker=gpus_per_worker, min_gpus=min_gpus)
    except RobustsweepError as exc:
        _fail(exc)
    print(submission_id, flush=True)
    if forward_aws and (names := aws_variables()):
        console.print(f"passed to the job: {', '.join(names)} (values not shown)")
    if out is None or not ("://" in out or Path(out).is_absolute()):
        console.print("[yellow]note:[/] results go to the job's working dir on the head node; "
                      "give --out s3://bucket/prefix to keep them")
    if not wait:
        console.print(f"submitted {submission_id}: robustsweep status|logs|stop {submission_id} --address {address}")
        return
    try:
        st = _follow(address, submission_id)
    except RobustsweepError as exc:
        _fail(exc)
    console.print(f"job {submission_id}: {st['status']}" + (f" ({st['message']})" if st["status"] != "SUCCEEDED" else ""))
    if st["status"] != "SUCCEEDED":
        raise typer.Exit(1)


@app.command("logs")
def logs_cmd(
    submission_id: str = typer.Argument(..., help="the id `submit` printed (raysubmit_...)"),
    address: str = typer.Option(..., help="the cluster's dashboard URL, http://HEAD:8265"),
    follow: bool = typer.Option(False, "--follow", "-f", help="stream until the job ends; exit 0 if it succeeded, else 1"),
):
    """The logs of a submitted job."""
    from pipeline.runtime.submit import job_logs

    try:
        if not follow:
            sys.stdout.write(job_logs(address, submission_id))
            return
        st = _follow(address, submission_id)
    except RobustsweepError as exc:
        _fail(exc)
    if st["status"] != "SUCCEEDED":
        console.print(f"job {submission_id}: {st['status']}")
        raise typer.Exit(1)


@app.command("stop")
def stop_cmd(
    submission_id: str = typer.Argument(..., help="the id `submit` printed (raysubmit_...)"),
    address: str = typer.Option(..., help="the cluster's dashboard URL, http://HEAD:8265"),
    wait: bool = typer.Option(True, help="wait (at most 60 s) until the job has stopped"),
):
    """Stop a submitted job; committed units stay, a later submit of the same job resumes."""
    from pipeline.runtime.submit import stop_job

    try:
        st = stop_job(address, submission_id, wait=wait)
    except RobustsweepError as exc:
        _fail(exc)
    print(json.dumps(st, indent=2))


REPORT_FORMATS = ("table", "markdown", "csv", "json")


def _check_format(fmt: str, allowed: tuple[str, ...] = REPORT_FORMATS) -> None:
    if fmt not in allowed:
        _fail(ConfigError(f"--format must be one of {', '.join(allowed)}, got {fmt!r}"))


def _emit_report(report: dict, fmt: str) -> None:
    """Print report sections ({section: rows}) in one of REPORT_FORMATS (csv: one section)."""
    from rich.console import Console as Out

    from pipeline.analytics.render import render_tables, report_markdown, to_csv, to_json

    if fmt == "markdown":
        print(report_markdown(report))
    elif fmt == "json":
        print(to_json(report))
    elif fmt == "csv":
        (rows,) = report.values()
        print(to_csv(rows), end="")
    else:
        out = Out(width=max(Out().width, 200))
        for table in render_tables(report):
            out.print(table)


def _print_report(uris: list[str], endpoint_url: str | None, fmt: str) -> None:
    """The accuracy summary of runs (what `run` prints at the end); an empty run prints an empty table."""
    from pipeline.analytics import build_report, connect

    notes: list[str] = []
    con = connect(uris, endpoint_url=endpoint_url, require=False, notes=notes)
    try:
        report = build_report(con, ["summary"])
    finally:
        con.close()
    _emit_report(report, fmt)
    _notes(notes)


@app.command("report")
def report_cmd(
    uris: list[str] = typer.Argument(..., help="run folders: {out}/{run_id}, local or s3://; several are combined"),
    format: str = typer.Option("table", "--format", help="table, markdown, csv (one section) or json"),
    section: list[str] = typer.Option([], "--section", help="summary, classes, stages, cost or flags (repeatable; default all, csv: summary)"),
    plot: Optional[Path] = typer.Option(None, "--plot", help="write the figures (PNG) into this folder"),
    html: Optional[Path] = typer.Option(None, "--html", help="write one self-contained HTML page (tables and figures inline)"),
    robustbench: Optional[str] = typer.Option(None, "--robustbench", help="write RobustBench-style JSON per defense, threat model and eps into this folder or s3:// prefix"),
    endpoint_url: Optional[str] = typer.Option(None, help="S3 endpoint (default: AWS_ENDPOINT_URL)"),
    skip_bad: bool = typer.Option(False, "--skip-bad", help=SKIP_BAD_HELP),
):
    """Accuracy (95% Wilson), per-class accuracy, the attack stage that broke each example, cost, sanity flags; figures and exports."""
    from pipeline.analytics.outputs import analyze
    from pipeline.analytics.report import SECTIONS

    _check_format(format)
    sections = section or (["summary"] if format == "csv" else list(SECTIONS))
    unknown = [s for s in sections if s not in SECTIONS]
    if unknown:
        _fail(ConfigError(f"--section: unknown section(s) {unknown}; choose from {', '.join(SECTIONS)}"))
    if format == "csv" and len(sections) != 1:
        _fail(ConfigError(f"--format csv writes one table; pick one --section (got {', '.join(sections)})"))
    try:
        result = analyze(uris, endpoint_url=endpoint_url, sections=sections, plot_dir=plot, html_path=html,
                         robustbench_dir=robustbench, skip_bad=skip_bad)
    except RobustsweepError as exc:
        _fail(exc)
    _emit_report(result["report"], format)
    for note in result["notes"]:
        console.print(f"[yellow]note:[/] {note}")
    if plot is not None:
        console.print(f"{len(result['plots'])} figures in {plot}")
    if robustbench is not None:
        console.print(f"{len(result['robustbench'])} RobustBench entries in {robustbench}")
    if html is not None:
        console.print(f"HTML page: {result['html']}")


@app.command("compare")
def compare_cmd(
    uris: list[str] = typer.Argument(..., help="run folders: {out}/{run_id}, local or s3://; several are combined"),
    a: str = typer.Option(..., "--a", help="defense A (its name in the results)"),
    b: str = typer.Option(..., "--b", help="defense B"),
    attack: Optional[str] = typer.Option(None, help="only this attack (default: every attack both ran under)"),
    metric: str = typer.Option("robust", help="robust (single pass), clean, vote or worst (over the R passes)"),
    resamples: int = typer.Option(10_000, help="bootstrap resamples"),
    seed: int = typer.Option(0, help="seed of the bootstrap"),
    format: str = typer.Option("table", "--format", help="table, markdown, csv or json"),
    endpoint_url: Optional[str] = typer.Option(None, help="S3 endpoint (default: AWS_ENDPOINT_URL)"),
    skip_bad: bool = typer.Option(False, "--skip-bad", help=SKIP_BAD_HELP),
):
    """Paired A vs B on the same (attack, eps, example): accuracy difference with a bootstrap interval, exact McNemar test."""
    from pipeline.analytics import connect
    from pipeline.analytics.compare import compare

    _check_format(format)
    if resamples < 1:
        _fail(ConfigError(f"--resamples must be >= 1, got {resamples}"))
    notes: list[str] = []
    try:
        con = connect(uris, endpoint_url=endpoint_url, skip_bad=skip_bad, notes=notes)
        try:
            rows = compare(con, a, b, metric=metric, attack=attack, resamples=resamples, seed=seed)
        finally:
            con.close()
    except RobustsweepError as exc:
        _fail(exc)
    _emit_report({"compare": rows}, format)
    _notes(notes)


@app.command("sql")
def sql_cmd(
    args: list[str] = typer.Argument(..., metavar="RUN_URI... QUERY", help="one or more run folders, then the SQL query (last); the records are the view `results`"),
    format: str = typer.Option("table", "--format", help="table, csv or json"),
    max_rows: int = typer.Option(1000, help="rows shown by --format table"),
    endpoint_url: Optional[str] = typer.Option(None, help="S3 endpoint (default: AWS_ENDPOINT_URL)"),
    skip_bad: bool = typer.Option(False, "--skip-bad", help=SKIP_BAD_HELP),
    unsafe: bool = typer.Option(False, "--unsafe", help="lift the read-only lock: any statement (COPY TO, ATTACH, ...) and any file, with the store's credentials"),
):
    """Run SQL (DuckDB, read-only unless --unsafe) over the records of runs, local or S3: e.g. robustsweep sql results/demo-x "SELECT defense, avg(adv_correct::INT) FROM results GROUP BY ALL"."""
    from rich.console import Console as Out

    from pipeline.analytics.sql import arrow_csv, arrow_json, render_arrow, run_sql

    _check_format(format, ("table", "csv", "json"))
    if len(args) < 2:
        _fail(ConfigError('give a run folder and a query: robustsweep sql RUN_URI "SELECT ... FROM results"'))
    notes: list[str] = []
    try:
        table = run_sql(args[:-1], args[-1], endpoint_url=endpoint_url, unsafe=unsafe, skip_bad=skip_bad, notes=notes)
    except RobustsweepError as exc:
        _fail(exc)
    _notes(notes)
    if format == "csv":
        print(arrow_csv(table), end="")
    elif format == "json":
        print(arrow_json(table))
    else:
        Out(width=max(Out().width, 200)).print(render_arrow(table, max_rows))


bench_app = typer.Typer(help="Benchmarks measured side by side in one run.", no_args_is_help=True)
app.add_typer(bench_app, name="bench")


@bench_app.command("elbo")
def bench_elbo_cmd(
    model: str = typer.Option("default", help="'default' (the digits UNet) or 'optimal'"),
    examples: int = typer.Option(2, help="digits test examples"),
    timesteps: int = typer.Option(1000, help="RDC timesteps (systematic subsample; 1000 = all)"),
    repeat: int = typer.Option(2, help="timed rounds after a warm-up; the best round counts"),
    threads: Optional[int] = typer.Option(1, help="torch threads (0: torch's default)"),
    device: str = typer.Option("cpu", help="cpu or cuda"),
    chunk: Optional[int] = typer.Option(None, help="engine: network inputs per call (default: the device's)"),
    channels_last: bool = typer.Option(True, "--channels-last/--no-channels-last", help="engine: channels_last layout"),
    compile: str = typer.Option("off", help="engine: torch.compile 'off', 'forward' (logits only) or 'on' (also gradients)"),
    autocast: str = typer.Option("auto", help="engine: autocast 'auto' (bf16 on CUDA, off on CPU), 'off', 'bf16' or 'fp16'"),
    agreement_timesteps: int = typer.Option(100, help="with bf16/fp16: timesteps of the fp32 agreement check on the digits test split"),
    grad: bool = typer.Option(True, "--grad/--no-grad", help="also time input gradients"),
    profile: bool = typer.Option(False, "--profile", help="also profile one example: seconds by kind of operator"),
    as_json: bool = typer.Option(False, "--json", help="print JSON"),
):
    """RDC logits and gradients: the reference strategy (class loop, 64-timestep chunks, one example at a time) vs the engine,
    with FLOPs against a matmul peak measured in the same run."""
    from pipeline.bench.elbo import bench_elbo

    try:
        compiled = {"off": False, "forward": "forward", "on": True}.get(compile)
        if compiled is None:
            raise ConfigError(f"--compile must be off, forward or on; got {compile!r}")
        result = bench_elbo(model, examples, timesteps, repeat=repeat, threads=threads or None, device=device, chunk=chunk,
                            channels_last=channels_last, compile=compiled, autocast=autocast, grad=grad, profile=profile,
                            agreement_timesteps=agreement_timesteps)
    except RobustsweepError as exc:
        _fail(exc)
    if as_json:
        print(json.dumps(result, indent=2))
        return
    console.print(f"RDC logits ({result['model']}, {result['timesteps']} timesteps x {result['classes']} classes, "
                  f"{result['threads']} thread(s), {result['device']}): reference {result['reference_examples_per_s']:.3g} ex/s, "
                  f"engine {result['engine_examples_per_s']:.3g} ex/s, ratio {result['ratio']:.2f}x; engine "
                  f"{result['engine_flops_per_s'] / 1e9:.1f} GFLOP/s = {100 * result['fraction_of_peak']:.0f}% of the "
                  f"{result['peak_flops'] / 1e9:.1f} GFLOP/s matmul peak")
    if grad:
        console.print(f"input gradients: reference {result['reference_grad_examples_per_s']:.3g} ex/s, engine "
                      f"{result['engine_grad_examples_per_s']:.3g} ex/s, ratio {result['grad_ratio']:.2f}x; engine "
                      f"{100 * result['grad_fraction_of_peak']:.0f}% of peak")
    if "autocast_agreement" in result:
        a = result["autocast_agreement"]
        console.print(f"{a['dtype']} against float32 on {a['n']} digits test images ({a['timesteps']} timesteps): "
                      f"{100 * a['agreement']:.2f}% of predictions agree; float32 peak "
                      f"{result['float32_peak_flops'] / 1e9:.1f} GFLOP/s")
    for name, p in result.get("profile", {}).items():
        kinds = ", ".join(f"{k} {v:.2f}" for k, v in p.items() if k not in ("wall", "convolution_flops", "convolution_flops_per_s"))
        rate = p["convolution_flops_per_s"]
        console.print(f"profile {name} (one example, {p['wall']:.2f} s): {kinds}; convolutions at "
                      f"{(rate or 0) / 1e9:.1f} GFLOP/s")
    console.print(f"load average {result['load_before']} before, {result['load_after']} after")


@bench_app.command("scaling")
def bench_scaling_cmd(
    examples: int = typer.Option(48, help="digits test examples in the job"),
    shard_size: int = typer.Option(4, help="examples per unit"),
    timesteps: int = typer.Option(10, help="RDC timesteps of the job's defense (the digits UNet)"),
    steps: int = typer.Option(5, help="PGD steps of the job's attack"),
    passes: int = typer.Option(2, help="scoring passes"),
    workers: str = typer.Option("1,2", help="worker counts, comma-separated"),
    repeat: int = typer.Option(1, help="rounds per figure; the best is kept"),
    as_json: bool = typer.Option(False, "--json", help="print JSON"),
):
    """The same job through Ray (run_job, 1 and 2 actors, one thread each) and split by hand into independent processes."""
    from pipeline.bench.scaling import bench_scaling

    try:
        counts = tuple(int(w) for w in workers.split(","))
        if not counts or min(counts) < 1:
            raise ValueError
    except ValueError:
        _fail(ConfigError(f"--workers: expected positive integers, e.g. 1,2; got {workers!r}"))
    if min(examples, shard_size, timesteps, steps, passes, repeat) < 1:
        _fail(ConfigError("--examples, --shard-size, --timesteps, --steps, --passes and --repeat must be >= 1"))
    try:
        result = bench_scaling(examples, shard_size, timesteps, steps, passes, workers=counts, repeat=repeat)
    except RobustsweepError as exc:
        _fail(exc)
    if as_json:
        print(json.dumps(result, indent=2))
        return
    for r in result["runs"]:
        console.print(f"{r['workers']} worker(s), {result['units']} units: Ray {r['ray_seconds']:.1f} s "
                      f"({r['ray_examples_per_s']:.2f} ex/s), independent processes {r['processes_seconds']:.1f} s "
                      f"({r['processes_examples_per_s']:.2f} ex/s); Ray at {100 * r['ratio']:.0f}% of their throughput, "
                      f"overhead {r['overhead_per_unit_s']:+.3f} s per unit; same predictions: {r['same_predictions']}")
    console.print(f"load average {result['load_before']} before, {result['load_after']} after")


@bench_app.command("grid")
def bench_grid_cmd(
    model: str = typer.Option("default", help="'default' (the digits UNet) or 'optimal'"),
    timesteps: int = typer.Option(1000, help="RDC timesteps (systematic subsample)"),
    examples: int = typer.Option(2, help="digits test examples in the batch"),
    gangs: Optional[str] = typer.Option(None, help="gang sizes, comma-separated (default 1,2 and 3 where cores allow)"),
    repeat: int = typer.Option(2, help="timed runs per figure; the best is kept"),
    as_json: bool = typer.Option(False, "--json", help="print JSON"),
):
    """Grid sharding: seconds of one batch's RDC logits and of one exact input gradient for G = 1, 2, 3 actors."""
    from pipeline.bench.grid import bench_grid

    try:
        sizes = tuple(int(g) for g in gangs.split(",")) if gangs else None
        if sizes is not None and (not sizes or min(sizes) < 1 or sizes[0] != 1):
            raise ValueError
    except ValueError:
        _fail(ConfigError(f"--gangs: expected positive integers starting with 1, e.g. 1,2,3; got {gangs!r}"))
    if examples < 1 or repeat < 1:
        _fail(ConfigError(f"--examples and --repeat must be >= 1, got {examples} and {repeat}"))

    def show(g, t_logits, t_grad):
        console.print(f"G={g}: logits {t_logits:.2f} s, input gradient {t_grad:.2f} s")

    try:
        result = bench_grid(model=model, timesteps=timesteps, examples=examples, gangs=sizes, repeat=repeat,
                            progress=None if as_json else show)
    except RobustsweepError as exc:
        _fail(exc)
    if as_json:
        print(json.dumps(result, indent=2))
        return
    for g in result["gangs"][1:]:
        console.print(f"speedup at G={g}: logits {result[f'speedup_logits_g{g}']:.2f}x, "
                      f"gradient {result[f'speedup_grad_g{g}']:.2f}x")


@bench_app.command("report")
def bench_report_cmd(
    rows: int = typer.Option(1_000_000, help="synthetic records (all columns of the record schema)"),
    files: int = typer.Option(100, help="Parquet files they are written to (like units of a run)"),
    repeats: int = typer.Option(3, help="timed runs; the best is reported"),
    as_json: bool = typer.Option(False, "--json", help="print JSON"),
):
    """The full report (every section, rendered) over ROWS synthetic records read from Parquet."""
    from pipeline.bench.report import bench_report

    if rows < 1 or repeats < 1 or files < 1:
        _fail(ConfigError(f"--rows, --files and --repeats must be >= 1, got {rows}, {files} and {repeats}"))
    try:
        result = bench_report(rows, repeats=repeats, files=files)
    except RobustsweepError as exc:
        _fail(exc)
    if as_json:
        print(json.dumps(result, indent=2))
        return
    console.print(f"report over {result['rows']} rows in {result['files']} Parquet files: "
                  f"{result['report_seconds']:.3f} s (best of {len(result['runs'])}: {result['runs']})")

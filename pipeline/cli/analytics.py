"""`robustsweep report | compare | sql`: read the records of finished runs."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from pipeline.cli.common import SKIP_BAD_HELP, console, fails_cleanly, no_bool_words, notes
from pipeline.errors import ConfigError

REPORT_FORMATS = ("table", "markdown", "csv", "json")


def check_format(fmt: str, allowed: tuple[str, ...] = REPORT_FORMATS) -> None:
    if fmt not in allowed:
        raise ConfigError(f"--format must be one of {', '.join(allowed)}, got {fmt!r}")


def emit_report(report: dict, fmt: str) -> None:
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


def print_summary(uris: list[str], endpoint_url: str | None, fmt: str = "table") -> None:
    """The headline (worst over attacks and paths) and the accuracy summary of runs (what `run`
    prints at the end); an empty run prints empty tables."""
    from pipeline.analytics import build_report, connect

    left_out: list[str] = []
    con = connect(uris, endpoint_url=endpoint_url, require=False, notes=left_out)
    try:
        report = build_report(con, ["headline", "summary"])
    finally:
        con.close()
    emit_report(report, fmt)
    notes(left_out)


@fails_cleanly
def report_cmd(
    uris: list[str] = typer.Argument(..., help="run folders: {out}/{run_id}, local or s3://; several are combined"),
    format: str = typer.Option("table", "--format", help="table, markdown, csv (one section) or json"),
    section: list[str] = typer.Option([], "--section", help="headline, summary, classes, stages, cost, prediction or flags (repeatable; default all, csv: summary)"),
    plot: Optional[Path] = typer.Option(None, "--plot", help="write the figures (PNG) into this folder"),
    html: Optional[Path] = typer.Option(None, "--html", help="write one self-contained HTML page (tables and figures inline)"),
    robustbench: Optional[str] = typer.Option(None, "--robustbench", help="write RobustBench-style JSON per defense, threat model and eps into this folder or s3:// prefix"),
    endpoint_url: Optional[str] = typer.Option(None, help="S3 endpoint (default: AWS_ENDPOINT_URL)"),
    skip_bad: bool = typer.Option(False, "--skip-bad/--no-skip-bad", metavar="", help=SKIP_BAD_HELP),
):
    """Accuracy (95% Wilson), per-class accuracy, the attack stage that broke each example, cost, sanity flags; figures and exports."""
    from pipeline.analytics.outputs import analyze
    from pipeline.analytics.report import SECTIONS

    check_format(format)
    no_bool_words(uris)
    sections = section or (["summary"] if format == "csv" else list(SECTIONS))
    unknown = [s for s in sections if s not in SECTIONS]
    if unknown:
        raise ConfigError(f"--section: unknown section(s) {unknown}; choose from {', '.join(SECTIONS)}")
    if format == "csv" and len(sections) != 1:
        raise ConfigError(f"--format csv writes one table; pick one --section (got {', '.join(sections)})")
    result = analyze(uris, endpoint_url=endpoint_url, sections=sections, plot_dir=plot, html_path=html,
                     robustbench_dir=robustbench, skip_bad=skip_bad)
    emit_report(result["report"], format)
    notes(result["notes"])
    if plot is not None:
        console.print(f"{len(result['plots'])} figures in {plot}", markup=False)
    if robustbench is not None:
        console.print(f"{len(result['robustbench'])} RobustBench entries in {robustbench}", markup=False)
    if html is not None:
        console.print(f"HTML page: {result['html']}", markup=False)


@fails_cleanly
def compare_cmd(
    uris: list[str] = typer.Argument(..., help="run folders: {out}/{run_id}, local or s3://; several are combined"),
    a: str = typer.Option(..., "--a", help="defense A (its name in the results)"),
    b: str = typer.Option(..., "--b", help="defense B"),
    attack: Optional[str] = typer.Option(None, help="only this attack (default: every attack both ran under)"),
    metric: str = typer.Option("robust", help="robust (first of the R passes, the report's rule), clean, vote (majority of the R passes) or all-passes"),
    path: str = typer.Option("worst", help="worst (right on every gradient path that ran: the report's rule), adaptive, oblivious or transfer"),
    resamples: int = typer.Option(10_000, help="bootstrap resamples"),
    seed: int = typer.Option(0, help="seed of the bootstrap"),
    format: str = typer.Option("table", "--format", help="table, markdown, csv or json"),
    endpoint_url: Optional[str] = typer.Option(None, help="S3 endpoint (default: AWS_ENDPOINT_URL)"),
    skip_bad: bool = typer.Option(False, "--skip-bad/--no-skip-bad", metavar="", help=SKIP_BAD_HELP),
):
    """Paired A vs B on the same (attack, eps, example), and on each one's worst case over all its attacks ("all attacks"): accuracy difference with a bootstrap interval, exact McNemar test."""
    from pipeline.analytics import connect
    from pipeline.analytics.compare import compare

    check_format(format)
    no_bool_words(uris)
    if resamples < 1:
        raise ConfigError(f"--resamples must be >= 1, got {resamples}")
    left_out: list[str] = []
    con = connect(uris, endpoint_url=endpoint_url, skip_bad=skip_bad, notes=left_out)
    try:
        rows = compare(con, a, b, metric=metric, attack=attack, path=path, resamples=resamples, seed=seed,
                       notes=left_out)
    finally:
        con.close()
    emit_report({"compare": rows}, format)
    notes(left_out)


@fails_cleanly
def sql_cmd(
    args: list[str] = typer.Argument(..., metavar="RUN_URI... QUERY", help="one or more run folders, then the SQL query (last); the records are the view `results`"),
    format: str = typer.Option("table", "--format", help="table, csv or json"),
    max_rows: int = typer.Option(1000, help="rows shown by --format table"),
    endpoint_url: Optional[str] = typer.Option(None, help="S3 endpoint (default: AWS_ENDPOINT_URL)"),
    skip_bad: bool = typer.Option(False, "--skip-bad/--no-skip-bad", metavar="", help=SKIP_BAD_HELP),
    unsafe: bool = typer.Option(False, "--unsafe/--no-unsafe", metavar="", help="lift the read-only lock: any statement (COPY TO, ATTACH, ...) and any file, with the store's credentials"),
):
    """Run SQL (DuckDB, read-only unless --unsafe) over the records of runs, local or S3: e.g. robustsweep sql results/demo-x "SELECT defense, avg(adv_correct::INT) FROM results GROUP BY ALL"."""
    from rich.console import Console as Out

    from pipeline.analytics.sql import arrow_csv, arrow_json, render_arrow, run_sql

    check_format(format, ("table", "csv", "json"))
    if len(args) < 2:
        raise ConfigError('give a run folder and a query: robustsweep sql RUN_URI "SELECT ... FROM results"')
    no_bool_words(args[:-1])
    left_out: list[str] = []
    table = run_sql(args[:-1], args[-1], endpoint_url=endpoint_url, unsafe=unsafe, skip_bad=skip_bad, notes=left_out)
    notes(left_out)
    if format == "csv":
        print(arrow_csv(table), end="")
    elif format == "json":
        print(arrow_json(table))
    else:
        Out(width=max(Out().width, 200)).print(render_arrow(table, max_rows))

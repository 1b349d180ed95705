"""Everything `robustsweep report` can produce from run folders, in one call for notebooks and
the command line: the report sections, figures, RobustBench-style JSON and the HTML page."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from pipeline.analytics.export import robustbench_entries, write_robustbench
from pipeline.analytics.html import page
from pipeline.analytics.plots import all_plots, write_plots
from pipeline.analytics.report import SECTIONS, build_report
from pipeline.analytics.source import connect, open_runs
from pipeline.atomic import check_writable
from pipeline.data import class_names as dataset_classes
from pipeline.errors import DatasetError, InputError
from pipeline.names import clashes, describe_clashes
from pipeline.store import Store
from pipeline.store.verify import ABSENT, read_prediction


def class_names(plans: Sequence[dict]) -> tuple[str, ...]:
    """The class names of the runs' dataset (config.datasets), where they share one that has them."""
    datasets = {p["job"]["data"]["dataset"] for p in plans if "job" in p}
    if len(datasets) != 1:
        return ()
    try:
        return dataset_classes(datasets.pop())
    except DatasetError:  # a dataset this version does not know: labels as numbers
        return ()


def predictions(runs: Sequence[tuple[Store, dict | None]]) -> dict[str, dict | str]:
    """{run_id: its predicted.json, or why there is none} of the run folders (store, plan.json);
    a folder without a plan is keyed by its prediction's own run id, where it has one."""
    out: dict[str, dict | str] = {}
    for store, plan in runs:
        doc, why = read_prediction(store, plan)
        run_id = plan["run_id"] if plan is not None else (doc or {}).get("run_id")
        if isinstance(run_id, str):
            out[run_id] = doc if doc is not None else why
    return out


def analyze(uris: Sequence[str], *, endpoint_url: str | None = None, sections: Sequence[str] = SECTIONS,
            plot_dir: str | Path | None = None, html_path: str | Path | None = None,
            robustbench_dir: str | None = None, per_defense: int = 6, require: bool = True,
            skip_bad: bool = False) -> dict:
    """Read the run folders once and produce what is asked.

    Always: "report" {section: rows}. plot_dir: PNGs written there ("plots": their paths).
    html_path: the self-contained page written there, with every section and figure ("html").
    robustbench_dir: one JSON per defense, threat model and eps, local or s3:// ("robustbench":
    the URIs). "notes": record files left out (bad ones with skip_bad, a unit's second copy;
    see source.connect) and what the figures had to leave out (e.g. runs without stored images).
    """
    # Where the outputs go is checked before anything is read: a run over 10,000 files should not
    # end in a traceback because --html names a folder.
    if plot_dir is not None:
        check_writable(plot_dir, "--plot")
    if html_path is not None:
        check_writable(html_path, "--html", file=True)
    if robustbench_dir is not None and "://" not in str(robustbench_dir):
        check_writable(robustbench_dir, "--robustbench")
    read_notes: list[str] = []
    con = connect(uris, endpoint_url=endpoint_url, require=require, skip_bad=skip_bad, notes=read_notes)
    out: dict = {"plots": [], "notes": [], "robustbench": [], "html": None}
    try:
        wanted = SECTIONS if html_path is not None else sections
        runs = (open_runs(uris, endpoint_url)
                if (plot_dir or html_path or robustbench_dir or "classes" in wanted or "prediction" in wanted) else [])
        plans = [plan for _, plan in runs if plan is not None]
        predicted = predictions(runs) if "prediction" in wanted else {}
        report = build_report(con, wanted, class_names=class_names(plans), predictions=predicted)
        if "prediction" in sections:
            # A damaged prediction, or one of another run, is worth a note; a folder without one (or an
            # unpriced one) says so in the section itself, with the reason in its `note` field.
            read_notes += [f"prediction of run {run_id}: {why}" for run_id, why in predicted.items()
                           if isinstance(why, str) and not why.endswith(ABSENT)]
        out["report"] = {k: v for k, v in report.items() if k in sections}
        if plot_dir is not None or robustbench_dir is not None:
            defenses = [row[0] for row in con.execute("SELECT DISTINCT defense FROM results").fetchall()]
            if groups := clashes(defenses):
                raise InputError(f"defenses whose names become one file name would overwrite each other's figures and "
                                 f"exports: {describe_clashes(groups)}. Report these runs apart, or rename a defense")
        plots: list = []
        if plot_dir is not None or html_path is not None:
            plots, out["notes"] = all_plots(con, plans=plans, runs=runs, summary=report.get("summary"),
                                            heads=report.get("headline"), per_defense=per_defense)
        entries = robustbench_entries(con, plans=plans, runs=runs) if (robustbench_dir or html_path) else []
    finally:
        con.close()
    out["notes"] = read_notes + out["notes"]
    if plot_dir is not None:
        out["plots"] = [str(p) for p in write_plots(plots, plot_dir)]
    if robustbench_dir is not None:
        out["robustbench"] = write_robustbench(entries, robustbench_dir, endpoint_url=endpoint_url)
    if html_path is not None:
        path = Path(html_path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(page(report, plots, sources=[str(u) for u in uris], robustbench=entries,
                             notes=out["notes"]), encoding="utf-8")
        out["html"] = str(path)
    return out

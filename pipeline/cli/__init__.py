"""The `robustsweep` command line: it parses, then calls the library. One module per command group;
this one assembles them into `app` (`pipeline.cli:app`, `python -m pipeline.cli`)."""

from __future__ import annotations

import typer

from pipeline.cli.analytics import compare_cmd, report_cmd, sql_cmd
from pipeline.cli.bench import bench_app
from pipeline.cli.cluster import logs_cmd, stop_cmd, submit_cmd
from pipeline.cli.evaluate import accuracy_cmd
from pipeline.cli.jobs import plan_cmd, run_cmd, status_cmd, validate_cmd
from pipeline.cli.models import import_model_cmd, models_cmd
from pipeline.cli.train import train_app

app = typer.Typer(help="Robustness sweeps of inference-time defenses (RDC, Mixup Inference).", no_args_is_help=True,
                  pretty_exceptions_enable=False)
app.add_typer(train_app, name="train")
app.command("accuracy")(accuracy_cmd)
app.command("validate")(validate_cmd)
app.command("plan")(plan_cmd)
app.command("run")(run_cmd)
app.command("status")(status_cmd)
app.command("submit")(submit_cmd)
app.command("logs")(logs_cmd)
app.command("stop")(stop_cmd)
app.command("report")(report_cmd)
app.command("compare")(compare_cmd)
app.command("sql")(sql_cmd)
app.command("import-model")(import_model_cmd)
app.command("models")(models_cmd)
app.add_typer(bench_app, name="bench")

__all__ = ["app"]

"""`robustsweep import-model`: a published checkpoint -> a checkpoint folder, nothing in the file run;
`robustsweep models`: the presets and RobustBench zoo names a `model` field can give."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from pipeline.cli.common import console, fails_cleanly
from pipeline.errors import ConfigError


@fails_cleanly
def import_model_cmd(
    src: Path = typer.Argument(..., help="the published file: an NVlabs .pkl, a state dict .pt"),
    format: str = typer.Option(..., "--format", help="edm-pkl, edm-pt or robustbench"),
    out: Path = typer.Option(..., help="checkpoint folder to write (model.safetensors + config.json)"),
    arch: Optional[str] = typer.Option(None, help="architecture preset, e.g. edm-cifar10-cond-vp, wrn-28-10"),
    config: Optional[Path] = typer.Option(None, help="the model's config as a JSON file (for EDM: build_edm's)"),
    num_classes: Optional[int] = typer.Option(None, help="classes of the model (default: the preset's)"),
):
    """Convert a published checkpoint into a checkpoint folder with its provenance (sha256, format)."""
    from pipeline.atomic import check_writable
    from pipeline.config.tables import MAX_DEPTH, too_deep
    from pipeline.models.importer import import_to_folder

    check_writable(out, "--out")
    table = None
    if config is not None:
        try:
            table = json.loads(config.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ConfigError(f"--config {config}: not a readable JSON file ({exc})") from None
        except RecursionError:
            raise ConfigError(f"--config {config}: nested too deeply to be a model config") from None
        if not isinstance(table, dict):
            raise ConfigError(f"--config {config}: expected a JSON object of the model's settings "
                              f"(e.g. {{\"img_resolution\": 32}}), got a {type(table).__name__}")
        if (where := too_deep(table)) is not None:
            raise ConfigError(f"--config {config}: {where} is nested more than {MAX_DEPTH} levels deep")
    folder, cfg, meta = import_to_folder(src, format, out, preset=arch, config=table, num_classes=num_classes)
    console.print(f"saved {folder}: {cfg.get('arch')} from {src.name} (sha256 {meta['source']['sha256'][:16]}...)", markup=False)


@fails_cleanly
def models_cmd(
    dataset: Optional[str] = typer.Option(None, help="only the zoo names of this dataset (cifar10, cifar100)"),
    threat: Optional[str] = typer.Option(None, help="only the zoo names of this threat model (Linf, L2)"),
    supported: bool = typer.Option(False, "--supported/--all", metavar="", help="only what loads"),
    format: str = typer.Option("text", "--format", help="text or json"),
):
    """List the architecture presets and RobustBench's zoo names, with architecture and whether they load."""
    from pipeline.models.robustbench_zoo import DATASETS, THREATS, model_listing

    if dataset is not None and dataset not in DATASETS:
        raise ConfigError(f"--dataset {dataset!r}: RobustBench's zoo here covers {', '.join(DATASETS)}")
    if threat is not None and threat not in THREATS:
        raise ConfigError(f"--threat {threat!r}: expected one of {', '.join(THREATS)}")
    if format not in ("text", "json"):
        raise ConfigError(f"--format {format!r}: expected text or json")
    rows = [r for r in model_listing(dataset, threat) if r["supported"] or not supported]
    if format == "json":
        typer.echo(json.dumps(rows, indent=1))
        return
    width = max(len(r["model"]) for r in rows)
    for r in rows:
        where = f"{r['dataset']:<9}" if r["dataset"] else " " * 9
        state = "yes" if r["supported"] else f"no: {r['reason']}"
        typer.echo(f"{r['model']:<{width}}  {where} {r['arch']:<42} {state}")

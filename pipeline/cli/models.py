"""`robustsweep import-model`: a published checkpoint -> a checkpoint folder, nothing in the file run."""

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

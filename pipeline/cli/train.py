"""`robustsweep train ...`: train the models the defenses stand on."""

from __future__ import annotations

from pathlib import Path

import typer

from pipeline.cli.common import console, fails_cleanly

train_app = typer.Typer(help="Train the models the defenses stand on.", no_args_is_help=True)


@train_app.command("diffusion")
@fails_cleanly
def train_diffusion_cmd(
    dataset: str = typer.Option("digits", help="dataset to train on (its train split)"),
    out: Path = typer.Option(..., help="checkpoint folder to write (model.safetensors + config.json)"),
    seed: int = typer.Option(0, help="seed of all training draws"),
):
    """Train the default class-conditional UNet of DATASET (DDPM loss, label dropout 0.1, EMA)."""
    from pipeline.training.diffusion import train_default_diffusion

    _, meta = train_default_diffusion(dataset, out, progress=True, seed=seed)
    console.print(f"saved {out}: {meta['steps']} steps, loss {meta['loss']:.4f}, {meta['seconds']:.0f} s", markup=False)


@train_app.command("classifier")
@fails_cleanly
def train_classifier_cmd(
    dataset: str = typer.Option("digits", help="dataset to train on (its train split)"),
    method: str = typer.Option("erm", help="erm, mixup, iat (interpolated AT) or pgd_at"),
    out: Path = typer.Option(..., help="checkpoint folder to write"),
    seed: int = typer.Option(0, help="seed of all training draws"),
):
    """Train the default classifier of DATASET with METHOD."""
    from pipeline.training.classifier import train_default_classifier

    _, meta = train_default_classifier(dataset, method, out, progress=True, seed=seed)
    console.print(f"saved {out}: " + ", ".join(f"{k} {v}" for k, v in meta.items() if k in ("method", "seconds", "test_accuracy")), markup=False)

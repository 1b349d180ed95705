"""The `robustsweep` command line: it parses, then calls the library."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console

from .errors import CheckpointError, ConfigError, DatasetError, InputError, RobustsweepError

app = typer.Typer(help="Robustness sweeps of inference-time defenses (RDC, Mixup Inference).", no_args_is_help=True,
                  pretty_exceptions_enable=False)
train_app = typer.Typer(help="Train the models the defenses stand on.", no_args_is_help=True)
app.add_typer(train_app, name="train")
console = Console(stderr=True)

BAD_INPUT = (ConfigError, InputError, DatasetError, CheckpointError)


def _fail(exc: Exception) -> None:
    console.print(f"[bold red]error:[/] {exc}")
    raise typer.Exit(2 if isinstance(exc, BAD_INPUT) else 1)


@train_app.command("diffusion")
def train_diffusion_cmd(
    dataset: str = typer.Option("digits", help="dataset to train on (its train split)"),
    out: Path = typer.Option(..., help="checkpoint folder to write (model.safetensors + config.json)"),
    seed: int = typer.Option(0, help="seed of all training draws"),
):
    """Train the default class-conditional UNet of DATASET (DDPM loss, label dropout 0.1, EMA)."""
    from .diffusion.train import train_default_diffusion

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
    from .classifiers.train import train_default_classifier

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

    from .data import load_split
    from .defenses import build_defense
    from .evaluation import predict

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


def main() -> None:  # pragma: no cover - the console script
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(app())

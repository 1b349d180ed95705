"""`robustsweep accuracy`: clean accuracy of one defense, no attack."""

from __future__ import annotations

import json
import time
from typing import Optional

import typer

from pipeline.cli.common import console, fails_cleanly
from pipeline.errors import ConfigError


@fails_cleanly
def accuracy_cmd(
    defense: str = typer.Argument(..., help='a defense table as JSON, e.g. \'{"kind": "rdc", "model": "optimal", "timesteps": 100}\''),
    split: str = typer.Option("test", help="split to evaluate"),
    limit: Optional[int] = typer.Option(None, help="only the first LIMIT examples"),
    seed: int = typer.Option(0, help="seed of the defense's draws"),
    batch_size: int = typer.Option(64, help="examples per call"),
):
    """Clean accuracy of one defense on a split (no attack)."""
    from rich.progress import Progress

    from pipeline.config.defense import parse_defense
    from pipeline.data import load_split
    from pipeline.defenses import build_defense
    from pipeline.protocol.predict import predict

    if limit is not None and limit < 1:
        raise ConfigError(f"--limit must be >= 1 (or left out for the whole split), got {limit}")
    if batch_size < 1:
        raise ConfigError(f"--batch-size must be >= 1, got {batch_size}")
    try:
        table = json.loads(defense)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"defense: not valid JSON ({exc})") from None
    spec = parse_defense(table)
    module = build_defense(spec)
    x, y = load_split(spec.dataset, split, root=spec.data_root)
    if limit is not None:
        x, y = x[:limit], y[:limit]
    start = time.perf_counter()
    with Progress(console=console, transient=True) as bar:
        task = bar.add_task(f"{module.name} on {split}", total=len(x))
        logits = predict(module, x, seed=seed, batch_size=batch_size, progress=lambda n: bar.update(task, completed=n))
    seconds = time.perf_counter() - start
    acc = float((logits.argmax(1) == y).float().mean())
    print(json.dumps({"defense": module.name, "split": split, "n": len(y), "accuracy": acc, "seconds": round(seconds, 2)}))

"""What every command shares: the error console and the one mapping from library errors to exit codes.

Commands import the library inside their bodies so that `robustsweep --help` does not pay for torch
and Ray; the CLI is the top layer, so these imports hide no cycle.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Callable, TypeVar

import typer
from rich.console import Console
from rich.markup import escape

from pipeline.errors import (BadFileError, CheckpointError, ConfigError, DatasetError, InputError, LeaseHeldError,
                             RobustsweepError)

console = Console(stderr=True, soft_wrap=True)

# Errors that mean the user's input is wrong (exit 2); any other RobustsweepError is a failure while working (exit 1),
# a cluster or store that cannot be reached included (README, exit codes).
BAD_INPUT = (ConfigError, InputError, DatasetError, CheckpointError, BadFileError, LeaseHeldError)
SKIP_BAD_HELP = "leave out record files that fail their checks (each is listed) instead of refusing them (exit 2)"

F = TypeVar("F", bound=Callable)


def exit_code(exc: RobustsweepError) -> int:
    return 2 if isinstance(exc, BAD_INPUT) else 1


def fails_cleanly(command: F) -> F:
    """Decorate a command: a RobustsweepError becomes one red line on stderr and exit 2 (bad input) or 1."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except RobustsweepError as exc:
            console.print(f"[bold red]error:[/] {escape(str(exc))}")  # a message may quote [bracketed] names
            raise typer.Exit(exit_code(exc)) from None

    return wrapper  # type: ignore[return-value]


BOOL_WORDS = ("true", "false", "yes", "no", "on", "off", "1", "0")


def no_bool_words(uris: list[str]) -> None:
    """ConfigError for a run folder argument that is a boolean word no folder is named: a value
    written after a flag (`--skip-bad true`), which takes none."""
    for uri in uris:
        if uri.lower() in BOOL_WORDS and not Path(uri).exists():
            raise ConfigError(f"{uri!r} is read as a run folder, and there is none of that name: flags take no value "
                              f"(write --skip-bad or --no-skip-bad, not --skip-bad {uri})")


def notes(lines: list[str]) -> None:
    """Print what a reader left out (bad files skipped, a unit's second copy) as notes on stderr."""
    for line in lines:
        console.print(f"[yellow]note:[/] {escape(line)}", highlight=False)


def load_job_file(path: Path):
    """The job at `path`, parsed (its models and data are checked by the preflight of `validate` and `run`)."""
    from pipeline.config.job import load_job

    return load_job(path)


def say(lines: list[str]) -> None:
    """Print a benchmark's formatted lines on stderr, as plain text (no rich markup)."""
    for line in lines:
        console.print(line, markup=False)

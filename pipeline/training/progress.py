"""The one progress bar of training (rich): steps done of total, a free-text `info` field, times."""

from __future__ import annotations

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskID, TextColumn, TimeElapsedColumn, TimeRemainingColumn


def progress_bar(show: bool, description: str, total: int) -> tuple[Progress, TaskID]:
    """(bar, task): use the bar as a context manager, then `bar.update(task, completed=..., info=...)`
    or `bar.advance(task)`; with show=False it draws nothing."""
    bar = Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
        TextColumn("{task.fields[info]}"), TimeElapsedColumn(), TimeRemainingColumn(),
        disable=not show, transient=False,
    )
    return bar, bar.add_task(description, total=total, info="")


__all__ = ["progress_bar"]

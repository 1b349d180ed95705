"""The one safe-name rule: any name (a defense, an attack, a norm) as a file or folder name."""

from __future__ import annotations

import re
from collections.abc import Iterable

_UNSAFE = re.compile(r"[^A-Za-z0-9._+-]")


def safe_name(text: object) -> str:
    """`text` with every character outside [A-Za-z0-9._+-] replaced by "_" (no "/", no spaces)."""
    return _UNSAFE.sub("_", str(text))


def clashes(names: Iterable[object]) -> list[tuple[str, ...]]:
    """Groups of distinct names that `safe_name` turns into one file name (e.g. "x/y" and
    "x_y"), each sorted; the groups in order of their file name. Two such defenses would write
    each other's exports and figures, so the job is refused (config/preflight.py) and a report
    over runs that hold both writes none of them (analytics/outputs.py)."""
    by_file: dict[str, set[str]] = {}
    for name in names:
        by_file.setdefault(safe_name(name), set()).add(str(name))
    return [tuple(sorted(group)) for _, group in sorted(by_file.items()) if len(group) > 1]


def describe_clashes(groups: list[tuple[str, ...]]) -> str:
    """The clashes as a clause: "'x/y' and 'x_y' (file name x_y); ..."."""
    return "; ".join(" and ".join(repr(n) for n in group) + f" (file name {safe_name(group[0])})" for group in groups)


__all__ = ["clashes", "describe_clashes", "safe_name"]

"""The one name rule: which characters a name that becomes a file or folder name may hold.

`check_name` refuses a name outside the rule (job name, run id); `safe_name` maps any text (a
defense, an attack, a norm) onto it. Both use the same character class, `NAME_CHARS`.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from pipeline.errors import ConfigError

NAME_CHARS = "A-Za-z0-9._+-"
NAME_MAX = 100
_UNSAFE = re.compile(f"[^{NAME_CHARS}]")
_SAFE = re.compile(f"[{NAME_CHARS}]{{1,{NAME_MAX}}}")
NAME_PATTERN = f"^[{NAME_CHARS}]+$"
"""The character rule as a whole-string pattern (pydantic's, whose `$` is the end of the text); the
length bound goes beside it, as `max_length=NAME_MAX`."""


def safe_name(text: object) -> str:
    """`text` with every character outside [A-Za-z0-9._+-] replaced by "_" (no "/", no spaces)."""
    return _UNSAFE.sub("_", str(text))


def check_name(value: object, field: str) -> str:
    """`value` when it is 1-100 characters of letters, digits and . _ + - (and not "." or "..");
    else ConfigError naming `field`."""
    # fullmatch: `$` would also match before a final newline, and "run\n" would become a folder.
    if not isinstance(value, str) or not _SAFE.fullmatch(value) or value in (".", ".."):
        shown = value if not isinstance(value, str) or len(value) <= 40 else f"{value[:40]}... ({len(value)} characters)"
        raise ConfigError(f"{field}: expected 1-{NAME_MAX} characters of letters, digits and . _ + - "
                          f"(it becomes a file name), got {shown!r}")
    return value


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


__all__ = ["NAME_CHARS", "NAME_MAX", "NAME_PATTERN", "check_name", "clashes", "describe_clashes", "safe_name"]

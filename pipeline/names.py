"""The one name rule: which characters a name that becomes a file or folder name may hold.

`check_name` refuses a name outside the rule (job name, run id); `safe_name` maps any text (a
defense, an attack, a norm) onto it. Both use the same character class, `NAME_CHARS`.
"""

from __future__ import annotations

import re

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


__all__ = ["NAME_CHARS", "NAME_MAX", "NAME_PATTERN", "check_name", "safe_name"]

"""The one safe-name rule: any name (a defense, an attack, a norm) as a file or folder name."""

from __future__ import annotations

import re

_UNSAFE = re.compile(r"[^A-Za-z0-9._+-]")


def safe_name(text: object) -> str:
    """`text` with every character outside [A-Za-z0-9._+-] replaced by "_" (no "/", no spaces)."""
    return _UNSAFE.sub("_", str(text))


__all__ = ["safe_name"]

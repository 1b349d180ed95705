"""Facts about the processor this process runs on, read in one place: its name and feature flags.

Linux keeps both in /proc/cpuinfo; elsewhere the name comes from `platform` and the flags are
empty (no bf16 units are assumed).
"""

from __future__ import annotations

import functools
import platform
from pathlib import Path

CPUINFO = "/proc/cpuinfo"


def _field(name: str, path: str) -> str | None:
    """The value of the first `name : value` line of the cpuinfo file, None where it is unreadable."""
    try:
        text = Path(path).read_text(encoding="utf-8", errors="replace")
    except OSError:
        return None
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip() == name:
            return value.strip()
    return None


@functools.lru_cache(maxsize=4)
def processor_name(path: str = CPUINFO) -> str:
    """The CPU's marketing name ("model name"), else what `platform` knows."""
    return _field("model name", path) or platform.processor() or platform.machine()


@functools.lru_cache(maxsize=4)
def cpu_flags(path: str = CPUINFO) -> frozenset[str]:
    """The processor's feature flags; empty where the file is unreadable (not Linux)."""
    return frozenset((_field("flags", path) or "").split())


__all__ = ["CPUINFO", "cpu_flags", "processor_name"]

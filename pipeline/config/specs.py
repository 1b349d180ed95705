"""spec(table): any defense or attack table -> its parsed spec, for notebooks and tests.

Jobs parse their tables in config/job.py; everything below the boundary (build_defense,
build_attack, evaluate, the worker) takes only parsed specs, so a table written by hand goes
through here first.
"""

from __future__ import annotations

from pipeline.config import attack, defense
from pipeline.errors import ConfigError


def spec(table: dict):
    """The parsed spec of a defense table (kind plain, mi, rdc) or an attack table (kind
    autoattack, pgd, transfer, none); ConfigError names every bad field."""
    if not isinstance(table, dict):
        raise ConfigError(f"spec: expected a defense or attack table, got {type(table).__name__}")
    kind = table.get("kind")
    if kind in defense.KINDS:
        return defense.parse_defense(table)
    if kind in attack.KINDS:
        return attack.parse_attack(table)
    raise ConfigError(f"kind: {kind!r} is neither a defense kind {defense.KINDS} nor an attack kind {attack.KINDS}")

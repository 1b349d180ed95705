"""Validation of the tables a job file holds (defense, attack): one place for the error wording."""

from __future__ import annotations

from pydantic import TypeAdapter, ValidationError

from pipeline.errors import ConfigError, config_error

MAX_DEPTH = 32
"""Deepest nesting of tables and arrays a job file or a model config may have (the shipped ones
reach 5); deeper input is refused before any recursive code (pydantic, json, deepcopy) sees it."""


def validate_table(adapter: TypeAdapter, config: dict, what: str, kinds: tuple[str, ...]):
    """Parse `config` (a dict with a `kind` among `kinds`) with a pydantic discriminated union.

    Raises ConfigError naming the field (`{what}.field: ...`) for every problem.
    """
    if not isinstance(config, dict):
        raise ConfigError(f"{what}: expected a table, got {type(config).__name__}")
    if config.get("kind") not in kinds:
        raise ConfigError(f"{what}.kind: unknown {what} kind {config.get('kind')!r}; expected one of {kinds}")
    try:
        return adapter.validate_python(config)
    except ValidationError as exc:
        raise config_error(exc, what, tags=kinds) from None


def too_deep(value, limit: int = MAX_DEPTH) -> str | None:
    """The path (e.g. "defenses[0].x[0][0]") of the first value nested more than `limit` tables
    or arrays deep, None when there is none. Iterative, so any depth is measured safely."""
    stack = [(value, "", 0)]
    while stack:
        item, where, depth = stack.pop()
        if isinstance(item, (dict, list, tuple)):
            if depth >= limit:
                return (where if len(where) <= 60 else where[:60] + "...") or "(top level)"
            children = item.items() if isinstance(item, dict) else enumerate(item)
            for key, child in children:
                stack.append((child, f"{where}[{key}]" if isinstance(key, int) else f"{where}.{key}" if where else str(key),
                              depth + 1))
    return None

"""Validation of the tables a job file holds (defense, attack): one place for the error wording."""

from __future__ import annotations

from pydantic import TypeAdapter, ValidationError

from pipeline.errors import ConfigError, config_error


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

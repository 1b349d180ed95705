"""Keeping credentials out of messages, logs and results: the one scrubber.

`scrub` replaces known secret values in a text (the ones given, and the AWS credentials set in
the environment); `redact` hides the secret entries of an options table (fsspec storage options,
nested client_kwargs included); `redact_uri` drops the user:password part of a URL.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from typing import Any
from urllib.parse import urlsplit, urlunsplit

# Option names whose values are secrets, matched case-insensitively as substrings, so that e.g.
# aws_secret_access_key and session_token are covered too.
SECRET_NAMES = ("key", "secret", "token", "password", "credential", "signature")
# Environment variables that hold credentials.
SECRET_ENV = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN")
MASK = "***"
# Shorter values are not replaced: a secret of 1-3 characters would mask ordinary words.
_MIN_LENGTH = 4


def is_secret_name(name: Any) -> bool:
    n = str(name).lower()
    return any(s in n for s in SECRET_NAMES)


def collect_secrets(options: Any, name: str = "") -> set[str]:
    """The secret string values in an options table (by their names, at any depth)."""
    if isinstance(options, dict):
        return set().union(*(collect_secrets(v, k) for k, v in options.items())) if options else set()
    if isinstance(options, str) and is_secret_name(name) and len(options) >= _MIN_LENGTH:
        return {options}
    return set()


def env_secrets() -> set[str]:
    """The credentials set in this process's environment (SECRET_ENV)."""
    return {v for k in SECRET_ENV if len(v := os.environ.get(k, "")) >= _MIN_LENGTH}


def scrub(text: str, secrets: Iterable[str] = ()) -> str:
    """`text` with every value in `secrets` and every credential in the environment masked."""
    known = {s for s in secrets if s and len(s) >= _MIN_LENGTH} | env_secrets()
    for secret in sorted(known, key=len, reverse=True):  # longest first: one may contain another
        text = text.replace(secret, MASK)
    return text


def redact(options: Any, name: str = "") -> Any:
    """Options with secret values replaced by MASK (URLs lose any user:password part)."""
    if isinstance(options, dict):
        return {k: redact(v, k) for k, v in options.items()}
    if is_secret_name(name):
        return MASK
    if isinstance(options, str):
        return redact_uri(options)
    if isinstance(options, (int, float, bool, type(None), list, tuple)):
        return options
    return f"<{type(options).__name__}>"  # e.g. a botocore Config: its repr is not ours to vet


def redact_uri(uri: str) -> str:
    """The URL with any user:password@ replaced by ***@."""
    if "@" not in uri or "://" not in uri:
        return uri
    try:
        parts = urlsplit(uri)
    except ValueError:
        return uri
    if parts.username is None and parts.password is None:
        return uri
    host = parts.hostname or ""
    if parts.port:
        host = f"{host}:{parts.port}"
    return urlunsplit((parts.scheme, f"{MASK}@{host}", parts.path, parts.query, parts.fragment))


__all__ = ["scrub", "redact", "redact_uri", "collect_secrets", "env_secrets", "is_secret_name",
           "SECRET_NAMES", "SECRET_ENV", "MASK"]

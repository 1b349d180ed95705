"""Which store errors are worth another try, and the one time bound every S3 operation keeps.

An operation (one read, one listing, one write) gets `retry_seconds()` in all: each attempt is
cut off at what is left of it (the attempt's coroutine is cancelled, s3fs's and botocore's own
retries inside it included), and between attempts it backs off. A slow endpoint therefore
fails after the bound, as an unreachable one does, instead of once per inner retry.

Classes are matched by name anywhere in an exception's MRO and its chain, so that botocore and
aiohttp need not be importable for a local store.
"""

from __future__ import annotations

import os
import random
import time
from collections.abc import Callable
from typing import TypeVar

from pipeline.errors import StoreError

T = TypeVar("T")

RETRY_ENV = "ROBUSTSWEEP_S3_RETRY_SECONDS"
DEFAULT_RETRY_SECONDS = 60.0
# The shortest attempt: an operation whose bound is spent (or 0) still gets one try this long
# (the first call of a process also sets up its S3 client inside it).
MIN_ATTEMPT_SECONDS = 5.0

# The endpoint could not be reached, or did not answer in time.
UNREACHABLE = frozenset({"EndpointConnectionError", "ConnectTimeoutError", "ReadTimeoutError", "ConnectionError",
                         "ClientConnectorError", "ServerDisconnectedError", "ConnectionClosedError",
                         "TimeoutError", "FSTimeoutError", "gaierror"})
TIMED_OUT = frozenset({"ReadTimeoutError", "ConnectTimeoutError", "TimeoutError", "FSTimeoutError"})
# The endpoint answered that it is busy or broken for now (HTTP 500, 502, 503, 504 and their codes).
BUSY_CODES = frozenset({"500", "502", "503", "504", "InternalError", "ServiceUnavailable", "SlowDown",
                        "RequestTimeout", "Throttling", "ThrottlingException"})
NO_CREDENTIALS = frozenset({"NoCredentialsError", "PartialCredentialsError", "CredentialRetrievalError"})
# A conditional request whose condition did not hold (412), or lost a race with another one (409).
PRECONDITION_CODES = frozenset({"PreconditionFailed", "ConditionalRequestConflict", "412", "409"})


def retry_seconds() -> float:
    """The bound of one S3 operation, in seconds: env ROBUSTSWEEP_S3_RETRY_SECONDS, else 60."""
    raw = os.environ.get(RETRY_ENV)
    try:
        return max(0.0, float(raw)) if raw else DEFAULT_RETRY_SECONDS
    except ValueError:
        raise StoreError(f"{RETRY_ENV} must be a number of seconds, got {raw!r}") from None


def operation_seconds() -> float:
    """How long one operation may take in all: the bound, but at least one attempt's worth."""
    return max(retry_seconds(), MIN_ATTEMPT_SECONDS)


def _chain(exc: BaseException | None, depth: int = 4):
    # The error and what it wraps (s3fs and aiobotocore chain theirs).
    for _ in range(depth):
        if exc is None:
            return
        yield exc
        exc = exc.__cause__ or exc.__context__


def class_names(exc: BaseException) -> set[str]:
    return {c.__name__ for c in type(exc).__mro__}


def error_code(exc: BaseException) -> str:
    """The S3 error code of a botocore ClientError (or of what it wraps), else ""."""
    for e in _chain(exc):
        response = getattr(e, "response", None)
        if isinstance(response, dict):
            error = response.get("Error") or {}
            code = str(error.get("Code", "")) or str((response.get("ResponseMetadata") or {}).get("HTTPStatusCode", ""))
            if code:
                return code
    return ""


def unreachable(exc: BaseException) -> bool:
    """Whether the endpoint could not be reached or did not answer in time."""
    return any(class_names(e) & UNREACHABLE for e in _chain(exc))


def timed_out(exc: BaseException) -> bool:
    return any(class_names(e) & TIMED_OUT for e in _chain(exc))


def busy(exc: BaseException) -> bool:
    """Whether the endpoint answered with a transient server error (5xx, SlowDown)."""
    return error_code(exc) in BUSY_CODES


def transient(exc: BaseException) -> bool:
    """Worth another try within the operation's bound."""
    return unreachable(exc) or busy(exc)


def precondition_failed(exc: BaseException) -> bool:
    """Whether a conditional write was refused because its condition did not hold."""
    return isinstance(exc, FileExistsError) or error_code(exc) in PRECONDITION_CODES


def no_credentials(exc: BaseException) -> bool:
    return any(class_names(e) & NO_CREDENTIALS for e in _chain(exc))


def raise_transient(blobs: dict) -> dict:
    """fs.cat(on_error="return") hands errors back per path; a transient one is raised so that the
    whole batch is tried again."""
    for value in blobs.values():
        if isinstance(value, BaseException) and transient(value):
            raise value
    return blobs


def bounded(call: Callable[[float], T], bound: float, *, clock: Callable[[], float] = time.monotonic,
            sleep: Callable[[float], None] = time.sleep, between: Callable[[], None] | None = None) -> T:
    """call(timeout) until it returns, for at most `bound` seconds in all.

    call gets the seconds left (at least MIN_ATTEMPT_SECONDS) and must give up by then. A
    transient error is tried again after a backoff (0.5 s doubling to 8 s, each +-50% jitter so
    that many workers do not return in step) while the bound allows; any other error, and the
    last transient one, goes up. between(): called before each new attempt (e.g. to drop caches).
    """
    deadline, delay = clock() + bound, 0.5
    while True:
        try:
            return call(max(MIN_ATTEMPT_SECONDS, deadline - clock()))
        except Exception as exc:
            if not transient(exc):
                raise
            pause = delay * random.uniform(0.5, 1.5)
            if clock() + pause >= deadline:
                raise
        sleep(pause)
        delay = min(2 * delay, 8.0)
        if between is not None:
            between()


__all__ = ["RETRY_ENV", "DEFAULT_RETRY_SECONDS", "MIN_ATTEMPT_SECONDS", "retry_seconds", "operation_seconds", "unreachable",
           "timed_out", "busy", "transient", "precondition_failed", "no_credentials", "raise_transient", "bounded",
           "error_code", "class_names"]

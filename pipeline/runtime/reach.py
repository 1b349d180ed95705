"""Is a Ray cluster there? A TCP connect to its address, retried with backoff for a bounded
time, before `ray.init` (which, given an address where nothing listens, waits on its own
timeouts and ends in a traceback)."""

from __future__ import annotations

import os
import random
import socket
import time
from urllib.parse import urlsplit

from pipeline.errors import ClusterUnreachableError

RETRY_ENV = "ROBUSTSWEEP_RAY_RETRY_SECONDS"
DEFAULT_PORT = 6379  # Ray's GCS port when an address gives none


def retry_seconds() -> float:
    """How long an unreachable cluster is retried: env ROBUSTSWEEP_RAY_RETRY_SECONDS, else 20."""
    raw = os.environ.get(RETRY_ENV)
    try:
        return max(0.0, float(raw)) if raw else 20.0
    except ValueError:
        raise ClusterUnreachableError(f"{RETRY_ENV} must be a number of seconds, got {raw!r}") from None


def host_port(address: str) -> tuple[str, int] | None:
    """(host, port) of "host:port", "ray://host:port" or "http://host:port"; None for "auto"
    and the like (Ray finds those itself)."""
    if address in ("auto", "local", ""):
        return None
    parts = urlsplit(address if "://" in address else f"tcp://{address}")
    if not parts.hostname:
        return None
    try:
        return parts.hostname, parts.port or DEFAULT_PORT
    except ValueError:
        raise ClusterUnreachableError(f"--address {address!r}: not host:port") from None


def check_reachable(address: str, budget: float | None = None) -> None:
    """Return once something accepts TCP connections at `address`; after `budget` seconds of
    exponential backoff with jitter (0.25 s doubling to 4 s), ClusterUnreachableError naming it."""
    target = host_port(address)
    if target is None:
        return
    budget = retry_seconds() if budget is None else budget
    deadline, delay = time.monotonic() + budget, 0.25
    while True:
        try:
            with socket.create_connection(target, timeout=min(5.0, max(budget, 0.5))):
                return
        except OSError as exc:
            error = exc
        if time.monotonic() + delay > deadline:
            break
        time.sleep(delay * random.uniform(0.5, 1.5))
        delay = min(2 * delay, 4.0)
    reason = error.strerror or type(error).__name__
    raise ClusterUnreachableError(
        f"no Ray cluster answers at {target[0]}:{target[1]} (--address {address}): {reason}, retried for {budget:g} s "
        f"({RETRY_ENV}); check that the head node is up (`ray status` on it) and that the port is open")

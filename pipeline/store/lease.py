"""One driver per run folder: a lease at `{run}/lease.json` that says who holds it.

    with RunLease(store, run_id):
        ...  # plan, check, dispatch, commit

The holder's document is {host, pid, since, renewed, expires, ttl, token}; a thread renews it
every third of its time to live, so it outlives any run of its holder and dies with it:

- Local folder: an exclusive `flock` on the file. The kernel drops it the moment the holding
  process ends, however it ends (SIGKILL included), so a killed driver's lease is free at once;
  the JSON inside only names the holder for the message of the one refused.
- S3: the lease object is created with a conditional PUT (`Store.create_exclusive`), so of two
  drivers exactly one creates it. A lease that has expired (its holder stopped renewing: killed,
  or cut off) is taken over with `Store.replace_if_match` on the version that was read, so of
  two drivers taking over the same stale lease exactly one wins. Renewals are conditional on the
  holder's own version: a holder whose lease was taken over learns it at its next renewal (`lost`).
- Other file systems: the same steps, best effort (checked, then written; no guarantee against
  a race).

The document is not trusted as written: a lease expires at the holder's `expires`, but never
later than its renewal plus its time to live (at most MAX_TTL). The renewal is the earlier of
two times that do not depend on the holder's clock: when the store says the document was last
written, and when this reader first saw that version of it. So a holder whose clock runs ahead,
or an `expires` of 1e300, cannot keep a folder for more than one time to live without renewing,
whatever the clocks of the store and the reader say. A document that does not parse, or whose
`expires` is not a finite number, is treated as expired.

The clock (wall time, monotonic time, sleep) is injectable, so that the waiting and take-over
logic runs on a fake one in tests.
"""

from __future__ import annotations

import json
import math
import os
import socket
import threading
import time
import uuid
from typing import Protocol

from pipeline.errors import LeaseHeldError, LeaseLostError, StoreError
from pipeline.store.io import Store, Version

LEASE = "lease.json"
TTL_ENV = "ROBUSTSWEEP_LEASE_SECONDS"
DEFAULT_TTL = 60.0
MAX_TTL = 86400.0
# S3 keeps LastModified in whole seconds (rounded down): a write may be up to 1 s later than it says.
STORE_TIME_SLACK = 1.0
HOLDER_FIELDS = ("host", "pid", "since", "renewed")


class Clock(Protocol):
    def time(self) -> float: ...

    def monotonic(self) -> float: ...

    def sleep(self, seconds: float) -> None: ...


class SystemClock:
    """The process's clocks."""

    def time(self) -> float:
        return time.time()

    def monotonic(self) -> float:
        return time.monotonic()

    def sleep(self, seconds: float) -> None:
        time.sleep(seconds)


SYSTEM_CLOCK = SystemClock()


def default_ttl() -> float:
    """Seconds a lease lives without renewal: env ROBUSTSWEEP_LEASE_SECONDS, else 60."""
    raw = os.environ.get(TTL_ENV)
    try:
        ttl = float(raw) if raw else DEFAULT_TTL
    except ValueError:
        raise StoreError(f"{TTL_ENV} must be a number of seconds, got {raw!r}") from None
    if not 1 <= ttl <= MAX_TTL:
        raise StoreError(f"{TTL_ENV} must be between 1 and {MAX_TTL:.0f} seconds, got {raw!r}")
    return ttl


def expiry(holder: dict | None, renewal: float, ttl: float) -> float | None:
    """When a lease read from the store expires (seconds since the epoch), or None when its
    document cannot be trusted at all (not JSON, `expires` not a finite number): expired.

    The holder's `expires`, capped at `renewal` (see the module's docstring) plus the time to
    live the document declares (`ttl`, at most MAX_TTL; the reader's `ttl` where it declares none).
    """
    if holder is None:
        return None
    expires = holder.get("expires")
    if isinstance(expires, bool) or not isinstance(expires, (int, float)) or not math.isfinite(expires):
        return None
    declared = holder.get("ttl")
    if isinstance(declared, bool) or not isinstance(declared, (int, float)) or not math.isfinite(declared) or declared <= 0:
        declared = ttl
    return min(float(expires), renewal + min(float(declared), MAX_TTL))


def renewal(version: Version, first_seen: float) -> float:
    """The earliest evidence of when this version of the lease was written: the store's time of
    the write (S3 keeps whole seconds: +STORE_TIME_SLACK), or when the reader first saw it."""
    return min(version.modified + STORE_TIME_SLACK, first_seen)


class RunLease:
    """The lease of the run folder `{store}/{run_id}`; acquire() or a `with` block takes it.

    wait: seconds to keep trying while another driver holds it (0: refuse at once).
    clock: where time comes from (SystemClock; tests pass a fake one).
    Raises LeaseHeldError naming the holder (host, pid, since) when it cannot be had.
    """

    def __init__(self, store: Store, run_id: str, *, ttl: float | None = None, wait: float = 0.0,
                 clock: Clock = SYSTEM_CLOCK):
        self.store, self.run_id, self.rel = store, run_id, f"{run_id}/{LEASE}"
        self.ttl = default_ttl() if ttl is None else float(ttl)
        self.wait = float(wait)
        self.clock = clock
        self.token = uuid.uuid4().hex
        self.since = clock.time()
        self.lost = False
        self.taker: dict | None = None  # who held the lease when this driver found it lost
        self._fd: int | None = None
        self._version: Version | None = None
        self._seen: dict[str, float] = {}  # version tag of the lease read -> when this reader first saw it
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- the document ---------------------------------------------------------------------------

    def _doc(self) -> bytes:
        now = self.clock.time()
        return json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "since": _stamp(self.since),
                           "renewed": _stamp(now), "expires": now + self.ttl, "ttl": self.ttl,
                           "token": self.token}).encode()

    def _held(self, holder: dict) -> LeaseHeldError:
        h, where = holder, self.store.join(self.rel)
        if self.store.backend == "local":
            ends = "a killed driver's lease is free at once"
        else:
            left = h.get("expires_at")
            ends = (f"unless its driver renews it, it expires at {_stamp(left)} (in {max(0.0, left - self.clock.time()):.0f} s)"
                    if isinstance(left, float) else f"a killed driver's lease expires within {self.ttl:.0f} s")
            ends += (f". If no driver is running this folder any more, delete {where} to free it now "
                     f"(e.g. `aws s3 rm {where}`)" if self.store.backend == "s3" else
                     f". If no driver is running this folder any more, delete {where} to free it now")
        return LeaseHeldError(
            f"run folder {self.store.join(self.run_id)} is in use by another driver: host "
            f"{h.get('host', '?')}, pid {h.get('pid', '?')}, since {h.get('since', '?')} (lease {where}"
            f", renewed {h.get('renewed', '?')}). Wait for it to finish (--lease-wait), or stop it; {ends}")

    # -- acquire / renew / release ----------------------------------------------------------------

    def acquire(self) -> "RunLease":
        deadline = self.clock.monotonic() + self.wait
        while True:
            holder = self._try()
            if holder is None:
                break
            if self.clock.monotonic() >= deadline:
                raise self._held(holder)
            self.clock.sleep(min(1.0, max(0.05, deadline - self.clock.monotonic())))
        self._thread = threading.Thread(target=self._renew_loop, name="run-lease", daemon=True)
        self._thread.start()
        return self

    def _try(self) -> dict | None:
        """None when the lease is now ours; else the holder's document."""
        return self._try_local() if self.store.backend == "local" else self._try_conditional()

    def _try_local(self) -> dict | None:
        import fcntl

        path = self.store.local_path(self.rel)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _parse(os.pread(fd, 1 << 16, 0))
            os.close(fd)
            return holder or {}
        self._fd = fd
        self._write_local()
        return None

    def _write_local(self) -> None:
        data = self._doc()
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, data, 0)
        os.fsync(self._fd)

    def _try_conditional(self) -> dict | None:
        created = self.store.create_exclusive(self.rel, self._doc())
        if created is not None:
            self._version = created
            return None
        found = self.store.read_versioned(self.rel)
        if found is None:
            return {"since": "just released"}  # deleted since: try again on the next round
        data, version = found
        holder = _parse(data)
        if holder is not None and holder.get("token") == self.token:
            self._version = version  # our own PUT went through, its reply was lost and the retry met it
            return None
        now = self.clock.time()
        first_seen = self._seen.setdefault(version.tag, now)
        ends = expiry(holder, renewal(version, first_seen), self.ttl)
        if ends is not None and ends > now:
            return {**holder, "expires_at": ends}
        # Expired, or not a lease document at all: take it over, unless another driver did first.
        taken = self.store.replace_if_match(self.rel, self._doc(), version)
        if taken is not None:
            self._version = taken
            return None
        return holder or {}

    def renew(self) -> None:
        """Push `expires` forward; sets `lost` when another driver has taken the lease over (a lost
        lease is not renewed again: it is the other driver's)."""
        if self.lost:
            return
        if self.store.backend == "local":
            self._write_local()
            return
        renewed = self.store.replace_if_match(self.rel, self._doc(), self._version)
        if renewed is None:
            # Read now: by the time the driver stops (after the units in flight) the new holder's
            # lease may itself have ended, and the message could no longer say who it was.
            self.taker = self._holder_now()
            self.lost = True
        else:
            self._version = renewed

    def check(self) -> None:
        """Raise LeaseLostError, naming the new holder, once another driver has taken the lease over."""
        if not self.lost:
            return
        h = self.taker or self._holder_now()
        raise LeaseLostError(
            f"the lease of run folder {self.store.join(self.run_id)} was taken over by another driver "
            f"(host {h.get('host', '?')}, pid {h.get('pid', '?')}, since {h.get('since', '?')}) while this run was "
            f"going: this driver stopped handing out units. Committed units stay; run again (with --lease-wait) "
            f"to resume once the other driver is done")

    def _holder_now(self) -> dict:
        try:
            return current_holder(self.store, self.run_id, clock=self.clock) or {}
        except (StoreError, OSError):  # the message still says what happened
            return {}

    def _renew_loop(self) -> None:
        while not self._stop.wait(self.ttl / 3):
            try:
                self.renew()
            except Exception:  # a renewal that fails is retried next period; expiry is the backstop
                pass

    def release(self) -> None:
        """Give the lease back (the next driver gets it at once)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        if self.store.backend == "local" and self._fd is not None:
            import fcntl

            # The file stays (unlinking a locked file lets a waiter lock an orphan); emptied, it
            # names no holder.
            os.ftruncate(self._fd, 0)
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None
        elif self.store.backend != "local" and self._version is not None and not self.lost:
            try:
                self.store.remove_if_match(self.rel, self._version)
            except Exception:
                pass  # it expires on its own
            self._version = None

    def __enter__(self) -> "RunLease":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def current_holder(store: Store, run_id: str = "", *, ttl: float | None = None,
                   clock: Clock = SYSTEM_CLOCK) -> dict | None:
    """{host, pid, since, renewed} of the driver holding the run folder's lease, or None when
    it is free (released, expired, unreadable, or its holder's process gone); takes nothing."""
    rel = f"{run_id}/{LEASE}" if run_id else LEASE
    if store.backend == "local":
        import fcntl

        try:
            fd = os.open(store.local_path(rel), os.O_RDONLY)
        except FileNotFoundError:
            return None
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _parse(os.pread(fd, 1 << 16, 0)) or {}
            return {k: holder.get(k) for k in HOLDER_FIELDS}
        finally:
            os.close(fd)  # also drops the shared lock, if it was taken
        return None
    found = store.read_versioned(rel)
    if found is None:
        return None
    holder, now = _parse(found[0]), clock.time()
    ends = expiry(holder, renewal(found[1], now), default_ttl() if ttl is None else ttl)
    if ends is None or ends <= now:
        return None
    return {k: holder.get(k) for k in HOLDER_FIELDS}


def _stamp(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))


def _parse(data: bytes | None) -> dict | None:
    try:
        doc = json.loads(data or b"")
    except (ValueError, UnicodeDecodeError, RecursionError):
        return None
    return doc if isinstance(doc, dict) else None

"""One driver per run folder: a lease at `{run}/lease.json` that says who holds it.

    with RunLease(store, run_id):
        ...  # plan, check, dispatch, commit

The holder's document is {host, pid, since, renewed, expires, token}; a thread renews it every
third of its time to live, so it outlives any run of its holder and dies with it:

- Local folder: an exclusive `flock` on the file. The kernel drops it the moment the holding
  process ends, however it ends (SIGKILL included), so a killed driver's lease is free at once;
  the JSON inside only names the holder for the message of the one refused.
- S3: the lease object is created with a conditional PUT (`If-None-Match: *`), so of two
  drivers exactly one creates it. A lease whose `expires` has passed (its holder stopped
  renewing: killed, or cut off) is taken over with `If-Match` on the ETag that was read, so
  of two drivers taking over the same stale lease exactly one wins. Renewals are `If-Match`
  on the holder's own ETag: a holder whose lease was taken over learns it at its next renewal
  (`lost`). Expiry compares the holder's clock with the reader's; keep the time to live well
  above the clock skew between machines (the default, 60 s, is).
- Other file systems: create-if-absent by existence check, without a guarantee against a race.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
import uuid

from pipeline.errors import LeaseHeldError, LeaseLostError, StoreError
from pipeline.store.io import Store

LEASE = "lease.json"
TTL_ENV = "ROBUSTSWEEP_LEASE_SECONDS"
DEFAULT_TTL = 60.0


def default_ttl() -> float:
    """Seconds a lease lives without renewal: env ROBUSTSWEEP_LEASE_SECONDS, else 60."""
    raw = os.environ.get(TTL_ENV)
    try:
        ttl = float(raw) if raw else DEFAULT_TTL
    except ValueError:
        raise StoreError(f"{TTL_ENV} must be a number of seconds, got {raw!r}") from None
    if not 1 <= ttl <= 86400:
        raise StoreError(f"{TTL_ENV} must be between 1 and 86400 seconds, got {raw!r}")
    return ttl


class RunLease:
    """The lease of the run folder `{store}/{run_id}`; acquire() or a `with` block takes it.

    wait: seconds to keep trying while another driver holds it (0: refuse at once).
    Raises LeaseHeldError naming the holder (host, pid, since) when it cannot be had.
    """

    def __init__(self, store: Store, run_id: str, *, ttl: float | None = None, wait: float = 0.0):
        self.store, self.run_id, self.rel = store, run_id, f"{run_id}/{LEASE}"
        self.ttl = default_ttl() if ttl is None else float(ttl)
        self.wait = float(wait)
        self.token = uuid.uuid4().hex
        self.since = time.time()
        self.lost = False
        self._fd: int | None = None
        self._etag: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._kind = "local" if store._local else "s3" if store._is_s3 else "other"

    # -- the document ---------------------------------------------------------------------------

    def _doc(self) -> bytes:
        now = time.time()
        return json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "since": _stamp(self.since),
                           "renewed": _stamp(now), "expires": now + self.ttl, "token": self.token}).encode()

    def _held(self, holder: dict | None) -> LeaseHeldError:
        h = holder or {}
        return LeaseHeldError(
            f"run folder {self.store.join(self.run_id)} is in use by another driver: host "
            f"{h.get('host', '?')}, pid {h.get('pid', '?')}, since {h.get('since', '?')} (lease {self.store.join(self.rel)}"
            f", renewed {h.get('renewed', '?')}). Wait for it to finish, or stop it; a killed driver's lease "
            f"expires {'at once' if self._kind == 'local' else f'within {self.ttl:.0f} s'}")

    # -- acquire / renew / release ----------------------------------------------------------------

    def acquire(self) -> "RunLease":
        deadline = time.monotonic() + self.wait
        while True:
            holder = self._try()
            if holder is None:
                break
            if time.monotonic() >= deadline:
                raise self._held(holder)
            time.sleep(min(1.0, max(0.05, deadline - time.monotonic())))
        self._thread = threading.Thread(target=self._renew_loop, name="run-lease", daemon=True)
        self._thread.start()
        return self

    def _try(self) -> dict | None:
        """None when the lease is now ours; else the holder's document."""
        return {"local": self._try_local, "s3": self._try_s3, "other": self._try_other}[self._kind]()

    def _try_local(self) -> dict | None:
        import fcntl

        path = self.store._path(self.rel)
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

    def _bucket_key(self) -> tuple[str, str]:
        bucket, _, key = self.store._path(self.rel).partition("/")
        return bucket, key

    def _put(self, **condition) -> str:
        """One conditional PUT of our document (retried while the endpoint is unreachable)."""
        bucket, key = self._bucket_key()
        reply = self.store._patient(lambda: self.store.fs.call_s3(
            "put_object", Bucket=bucket, Key=key, Body=self._doc(), ContentType="application/json", **condition))
        return reply["ETag"]

    def _try_s3(self) -> dict | None:
        try:
            self._etag = self._put(IfNoneMatch="*")
            return None
        except Exception as exc:
            if not _precondition(exc):
                raise self.store._error(exc, "create the lease", self.rel) from None
        path = self.store._path(self.rel)
        try:
            # The ETag first: if the lease changes after it is read, the take-over below fails.
            self.store.fs.invalidate_cache(path)
            etag = self.store._patient(lambda: self.store.fs.info(path))["ETag"]
            holder = _parse(self.store._patient(lambda: self.store.fs.cat_file(path)))
        except FileNotFoundError:
            return {"host": "?", "pid": "?", "since": "just released"}  # try again on the next round
        except Exception as exc:
            raise self.store._error(exc, "read the lease", self.rel) from None
        if holder is not None and holder.get("token") == self.token:
            self._etag = etag  # our own PUT went through, its reply was lost and the retry met it
            return None
        if holder is not None and float(holder.get("expires", 0)) > time.time():
            return holder
        try:  # expired (or unreadable): take it over, unless another driver did first
            self._etag = self._put(IfMatch=etag)
            return None
        except Exception as exc:
            if _precondition(exc):
                return holder or {}
            raise self.store._error(exc, "take over the lease", self.rel) from None

    def _try_other(self) -> dict | None:
        if self.store.exists(self.rel):
            holder = _parse(self.store._read_bytes(self.rel))
            if holder is not None and float(holder.get("expires", 0)) > time.time():
                return holder
        self.store._commit(self.rel, lambda f: f.write(self._doc()))
        return None

    def renew(self) -> None:
        """Push `expires` forward; sets `lost` when another driver has taken the lease over."""
        if self._kind == "local":
            self._write_local()
        elif self._kind == "s3":
            try:
                self._etag = self._put(IfMatch=self._etag)
            except Exception as exc:
                if _precondition(exc) or isinstance(exc, FileNotFoundError):
                    self.lost = True
                # else: a transient fault; the next renewal tries again well before expiry
        else:
            self.store._commit(self.rel, lambda f: f.write(self._doc()))

    def check(self) -> None:
        """Raise LeaseLostError, naming the new holder, once another driver has taken the lease over."""
        if not self.lost:
            return
        try:
            h = current_holder(self.store, self.run_id) or {}
        except (StoreError, OSError):  # the message still says what happened
            h = {}
        raise LeaseLostError(
            f"the lease of run folder {self.store.join(self.run_id)} was taken over by another driver "
            f"(host {h.get('host', '?')}, pid {h.get('pid', '?')}, since {h.get('since', '?')}) while this run was "
            f"going: this driver stopped handing out units. Committed units stay; run again (with --lease-wait) "
            f"to resume once the other driver is done")

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
        if self._kind == "local" and self._fd is not None:
            import fcntl

            # The file stays (unlinking a locked file lets a waiter lock an orphan); emptied, it
            # names no holder.
            os.ftruncate(self._fd, 0)
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None
        elif self._kind == "s3" and self._etag is not None and not self.lost:
            bucket, key = self._bucket_key()
            try:
                head = self.store.fs.call_s3("head_object", Bucket=bucket, Key=key)
                if head.get("ETag") == self._etag:
                    self.store.fs.call_s3("delete_object", Bucket=bucket, Key=key)
            except Exception:
                pass  # it expires on its own
        elif self._kind == "other":
            self.store.remove(self.rel)

    def __enter__(self) -> "RunLease":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def current_holder(store: Store, run_id: str = "") -> dict | None:
    """{host, pid, since, renewed} of the driver holding the run folder's lease, or None when
    it is free (released, expired, or its holder's process gone); takes nothing."""
    rel = f"{run_id}/{LEASE}" if run_id else LEASE
    if store._local:
        import fcntl

        try:
            fd = os.open(store._path(rel), os.O_RDONLY)
        except FileNotFoundError:
            return None
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _parse(os.pread(fd, 1 << 16, 0)) or {}
            return {k: holder.get(k) for k in ("host", "pid", "since", "renewed")}
        finally:
            os.close(fd)  # also drops the shared lock, if it was taken
        return None
    if not store.exists(rel):
        return None
    holder = _parse(store._read_bytes(rel))
    if holder is None or float(holder.get("expires", 0)) <= time.time():
        return None
    return {k: holder.get(k) for k in ("host", "pid", "since", "renewed")}


def _stamp(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))


def _parse(data: bytes | None) -> dict | None:
    try:
        doc = json.loads(data or b"")
    except (ValueError, UnicodeDecodeError):
        return None
    return doc if isinstance(doc, dict) else None


def _precondition(exc: BaseException) -> bool:
    """Whether an S3 error is a failed condition (412 PreconditionFailed, 409 ConditionalRequestConflict)."""
    if isinstance(exc, FileExistsError):
        return True
    for e in (exc, exc.__cause__, exc.__context__):
        code = str(((getattr(e, "response", None) or {}).get("Error") or {}).get("Code", ""))
        if code in ("PreconditionFailed", "ConditionalRequestConflict", "412", "409"):
            return True
    return False

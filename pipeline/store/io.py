"""A results store on a local folder or an object store (s3://bucket/prefix), through fsspec.

Every file is committed whole: on local disk by writing a temp file in the target folder,
fsync, then `os.replace` (atomic within one filesystem); on an object store by serializing in
memory and uploading with one PUT (`pipe_file`), since an S3 object only becomes visible once
its upload completes. A reader therefore sees either no file or the whole file, and a unit's
Parquet file existing with a valid footer and the row count it promises means the unit is done
(`Store.committed`); resume relies on that.

Transient faults: every S3 operation has one time bound (`retry_seconds`, store/retry.py): an
attempt is cut off at what is left of it, and an unreachable, slow or busy endpoint is tried
again with exponential backoff and jitter within it; then the error goes up naming the endpoint.
A unit's tries are only spent after that.

Conditional writes (`create_exclusive`, `replace_if_match`) and `read_versioned` are the
surface the run lease (store/lease.py) stands on: on S3 they are conditional PUTs on the
object's ETag; elsewhere they are best effort (checked, then written).

Credentials: for S3 they come from the usual AWS sources (env vars, profile, instance role)
unless given in `storage_options`. They never appear in `repr(store)` nor in a StoreError: the
options are redacted, and messages of underlying exceptions are scrubbed of secret values.
"""

from __future__ import annotations

import json
import os
import posixpath
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.atomic import atomic_write as _commit_local
from pipeline.errors import CommitRefusedError, CredentialsError, StoreError
from pipeline.scrub import collect_secrets as _collect_secrets
from pipeline.scrub import redact as _redact
from pipeline.scrub import redact_uri as _redact_uri
from pipeline.scrub import scrub
from pipeline.store import retry
from pipeline.store.retry import RETRY_ENV, retry_seconds
from pipeline.store.schema import RECORD_SCHEMA
from pipeline.store.seal import META_PREFIX, inspect, seal


# Files `check` holds in memory at once (unit files are small: tens of KiB to a few MiB).
_CHECK_BATCH = 64
# s3fs switches to a multipart upload at 2 * chunksize; 5 GiB is S3's single-PUT limit, so with
# this chunksize every object S3 accepts in one request goes up as exactly one PUT.
_S3_CHUNKSIZE = 5 * 2**30

Backend = Literal["local", "s3", "other"]


@dataclass(frozen=True)
class Version:
    """Which version of a file was read or written: `tag` (the S3 ETag; elsewhere size and
    modification time) and `modified`, when the store says it was last written (seconds since
    the epoch, by the store's clock: the S3 server's, not the writer's)."""

    tag: str
    modified: float


class Store:
    """Files under one root: a local folder, or `s3://bucket/prefix` (any fsspec URL works).

    uri: local path (relative paths are made absolute) or fsspec URL.
    storage_options: fsspec options (for s3fs: key, secret, token, client_kwargs, config_kwargs,
        ...); may hold secrets, so they are never shown.
    endpoint_url: S3-compatible endpoint (MinIO, moto, Ceph); default: storage_options'
        client_kwargs.endpoint_url, else env AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL, else AWS.

    All methods take paths relative to the root, "/"-separated, without "..".
    Attributes `fs` (the fsspec filesystem) and `root` (its path of the root) are public, e.g. to
    hand the filesystem to DuckDB (`con.register_filesystem(store.fs)`).
    """

    def __init__(self, uri: str, storage_options: Mapping[str, Any] | None = None,
                 endpoint_url: str | None = None):
        uri = str(uri)
        protocol, _ = fsspec.core.split_protocol(uri)
        options = _deep_copy(dict(storage_options or {}))
        self._is_s3 = protocol in ("s3", "s3a")
        if self._is_s3:
            client = dict(options.get("client_kwargs") or {})
            endpoint = (endpoint_url or client.get("endpoint_url") or os.environ.get("AWS_ENDPOINT_URL_S3")
                        or os.environ.get("AWS_ENDPOINT_URL"))
            if endpoint:
                client["endpoint_url"] = endpoint
            # botocore reads AWS_DEFAULT_REGION itself but not AWS_REGION (the name most other
            # AWS SDKs and CI systems set).
            region = os.environ.get("AWS_REGION")
            if region and "region_name" not in client and not os.environ.get("AWS_DEFAULT_REGION"):
                client["region_name"] = region
            if client:
                options["client_kwargs"] = client
        elif endpoint_url:
            raise StoreError(f"endpoint_url applies to s3:// stores only; {_redact_uri(uri)!r} is not one")
        self._options = options
        self._secrets = _collect_secrets(options)
        try:
            self.fs, root = fsspec.core.url_to_fs(uri, **options)
        except Exception as exc:  # unknown protocol, missing backend, bad option
            raise StoreError(f"cannot open store {_redact_uri(uri)!r}: {type(exc).__name__}: "
                             f"{self._scrub(str(exc))}") from None
        self.root = root.rstrip("/") or root
        self._local = "file" in _protocols(self.fs)

    # -- naming -------------------------------------------------------------------------------

    @property
    def uri(self) -> str:
        """The root as a URI: an absolute local path, or e.g. "s3://bucket/prefix"."""
        return self.root if self._local else self.fs.unstrip_protocol(self.root)

    def join(self, *parts: str) -> str:
        """The full URI (or local path) of a relative path under the root, e.g.
        join("records", "x.parquet") -> "s3://bucket/prefix/records/x.parquet"."""
        rel = _rel(*parts)
        return f"{self.uri}/{rel}" if rel else self.uri

    def path(self, *parts: str) -> str:
        """The file system's path of a relative path (what the methods of `fs` take): e.g.
        "bucket/prefix/records/x.parquet" on S3, an absolute path on local disk."""
        rel = _rel(*parts)
        return f"{self.root}/{rel}" if rel else self.root

    @property
    def backend(self) -> Backend:
        """"local" (a folder on this machine's file system), "s3", or "other" (any other fsspec
        file system)."""
        return "local" if self._local else "s3" if self._is_s3 else "other"

    def local_path(self, rel: str) -> str:
        """The OS path of `rel` on a local store (for file locks); StoreError on other backends."""
        if not self._local:
            raise StoreError(f"{self.join(rel)} is not on the local file system")
        return self.path(rel)

    def __repr__(self) -> str:
        shown = _redact(self._options)
        opts = f", storage_options={shown!r}" if shown else ""
        return f"Store({_redact_uri(self.uri)!r}{opts})"

    __str__ = __repr__

    # -- Parquet --------------------------------------------------------------------------------

    def write_table(self, rel: str, table: pa.Table, metadata: Mapping[str, Any] | None = None, *,
                    schema: pa.Schema | None = RECORD_SCHEMA, exclusive: bool = False) -> None:
        """Commit `table` as one sealed Parquet file at `rel`, atomically (whole file or nothing).

        metadata: footer key-values; keys get the prefix "robustsweep." unless they have it,
            values are str()-ed. The row count, the schema's fingerprint and the checksum of
            the content are always written (pipeline.store.seal).
        schema: the table must have these column names and types (RECORD_SCHEMA by default;
            None writes any table). Checked before anything is written.
        exclusive: write only if no file is at `rel` (local: hard link; S3: a conditional PUT,
            If-None-Match: *); else CommitRefusedError and the file there is left as it was.
        Raises StoreError (nothing is left behind) when the table does not fit or the write fails.
        """
        if schema is not None:
            table = _conform(table, schema, f"table for {rel!r}")
        kv = {k if k.startswith(META_PREFIX) else META_PREFIX + k: str(v) for k, v in (metadata or {}).items()}
        try:
            data = seal(table, kv)
        except StoreError:
            raise
        except Exception as exc:
            raise StoreError(f"cannot serialize {self.join(rel)}: {type(exc).__name__}: "
                             f"{self._scrub(str(exc))}") from None
        self._commit(rel, lambda f: f.write(data), exclusive=exclusive)

    def committed(self, rel: str, expected_rows: int | None = None, *,
                  schema: pa.Schema | None = RECORD_SCHEMA) -> bool:
        """True iff `rel` is a whole sealed file: footer, row count (and `expected_rows`), schema
        (RECORD_SCHEMA unless given; None: any) and checksum of the content check out (`check`)."""
        rows = {rel: expected_rows} if expected_rows is not None else None
        return self.check([rel], rows, schema=schema)[rel] is None

    def check(self, rels: list[str], expected_rows: Mapping[str, int] | None = None, *,
              schema: pa.Schema | None = RECORD_SCHEMA, expect: Mapping[str, Mapping[str, str]] | None = None,
              keep: bool = False) -> dict[str, Any]:
        """{rel: None when the file is whole and matches, else the reason ("missing", "truncated
        ...", "content does not match its checksum (corrupted)", ...)}; with keep, {rel: (reason,
        footer)} instead. Files are read whole, in batches fetched concurrently on S3.

        expected_rows / expect: per file, the rows it must hold / footer values it must carry.
        An unreachable store raises StoreError (an outage never reads as "nothing done yet").
        """
        out: dict[str, Any] = {}
        for begin in range(0, len(rels), _CHECK_BATCH):
            batch = rels[begin:begin + _CHECK_BATCH]
            paths = {self.path(r): r for r in batch}
            try:
                for p in paths:
                    self.fs.invalidate_cache(p)  # s3fs caches listings; another worker may have written
                blobs = self._patient(lambda **t: retry.raise_transient(self._cat(list(paths), on_error="return", **t)))
            except Exception as exc:
                raise self._error(exc, "check", batch[0]) from None
            for path, rel in paths.items():
                blob = blobs.get(path) if isinstance(blobs, dict) else blobs
                if blob is None or isinstance(blob, (FileNotFoundError, IsADirectoryError)):
                    found = ("missing", None)
                elif isinstance(blob, BaseException):
                    raise self._error(blob, "check", rel) from None
                else:
                    found = inspect(blob, schema=schema, expected_rows=(expected_rows or {}).get(rel),
                                    expect=dict((expect or {}).get(rel) or {}))
                out[rel] = found if keep else found[0]
        return out

    def read_table(self, rel: str) -> pa.Table:
        """One Parquet file as a table (footer metadata kept). StoreError if missing or unreadable."""
        data = self.read_bytes(rel)
        try:
            return pq.read_table(pa.BufferReader(data))
        except Exception as exc:
            raise StoreError(f"{self.join(rel)} is not a readable Parquet file "
                             f"({type(exc).__name__}: {exc}); delete it to have its unit rerun") from None

    def read_records(self, rel_prefix: str = "records", columns: list[str] | None = None, *,
                     rels: list[str] | None = None) -> pa.Table:
        """All Parquet files below `rel_prefix` (or the files `rels`), concatenated into one table
        with RECORD_SCHEMA (only `columns` when given, in that order); an empty table when there
        are none.

        Raises StoreError naming the file when one fails its seal, does not read or does not
        fit the schema (pipeline.store.verify picks the files to read and skips bad ones).
        """
        schema = RECORD_SCHEMA if columns is None else _subschema(columns)
        rels = self.list(rel_prefix, ".parquet") if rels is None else list(rels)
        if not rels:
            return schema.empty_table()
        paths = [self.path(r) for r in rels]
        blobs: dict[str, bytes] = {}
        for begin in range(0, len(paths), _CHECK_BATCH):
            # One call per batch: s3fs fetches a batch concurrently, and each batch has the bound.
            batch = paths[begin:begin + _CHECK_BATCH]
            try:
                blobs.update(self._patient(lambda **t: self._cat(batch, on_error="raise", **t)))
            except Exception as exc:
                raise self._error(exc, "read", rel_prefix) from None
        tables, bad = [], []
        for rel, path in zip(rels, paths):
            reason, _ = inspect(blobs[path], schema=RECORD_SCHEMA)
            if reason is not None:
                bad.append(f"{self.join(rel)} ({reason})")
                continue
            try:
                pf = pq.ParquetFile(pa.BufferReader(blobs[path]))
                present = set(pf.schema_arrow.names)
                # Missing columns are reported by _conform below; extra ones (a newer writer) are ignored.
                t = pf.read(columns=[c for c in schema.names if c in present])
            except Exception as exc:
                bad.append(f"{self.join(rel)} ({type(exc).__name__}: {exc})")
                continue
            tables.append(_conform(t, schema, self.join(rel)).replace_schema_metadata(None))
        if bad:
            # All of them at once, so that one cleanup fixes the store.
            shown = "; ".join(bad[:10]) + (f"; and {len(bad) - 10} more" if len(bad) > 10 else "")
            raise StoreError(f"{len(bad)} unreadable Parquet file(s) under {self.join(rel_prefix)}: {shown}. "
                             f"Delete them to have their units rerun")
        return pa.concat_tables(tables)

    # -- JSON and files ---------------------------------------------------------------------------

    def write_json(self, rel: str, obj: Any) -> None:
        """Commit `obj` as JSON (UTF-8, indented) at `rel`, atomically. NaN/inf are refused
        (strict JSON, so any reader takes it): StoreError."""
        try:
            data = json.dumps(obj, indent=2, allow_nan=False).encode() + b"\n"
        except (TypeError, ValueError) as exc:
            raise StoreError(f"cannot write {rel!r} as JSON: {exc}") from None
        self._commit(rel, lambda f: f.write(data))

    def read_json(self, rel: str) -> Any:
        """The JSON value at `rel`. StoreError naming the path when missing or not valid JSON."""
        data = self.read_bytes(rel)
        try:
            return json.loads(data)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise StoreError(f"{self.join(rel)} is not valid JSON: {exc}") from None

    def exists(self, rel: str) -> bool:
        """Whether a file (or folder) exists at `rel`."""
        path = self.path(rel)
        try:
            self.fs.invalidate_cache(path)
            return bool(self._patient(lambda **t: self.fs.exists(path, **t)))
        except Exception as exc:
            raise self._error(exc, "check", rel) from None

    def list(self, rel_prefix: str = "", suffix: str = "") -> list[str]:
        """Relative paths of all files below `rel_prefix` (recursive) ending in `suffix`, sorted.
        A missing prefix gives []. Temp files of writes in progress are never listed."""
        base = self.path(rel_prefix)
        try:
            self.fs.invalidate_cache(base)
            found = self._patient(lambda **t: self.fs.find(base, **t))
        except FileNotFoundError as exc:
            if self._is_s3 and "bucket" in str(exc).lower():
                raise self._error(exc, "list", rel_prefix) from None
            return []
        except Exception as exc:
            raise self._error(exc, "list", rel_prefix) from None
        root = self.root.rstrip("/") + "/"
        out = []
        for p in found:
            p = p.split("://", 1)[1] if "://" in p else p
            rel = p[len(root):] if p.startswith(root) else p
            name = posixpath.basename(rel)
            if name.endswith(".tmp") and name.startswith("."):
                continue
            if rel.endswith(suffix):
                out.append(rel)
        return sorted(out)

    def remove(self, rel: str) -> None:
        """Delete the file at `rel` if it exists (used for stale failure notes, never for records)."""
        path = self.path(rel)
        try:
            if self._patient(lambda **t: self.fs.exists(path, **t)):
                self._patient(lambda **t: self.fs.rm_file(path, **t))
        except Exception as exc:
            raise self._error(exc, "remove", rel) from None

    def mtime(self, rel: str) -> float:
        """Modification time of `rel`, seconds since the epoch (local stores: the file's mtime)."""
        path = self.path(rel)
        try:
            if self._local:
                return os.path.getmtime(path)
            self.fs.invalidate_cache(path)
            return _version(self._patient(lambda **t: self.fs.info(path, **t))).modified
        except Exception as exc:
            raise self._error(exc, "stat", rel) from None

    def read_bytes(self, rel: str) -> bytes:
        """The content of the file at `rel`. StoreError naming it when missing or unreadable."""
        path = self.path(rel)
        try:
            return self._patient(lambda **t: self.fs.cat_file(path, **t))
        except Exception as exc:
            raise self._error(exc, "read", rel) from None

    # -- versions and conditional writes (the lease's surface) -----------------------------------

    def read_versioned(self, rel: str) -> tuple[bytes, Version] | None:
        """(content, version) of the file at `rel`, or None when there is none. The version is
        read first: a write between the two reads makes a later `replace_if_match` on it fail,
        never succeed on content it did not see."""
        path = self.path(rel)
        try:
            if self._local:
                st = os.stat(path)
                version = Version(f"{st.st_size}-{st.st_mtime_ns}", st.st_mtime)
            else:
                self.fs.invalidate_cache(path)
                version = _version(self._patient(lambda **t: self.fs.info(path, **t)))
            return self._patient(lambda **t: self.fs.cat_file(path, **t)), version
        except FileNotFoundError:
            return None
        except Exception as exc:
            raise self._error(exc, "read", rel) from None

    def create_exclusive(self, rel: str, data: bytes) -> Version | None:
        """Write `data` at `rel` only if no file is there: its version, or None when one was.
        On S3 one conditional PUT (If-None-Match: *), so of two writers exactly one creates it;
        elsewhere checked, then written (no guarantee against a race)."""
        if not self._is_s3:
            if self.exists(rel):
                return None
            self._commit(rel, lambda f: f.write(data))
            return self._version_of(rel)
        return self._put_if(rel, data, "create", IfNoneMatch="*")

    def replace_if_match(self, rel: str, data: bytes, version: Version) -> Version | None:
        """Replace the file at `rel` with `data` only if it is still at `version`: the new
        version, or None when it changed or is gone. On S3 one conditional PUT (If-Match on the
        ETag), so of two writers replacing the same version exactly one wins; elsewhere checked,
        then written."""
        if not self._is_s3:
            found = self.read_versioned(rel)
            if found is None or found[1].tag != version.tag:
                return None
            self._commit(rel, lambda f: f.write(data))
            return self._version_of(rel)
        return self._put_if(rel, data, "replace", IfMatch=version.tag)

    def remove_if_match(self, rel: str, version: Version) -> bool:
        """Delete the file at `rel` if it is still at `version`; whether it was deleted."""
        found = self.read_versioned(rel)
        if found is None or found[1].tag != version.tag:
            return False
        self.remove(rel)
        return True

    def _version_of(self, rel: str) -> Version:
        found = self.read_versioned(rel)
        if found is None:
            raise StoreError(f"{self.join(rel)} vanished right after it was written")
        return found[1]

    def _put_if(self, rel: str, data: bytes, action: str, **condition) -> Version | None:
        path = self.path(rel)
        bucket, _, key = path.partition("/")
        try:
            self._patient(lambda **t: self.fs.call_s3("put_object", Bucket=bucket, Key=key, Body=data, **condition, **t))
        except Exception as exc:
            if retry.precondition_failed(exc) or (isinstance(exc, FileNotFoundError) and "IfMatch" in condition):
                return None
            raise self._error(exc, action, rel) from None
        try:
            # The ETag of what was just written; info() (not the PUT's reply) also gives the
            # server's time of the write.
            self.fs.invalidate_cache(path)
            version = _version(self._patient(lambda **t: self.fs.info(path, **t)))
        except Exception as exc:
            raise self._error(exc, "read", rel) from None
        return version

    # -- internals -----------------------------------------------------------------------------

    def _commit(self, rel: str, write: Callable[[Any], Any], exclusive: bool = False) -> None:
        """Write a file whole: `write(fileobj)` fills it; readers see all of it or nothing.
        exclusive: only if absent (write_table)."""
        path = self.path(rel)
        if not _rel(rel):
            raise StoreError("cannot write to the store root itself; give a relative file path")
        if self._local:
            try:
                _commit_local(path, write, exclusive=exclusive)
            except StoreError:
                raise
            except FileExistsError:
                raise self._refused(rel) from None
            except Exception as exc:
                raise self._error(exc, "write", rel) from None
            return
        buf = pa.BufferOutputStream()
        try:
            write(buf)
            data = buf.getvalue().to_pybytes()
        except Exception as exc:
            raise StoreError(f"cannot serialize {self.join(rel)}: {type(exc).__name__}: "
                             f"{self._scrub(str(exc))}") from None
        try:
            if self._is_s3 and exclusive:
                bucket, _, key = path.partition("/")
                self._patient(lambda **t: self.fs.call_s3("put_object", Bucket=bucket, Key=key, Body=data,
                                                      IfNoneMatch="*", **t))
                self.fs.invalidate_cache(path)
            elif self._is_s3:
                self._patient(lambda **t: self.fs.pipe_file(path, data, chunksize=_S3_CHUNKSIZE, **t))
            else:
                if exclusive and self.fs.exists(path):  # no conditional write here: best effort
                    raise FileExistsError(path)
                self.fs.pipe_file(path, data)
        except Exception as exc:
            if exclusive and retry.precondition_failed(exc):
                raise self._refused(rel) from None
            raise self._error(exc, "write", rel) from None

    def _cat(self, paths: list[str], on_error: str, **kw) -> dict[str, Any]:
        """{path: bytes (or the error, with on_error "return")} of whole files, fetched
        concurrently on S3. Paths are literal: fs.cat would expand glob characters, so that a
        run folder named runs[1] read runs1's files and runs*/t1 every sibling's."""
        if not paths:
            return {}
        blobs = self.fs.cat_ranges(paths, [None] * len(paths), [None] * len(paths), on_error=on_error, **kw)
        return dict(zip(paths, blobs))

    def _refused(self, rel: str) -> CommitRefusedError:
        return CommitRefusedError(f"{_redact_uri(self.join(rel))} is already there (another attempt committed "
                                  f"it first); left as it was")

    def set_aside(self, rel: str, suffix: str) -> None:
        """Move the file at `rel` to `rel + suffix` (a records file that failed its checks, kept for
        a person to look at, so that its unit can be committed afresh with an exclusive write)."""
        try:
            if self._local:
                os.replace(self.path(rel), self.path(rel) + suffix)
            else:
                self.fs.mv(self.path(rel), self.path(rel) + suffix)
                self.fs.invalidate_cache()
        except FileNotFoundError:
            return
        except Exception as exc:
            raise self._error(exc, "move aside", rel) from None

    def _patient(self, call: Callable[..., Any]) -> Any:
        """call() on local and other stores; on S3 call(timeout=seconds left), tried again while
        the endpoint is unreachable, slow or busy, all within one bound (`retry_seconds()`,
        store/retry.py); then the last error goes up (and _error names the endpoint). `timeout`
        reaches fsspec's sync wrapper, which cancels the attempt (inner retries included)."""
        if not self._is_s3:
            return call()
        return retry.bounded(lambda left: call(timeout=left), retry_seconds(), between=self.fs.invalidate_cache)

    def _scrub(self, text: str) -> str:
        return scrub(text, self._secrets)

    def _error(self, exc: BaseException, action: str, rel: str) -> StoreError:
        """A StoreError that says what failed and what to do, without any credential."""
        where = _redact_uri(self.join(rel))
        detail = f"({type(exc).__name__}: {self._scrub(str(exc))})"
        names = retry.class_names(exc)
        endpoint = _redact_uri(str((self._options.get("client_kwargs") or {}).get("endpoint_url") or "AWS default"))
        if self._is_s3 and isinstance(exc, FileNotFoundError) and "bucket" in str(exc).lower():
            bucket = self.root.split("/", 1)[0]
            msg = (f"cannot {action} {where}: bucket {bucket!r} does not exist at endpoint {endpoint}; "
                   f"create it or fix the store URI")
        elif isinstance(exc, FileNotFoundError):
            msg = f"cannot {action} {where}: not found"
        elif self._is_s3 and (isinstance(exc, PermissionError) or names & {"AccessDenied", "InvalidAccessKeyId"}):
            return CredentialsError(f"cannot {action} {where}: permission denied; check the credentials "
                                    f"(AWS_ACCESS_KEY_ID / AWS_PROFILE or storage_options) and the bucket policy {detail}")
        elif isinstance(exc, PermissionError):
            msg = f"cannot {action} {where}: permission denied; check the folder's permissions"
        elif retry.no_credentials(exc):
            return CredentialsError(
                f"cannot {action} {where}: no usable AWS credentials; set AWS_ACCESS_KEY_ID and "
                f"AWS_SECRET_ACCESS_KEY (or AWS_PROFILE), or pass key/secret in storage_options {detail}")
        elif self._is_s3 and retry.timed_out(exc):
            msg = (f"cannot {action} {where}: S3 endpoint {endpoint} did not answer within {retry.operation_seconds():g} s "
                   f"(the bound of one operation, {RETRY_ENV}); it is unreachable or too slow: check "
                   f"endpoint_url / AWS_ENDPOINT_URL and the network")
        elif self._is_s3 and retry.unreachable(exc):
            msg = (f"cannot {action} {where}: S3 endpoint {endpoint} is unreachable (retried for up to "
                   f"{retry_seconds():g} s, {RETRY_ENV}); check endpoint_url / AWS_ENDPOINT_URL and the network")
        elif self._is_s3 and retry.busy(exc):
            msg = (f"cannot {action} {where}: S3 endpoint {endpoint} kept answering {retry.error_code(exc)} "
                   f"(retried for up to {retry_seconds():g} s, {RETRY_ENV}); try again later")
        else:
            msg = f"cannot {action} {where}"
        return StoreError(f"{msg} {detail}")


def _version(info: Mapping[str, Any]) -> Version:
    """A Version from fsspec's info(): S3's ETag and LastModified, else size and mtime."""
    modified = info.get("LastModified") or info.get("mtime") or info.get("created") or 0.0
    if isinstance(modified, datetime):
        modified = modified.timestamp()
    tag = info.get("ETag") or f"{info.get('size')}-{modified}"
    return Version(str(tag), float(modified))


def _rel(*parts: str) -> str:
    """Normalized relative path; StoreError for absolute paths or ".."."""
    pieces = []
    for part in parts:
        for piece in str(part).replace("\\", "/").split("/"):
            if piece in ("", "."):
                continue
            if piece == "..":
                raise StoreError(f"store path {'/'.join(map(str, parts))!r} must not contain '..'")
            pieces.append(piece)
    return "/".join(pieces)


def _conform(table: pa.Table, schema: pa.Schema, what: str) -> pa.Table:
    """`table` with exactly `schema` (names, order, types, nullability) or StoreError naming the
    columns that differ."""
    have = {f.name: f for f in table.schema}
    missing = [n for n in schema.names if n not in have]
    extra = [n for n in have if n not in schema.names]
    wrong = [f"{f.name} ({have[f.name].type}, expected {f.type})" for f in schema
             if f.name in have and not have[f.name].type.equals(f.type)]
    if missing or extra or wrong:
        parts = ([f"missing column(s) {missing}"] if missing else []) + \
                ([f"unknown column(s) {extra}"] if extra else []) + \
                ([f"wrong type(s): {', '.join(wrong)}"] if wrong else [])
        raise StoreError(f"{what} does not fit the record schema: {'; '.join(parts)}")
    table = table.select(schema.names)
    for f in schema:
        if not f.nullable and table.column(f.name).null_count:
            raise StoreError(f"{what}: column {f.name!r} has nulls but is required")
    return pa.Table.from_arrays(table.columns, schema=schema.with_metadata(table.schema.metadata or {}))


def _subschema(columns: list[str]) -> pa.Schema:
    unknown = [c for c in columns if c not in RECORD_SCHEMA.names]
    if unknown:
        raise StoreError(f"unknown record column(s) {unknown}; the record schema has {RECORD_SCHEMA.names}")
    return pa.schema([RECORD_SCHEMA.field(c) for c in columns])


def _protocols(fs) -> tuple[str, ...]:
    p = fs.protocol
    return (p,) if isinstance(p, str) else tuple(p)


def _deep_copy(obj):
    # Options are plain dicts/lists/scalars (plus maybe a botocore Config): copy containers only,
    # so that filling client_kwargs never mutates the caller's dict.
    if isinstance(obj, dict):
        return {k: _deep_copy(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_deep_copy(v) for v in obj]
    return obj



"""A sealed Parquet file: its footer says what it holds, so a reader can tell a whole, unaltered
file from anything else without trusting its name.

Footer keys (prefix "robustsweep."): `rows` (the row count), `schema` (fingerprint of the
column names and types, see schema.schema_fingerprint; the check itself compares the file's
columns, so a newer writer's extra columns pass) and `sha256` (of every byte before the
footer: the data pages). The data pages do not depend on the footer's key-values, so the file
is serialized once to hash its pages, then again with the hash in its footer; the second
serialization is checked to hold the same pages.

`inspect` checks a file's bytes against its footer: truncated, corrupted in the middle (even
with the footer intact), written under another schema, with another row count, or not written
by the store at all (a stray Parquet file, one overwritten by hand) all give a reason.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.errors import StoreError
from pipeline.store.schema import schema_fingerprint

META_PREFIX = "robustsweep."
"""Prefix of the Parquet footer keys the store writes (`robustsweep.rows`, ...)."""

ROWS, SCHEMA, SHA256 = (META_PREFIX + k for k in ("rows", "schema", "sha256"))


def _serialize(table: pa.Table) -> bytes:
    buf = pa.BufferOutputStream()
    # zstd: logits and repeated strings compress several times better than with snappy, and
    # DuckDB, Spark and pandas all read it.
    pq.write_table(table, buf, compression="zstd")
    return buf.getvalue().to_pybytes()


def _body(data: bytes) -> bytes | None:
    """The bytes before the footer, or None when `data` does not end like a Parquet file."""
    if len(data) < 12 or data[:4] != b"PAR1" or data[-4:] != b"PAR1":
        return None
    footer = int.from_bytes(data[-8:-4], "little")
    if footer + 12 > len(data):
        return None
    return data[:len(data) - 8 - footer]


def seal(table: pa.Table, metadata: dict[str, str]) -> bytes:
    """The Parquet bytes of `table` with `metadata` plus rows, schema and sha256 in its footer."""
    kv = dict(metadata)
    kv[ROWS] = str(table.num_rows)
    kv[SCHEMA] = schema_fingerprint(table.schema)
    merged = dict(table.schema.metadata or {})
    merged.update({k.encode(): v.encode() for k, v in kv.items()})
    first = _serialize(table.replace_schema_metadata(merged))
    body = _body(first)
    merged[SHA256.encode()] = hashlib.sha256(body).hexdigest().encode()
    data = _serialize(table.replace_schema_metadata(merged))
    if data[:len(body)] != body:  # the writer changed the pages between two identical calls
        raise StoreError("the Parquet writer is not deterministic; cannot seal the file")
    return data


@dataclass(frozen=True)
class Footer:
    """What a sealed file's footer promises."""

    rows: int
    metadata: dict[str, str]

    def get(self, key: str, default: str | None = None) -> str | None:
        return self.metadata.get(key if key.startswith(META_PREFIX) else META_PREFIX + key, default)


def inspect(data: bytes, *, schema: pa.Schema | None = None, expected_rows: int | None = None,
            expect: dict[str, str] | None = None) -> tuple[str | None, Footer | None]:
    """(reason, footer): reason is None for a whole sealed file that matches; else it says what
    is wrong in a few words (e.g. "truncated", "content does not match its checksum").

    schema: the columns the file must have (its fingerprint and its Arrow schema).
    expected_rows: the row count it must hold. expect: footer values it must carry (unit_id, ...).
    """
    body = _body(data)
    if body is None:
        return "truncated or not a Parquet file", None
    try:
        md = pq.read_metadata(pa.BufferReader(data))
        meta = {k.decode(): v.decode() for k, v in (md.metadata or {}).items()}
        arrow = md.schema.to_arrow_schema()
    except Exception as exc:  # ArrowInvalid, OSError, UnicodeDecodeError
        return f"unreadable footer ({type(exc).__name__})", None
    if SHA256 not in meta or ROWS not in meta:
        return "not written by robustsweep (no checksum in its footer)", None
    try:
        footer = Footer(int(meta[ROWS]), meta)
    except ValueError:
        return f"bad row count {meta[ROWS]!r} in its footer", None
    if md.num_rows != footer.rows:
        return f"holds {md.num_rows} rows, its footer promises {footer.rows}", footer
    if expected_rows is not None and footer.rows != expected_rows:
        return f"holds {footer.rows} rows, the unit has {expected_rows}", footer
    if schema is not None and (missing := _missing_columns(arrow, schema)):
        return f"written under another record schema (no column {', '.join(missing[:3])})", footer
    for key, value in (expect or {}).items():
        if footer.get(key) != value:
            return f"footer {key} is {footer.get(key)!r}, expected {value!r}", footer
    if hashlib.sha256(body).hexdigest() != meta[SHA256]:
        return "content does not match its checksum (corrupted)", footer
    return None, footer


def _missing_columns(have: pa.Schema, want: pa.Schema) -> list[str]:
    """Columns of `want` that `have` lacks or holds with another type ("name type"). Extra
    columns are fine: a newer writer's file still holds every column this version reads."""
    fields = {f.name: f for f in have}
    return [f"{f.name} {f.type}" for f in want
            if f.name not in fields or schema_fingerprint(pa.schema([fields[f.name]])) != schema_fingerprint(pa.schema([f]))]

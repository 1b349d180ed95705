"""Where the analytics read from: the records of one or more run folders as the DuckDB view
`results`, local or on S3, without loading them into Python first.

DuckDB reads the Parquet files itself. For an object store it goes through the run's fsspec
filesystem (`register_filesystem`), so no DuckDB extension is needed. Hive partitioning is
off because the `defense=` / `attack=` folders would otherwise add columns that clash with the
record columns of the same names.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import duckdb
import pyarrow as pa

from pipeline.errors import InputError, StoreError
from pipeline.store import RECORD_SCHEMA, Store

VIEW = "results"
"""Name of the view that holds the records in every connection made here."""

Source = duckdb.DuckDBPyConnection | pa.Table
"""What the analytics functions accept: a connection with the view `results`, or a records table."""


def run_stores(uris: Sequence[str], endpoint_url: str | None = None,
               storage_options: Mapping[str, Any] | None = None) -> list[Store]:
    """One Store per distinct run folder URI (order kept, duplicates dropped: a run given twice
    must not count twice)."""
    if not uris:
        raise InputError("no run folder given; pass one or more {out}/{run_id} folders")
    seen, stores = set(), []
    for uri in uris:
        store = Store(uri, storage_options=storage_options, endpoint_url=endpoint_url)
        if store.uri not in seen:
            seen.add(store.uri)
            stores.append(store)
    return stores


def record_files(store: Store, require: bool = True) -> list[str]:
    """Full paths (fsspec form, e.g. "bucket/prefix/run/records/...parquet" or a local path) of
    the committed record files of one run folder, sorted.

    require: raise InputError when the folder holds neither records nor a plan.json (the URI is
    most likely not a run folder); a run with a plan but no records yet gives [].
    """
    rels = store.list("records", ".parquet")
    if not rels and require and not store.exists("plan.json"):
        raise InputError(f"{store.uri} is not a run folder: it has no plan.json and no records/*.parquet "
                         f"(expected {{out}}/{{run_id}}, e.g. results/demo-759353b7)")
    root = store.fs._strip_protocol(store.root).rstrip("/")
    return [f"{root}/{rel}" for rel in rels]


def connect(uris: Sequence[str], *, endpoint_url: str | None = None,
            storage_options: Mapping[str, Any] | None = None, require: bool = True,
            threads: int | None = None) -> duckdb.DuckDBPyConnection:
    """A DuckDB connection whose view `results` holds every record of the run folders `uris`
    (local paths or s3://...; several runs are combined into one view).

    Columns are those of RECORD_SCHEMA (pipeline.store.schema). The caller closes the connection.
    require: see `record_files`. threads: DuckDB worker threads (default: all cores).
    Raises InputError for a URI that is not a run folder, StoreError when a store cannot be read.
    """
    stores = run_stores(uris, endpoint_url, storage_options)
    con = duckdb.connect()
    if threads is not None:
        con.execute(f"SET threads = {int(threads)}")
    files: list[str] = []
    registered: dict[str, Any] = {}
    try:
        for store in stores:
            paths = record_files(store, require=require)
            if "://" not in store.uri:  # a local folder: DuckDB reads the paths itself
                files += paths
                continue
            protocol = store.uri.split("://", 1)[0]
            # One filesystem per protocol is all DuckDB can hold; s3fs caches its instances by
            # options, so stores on one endpoint share the same object.
            if protocol in registered and registered[protocol] is not store.fs:
                raise InputError(f"{store.uri}: runs on {protocol}:// must share one endpoint and credentials "
                                 f"to be read together")
            if protocol not in registered:
                con.register_filesystem(store.fs)
                registered[protocol] = store.fs
            files += [f"{protocol}://{p}" for p in paths]
        if files:
            listed = ", ".join("'" + f.replace("'", "''") + "'" for f in files)
            # The record columns by name: a file with extra columns (a newer writer) still reads, in
            # any order, without union_by_name, which reads every footer before the first row and
            # makes a report over 10,000 unit files about twice as slow.
            names = ", ".join(f'"{n}"' for n in RECORD_SCHEMA.names)
            con.execute(f"CREATE VIEW {VIEW} AS SELECT {names} FROM read_parquet([{listed}], "
                        f"hive_partitioning=false)")
        else:
            # No records yet: an empty view with the record columns, so every query still runs.
            con.register("_empty", RECORD_SCHEMA.empty_table())
            con.execute(f"CREATE VIEW {VIEW} AS SELECT * FROM _empty")
    except duckdb.Error as exc:
        con.close()
        raise StoreError(f"cannot read the records of {', '.join(s.uri for s in stores)}: {exc}") from None
    except BaseException:
        con.close()
        raise
    return con


def connect_table(table: pa.Table) -> duckdb.DuckDBPyConnection:
    """A DuckDB connection whose view `results` is `table` (records, e.g. from Store.read_records)."""
    con = duckdb.connect()
    con.register(VIEW, table)
    return con


def as_connection(source: Source) -> tuple[duckdb.DuckDBPyConnection, bool]:
    """(connection, owned): a connection for `source`; owned means the caller must close it."""
    if isinstance(source, pa.Table):
        return connect_table(source), True
    if isinstance(source, duckdb.DuckDBPyConnection):
        return source, False
    raise TypeError(f"expected a duckdb connection with a view {VIEW!r} or a pyarrow Table, got {type(source).__name__}")


def columns_of(con: duckdb.DuckDBPyConnection) -> list[str]:
    """Column names of the view `results`."""
    return [row[0] for row in con.execute(f"DESCRIBE {VIEW}").fetchall()]


def open_runs(uris: Sequence[str], endpoint_url: str | None = None,
              storage_options: Mapping[str, Any] | None = None) -> list[tuple[Store, dict | None]]:
    """(store, plan) per distinct run folder; plan is its plan.json, or None where there is
    none (a folder of records written by hand)."""
    return [(store, store.read_json("plan.json") if store.exists("plan.json") else None)
            for store in run_stores(uris, endpoint_url, storage_options)]

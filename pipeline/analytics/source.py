"""Where the analytics read from: the records of one or more run folders as the DuckDB view
`results`, local or on S3, without loading them into Python first.

Every record file is checked against its seal before DuckDB sees it (pipeline.store.verify):
bad files are refused by name or skipped, a unit present twice is read once. DuckDB then reads
the Parquet files itself. For an object store it goes through the run's fsspec
filesystem (`register_filesystem`), so no DuckDB extension is needed. Hive partitioning is
off because the `defense=` / `attack=` folders would otherwise add columns that clash with the
record columns of the same names.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import duckdb
import pyarrow as pa

from pipeline.errors import InputError, StoreError
from pipeline.store import RECORD_SCHEMA, Store
from pipeline.store.binding import read_plan
from pipeline.store.verify import verify_runs

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


def check_folders(stores: Sequence[Store], require: bool = True) -> None:
    """InputError for a folder that holds neither records nor a plan.json (the URI is most
    likely not a run folder); with require False, or a plan but no records yet, nothing."""
    for store in stores if require else ():
        if not store.list("records", ".parquet") and not store.exists("plan.json"):
            raise InputError(f"{store.uri} is not a run folder: it has no plan.json and no records/*.parquet "
                             f"(expected {{out}}/{{run_id}}, e.g. results/demo-759353b7)")


def record_files(store: Store, require: bool = True, *, skip_bad: bool = False) -> list[str]:
    """Full paths (fsspec form, e.g. "bucket/prefix/run/records/...parquet" or a local path) of
    the record files of one run folder that pass their checks, one per unit, sorted.

    require: see `check_folders`. Bad files: BadFileError naming them, unless skip_bad.
    """
    check_folders([store], require)
    return [store.path(rel) for _, rel in verify_runs([store], skip_bad=skip_bad).files]


def connect(uris: Sequence[str], *, endpoint_url: str | None = None,
            storage_options: Mapping[str, Any] | None = None, require: bool = True,
            threads: int | None = None, skip_bad: bool = False, notes: list[str] | None = None,
            pool_check: bool = True, read_only: bool = False) -> duckdb.DuckDBPyConnection:
    """A DuckDB connection whose view `results` holds every record of the run folders `uris`
    (local paths or s3://...; several runs are combined into one view).

    Columns are those of RECORD_SCHEMA (pipeline.store.schema). The caller closes the connection.
    Every record file is checked against its seal first (pipeline.store.verify): a bad one
    raises BadFileError naming it unless skip_bad, and a unit present twice (a copied file, a
    run given twice) is read once. What was left out goes to `notes` (a list the caller
    prints), or is issued as warnings when notes is None.
    pool_check: InputError when one label (defense, attack, eps) holds rows of two jobs.
    read_only: lock the connection so that it reads the checked record files and nothing else
        (`lock_down`); what it may run is for the caller to check (pipeline.analytics.sql).
    require: see `check_folders`. threads: DuckDB worker threads (default: all cores).
    Raises InputError for a URI that is not a run folder, StoreError when a store cannot be read.
    """
    stores = run_stores(uris, endpoint_url, storage_options)
    check_folders(stores, require)
    verified = verify_runs(stores, skip_bad=skip_bad)
    if notes is None:
        for line in verified.notes():
            warnings.warn(line, stacklevel=2)
    else:
        notes.extend(verified.notes())
    con = duckdb.connect()
    if threads is not None:
        con.execute(f"SET threads = {int(threads)}")
    files: list[str] = []
    registered: dict[str, Any] = {}
    try:
        for store, rel in verified.files:
            path = store.path(rel)
            if "://" not in store.uri:  # a local folder: DuckDB reads the paths itself
                files.append(path)
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
            files.append(f"{protocol}://{path}")
        if files:
            listed = ", ".join("'" + literal(f).replace("'", "''") + "'" for f in files)
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
        if pool_check:
            check_one_job_per_label(con)
        if read_only:
            lock_down(con, files)
    except duckdb.Error as exc:
        con.close()
        raise StoreError(f"cannot read the records of {', '.join(s.uri for s in stores)}: {exc}") from None
    except BaseException:
        con.close()
        raise
    return con


def literal(path: str) -> str:
    """`path` as a DuckDB file pattern that matches only itself: DuckDB globs every path it is
    given, so a run folder named runs[1] would read runs1's files, and runs* every sibling's."""
    return re.sub(r"([\[*?])", r"[\1]", path)


def lock_down(con: duckdb.DuckDBPyConnection, files: Sequence[str]) -> None:
    """No file access but reading `files` (the view's), and no way to change that back:
    DuckDB's enable_external_access off, allowed_paths the files, configuration locked."""
    # The view names each file as a literal glob pattern, which DuckDB checks too.
    allowed = list(files) + [literal(f) for f in files if literal(f) != f]
    listed = ", ".join("'" + f.replace("'", "''") + "'" for f in allowed)
    con.execute(f"SET allowed_paths = [{listed}]")
    con.execute("SET enable_external_access = false")
    con.execute("SET lock_configuration = true")


def check_one_job_per_label(con: duckdb.DuckDBPyConnection) -> None:
    """InputError when rows of two jobs (job_hash) share a label (defense, attack, eps): a
    report would pool different settings under one name."""
    mixed = con.execute(
        f"SELECT defense, attack, eps, list(DISTINCT job_hash ORDER BY job_hash), list(DISTINCT run_id ORDER BY run_id) "
        f"FROM {VIEW} GROUP BY ALL HAVING count(DISTINCT job_hash) > 1 ORDER BY ALL LIMIT 5").fetchall()
    if mixed:
        shown = "; ".join(f"{d} / {a} at eps {e:g}: jobs {', '.join(j)} (runs {', '.join(r)})"
                          for d, a, e, j, r in mixed)
        raise InputError(f"rows of different jobs share a label, so they would be pooled as one: {shown}. Report "
                         f"the runs apart, or name the defenses or attacks of one job differently (`name = ...`)")


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
    return [(store, read_plan(store)) for store in run_stores(uris, endpoint_url, storage_options)]

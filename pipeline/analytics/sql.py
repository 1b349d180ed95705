"""SQL over a run's records: DuckDB with the records as the view `results`.

    run_sql(["results/demo-759353b7"], "SELECT defense, avg(adv_correct::INT) FROM results GROUP BY ALL")

Local folders and s3:// both work (S3 through the store's fsspec filesystem; see
pipeline.analytics.source), read-only unless asked otherwise (`unsafe`). The result is an Arrow table; `render_arrow`, `arrow_csv` and
`arrow_json` print it.
"""

from __future__ import annotations

import csv
import decimal
import io
import json
import re
from collections.abc import Mapping, Sequence
from typing import Any

import duckdb
import pyarrow as pa
from rich.table import Table
from rich.text import Text

from pipeline.analytics.source import connect
from pipeline.errors import InputError, StoreError


def query(con: duckdb.DuckDBPyConnection, sql: str) -> pa.Table:
    """Run one SQL text on `con`; its last statement's result as an Arrow table (empty when the
    statement returns nothing, e.g. CREATE). InputError (with DuckDB's message, which points at
    the offending token) for SQL that does not parse, names an unknown table or column, or
    fails on the data; StoreError when a file cannot be read."""
    if not sql.strip():
        raise InputError("empty SQL query; give e.g. \"SELECT defense, count(*) FROM results GROUP BY ALL\"")
    try:
        relation = con.sql(sql)  # a relation for a query; None for a statement without rows
        return pa.table({}) if relation is None else relation.to_arrow_table()
    except duckdb.IOException as exc:
        raise StoreError(f"cannot read the records: {exc}") from None
    except duckdb.Error as exc:
        raise InputError(f"bad SQL: {exc}\n(the records are the view `results`; its columns are the record "
                         f"schema's: run `DESCRIBE results`)") from None


READ_ONLY = (duckdb.StatementType.SELECT,)
# EXPLAIN, EXPLAIN ANALYZE, and either with options: EXPLAIN (FORMAT JSON) SELECT ...
_EXPLAIN = re.compile(r"^\s*explain\s*(analyze\s*)?(\([^)]*\)\s*)?", re.IGNORECASE)


def check_read_only(con: duckdb.DuckDBPyConnection, sql: str) -> None:
    """InputError unless every statement of `sql` only reads: SELECT (with DESCRIBE, SHOW,
    SUMMARIZE, FROM-first), or EXPLAIN of one. COPY, ATTACH, CREATE, INSERT, SET, PRAGMA,
    INSTALL/LOAD, EXPORT and the rest are refused."""
    try:
        statements = con.extract_statements(sql)
    except duckdb.Error as exc:
        raise InputError(f"bad SQL: {exc}") from None
    for st in statements:
        kind = st.type
        if kind == duckdb.StatementType.EXPLAIN:  # EXPLAIN ANALYZE runs its statement: judge that one
            inner = _EXPLAIN.sub("", st.query, count=1)
            try:
                kinds = [s.type for s in con.extract_statements(inner)] if inner != st.query else [kind]
            except duckdb.Error as exc:  # an EXPLAIN whose statement cannot be told apart is not run
                raise InputError(f"bad SQL: cannot tell what {st.query.strip()[:80]!r} explains: {exc}") from None
            kind = next((k for k in kinds if k not in READ_ONLY), duckdb.StatementType.SELECT)
        if kind not in READ_ONLY:
            raise InputError(f"sql is read-only: {kind.name} statements are refused (only SELECT, DESCRIBE, SHOW, "
                             f"SUMMARIZE and EXPLAIN of those run); pass --unsafe to lift this (it may then write "
                             f"files with the store's credentials)")


def run_sql(uris: Sequence[str], sql: str, *, endpoint_url: str | None = None,
            storage_options: Mapping[str, Any] | None = None, unsafe: bool = False, skip_bad: bool = False,
            notes: list[str] | None = None) -> pa.Table:
    """`sql` over the records of the run folders `uris` (the view `results`), as an Arrow table.

    Read-only unless `unsafe`: only reading statements run (check_read_only), and DuckDB may
    open no file but the run's checked record files (source.lock_down). skip_bad and notes:
    see source.connect."""
    con = connect(uris, endpoint_url=endpoint_url, storage_options=storage_options, skip_bad=skip_bad,
                  notes=notes, pool_check=False, read_only=not unsafe)
    try:
        if not unsafe:
            check_read_only(con, sql)
        return query(con, sql)
    finally:
        con.close()


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.6g}"
    if isinstance(value, (list, dict)):
        return json.dumps(value, default=str)
    return str(value)


def render_arrow(table: pa.Table, max_rows: int | None = 1000) -> Table:
    """A rich table of a query result (the first `max_rows` rows; the caption says how many)."""
    out = Table(caption=(f"{table.num_rows} rows" + (f", first {max_rows} shown"
                                                       if max_rows is not None and table.num_rows > max_rows else "")))
    for field in table.schema:
        numeric = pa.types.is_integer(field.type) or pa.types.is_floating(field.type)
        out.add_column(Text(field.name), justify="right" if numeric else "left")
    shown = table if max_rows is None else table.slice(0, max_rows)
    for row in shown.to_pylist():
        out.add_row(*(Text(_cell(v)) for v in row.values()))  # query results are text, never console markup
    return out


def arrow_csv(table: pa.Table) -> str:
    """CSV of a query result: header, one line per row; lists and structs as JSON text."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(table.column_names)
    for row in table.to_pylist():
        writer.writerow(["" if v is None else json.dumps(v, default=str) if isinstance(v, (list, dict)) else v
                         for v in row.values()])
    return buf.getvalue()


def _plain(value: Any) -> Any:
    # sum() of integers is a 128-bit integer in DuckDB, a Decimal in Python: JSON wants a number.
    if isinstance(value, decimal.Decimal):
        return int(value) if value == value.to_integral_value() else float(value)
    return str(value)


def arrow_json(table: pa.Table) -> str:
    """JSON of a query result: a list of {column: value} objects (decimals as numbers, dates
    and other values without a JSON type as text)."""
    return json.dumps(table.to_pylist(), indent=2, default=_plain)

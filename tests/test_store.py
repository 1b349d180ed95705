"""The results store on local disk and on a real S3 endpoint (moto's server on loopback)."""

from __future__ import annotations

import os
import socket

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.errors import StoreError
from pipeline.store import COLUMNS, RECORD_SCHEMA, Store, records_to_table
from pipeline.store import io as store_io

CONSTANTS = {"run_id": "run-1", "job_hash": "job-abc", "unit_id": "u0001", "worker": "worker-0", "config_hash": "cfg-abc"}


def fake_records(n: int = 6, *, seed: int = 0, defense: str = "rdc", attack: str = "pgd", eps: float = 8 / 255,
                 K: int = 10, passes: int = 3) -> list[dict]:
    """Records shaped like pipeline.protocol.Record.as_dict()'s (all columns but CONSTANTS),
    with consistent values: predictions are argmaxes of the logits, correctness follows."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        label = int(rng.integers(K))
        clean = rng.normal(size=K).astype(np.float32)
        adv = clean + rng.normal(scale=0.5, size=K).astype(np.float32)
        cp, ap = int(clean.argmax()), int(adv.argmax())
        delta = rng.uniform(-eps, eps, size=(3, 8, 8))
        out.append({
            "example_id": 100 + i, "label": label, "defense": defense, "attack": attack, "path": "full",
            "norm": "Linf", "eps": eps, "seed": 7, "passes": passes,
            "clean_pred": cp, "clean_correct": cp == label, "clean_vote_pred": cp,
            "clean_vote_correct": cp == label, "clean_worst_correct": cp == label,
            "clean_pass_accuracy": float(cp == label),
            "adv_pred": ap, "adv_correct": ap == label, "adv_vote_pred": ap, "adv_vote_correct": ap == label,
            "adv_worst_correct": ap == label, "adv_pass_accuracy": float(ap == label),
            "clean_logits": [float(v) for v in clean], "adv_logits": [float(v) for v in adv],
            "linf": float(np.abs(delta).max()), "l2": float(np.sqrt((delta ** 2).sum())),
            "l1": float(np.abs(delta).sum()),
            "broken_by": "apgd-ce" if ap != label else None, "attack_success": ap != label if i % 2 else None,
            "queries": 20, "gradients": 20 * passes, "forward_passes": 21 * passes, "backward_passes": 20 * passes,
            "seconds": 0.01 * (i + 1), "device": "cpu", "flags": ["zero_gradient"] if i == 0 else [],
        })
    return out


def fake_table(n: int = 6, **kw) -> pa.Table:
    return records_to_table(fake_records(n, **kw), **CONSTANTS)


def free_port() -> int:
    """A loopback port with nothing listening (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(params=["local", pytest.param("s3", marks=pytest.mark.slow)])
def store(request, tmp_path) -> Store:
    if request.param == "local":
        return Store(str(tmp_path / "out"))
    server = request.getfixturevalue("s3_server")
    bucket = request.getfixturevalue("s3_bucket")
    return Store(f"{bucket}/out", storage_options=server.storage_options)


# -- schema ----------------------------------------------------------------------------------------


def test_records_to_table_fills_constants_and_types():
    recs = fake_records(4)
    t = records_to_table(recs, **CONSTANTS)
    assert t.schema.equals(RECORD_SCHEMA)
    assert t.num_rows == 4
    assert t.column("run_id").to_pylist() == ["run-1"] * 4
    assert t.column("example_id").to_pylist() == [100, 101, 102, 103]
    assert t.column("adv_logits").to_pylist()[1] == pytest.approx(recs[1]["adv_logits"], rel=1e-6)
    assert t.schema.field("broken_by").nullable and not t.schema.field("eps").nullable
    assert [c[0] for c in COLUMNS] == RECORD_SCHEMA.names and all(c[2] for c in COLUMNS)
    assert records_to_table([], **CONSTANTS).num_rows == 0


def test_records_to_table_names_the_bad_field():
    recs = fake_records(2)
    del recs[1]["l2"]
    with pytest.raises(StoreError, match="l2"):
        records_to_table(recs, **CONSTANTS)
    recs = fake_records(2)
    recs[0]["bogus"] = 1
    with pytest.raises(StoreError, match="bogus"):
        records_to_table(recs, **CONSTANTS)
    with pytest.raises(StoreError, match="worker"):  # a constant left out is a missing field
        records_to_table(fake_records(2), run_id="r", job_hash="j", unit_id="u", config_hash="c")
    with pytest.raises(StoreError, match="nonsense"):
        records_to_table(fake_records(2), nonsense=1, **CONSTANTS)
    recs = fake_records(2)
    recs[1]["seed"] = None
    with pytest.raises(StoreError, match="seed"):
        records_to_table(recs, **CONSTANTS)
    recs = fake_records(2)
    recs[0]["eps"] = "big"
    with pytest.raises(StoreError, match="eps"):
        records_to_table(recs, **CONSTANTS)
    # A column both in the records and constant: fine when equal, an error when not.
    assert records_to_table(fake_records(2), device="cpu", **CONSTANTS).num_rows == 2
    with pytest.raises(StoreError, match="device"):
        records_to_table(fake_records(2), device="cuda:0", **CONSTANTS)


# -- both backends ---------------------------------------------------------------------------------


def test_write_read_round_trip(store):
    t = fake_table(6)
    store.write_table("records/defense=rdc/unit-1.parquet", t, {"unit_id": "u0001", "robustsweep.attempt": 2})
    assert store.committed("records/defense=rdc/unit-1.parquet", expected_rows=6)
    back = store.read_table("records/defense=rdc/unit-1.parquet")
    meta = back.schema.metadata
    assert meta[b"robustsweep.rows"] == b"6" and meta[b"robustsweep.unit_id"] == b"u0001"
    assert meta[b"robustsweep.attempt"] == b"2"
    assert back.replace_schema_metadata(None).equals(t)

    store.write_table("records/defense=mi/unit-2.parquet", fake_table(3, seed=1, defense="mi"), {})
    assert store.list("records", ".parquet") == ["records/defense=mi/unit-2.parquet",
                                                  "records/defense=rdc/unit-1.parquet"]
    allrec = store.read_records()
    assert allrec.schema.equals(RECORD_SCHEMA) and allrec.num_rows == 9
    assert sorted(set(allrec.column("defense").to_pylist())) == ["mi", "rdc"]
    few = store.read_records(columns=["defense", "adv_correct"])
    assert few.column_names == ["defense", "adv_correct"] and few.num_rows == 9
    assert store.read_records("nothing-here").schema.equals(RECORD_SCHEMA)
    assert store.read_records("nothing-here").num_rows == 0
    assert store.join("records", "x.parquet") == store.uri + "/records/x.parquet"


def test_committed_false_for_missing_truncated_and_mismatch(store):
    assert not store.committed("records/nope.parquet")
    t = fake_table(5)
    store.write_table("a.parquet", t, {})
    assert store.committed("a.parquet") and store.committed("a.parquet", expected_rows=5)
    assert not store.committed("a.parquet", expected_rows=4)  # the unit expected other rows
    whole = store.fs.cat_file(store.path("a.parquet"))
    store.fs.pipe_file(store.path("half.parquet"), whole[: len(whole) // 2])
    assert not store.committed("half.parquet")
    store.fs.pipe_file(store.path("cut.parquet"), whole[:-3])
    assert not store.committed("cut.parquet")
    store.fs.pipe_file(store.path("junk.parquet"), b"PAR1" + b"\x00" * 40 + b"PAR1")
    assert not store.committed("junk.parquet")
    # A whole Parquet file whose footer promises another row count.
    lie = t.replace_schema_metadata({"robustsweep.rows": "7"})
    sink = pa.BufferOutputStream()
    pq.write_table(lie, sink)
    store.fs.pipe_file(store.path("lie.parquet"), sink.getvalue().to_pybytes())
    assert not store.committed("lie.parquet")
    # Not written by the store at all (no robustsweep.rows).
    sink = pa.BufferOutputStream()
    pq.write_table(t, sink)
    store.fs.pipe_file(store.path("foreign.parquet"), sink.getvalue().to_pybytes())
    assert not store.committed("foreign.parquet")
    with pytest.raises(StoreError, match="half.parquet"):
        store.read_records("")  # a corrupt file is reported, never silently dropped


def test_json_round_trip_and_errors(store):
    plan = {"run_id": "r1", "units": [{"id": "u1", "eps": 0.03137}], "n": 3}
    store.write_json("plan.json", plan)
    assert store.read_json("plan.json") == plan and store.exists("plan.json")
    assert not store.exists("other.json")
    with pytest.raises(StoreError, match="other.json"):
        store.read_json("other.json")
    store.fs.pipe_file(store.path("bad.json"), b"{not json")
    with pytest.raises(StoreError, match="bad.json.*not valid JSON"):
        store.read_json("bad.json")
    with pytest.raises(StoreError, match="JSON"):
        store.write_json("nan.json", {"x": float("nan")})
    assert not store.exists("nan.json")
    with pytest.raises(StoreError, match=r"\.\."):
        store.write_json("../escape.json", {})


# -- local atomicity -------------------------------------------------------------------------------


def test_local_write_leaves_no_temp_files(tmp_path):
    st = Store(str(tmp_path))
    for i in range(3):
        st.write_table(f"records/d=x/unit-{i}.parquet", fake_table(2, seed=i), {"i": i})
    st.write_json("plan.json", {"a": 1})
    names = sorted(p.name for p in tmp_path.rglob("*") if p.is_file())
    assert names == ["plan.json", "unit-0.parquet", "unit-1.parquet", "unit-2.parquet"]
    assert st.mtime("plan.json") == pytest.approx(os.path.getmtime(tmp_path / "plan.json"))


def test_local_failed_write_leaves_nothing(tmp_path, monkeypatch):
    st = Store(str(tmp_path))
    bad = fake_table(3).drop_columns(["l1"]).append_column("l1", pa.array(["x"] * 3))
    with pytest.raises(StoreError, match="l1"):
        st.write_table("records/u.parquet", bad, {})
    assert not st.exists("records/u.parquet")

    # A crash half way through serializing: the temp file holds some bytes, then it fails.
    st.write_table("records/u.parquet", fake_table(3), {"v": "old"})
    def half_then_fail(table, where, **kw):
        where.write(b"PAR1 partial bytes")
        raise OSError("disk full")
    monkeypatch.setattr(store_io.pq, "write_table", half_then_fail)
    with pytest.raises(StoreError, match="disk full"):
        st.write_table("records/u.parquet", fake_table(4), {"v": "new"})
    monkeypatch.undo()
    files = [p.name for p in tmp_path.rglob("*") if p.is_file()]
    assert files == ["u.parquet"]  # old file intact, no temp left
    assert st.committed("records/u.parquet", expected_rows=3)
    assert st.read_table("records/u.parquet").schema.metadata[b"robustsweep.v"] == b"old"


def test_local_bad_schema_refused_unless_schema_none(tmp_path):
    st = Store(str(tmp_path))
    other = pa.table({"a": [1, 2]})
    with pytest.raises(StoreError, match="missing column"):
        st.write_table("t.parquet", other, {})
    st.write_table("t.parquet", other, {"k": "v"}, schema=None)
    assert st.committed("t.parquet", expected_rows=2, schema=None)
    assert not st.committed("t.parquet", expected_rows=2)  # sealed, but not a record file


# -- S3 ----------------------------------------------------------------------------------------


def test_s3_write_is_one_put_of_the_whole_object(s3_server, s3_bucket, monkeypatch):
    from slowproxy import SlowProxy

    host, port = s3_server.endpoint_url.removeprefix("http://").rsplit(":", 1)
    with SlowProxy((host, int(port)), lifetime=60) as proxy:
        st = Store(f"{s3_bucket}/run", endpoint_url=proxy.url, storage_options=s3_server.storage_options)
        t = fake_table(50)
        st.write_table("records/u.parquet", t, {})
        puts = [r for r in proxy.requests if not r.startswith(("HEAD ", "GET "))]
    # No multipart: the object appears whole or not at all.
    assert len(puts) == 1 and puts[0].startswith(f"PUT /{s3_bucket[5:]}/run/records/u.parquet "), proxy.requests
    fs = s3_server.filesystem()
    fs.invalidate_cache()
    body = fs.cat_file(f"{s3_bucket[5:]}/run/records/u.parquet")
    assert pq.read_table(pa.BufferReader(body)).num_rows == 50
    assert pq.read_metadata(pa.BufferReader(body)).num_rows == 50


def test_duckdb_reads_s3_records_like_pyarrow(s3_server, s3_bucket):
    st = Store(f"{s3_bucket}/prefix", storage_options=s3_server.storage_options)
    for i, defense in enumerate(["rdc", "mi", "plain"]):
        st.write_table(f"records/defense={defense}/attack=pgd/unit-{i}.parquet",
                       fake_table(7 + i, seed=i, defense=defense), {})
    arrow = st.read_records()
    con = duckdb.connect()
    con.register_filesystem(s3_server.filesystem())
    count, correct = con.execute(
        f"SELECT count(*), sum(adv_correct::INT) FROM read_parquet('{s3_bucket}/prefix/records/**/*.parquet')"
    ).fetchone()
    assert count == arrow.num_rows == 24
    assert correct == sum(arrow.column("adv_correct").to_pylist())


def test_endpoint_and_credentials_from_env(s3_server, s3_bucket, monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server.endpoint_url)
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    st = Store(s3_bucket + "/envrun")  # key/secret: the "testing" env vars conftest set
    st.write_json("plan.json", {"ok": True})
    assert Store(s3_bucket + "/envrun", storage_options=s3_server.storage_options).read_json("plan.json") == {"ok": True}


def test_credentials_never_shown(s3_server, s3_bucket, monkeypatch):
    monkeypatch.setenv("ROBUSTSWEEP_S3_RETRY_SECONDS", "0")  # no backoff: the endpoint stays dead
    key, secret = "AKIADISTINCTIVEKEY42", "Sup3r/S3cret+Value-do-not-leak"
    opts = {**s3_server.storage_options, "key": key, "secret": secret}
    st = Store(f"{s3_bucket}/x", storage_options=opts)
    for text in (repr(st), str(st)):
        assert key not in text and secret not in text and "***" in text
    assert s3_server.endpoint_url in repr(st)  # the endpoint itself is useful and not secret

    # Missing bucket: actionable, names the bucket, no credentials.
    gone = Store("s3://no-such-bucket-xyz/run", storage_options=opts)
    with pytest.raises(StoreError) as err:
        gone.write_json("plan.json", {})
    msg = str(err.value)
    assert "no-such-bucket-xyz" in msg and "does not exist" in msg
    assert key not in msg and secret not in msg

    # Unreachable endpoint (nothing listens on the port): fails fast, says so, no credentials.
    dead = f"http://127.0.0.1:{free_port()}"
    st = Store(f"{s3_bucket}/x", endpoint_url=dead, storage_options={
        **opts, "config_kwargs": {"connect_timeout": 1, "read_timeout": 1, "retries": {"max_attempts": 0}}})
    for call in (lambda: st.write_json("plan.json", {}), lambda: st.committed("u.parquet"),
                 lambda: st.list("records")):
        with pytest.raises(StoreError) as err:
            call()
        msg = str(err.value)
        assert "unreachable" in msg and dead in msg and "EndpointConnectionError" in msg
        assert key not in msg and secret not in msg
        assert err.value.__cause__ is None and err.value.__suppress_context__
    assert secret not in repr(st)


def test_a_slow_s3_endpoint_fails_within_one_bound_naming_it(s3_server, s3_bucket, monkeypatch, tmp_path):
    """Every request held back for a minute by a proxy in front of the server: each operation
    gives up after its one bound (s3fs's and botocore's own retries inside it included) and says
    which endpoint did not answer; `status` too, as one clean error."""
    import time

    from typer.testing import CliRunner

    import pipeline.runtime.status  # noqa: F401  (imported here, so that the command's time is its own)
    from pipeline.cli import app
    from pipeline.store.retry import MIN_ATTEMPT_SECONDS, RETRY_ENV
    from slowproxy import SlowProxy

    host, port = s3_server.endpoint_url.removeprefix("http://").rsplit(":", 1)
    options = {k: v for k, v in s3_server.storage_options.items() if k != "client_kwargs"}
    with SlowProxy((host, int(port)), lifetime=90) as proxy:
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.url)
        monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
        st = Store(f"{s3_bucket}/run", storage_options=options)
        st.write_json("plan.json", {"run_id": "run", "units": []})  # through the proxy, not yet slow
        monkeypatch.setenv(RETRY_ENV, "2")
        bound = max(2, MIN_ATTEMPT_SECONDS)
        proxy.delay = 60
        for name, call in {"read": lambda: st.read_json("plan.json"), "write": lambda: st.write_json("x.json", {})}.items():
            start = time.monotonic()
            with pytest.raises(StoreError) as err:
                call()
            elapsed = time.monotonic() - start
            assert bound - 0.5 <= elapsed < bound + 4, (name, elapsed)
            assert f"S3 endpoint {proxy.url} did not answer within {bound:g} s" in str(err.value), str(err.value)
        start = time.monotonic()
        result = CliRunner().invoke(app, ["status", f"{s3_bucket}/run"])
        assert time.monotonic() - start < bound + 4
        assert result.exit_code == 1 and isinstance(result.exception, SystemExit)  # an outage: exit 1
        assert proxy.url in " ".join(result.output.split()) and "Traceback" not in result.output


def test_s3_transient_errors_are_classified_by_name_and_code():
    from botocore.exceptions import ClientError, EndpointConnectionError, ReadTimeoutError

    from pipeline.store import retry

    def client_error(code, status):
        return ClientError({"Error": {"Code": code}, "ResponseMetadata": {"HTTPStatusCode": status}}, "GetObject")

    def wrapped(inner):  # as s3fs raises them: an OSError from within the handler of botocore's
        try:
            raise inner
        except Exception:
            try:
                raise OSError("translated")
            except OSError as exc:
                return exc

    assert retry.unreachable(EndpointConnectionError(endpoint_url="http://x")) and retry.transient(wrapped(
        EndpointConnectionError(endpoint_url="http://x")))
    assert retry.timed_out(wrapped(ReadTimeoutError(endpoint_url="http://x")))
    for code, status in (("SlowDown", 503), ("InternalError", 500), ("ServiceUnavailable", 503)):
        assert retry.busy(wrapped(client_error(code, status))) and retry.transient(client_error(code, status))
    for code, status in (("NoSuchKey", 404), ("AccessDenied", 403), ("PreconditionFailed", 412)):
        assert not retry.transient(wrapped(client_error(code, status)))
    assert retry.precondition_failed(wrapped(client_error("PreconditionFailed", 412)))
    assert not retry.transient(ValueError("x")) and not retry.precondition_failed(ValueError("x"))


def test_bounded_retries_transient_errors_within_the_bound_on_a_fake_clock():
    from botocore.exceptions import EndpointConnectionError

    from pipeline.store import retry

    now = [0.0]
    timeouts = []

    def call(timeout):
        timeouts.append(timeout)
        raise EndpointConnectionError(endpoint_url="http://x")

    with pytest.raises(EndpointConnectionError):
        retry.bounded(call, 30.0, clock=lambda: now[0], sleep=lambda s: now.__setitem__(0, now[0] + s))
    assert now[0] <= 30.0 and len(timeouts) >= 4  # backed off, doubling, and stopped inside the bound
    assert all(t >= retry.MIN_ATTEMPT_SECONDS for t in timeouts) and timeouts[0] == 30.0
    calls = []
    with pytest.raises(KeyError):  # not transient: one attempt
        retry.bounded(lambda t: calls.append(t) or {}["missing"], 30.0, clock=lambda: 0.0, sleep=lambda s: None)
    assert len(calls) == 1

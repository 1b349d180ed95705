"""A results store you can trust: one run one job, every file checked, one driver per run
folder, read-only SQL, S3 faults ridden out (issue: bad input, faults and misuse)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from analytics_data import write_sweep
from pipeline.analytics import build_report, connect
from pipeline.analytics.sql import run_sql
from pipeline.cli import app
from pipeline.config.run import RunOptions
from pipeline.errors import BadFileError, InputError, LeaseHeldError, RunMismatchError, StoreError
from pipeline.store import Store
from pipeline.store.binding import check_binding, differences
from pipeline.store.lease import RunLease, current_holder
from pipeline.store.seal import inspect

ROOT = Path(__file__).resolve().parent.parent


def invoke(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def unit_files(run: str) -> list[Path]:
    return sorted(Path(run, "records").rglob("*.parquet"))


def corrupt_middle(path: Path) -> None:
    """Flip bytes in the middle of the data pages; the footer stays intact and parses."""
    data = bytearray(path.read_bytes())
    footer = int.from_bytes(data[-8:-4], "little")
    mid = (len(data) - footer - 8) // 2
    for i in range(mid, mid + 8):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))
    pq.read_metadata(path)  # the footer still reads: only the checksum can tell


def untimed(rows: list[dict]) -> list[dict]:
    """Summary rows without wall-clock seconds (a redone unit takes its own time; the rest is equal)."""
    return [{k: v for k, v in r.items() if k != "seconds_per_example"} for r in rows]


def summary(runs: list[str], **kw):
    con = connect(runs, **kw)
    try:
        return build_report(con, ["summary"])["summary"]
    finally:
        con.close()


@pytest.fixture
def run(tmp_path) -> str:
    return write_sweep(str(tmp_path / "runs" / "sweep-0001"), images=False)


# -- the seal --------------------------------------------------------------------------------------


def test_seal_tells_whole_files_from_damaged_and_foreign_ones(run, tmp_path):
    path = unit_files(run)[0]
    whole = path.read_bytes()
    reason, footer = inspect(whole)
    assert reason is None and footer.rows == 20 and footer.get("unit_id")
    assert inspect(whole[: len(whole) // 2])[0] == "truncated or not a Parquet file"
    corrupt_middle(path)
    assert inspect(path.read_bytes())[0] == "content does not match its checksum (corrupted)"
    assert inspect(whole, expected_rows=21)[0] == "holds 20 rows, the unit has 21"
    assert inspect(whole, expect={"unit_id": "other"})[0].startswith("footer unit_id is")
    plain = tmp_path / "plain.parquet"
    rows = pq.read_table(pa.BufferReader(whole))
    pq.write_table(rows.replace_schema_metadata(None), plain)  # same rows, not sealed
    assert inspect(plain.read_bytes())[0] == "not written by robustsweep (no checksum in its footer)"
    pq.write_table(rows, plain, compression="snappy")  # rewritten by another writer, old footer kept
    assert inspect(plain.read_bytes())[0] == "content does not match its checksum (corrupted)"


# -- every unit file verified ------------------------------------------------------------------------


BAD_FILES = {
    "truncated": lambda f: f.write_bytes(f.read_bytes()[: f.stat().st_size // 2]),
    "corrupted in the middle": corrupt_middle,
    "stray notes.parquet": lambda f: pq.write_table(pa.table({"note": ["hello"]}), f.parent / "notes.parquet"),
    "written by COPY TO": lambda f: pq.write_table(pq.read_table(f), f),
}


@pytest.mark.parametrize("case", sorted(BAD_FILES))
def test_report_compare_sql_status_refuse_bad_files_by_name(case, run):
    good = summary([run])
    victim = unit_files(run)[3]
    BAD_FILES[case](victim)
    bad = victim.parent / "notes.parquet" if case == "stray notes.parquet" else victim
    with pytest.raises(BadFileError) as err:
        connect([run])
    assert str(bad) in str(err.value) and "--skip-bad" in str(err.value)
    for args in (["report", run], ["compare", run, "--a", "plain-erm", "--b", "mi-pl"],
                 ["sql", run, "SELECT count(*) FROM results"], ["status", run]):
        result = invoke(*args)
        assert result.exit_code == 2, (args, result.output)
        assert bad.name in result.output and "Traceback" not in result.output
    notes: list[str] = []
    skipped = summary([run], skip_bad=True, notes=notes)
    assert notes == [f"skipped {bad}: {err.value.files[str(bad)]}"]
    if case == "stray notes.parquet":
        assert skipped == good  # nothing of the run was lost
    else:
        assert sum(r["n"] for r in skipped) == sum(r["n"] for r in good) - 20  # one unit of 20 rows left out
    result = invoke("report", run, "--skip-bad", "--section", "summary")
    assert result.exit_code == 0 and f"skipped {bad}" in " ".join(result.output.split())
    status = json.loads(invoke("status", run, "--skip-bad").stdout)
    assert len(status["skipped"]) == 1 and status["done"] == status["units"] - (case != "stray notes.parquet")


def test_a_copied_unit_file_and_a_copied_run_count_once(run, tmp_path):
    good = summary([run])
    original = unit_files(run)[0]
    shutil.copy(original, original.parent / f"{original.stem} (copy).parquet")
    copy_of_run = tmp_path / "copy-of-run"
    shutil.copytree(run, copy_of_run)
    notes: list[str] = []
    assert summary([run, str(copy_of_run)], notes=notes) == good
    assert any(n.endswith(f"(copy).parquet holds the same unit as {original}") for n in notes
               if n.startswith(f"read once: {run}"))
    # Every file of the copied run (the copy within it too) is left out for the original's.
    assert sum(n.startswith(f"read once: {copy_of_run}") for n in notes) == len(unit_files(run))
    result = invoke("report", run, copy_of_run, "--section", "summary", "--format", "json")
    assert result.exit_code == 0
    assert json.loads(result.stdout)["summary"] == json.loads(invoke("report", run, "--section", "summary",
                                                                     "--format", "json").stdout)["summary"]


def test_report_refuses_to_pool_two_jobs_under_one_label(run, tmp_path):
    other = tmp_path / "other"
    shutil.copytree(run, other)
    path = unit_files(str(other))[0]
    table = pq.read_table(path)
    table = table.set_column(table.schema.get_field_index("job_hash"), "job_hash", pa.array(["k"] * table.num_rows))
    table = table.set_column(table.schema.get_field_index("unit_id"), "unit_id", pa.array(["x"] * table.num_rows))
    Store(str(other)).write_table(str(path.relative_to(other)), table.replace_schema_metadata(None),
                                  {"unit_id": "x", "run_id": "sweep-0001", "job_hash": "k"})
    # Within a run bound to job j, that file is another job's: refused by name.
    with pytest.raises(BadFileError, match=r"rows of job 'k', not of this run's job 'j'"):
        connect([str(other)])
    # As a run of its own (job k, one unit), it reads; beside the run of job j, one label would pool two jobs.
    for f in unit_files(str(other)):
        if f != path:
            f.unlink()
    plan = json.loads((other / "plan.json").read_text())
    (other / "plan.json").write_text(json.dumps({**plan, "job_hash": "k", "units": [{**plan["units"][0], "unit_id": "x"}]}))
    with pytest.raises(InputError, match=r"rows of different jobs share a label.*jobs j, k"):
        connect([run, str(other)])
    result = invoke("report", run, other)
    assert result.exit_code == 2 and "different jobs" in result.output


# -- a run is bound to its job ---------------------------------------------------------------------


def test_check_binding_names_the_fields_that_differ(tmp_path):
    store = Store(str(tmp_path))
    job = {"data": {"limit": 8}, "attacks": [{"steps": 2, "eps": 0.03}]}
    assert check_binding(store, "r", "a", job) is None  # a new run
    plan = {"run_id": "r", "job_hash": "a", "job": job, "units": []}
    store.write_json("r/plan.json", plan)
    assert check_binding(store, "r", "a", job) == plan  # same job: resume
    edited = {"data": {"limit": 6}, "attacks": [{"steps": 5, "eps": 0.03}]}
    with pytest.raises(RunMismatchError) as err:
        check_binding(store, "r", "b", edited)
    assert "data.limit: 8 -> 6" in str(err.value) and "attacks[0].steps: 2 -> 5" in str(err.value)
    assert "--fresh" in str(err.value)
    assert differences({"a": [1, 2]}, {"a": [1]}) == ["a: [1, 2] -> [1]"]


# -- read-only SQL ---------------------------------------------------------------------------------


def test_sql_is_read_only_unless_unsafe(run, tmp_path):
    target = tmp_path / "written.parquet"
    files_before = sorted(p.name for p in Path(run).rglob("*"))
    for sql in (f"COPY results TO '{target}'", f"COPY results TO '{unit_files(run)[0]}'",
                f"ATTACH '{tmp_path / 'db.duckdb'}' AS db", "CREATE TABLE t AS SELECT 1",
                f"EXPLAIN ANALYZE COPY results TO '{target}'", "SET enable_external_access = true",
                "INSTALL httpfs"):
        with pytest.raises(InputError, match="read-only"):
            run_sql([run], sql)
        result = invoke("sql", run, sql)
        assert result.exit_code == 2 and "--unsafe" in result.output
    outside = tmp_path / "outside.csv"
    outside.write_text("a\n1\n")
    with pytest.raises(InputError, match="Permission"):
        run_sql([run], f"SELECT * FROM read_csv('{outside}')")
    with pytest.raises(InputError, match="Permission"):
        run_sql([run], f"SELECT count(*) FROM read_parquet('{run}/records/**/*.parquet')")
    assert run_sql([run], "SELECT count(*) AS n FROM results").column("n").to_pylist() == [20 * len(unit_files(run))]
    assert run_sql([run], "DESCRIBE results").num_rows > 30
    assert sorted(p.name for p in Path(run).rglob("*")) == files_before and not target.exists()
    run_sql([run], f"COPY results TO '{target}'", unsafe=True)
    assert pq.read_table(target).num_rows == 20 * len(unit_files(run))


@pytest.mark.slow
def test_sql_is_read_only_on_s3(s3_server, s3_bucket):
    run = write_sweep(f"{s3_bucket}/runs/sweep-0001", storage_options=s3_server.storage_options, images=False)
    fs = s3_server.filesystem()
    before = sorted(fs.find(s3_bucket))
    for sql in (f"COPY results TO '{s3_bucket}/stolen.parquet'", f"ATTACH '{s3_bucket}/db.duckdb' AS db"):
        with pytest.raises(InputError, match="read-only"):
            run_sql([run], sql, storage_options=s3_server.storage_options)
    fs.pipe(f"{s3_bucket.removeprefix('s3://')}/other/x.csv", b"a\n1\n")
    with pytest.raises(InputError, match="Permission"):
        run_sql([run], f"SELECT * FROM read_csv('{s3_bucket}/other/x.csv')", storage_options=s3_server.storage_options)
    fs.invalidate_cache()
    assert sorted(fs.find(s3_bucket)) == sorted(before + [f"{s3_bucket.removeprefix('s3://')}/other/x.csv"])


# -- a lease per run folder ------------------------------------------------------------------------


HOLDER = textwrap.dedent("""
    import sys, time
    from pipeline.store import Store
    from pipeline.store.lease import RunLease
    uri, opts = sys.argv[1], __import__("json").loads(sys.argv[2])
    RunLease(Store(uri, storage_options=opts or None), "r", ttl=float(sys.argv[3])).acquire()
    print("held", flush=True)
    time.sleep(600)
""")


def _lease_store(kind, tmp_path, request):
    if kind == "local":
        return Store(str(tmp_path / "out")), {}
    server = request.getfixturevalue("s3_server")
    bucket = request.getfixturevalue("s3_bucket")
    return Store(f"{bucket}/out", storage_options=server.storage_options), server.storage_options


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["local", "s3"])
def test_lease_of_a_killed_holder_expires(kind, tmp_path, request):
    store, opts = _lease_store(kind, tmp_path, request)
    ttl = 6.0  # renewed every 2 s: room for a loaded machine
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, store.uri, json.dumps(opts), str(ttl)],
                              stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        assert holder.stdout.readline().strip() == "held"
        assert current_holder(store, "r")["pid"] == holder.pid
        with pytest.raises(LeaseHeldError) as err:
            RunLease(store, "r", ttl=ttl).acquire()
        assert f"pid {holder.pid}" in str(err.value) and "since 20" in str(err.value)
        time.sleep(ttl)  # renewed meanwhile: still held
        with pytest.raises(LeaseHeldError):
            RunLease(store, "r", ttl=ttl).acquire()
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    lease = RunLease(store, "r", ttl=ttl, wait=3 * ttl).acquire()  # local: at once; S3: after ttl
    with pytest.raises(LeaseHeldError, match=f"pid {os.getpid()}"):
        RunLease(store, "r", ttl=ttl).acquire()
    lease.release()
    assert current_holder(store, "r") is None
    RunLease(store, "r", ttl=ttl).acquire().release()  # released: free at once


# -- drivers on a real cluster ---------------------------------------------------------------------



def job_text(cnn: str, limit: int = 8, steps: int = 2, name: str = "trust") -> str:
    return textwrap.dedent(f"""
        name = "{name}"
        seed = 1
        [data]
        dataset = "digits"
        limit = {limit}
        shard_size = 4
        [[defenses]]
        kind = "plain"
        model = "{cnn}"
        [[attacks]]
        kind = "pgd"
        eps = [0.03, 0.06]
        steps = {steps}
    """)


def cli(*args, env=None, timeout=240) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pipeline.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})})


@pytest.mark.slow
def test_a_run_id_reused_with_an_edited_job_is_refused(ray_cluster, cnn, tmp_path):
    from pipeline.config.job import load_job
    from pipeline.runtime import run_job

    job = tmp_path / "job.toml"
    job.write_text(job_text(cnn))
    out = str(tmp_path / "out")
    first = run_job(load_job(job), RunOptions(out=out, workers=2, address=ray_cluster, run_id="r"), progress=False)
    assert first.ok and first.rows == 16
    plan_before = Store(out).read_json("r/plan.json")
    job.write_text(job_text(cnn, limit=6, steps=3))
    proc = cli("run", job, "--out", out, "--run-id", "r", "--address", ray_cluster, "--no-report")
    assert proc.returncode == 2, proc.stderr
    text = " ".join(proc.stderr.split())
    assert "data.limit: 8 -> 6" in text and "attacks[0].steps: 2 -> 3" in text and "--fresh" in text
    assert Store(out).read_json("r/plan.json") == plan_before and len(unit_files(f"{out}/r")) == 4
    fresh = run_job(load_job(job), RunOptions(out=out, workers=2, address=ray_cluster, run_id="r", fresh=True),
                    progress=False)
    assert fresh.run_id.startswith("r-") and fresh.rows == 12


def slow_driver(args, store: Store, tmp_path) -> subprocess.Popen:
    """`robustsweep run args` in a subprocess with a 3 s lease and 4 s units, returned once it
    holds the run folder's lease and has written plan.json."""
    env = {"ROBUSTSWEEP_LEASE_SECONDS": "3", "ROBUSTSWEEP_FAULTS": json.dumps({"dir": str(tmp_path), "sleep_s": 4})}
    driver = subprocess.Popen([sys.executable, "-m", "pipeline.cli", *map(str, args)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(ROOT), **env})
    deadline = time.monotonic() + 120
    while not (store.exists("r/lease.json") and store.exists("r/plan.json")):
        if time.monotonic() >= deadline or driver.poll() is not None:
            driver.kill()
            _, err = driver.communicate()
            pytest.fail(f"the driver never took the lease: {err}")
        time.sleep(0.5)
    return driver


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["local", "s3"])
def test_two_drivers_on_one_run_folder(kind, ray_cluster, cnn, tmp_path, request):
    job = tmp_path / "job.toml"
    job.write_text(job_text(cnn, name=f"two-{kind}"))
    env = {"ROBUSTSWEEP_LEASE_SECONDS": "3", "ROBUSTSWEEP_FAULTS": json.dumps({"dir": str(tmp_path), "sleep_s": 4})}
    if kind == "local":
        out = str(tmp_path / "out")
    else:
        out = f"{request.getfixturevalue('s3_bucket')}/out"
    endpoint = request.getfixturevalue("s3_server").endpoint_url if kind == "s3" else None
    args = ["run", job, "--out", out, "--run-id", "r", "--address", ray_cluster, "--workers", "1", "--no-report"]
    args += ["--endpoint-url", endpoint] if endpoint else []
    store = Store(out, endpoint_url=endpoint)
    first = slow_driver(args, store, tmp_path)
    try:
        second = cli(*args, env=env)
        assert second.returncode == 2, second.stderr
        text = " ".join(second.stderr.split())
        assert "in use by another driver" in text and f"pid {first.pid}" in text and "since" in text
        first.send_signal(signal.SIGKILL)  # a driver killed mid-run leaves its lease behind
        first.wait()
        # Local: free at once; S3: expires within 3 s. The units themselves need not be slow now.
        third = cli(*args, "--lease-wait", 10, env={"ROBUSTSWEEP_LEASE_SECONDS": "3"})
        assert third.returncode == 0, third.stderr
    finally:
        if first.poll() is None:
            first.kill()
            first.wait()
    rows = pa.concat_tables([store.read_table(r) for r in store.list("r/records", ".parquet")])
    assert rows.num_rows == 16 and len(set(zip(rows.column("unit_id").to_pylist(),
                                               rows.column("example_id").to_pylist()))) == 16


@pytest.mark.slow
def test_a_driver_whose_s3_lease_is_taken_over_stops_handing_out_units(ray_cluster, cnn, tmp_path, request):
    job = tmp_path / "job.toml"
    job.write_text(job_text(cnn, name="lost"))
    server = request.getfixturevalue("s3_server")
    out = f"{request.getfixturevalue('s3_bucket')}/out"
    args = ["run", job, "--out", out, "--run-id", "r", "--address", ray_cluster, "--workers", "1", "--no-report",
            "--endpoint-url", server.endpoint_url]
    store = Store(out, endpoint_url=server.endpoint_url)
    first = slow_driver(args, store, tmp_path)
    try:
        # Another driver's lease, as if this one had been cut off past its expiry and lost it.
        store.write_json("r/lease.json", {"host": "elsewhere", "pid": 4242, "since": "2026-11-26T00:00:00Z",
                                          "renewed": "2026-11-26T00:00:00Z", "expires": time.time() + 3600,
                                          "token": "another"})
        _, err = first.communicate(timeout=120)
    finally:
        if first.poll() is None:
            first.kill()
            first.wait()
    text = " ".join(err.split())
    assert first.returncode == 1, err
    assert "was taken over by another driver (host elsewhere, pid 4242" in text and "stopped handing out units" in text
    committed = store.list("r/records", ".parquet")
    assert len(committed) < 4  # 4 units of 4 s each on one worker: it stopped well before the end
    time.sleep(5)  # its workers were stopped with it: nothing more is committed
    assert store.list("r/records", ".parquet") == committed
    assert json.loads(store.read_bytes("r/lease.json"))["token"] == "another"  # the new holder's lease stays


@pytest.mark.slow
def test_corrupted_unit_is_redone_and_the_report_is_unchanged(ray_cluster, cnn, tmp_path):
    job = tmp_path / "job.toml"
    job.write_text(job_text(cnn))
    out = tmp_path / "out"
    assert cli("run", job, "--out", out, "--run-id", "r", "--address", ray_cluster, "--no-report").returncode == 0
    before = invoke("report", out / "r", "--section", "summary", "--format", "json")
    victim = unit_files(str(out / "r"))[1]
    corrupt_middle(victim)
    refused = invoke("report", out / "r")
    assert refused.exit_code == 2 and victim.name in refused.output
    again = cli("run", job, "--out", out, "--run-id", "r", "--address", ray_cluster, "--no-report")
    assert again.returncode == 0, again.stderr
    assert "fails its checks (content does not match its checksum (corrupted)); redoing it" in again.stderr
    assert "1 units done, 3 already committed" in " ".join(again.stderr.split())
    after = invoke("report", out / "r", "--section", "summary", "--format", "json")
    assert untimed(json.loads(after.stdout)["summary"]) == untimed(json.loads(before.stdout)["summary"])


@pytest.mark.slow
def test_s3_server_restarted_between_unit_commits(ray_cluster, cnn, tmp_path):
    """moto keeps its buckets in the memory of the process that runs it, so a server stopped
    and started again on the same port in this process serves the same data: the closest
    moto comes to a restart on the same data folder."""
    from moto.server import ThreadedMotoServer

    from conftest import FAKE_CREDENTIALS
    from pipeline.config.job import load_job
    from pipeline.runtime import run_job

    for k, v in FAKE_CREDENTIALS.items():
        os.environ.setdefault(k, v)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    url = f"http://{host}:{port}"
    store = Store("s3://restart/out", endpoint_url=url)
    store.fs.call_s3("create_bucket", Bucket="restart")
    job = tmp_path / "job.toml"
    job.write_text(job_text(cnn))
    bounced = threading.Event()

    def bounce():
        nonlocal server
        while not store.list("r/records", ".parquet"):  # the first unit is committed
            time.sleep(0.2)
        server.stop()
        time.sleep(4)  # workers committing now meet a refused connection and back off
        server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
        server.start()
        bounced.set()

    thread = threading.Thread(target=bounce, daemon=True)
    env_faults = os.environ.get("ROBUSTSWEEP_FAULTS")
    os.environ["ROBUSTSWEEP_FAULTS"] = json.dumps({"dir": str(tmp_path), "sleep_s": 1})
    try:
        thread.start()
        options = RunOptions(out="s3://restart/out", workers=1, address=ray_cluster, run_id="r", endpoint_url=url)
        result = run_job(load_job(job), options, progress=False)
        thread.join(30)
        assert bounced.is_set()
        assert result.ok and result.done == 4 and result.rows == 16
        report = summary([store.join("r")], endpoint_url=url)
        again = run_job(load_job(job), options, progress=False)
        assert again.done == 0 and again.skipped == 4
        assert untimed(summary([store.join("r")], endpoint_url=url)) == untimed(report) and sum(r["n"] for r in report) == 16
    finally:
        if env_faults is None:
            os.environ.pop("ROBUSTSWEEP_FAULTS", None)
        else:
            os.environ["ROBUSTSWEEP_FAULTS"] = env_faults
        server.stop()


@pytest.mark.slow
def test_s3_calls_ride_out_a_server_restart_and_give_up_naming_the_endpoint(monkeypatch):
    from moto.server import ThreadedMotoServer

    from conftest import FAKE_CREDENTIALS

    for k, v in FAKE_CREDENTIALS.items():
        monkeypatch.setenv(k, v)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    url = f"http://{host}:{port}"
    store = Store("s3://bounce/run", endpoint_url=url, storage_options={
        "config_kwargs": {"connect_timeout": 1, "read_timeout": 2, "retries": {"max_attempts": 0}}})
    store.fs.call_s3("create_bucket", Bucket="bounce")
    store.write_json("a.json", {"n": 1})
    server.stop()
    restarted = []

    def restart():
        time.sleep(2.0)
        again = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
        again.start()
        restarted.append(again)

    thread = threading.Thread(target=restart)
    monkeypatch.setenv("ROBUSTSWEEP_S3_RETRY_SECONDS", "30")
    thread.start()
    try:
        store.write_json("b.json", {"n": 2})  # refused at first; backs off until the server is back
        thread.join()
        assert store.read_json("a.json") == {"n": 1} and store.read_json("b.json") == {"n": 2}
    finally:
        thread.join()
        for s in restarted:
            s.stop()
    monkeypatch.setenv("ROBUSTSWEEP_S3_RETRY_SECONDS", "1")  # now down for good: a bounded wait, then the endpoint named
    with pytest.raises(StoreError) as err:
        store.write_json("c.json", {})
    assert f"S3 endpoint {url} is unreachable (retried for up to 1 s" in str(err.value)
    assert "testing" not in str(err.value)

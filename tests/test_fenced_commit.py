"""Fenced commits: a unit's records file is created once; a late attempt (a worker the driver
gave up on, a speculative copy that lost) is refused and the committed file keeps its bytes."""

from __future__ import annotations

import dataclasses

import pyarrow as pa
import pytest

from pipeline.config.job import parse_job
from pipeline.errors import CommitRefusedError
from pipeline.runtime import plan
from pipeline.runtime.worker import Worker, WorkerContext
from pipeline.store import Store
from pipeline.store.adversarial import adversarial_path


def _unit_and_ctx(cnn, out):
    job = parse_job({"name": "fence", "seed": 1, "data": {"dataset": "digits", "split": "test", "limit": 2, "shard_size": 2},
                     "defenses": [{"kind": "plain", "model": cnn}], "attacks": [{"kind": "none"}]})
    (unit,) = plan(job, 355)
    ctx = WorkerContext(run_id="r", job_hash=job.hash, out=str(out), seed=1, data=job.spec.data)
    return unit, ctx


def test_a_late_attempt_is_refused_and_the_committed_file_keeps_its_bytes(cnn, tmp_path):
    unit, ctx = _unit_and_ctx(cnn, tmp_path)
    worker = Worker("worker-0", "cpu")
    first = worker.run_unit(unit, ctx, None, 2)  # the attempt the driver reissued commits first
    records = tmp_path / "r" / unit.path
    images = tmp_path / "r" / adversarial_path(unit.path)
    before = records.read_bytes(), images.read_bytes()
    late = Worker("worker-1", "cpu").run_unit(unit, ctx, None, 1)  # the old attempt wakes up
    assert first.committed and not late.committed
    assert (records.read_bytes(), images.read_bytes()) == before
    table = Store(str(tmp_path)).read_table(f"r/{unit.path}")
    assert table.column("attempt").to_pylist() == [2, 2] and len(set(table.column("node").to_pylist())) == 1


def test_an_exclusive_write_never_replaces_a_file(tmp_path):
    store = Store(str(tmp_path))
    one, two = pa.table({"x": [1]}), pa.table({"x": [2]})
    store.write_table("a.parquet", one, schema=None, exclusive=True)
    with pytest.raises(CommitRefusedError, match="already there"):
        store.write_table("a.parquet", two, schema=None, exclusive=True)
    assert store.read_table("a.parquet").column("x").to_pylist() == [1]
    assert [p.name for p in tmp_path.iterdir()] == ["a.parquet"]  # no temp file left behind


def test_an_exclusive_write_on_s3_is_a_conditional_put(s3_server, s3_bucket):
    store = Store(f"{s3_bucket}/p", endpoint_url=s3_server.endpoint_url)
    store.write_table("a.parquet", pa.table({"x": [1]}), schema=None, exclusive=True)
    with pytest.raises(CommitRefusedError, match="already there"):
        store.write_table("a.parquet", pa.table({"x": [2]}), schema=None, exclusive=True)
    assert store.read_table("a.parquet").column("x").to_pylist() == [1]


def test_the_worker_probe_without_credentials_is_a_credentials_error(cnn, tmp_path, s3_server, s3_bucket, monkeypatch):
    from pipeline.errors import CredentialsError

    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()  # as in a fresh worker process: no filesystem that holds keys
    _, ctx = _unit_and_ctx(cnn, s3_bucket)
    ctx = dataclasses.replace(ctx, endpoint_url=s3_server.endpoint_url)
    try:
        with pytest.raises(CredentialsError, match="no usable AWS credentials") as err:
            Worker("worker-0", "cpu").probe(ctx)
    finally:
        # The filesystem made without keys stays in s3fs's instance cache; a later test in this
        # process, its keys restored, would be handed it.
        s3fs.S3FileSystem.clear_instance_cache()
    assert "testing" not in str(err.value)

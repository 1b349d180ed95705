"""The pipeline against real parts: a local Ray cluster, a moto S3 server, Parquet read back."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import duckdb
import pytest

from pipeline.config.job import load_job, parse_job
from pipeline.config.run import RunOptions
from pipeline.runtime import plan, run_job
from pipeline.runtime.faults import ENV
from pipeline.runtime.status import run_status
from pipeline.store import Store

KEY = ["defense", "attack", "eps", "example_id"]
SAME = ["clean_pred", "adv_pred", "clean_correct", "adv_correct", "adv_vote_pred", "adv_worst_correct", "linf"]



def job_doc(cnn, shard_size=4, limit=8, name="mini"):
    return {
        "name": name, "seed": 1,
        "data": {"dataset": "digits", "split": "test", "limit": limit, "shard_size": shard_size},
        "defenses": [{"kind": "plain", "model": cnn},
                     {"kind": "rdc", "model": "optimal", "timesteps": 4, "lm": {"steps": 2, "timesteps": 3}}],
        "attacks": [{"kind": "pgd", "eps": [0.03, 0.06], "steps": 2, "eot": 2, "passes": 2}],
    }


def rows(table):
    return sorted(zip(*(table.column(c).to_pylist() for c in KEY + SAME)))


def test_local_and_s3_give_the_same_rows_and_duckdb_reads_s3(ray_cluster, cnn, tmp_path, s3_server, s3_bucket):
    job = parse_job(job_doc(cnn))
    local = run_job(job, RunOptions(out=str(tmp_path), workers=2), progress=False)
    assert local.ok and local.units == 8 and local.rows == 32
    remote = run_job(job, RunOptions(out=f"{s3_bucket}/sweeps", workers=2, endpoint_url=s3_server.endpoint_url), progress=False)
    assert remote.ok and remote.run_id == local.run_id
    a = Store(local.uri).read_records()
    b = Store(remote.uri, endpoint_url=s3_server.endpoint_url).read_records()
    assert a.num_rows == b.num_rows == 32
    assert rows(a) == rows(b)
    plan_doc = Store(local.uri).read_json("plan.json")
    assert len(plan_doc["units"]) == 8 and plan_doc["run_id"] == local.run_id
    con = duckdb.connect()
    con.register_filesystem(Store(remote.uri, endpoint_url=s3_server.endpoint_url).fs)
    n, robust = con.execute(f"SELECT count(*), sum(adv_correct::INT) FROM read_parquet('{remote.uri}/records/**/*.parquet', hive_partitioning=false)").fetchone()
    assert n == 32 and robust == sum(b.column("adv_correct").to_pylist())


def per_example(doc):
    """The job with its attacks run one example at a time (`batched = false`)."""
    doc["attacks"] = [{**a, "batched": False} for a in doc["attacks"]]
    return doc


def test_workers_and_shard_sizes_do_not_change_predictions(ray_cluster, cnn, tmp_path):
    # One example at a time, neither the worker count nor the shard size may change a record. (A
    # batched attack's draws are keyed by its unit, so there only the worker count may not:
    # tests/test_batched.py checks 1 and 2 workers, a shuffled order and a resume.)
    three = run_job(parse_job(per_example(job_doc(cnn, shard_size=4))), RunOptions(out=str(tmp_path / "c"), workers=1),
                    progress=False)
    four = run_job(parse_job(per_example(job_doc(cnn, shard_size=3))), RunOptions(out=str(tmp_path / "d"), workers=2),
                   progress=False)
    assert three.units == 8 and four.units == 12
    assert rows(Store(three.uri).read_records()) == rows(Store(four.uri).read_records())


def test_resume_skips_committed_units(ray_cluster, cnn, tmp_path):
    job = parse_job(job_doc(cnn))
    first = run_job(job, RunOptions(out=str(tmp_path), workers=2), progress=False)
    store = Store(first.uri)
    files = store.list("records", ".parquet")
    before = {f: store.mtime(f) for f in files}
    again = run_job(job, RunOptions(out=str(tmp_path), workers=2), progress=False)
    assert again.skipped == 8 and again.done == 0
    assert {f: store.mtime(f) for f in files} == before
    status = run_status(first.uri)
    assert (status["units"], status["done"], status["left"], status["failed"], status["rows"]) == (8, 8, 0, 0, 32)
    assert status["examples_per_worker_second"] > 0
    # the records the workers wrote lie in the cost model's prediction, and nothing is left
    cost = status["cost"]
    assert cost["evaluations_estimated"][0] <= cost["evaluations_spent"] <= cost["evaluations_estimated"][1]
    assert cost["evaluations_left"] == [0, 0] and cost["eta_worker_seconds"] == [0.0, 0.0]
    # the run calibrates this machine (the `cpu` profile of `plan`)
    from pipeline.runtime.calibration import calibrate

    assert calibrate(first.uri)["flops_per_second"] > 0
    fresh = run_job(job, RunOptions(out=str(tmp_path), workers=2, fresh=True), progress=False)
    assert fresh.run_id != first.run_id and fresh.done == 8


def test_driver_killed_mid_run_then_rerun(ray_cluster, cnn, tmp_path):
    doc = job_doc(cnn, shard_size=1, limit=6, name="killed")
    doc["attacks"][0]["steps"] = 6
    job_file = tmp_path / "job.toml"
    job_file.write_text(_toml(doc))
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-m", "pipeline.cli", "run", str(job_file), "--out", str(out),
                             "--workers", "1", "--address", ray_cluster, "--no-report"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    job = load_job(job_file)
    run_dir = out / f"killed-{job.hash[:8]}"
    deadline = time.time() + 120
    while time.time() < deadline and len(list(run_dir.glob("records/**/*.parquet"))) < 3:
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    time.sleep(3)  # the killed driver's actors go with it
    store = Store(str(run_dir))
    committed = {f: store.mtime(f) for f in store.list("records", ".parquet")}
    assert 3 <= len(committed) < 24
    result = run_job(job, RunOptions(out=str(out), workers=2), progress=False)
    assert result.ok and result.skipped == len(committed) and result.done == 24 - len(committed)
    assert {f: store.mtime(f) for f in committed} == committed  # nothing committed was recomputed
    table = store.read_records()
    keys = list(zip(*(table.column(c).to_pylist() for c in KEY)))
    assert len(keys) == len(set(keys)) == 24


def test_failures_are_retried_then_recorded(ray_cluster, cnn, tmp_path, monkeypatch):
    job = parse_job(job_doc(cnn, limit=4))
    units = plan(job, 355)
    flaky, crashing, broken = units[0].unit_id, units[1].unit_id, units[2].unit_id
    monkeypatch.setenv(ENV, json.dumps({"dir": str(tmp_path), "raise_once": [flaky], "crash_once": [crashing],
                                        "raise_always": [broken]}))
    result = run_job(job, RunOptions(out=str(tmp_path / "out"), workers=2), progress=False)
    assert result.failed == [broken]
    assert result.done == len(units) - 1
    store = Store(result.uri)
    note = store.read_json(f"failures/unit-{broken}.json")
    assert "fails on purpose" in note["error"] and "Traceback" in note["traceback"] and note["tries"] == 3
    assert store.read_records().num_rows == (len(units) - 1) * 4
    monkeypatch.delenv(ENV)
    again = run_job(job, RunOptions(out=str(tmp_path / "out"), workers=2), progress=False)
    assert again.ok and again.done == 1 and again.skipped == len(units) - 1
    assert not store.exists(f"failures/unit-{broken}.json")  # the stale note goes once the unit commits


def _toml(doc) -> str:
    def value(v):
        if isinstance(v, str):
            return json.dumps(v)
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, list):
            return "[" + ", ".join(value(x) for x in v) + "]"
        if isinstance(v, dict):
            return "{" + ", ".join(f"{k} = {value(x)}" for k, x in v.items()) + "}"
        return repr(v)

    lines = [f"name = {value(doc['name'])}", f"seed = {doc['seed']}", "[data]"]
    lines += [f"{k} = {value(v)}" for k, v in doc["data"].items()]
    for section in ("defenses", "attacks"):
        for table in doc[section]:
            lines.append(f"[[{section}]]")
            lines += [f"{k} = {value(v)}" for k, v in table.items()]
    return "\n".join(lines) + "\n"


BAD = {
    "unknown defense kind": ('[[defenses]]\nkind = "magic"', "defenses[0].kind"),
    "negative eps": ('[[attacks]]\nkind = "pgd"\neps = -0.1', "attacks[0].eps"),
    "missing dataset": ("", "data.dataset"),
    "wrong type": ('[data]\ndataset = "digits"\nlimit = "ten"', "data.limit"),
    "unknown key": ('colour = "red"', "colour"),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", sorted(BAD))
def test_invalid_specs_exit_2_and_write_nothing(case, tmp_path):
    body, field = BAD[case]
    text = {"missing dataset": '[data]\nlimit = 4\n[[defenses]]\nkind = "plain"\n[[attacks]]\nkind = "pgd"\n'}.get(case)
    if text is None:
        base = {"data": '[data]\ndataset = "digits"\nlimit = 4\n', "defenses": '[[defenses]]\nkind = "plain"\n',
                "attacks": '[[attacks]]\nkind = "pgd"\n'}
        if body.startswith("[data]"):
            base["data"] = body + "\n"
        elif body.startswith("[[defenses]]"):
            base["defenses"] = body + "\n"
        elif body.startswith("[[attacks]]"):
            base["attacks"] = body + "\n"
        text = (body + "\n" if not body.startswith("[") else "") + base["data"] + base["defenses"] + base["attacks"]
    job = tmp_path / "bad.toml"
    job.write_text(text)
    out = tmp_path / "out"
    for command in ("run", "validate"):
        proc = subprocess.run([sys.executable, "-m", "pipeline.cli", command, str(job)] + (["--out", str(out)] if command == "run" else []),
                              capture_output=True, text=True, timeout=60)
        assert proc.returncode == 2, proc.stderr
        assert field in proc.stderr
    assert not out.exists()


@pytest.mark.slow
def test_unreadable_job_file_exits_2(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "pipeline.cli", "validate", str(tmp_path / "missing.toml")],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "cannot read job file" in proc.stderr
    (tmp_path / "broken.toml").write_text("name = [")
    proc = subprocess.run([sys.executable, "-m", "pipeline.cli", "validate", str(tmp_path / "broken.toml")],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "not valid TOML" in proc.stderr


def test_cli_run_exits_1_when_a_unit_keeps_failing(ray_cluster, cnn, tmp_path):
    doc = job_doc(cnn, limit=2, shard_size=2, name="failing")
    doc["defenses"] = doc["defenses"][:1]
    doc["attacks"][0]["eps"] = 0.03
    job_file = tmp_path / "job.toml"
    job_file.write_text(_toml(doc))
    (unit,) = plan(load_job(job_file), 355)
    env = {**os.environ, ENV: json.dumps({"dir": str(tmp_path), "raise_always": [unit.unit_id]})}
    proc = subprocess.run([sys.executable, "-m", "pipeline.cli", "run", str(job_file), "--out", str(tmp_path / "out"),
                           "--workers", "1", "--address", ray_cluster, "--no-report"],
                          capture_output=True, text=True, timeout=180, env=env)
    assert proc.returncode == 1, proc.stderr
    assert "1 units failed" in proc.stderr


@pytest.mark.parametrize("path", sorted(Path(__file__).parent.parent.glob("jobs/*.toml")), ids=lambda p: p.name)
def test_shipped_job_files_validate(path):
    job = load_job(path)
    assert job.defenses and job.attacks
    assert all(job.spec.data.dataset == d.table["dataset"] for d in job.defenses)

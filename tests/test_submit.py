"""Submission to a real Ray head through the Jobs API, by the library and the CLI.

The head is started by tests/rayhead.py (`ray start --head` on 127.0.0.1, its own temp dir, ports
and process group; stopped by killing what it spawned, never `ray stop`). The jobs carry a copy of
the package as their working dir, so what runs is the code that was submitted.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from pipeline.cli import app
from pipeline.config.run import RunOptions
from pipeline.errors import ClusterError, ConfigError
from pipeline.runtime.submit import entrypoint, follow_job, job_status, runtime_env, stop_job, submit_job, wait_for_job
from rayhead import Head, free_port, ray_head

# Ray's log-tail client passes ssl=None to aiohttp, which warns about it.
pytestmark = pytest.mark.filterwarnings("ignore:ssl=None is deprecated:DeprecationWarning")

REPO = Path(__file__).resolve().parents[1]

TINY = """
name = "tiny"
[data]
dataset = "digits"
limit = 4
shard_size = 2
[[defenses]]
kind = "rdc"
model = "optimal"
timesteps = 4
[[attacks]]
kind = "pgd"
steps = 2
eps = 0.1
"""

# Minutes of work on 2 cores: only ever stopped.
LONG = """
name = "long"
[data]
dataset = "digits"
limit = 256
shard_size = 4
[[defenses]]
kind = "rdc"
model = "optimal"
[[attacks]]
kind = "pgd"
steps = 200
eps = 0.1
"""

# Valid as a spec, fails on the cluster: the dataset folder is not there.
MISSING_DATA = """
name = "nodata"
[data]
dataset = "cifar10"
root = "no-such-folder/cifar10"
limit = 2
[[defenses]]
kind = "plain"
[[attacks]]
kind = "none"
"""


@pytest.fixture(scope="module")
def head(tmp_path_factory):
    project = tmp_path_factory.mktemp("project")
    shutil.copytree(REPO / "pipeline", project / "pipeline", ignore=shutil.ignore_patterns("__pycache__"))
    (project / "jobs").mkdir()
    for name, text in (("tiny", TINY), ("long", LONG), ("nodata", MISSING_DATA)):
        (project / "jobs" / f"{name}.toml").write_text(text)
    with ray_head(project, tmp_path_factory.mktemp("job-cache")) as h:
        yield h


def _cli(*args: str):
    return CliRunner().invoke(app, list(args))


def _submit_args(head: Head, job: str, *extra: str) -> list[str]:
    return ["submit", str(head.project / "jobs" / job), "--address", head.address,
            "--working-dir", str(head.project), "--python", sys.executable,
            "--env", f"ROBUSTSWEEP_CACHE={head.cache}", "--workers", "1", "--no-report", *extra]


def _ray_client(head: Head):
    """Ray's own client on the head (RAY_ADDRESS, if set, would override the address we give)."""
    from ray.job_submission import JobSubmissionClient

    saved = {k: os.environ.pop(k) for k in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS") if k in os.environ}
    try:
        return JobSubmissionClient(head.address)
    finally:
        os.environ.update(saved)


def _jobs(head: Head) -> list:
    return _ray_client(head).list_jobs()


def test_entrypoint_and_runtime_env(monkeypatch, tmp_path):
    cmd = entrypoint("jobs/x y.toml", RunOptions(out="s3://b/p", workers=4, fresh=True, report=False, gpus_per_worker=0.5,
                                                 max_gpu_hours=12.5, device="a100", efficiency=0.4),
                     python="/opt/py/bin/python")
    assert cmd == ("/opt/py/bin/python -m pipeline.cli run 'jobs/x y.toml' --address auto --out s3://b/p --workers 4 "
                   "--fresh --no-report --gpus-per-worker 0.5 --max-gpu-hours 12.5 --device a100 --efficiency 0.4")
    words = cmd.split()[3:]  # every option the entrypoint uses is one `run` takes
    help_text = CliRunner().invoke(app, ["run", "--help"]).output
    assert all(w in help_text for w in words if w.startswith("--"))
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s3cr3t")
    monkeypatch.delenv("AWS_SESSION_TOKEN", raising=False)
    renv = runtime_env(tmp_path, env={"ROBUSTSWEEP_CACHE": "/c"}, excludes=["data"])
    assert renv["working_dir"] == str(tmp_path.resolve())
    assert {".venv", ".git", "results", "*.parquet", "data"} <= set(renv["excludes"])
    assert renv["env_vars"]["AWS_SECRET_ACCESS_KEY"] == "s3cr3t" and renv["env_vars"]["ROBUSTSWEEP_CACHE"] == "/c"
    assert "AWS_SESSION_TOKEN" not in renv["env_vars"]  # only what is set travels
    assert "AWS_SECRET_ACCESS_KEY" not in runtime_env(tmp_path, forward_aws=False).get("env_vars", {})


def test_bad_input_is_refused_before_anything_is_sent(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text(TINY.replace("shard_size = 2", "shard_size = 0"))
    # A closed port: if anything tried to reach a cluster, the error would be a ClusterError.
    res = _cli("submit", str(bad), "--address", "http://127.0.0.1:9", "--working-dir", str(tmp_path))
    assert res.exit_code == 2 and "data.shard_size" in res.output
    good = tmp_path / "good.toml"
    good.write_text(TINY)
    with pytest.raises(ConfigError, match="outside the working dir"):
        submit_job(good, "http://127.0.0.1:9", working_dir=REPO)
    with pytest.raises(ConfigError, match="dashboard URL"):
        submit_job(good, "127.0.0.1:8265", working_dir=tmp_path)
    res = _cli("submit", str(good), "--address", "http://127.0.0.1:9", "--working-dir", str(tmp_path), "--env", "NOVALUE")
    assert res.exit_code == 2 and "KEY=VALUE" in res.output
    res = _cli("submit", str(good), "--address", "http://127.0.0.1:9", "--working-dir", str(tmp_path), "--gpus-per-worker", "2")
    assert res.exit_code == 2 and "gpus_per_worker" in res.output
    # The same check guards `run` (in run_job, so notebooks get it too), before anything is written.
    out = tmp_path / "never"
    res = _cli("run", str(good), "--out", str(out), "--gpus-per-worker", "0")
    assert res.exit_code == 2 and "--gpus-per-worker" in res.output and not out.exists()
    res = _cli("status", "raysubmit_abc")
    assert res.exit_code == 2 and "--address" in res.output


def test_a_job_above_its_budget_is_refused_before_anything_is_sent(tmp_path, monkeypatch):
    monkeypatch.setenv("ROBUSTSWEEP_CACHE", str(tmp_path / "cache"))  # the default model's FLOPs, from its recipe
    job = tmp_path / "plain.toml"
    job.write_text(TINY.replace('kind = "rdc"\nmodel = "optimal"\ntimesteps = 4', 'kind = "plain"'))
    # A closed port: a submission that got as far as the cluster would be a ClusterError (exit 1).
    closed = f"http://127.0.0.1:{free_port()}"
    args = ["submit", str(job), "--address", closed, "--working-dir", str(tmp_path)]
    res = _cli(*args, "--max-gpu-hours", "1e-15", "--device", "a100", "--efficiency", "0.5")
    assert res.exit_code == 2, res.output
    text = " ".join(res.output.split())
    assert "device-hours on a100, above its budget max_gpu_hours = 1e-15; nothing was started" in text and "PFLOP" in text
    with_budget = tmp_path / "budget.toml"  # the job file's budget, as `run` takes it
    with_budget.write_text("max_gpu_hours = 1e-15\n" + job.read_text())
    res = _cli("submit", str(with_budget), "--address", closed, "--working-dir", str(tmp_path))
    assert res.exit_code == 2 and "above its budget" in res.output, res.output
    # within the budget the check lets it through: it goes on to the cluster, which is not there
    res = _cli(*args, "--max-gpu-hours", "1000")
    assert res.exit_code == 1 and "cannot reach the Ray dashboard" in res.output, res.output
    for bad, message in ((["--device", "tpu"], "device (--device) 'tpu' is unknown"),
                         (["--efficiency", "2"], "efficiency (--efficiency) must be in (0, 1]")):
        res = _cli(*args, *bad)
        assert res.exit_code == 2 and message in res.output, (bad, res.output)


def test_unreachable_cluster_is_a_cluster_error():
    closed = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(ClusterError, match="cannot reach the Ray dashboard"):
        job_status(closed, "raysubmit_abc")
    for args in (["status", "raysubmit_abc"], ["logs", "raysubmit_abc"], ["stop", "raysubmit_abc"]):
        res = _cli(*args, "--address", closed)
        assert res.exit_code == 1 and "cannot reach the Ray dashboard" in res.output, args


def test_bad_spec_submits_nothing(head):
    before = len(_jobs(head))
    bad = head.project / "jobs" / "bad.toml"
    bad.write_text(TINY.replace('kind = "pgd"', 'kind = "pgdx"'))
    try:
        res = _cli(*_submit_args(head, "bad.toml"))
    finally:
        bad.unlink()
    assert res.exit_code == 2 and "attacks" in res.output and "kind" in res.output, res.output
    assert len(_jobs(head)) == before


def test_submit_follows_a_job_to_success_and_its_rows_exist(head, tmp_path):
    out = tmp_path / "out"
    t0 = time.perf_counter()
    # a budget the estimate fits in travels to the run, with the profile it is counted on
    res = _cli(*_submit_args(head, "tiny.toml", "--out", str(out), "--run-id", "tiny-run", "--max-gpu-hours", "1000",
                             "--device", "a100", "--efficiency", "0.5"))
    assert res.exit_code == 0, res.output
    submission_id = res.stdout.splitlines()[0]
    assert submission_id.startswith("raysubmit_")
    assert "2 units done" in res.stdout, res.stdout  # the job's log, streamed while it ran
    assert "SUCCEEDED" in res.output
    files = sorted((out / "tiny-run" / "records").rglob("unit-*.parquet"))
    assert len(files) == 2  # 4 examples in shards of 2
    ids = [i for f in files for i in pq.read_table(f).column("example_id").to_pylist()]
    assert sorted(ids) == [0, 1, 2, 3]  # 4 examples x 1 defense x 1 attack x 1 eps: one row each
    print(f"tiny job: {time.perf_counter() - t0:.1f} s")

    res = _cli("status", submission_id, "--address", head.address)
    assert res.exit_code == 0, res.output
    st = json.loads(res.stdout)
    assert st["status"] == "SUCCEEDED" and st["driver_exit_code"] == 0
    assert "pipeline.cli run jobs/tiny.toml --address auto" in st["entrypoint"]
    assert st["entrypoint"].endswith("--max-gpu-hours 1000 --device a100 --efficiency 0.5")
    res = _cli("logs", submission_id, "--address", head.address)
    assert res.exit_code == 0 and "2 units done" in res.stdout

    async def inside_a_running_loop():  # a notebook: no websocket tail, follow_job polls instead
        chunks: list[str] = []
        return follow_job(head.address, submission_id, chunks.append), "".join(chunks)

    st, text = asyncio.run(inside_a_running_loop())
    assert st["status"] == "SUCCEEDED" and text == res.stdout
    # The run folder's status still works without --address.
    res = _cli("status", str(out / "tiny-run"))
    assert res.exit_code == 0 and json.loads(res.stdout)["done"] == 2


def test_submit_from_a_venv_that_is_not_activated(head, tmp_path):
    """The head's PATH has only the system's python3 (no typer): the submitting interpreter is used,
    and a relative --out lands under the head's home, not in the per-upload working dir."""
    home = tmp_path / "home"
    home.mkdir()
    args = ["submit", str(head.project / "jobs" / "tiny.toml"), "--address", head.address, "--working-dir",
            str(head.project), "--env", f"ROBUSTSWEEP_CACHE={head.cache}", "--env", "PATH=/usr/bin:/bin",
            "--env", f"HOME={home}", "--workers", "1", "--no-report", "--run-id", "venv-run"]
    res = _cli(*args, "--out", "rel-results")
    assert res.exit_code == 0, res.output
    assert f"on the head: {sys.executable}" in res.output
    assert f"results go to {home}/rel-results on the head node" in " ".join(res.output.split())
    assert len(list((home / "rel-results" / "venv-run" / "records").rglob("unit-*.parquet"))) == 2
    # An interpreter that lacks the dependencies: refused before the job starts, the fix named.
    before = [j for j in _jobs(head) if (j.metadata or {}).get("robustsweep_job")]
    res = _cli(*args, "--python", "python3")
    assert res.exit_code == 2, res.output
    text = " ".join(res.output.split())
    assert "no interpreter on the head imports robustsweep, so the job would fail there; nothing was submitted" in text
    assert "Tried: python3: ModuleNotFoundError: No module named 'typer'" in text
    assert "give --python the head's interpreter that has it" in text
    assert [j for j in _jobs(head) if (j.metadata or {}).get("robustsweep_job")] == before


def test_stop_a_long_job(head, tmp_path):
    res = _cli(*_submit_args(head, "long.toml", "--out", str(tmp_path / "out"), "--no-wait"))
    assert res.exit_code == 0, res.output
    submission_id = res.stdout.strip()
    assert submission_id.startswith("raysubmit_")
    st = wait_for_job(head.address, submission_id, timeout=60, poll=0.2, until=("RUNNING", "SUCCEEDED", "FAILED", "STOPPED"))
    assert st["status"] == "RUNNING", st
    res = _cli("stop", submission_id, "--address", head.address)
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["status"] == "STOPPED"
    assert job_status(head.address, submission_id)["status"] == "STOPPED"
    assert stop_job(head.address, submission_id)["status"] == "STOPPED"  # stopping again changes nothing
    res = _cli("logs", submission_id, "--address", head.address, "--follow")
    assert res.exit_code == 1 and "STOPPED" in res.output


def test_a_failing_job_exits_1_and_credentials_stay_secret(head, monkeypatch):
    secret = "not-a-real-secret-7f3a9c"
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIATESTONLY")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret)
    res = _cli(*_submit_args(head, "nodata.toml"))
    assert res.exit_code == 1, res.output
    assert "no-such-folder/cifar10" in res.stdout  # the job's own error, from its streamed log
    assert "FAILED" in res.output
    submission_id = res.stdout.splitlines()[0]
    st = job_status(head.address, submission_id)
    assert st["status"] == "FAILED" and st["driver_exit_code"] == 2
    assert secret not in res.output and secret not in json.dumps(st)
    # The credentials did travel, as env vars of the job only.
    assert _ray_client(head).get_job_info(submission_id).runtime_env["env_vars"]["AWS_SECRET_ACCESS_KEY"] == secret


def test_unknown_submission_id(head):
    with pytest.raises(ClusterError, match="no job with submission id"):
        job_status(head.address, "raysubmit_doesnotexist")
    res = _cli("logs", "raysubmit_doesnotexist", "--address", head.address)
    assert res.exit_code == 1 and "no job with submission id" in res.output

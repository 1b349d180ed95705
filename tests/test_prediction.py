"""The report closes the loop: `run` keeps the cost model's prediction of every planned unit in
the run folder (predicted.json), and the report's `prediction` section sets it beside what the
records spent.

The fast tests plan a small job and run its units through the worker's own code (no Ray): the
records are the ones a run writes. One slow test runs the same job through `run_job` on the
session's Ray cluster and resumes it.
"""

from __future__ import annotations

import json
from pathlib import Path

import duckdb
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from pipeline.analytics import build_report, connect, prediction
from pipeline.analytics.outputs import analyze, predictions
from pipeline.analytics.source import open_runs
from pipeline.cli import app
from pipeline.config.job import load_job
from pipeline.config.run import RunOptions
from pipeline.data import load_split
from pipeline.runtime.estimate import (device_profile, estimate_units, prediction_document, pricing_profile,
                                       write_prediction)
from pipeline.runtime.plan import plan, plan_document
from pipeline.runtime.status import run_status
from pipeline.runtime.worker import Worker, WorkerContext
from pipeline.store import Store
from pipeline.store.verify import PREDICTED, read_prediction, verify_runs


def _job_file(tmp_path: Path, cnn: str) -> Path:
    path = tmp_path / "job.toml"
    path.write_text(f"""name = "loop"
[data]
dataset = "digits"
split = "test"
limit = 6
shard_size = 4

[[defenses]]
kind = "plain"
model = "{cnn}"

[[attacks]]
kind = "none"

[[attacks]]
kind = "pgd"
eps = 0.1
steps = 2
""")
    return path


def _run_units(job, out: Path, run_id: str, use_gpu: bool, options: RunOptions) -> list:
    """Plan `job`, write plan.json and predicted.json as `run` does, and commit every unit
    through the worker's own code."""
    data = job.spec.data
    units = plan(job, load_split(data.dataset, data.split)[0].shape[0])
    store = Store(str(out))
    store.write_json(f"{run_id}/plan.json", plan_document(job, units, run_id))
    assert write_prediction(store, run_id, job.hash, units, options, use_gpu) is None
    worker = Worker("w0", "cpu", 1)
    ctx = WorkerContext(run_id, job.hash, str(out), job.spec.seed, data)
    for u in units:
        worker.run_unit(u, ctx)
    return units


@pytest.fixture(scope="module")
def ran(cnn, tmp_path_factory):
    """One small run (plain CNN, `none` and PGD), priced on an A100 at efficiency 0.5."""
    tmp = tmp_path_factory.mktemp("loop")
    job = load_job(_job_file(tmp, cnn))
    out = tmp / "results"
    options = RunOptions(out=str(out), device="a100", efficiency=0.5)
    units = _run_units(job, out, "loop-run", True, options)
    return job, units, out / "loop-run", options


def test_predicted_json_holds_what_the_estimate_computes(ran):
    job, units, folder, options = ran
    doc = json.loads((folder / PREDICTED).read_text())
    assert doc["run_id"] == "loop-run" and doc["job_hash"] == job.hash and doc["format"] == 1
    profile = device_profile("a100", 0.5)
    assert doc["profile"]["device"] == "a100" and doc["profile"]["flops_per_second"] == profile.flops_per_second
    assert [u["unit_id"] for u in doc["units"]] == [u.unit_id for u in units]
    for u, predicted in zip(units, doc["units"]):
        (row,) = estimate_units([u], profile).rows  # the estimate of this unit alone
        assert predicted["forward"] == row.forward.as_list() and predicted["backward"] == row.backward.as_list()
        assert predicted["flops"] == row.flops.as_list()
        assert predicted["seconds"] == pytest.approx([h * 3600 for h in row.hours.as_list()])
        parts = doc["parts"][predicted["parts"]]  # what spends them: their sum is the attack and scoring phases
        assert {p["phase"] for p in parts} >= {"scoring", "gradient check"}
    # a deterministic defense scored once, no attack: exact; PGD on it: a range
    none, pgd = doc["units"][0], doc["units"][-1]
    assert none["forward"][0] == none["forward"][1] and pgd["forward"][0] < pgd["forward"][1]


def test_the_section_sums_the_parquet_and_every_unit_lies_in_its_range(ran):
    job, units, folder, _ = ran
    rows = analyze([str(folder)], sections=["prediction"])["report"]["prediction"]
    assert [(r["attack"], r["units"], r["n"]) for r in rows] == [("clean", 2, 6), ("pgd-ce", 2, 6)]  # planned names
    # the recorded sums, computed another way: pyarrow over the Parquet files themselves
    files = sorted(folder.glob("records/**/*.parquet"))
    table = pa.concat_tables(pq.read_table(f, columns=["attack", "forward_passes", "backward_passes", "seconds"])
                             for f in files)
    doc = json.loads((folder / PREDICTED).read_text())
    for r in rows:
        mine = table.filter(pc.equal(table["attack"], r["attack"]))
        assert r["forward_recorded"] == pc.sum(mine["forward_passes"]).as_py()
        assert r["backward_recorded"] == pc.sum(mine["backward_passes"]).as_py()
        assert r["seconds_recorded"] == pytest.approx(pc.sum(mine["seconds"]).as_py())
        assert r["in_range"] is True and r["units_outside"] == 0 and r["note"] == ""
        ours = [u for u in doc["units"] if u["attack"] == r["attack"]]
        assert r["forward_predicted"] == [sum(u["forward"][i] for u in ours) for i in (0, 1)]
        assert r["backward_predicted"] == [sum(u["backward"][i] for u in ours) for i in (0, 1)]
        s = [sum(u["seconds"][i] for u in ours) for i in (0, 1)]
        assert r["seconds_predicted"] == pytest.approx(s) and r["device"] == "a100"
        assert r["seconds_ratio"] == pytest.approx([r["seconds_recorded"] / s[1], r["seconds_recorded"] / s[0]])
    none = rows[0]
    assert none["forward_predicted"][0] == none["forward_predicted"][1] == none["forward_recorded"]  # exact
    # the same through DuckDB directly
    con = duckdb.connect()
    listed = ", ".join(f"'{f}'" for f in files)
    got = dict(con.execute(f"SELECT attack, sum(forward_passes) FROM read_parquet([{listed}]) GROUP BY ALL").fetchall())
    assert got == {r["attack"]: r["forward_recorded"] for r in rows}


def test_a_unit_outside_its_range_shows(ran, tmp_path):
    job, units, folder, _ = ran
    doc = json.loads((folder / PREDICTED).read_text())
    doc["units"][0]["forward"] = [0, 1]  # a wrong model of the cost of one `none` unit
    con = connect([str(folder)])
    try:
        rows = prediction(con, {"loop-run": doc})
    finally:
        con.close()
    assert [(r["attack"], r["in_range"], r["units_outside"]) for r in rows] == [("clean", False, 1), ("pgd-ce", True, 0)]


def test_every_format_renders_the_section(ran, tmp_path):
    _, _, folder, _ = ran
    runner = CliRunner()
    text = runner.invoke(app, ["report", str(folder), "--section", "prediction"])
    assert text.exit_code == 0, text.output
    assert "fwd predicted" in text.output and "a100" in text.output and "yes" in text.output
    data = json.loads(runner.invoke(app, ["report", str(folder), "--section", "prediction", "--format", "json"]).output)
    assert [r["in_range"] for r in data["prediction"]] == [True, True]
    md = runner.invoke(app, ["report", str(folder), "--section", "prediction", "--format", "markdown"]).output
    assert "| run | defense | attack | eps | units | n | fwd predicted |" in md
    csv = runner.invoke(app, ["report", str(folder), "--section", "prediction", "--format", "csv"]).output
    assert csv.splitlines()[0].startswith("run_id,defense,attack,norm,eps,units,n,forward_predicted")
    page = tmp_path / "page.html"
    assert runner.invoke(app, ["report", str(folder), "--html", str(page)]).exit_code == 0
    assert 'data-section="prediction"' in page.read_text()


def test_several_runs_each_against_its_own_prediction(ran, cnn, tmp_path, monkeypatch):
    monkeypatch.setenv("ROBUSTSWEEP_CACHE", str(tmp_path / "cache"))  # no measured CPU profile: unpriced
    _, _, folder, _ = ran
    path = _job_file(tmp_path, cnn)
    # another job under other names: rows of two jobs never share a label, nor units an id
    path.write_text(path.read_text().replace('name = "loop"', 'name = "other"').replace(
        'kind = "plain"', 'kind = "plain"\nname = "plain-other"'))
    other = load_job(path)
    _run_units(other, tmp_path / "results", "other-run", False, RunOptions(out=str(tmp_path / "results")))
    result = analyze([str(folder), str(tmp_path / "results" / "other-run")], sections=["prediction"])
    rows = result["report"]["prediction"]
    assert [(r["run_id"], r["defense"], r["attack"], r["device"], r["in_range"]) for r in rows] == [
        ("loop-run", "plain-ckpt", "clean", "a100", True), ("loop-run", "plain-ckpt", "pgd-ce", "a100", True),
        ("other-run", "plain-other", "clean", None, True), ("other-run", "plain-other", "pgd-ce", None, True)]
    assert rows[2]["seconds_predicted"] is None and rows[2]["note"].startswith("not priced")
    assert "not priced: a CPU-only pool" in rows[2]["note"] and result["notes"] == []  # the section says it


def test_verify_and_status_take_the_file_and_the_analytics_read_it_without_torch(ran):
    _, units, folder, _ = ran
    verified = verify_runs([Store(str(folder))])
    assert verified.bad == {} and verified.notes() == [] and len(verified.files) == len(units)
    st = run_status(str(folder))
    assert st["done"] == len(units) and st["skipped"] == []
    # the section reads predicted.json as JSON: neither it nor the report imports runtime, protocol or torch
    import subprocess
    import sys

    code = ("import sys; from pipeline.analytics import build_report, connect; "
            "from pipeline.analytics.source import open_runs; from pipeline.store.verify import read_prediction; "
            f"(store, plan), = open_runs([{str(folder)!r}]); doc, _ = read_prediction(store, plan); "
            f"rows = build_report(connect([{str(folder)!r}]), ['prediction'], predictions={{plan['run_id']: doc}}); "
            "assert all(r['in_range'] for r in rows['prediction']); "
            "print(sorted(m for m in sys.modules if m == 'torch' or m.startswith(('pipeline.runtime', "
            "'pipeline.protocol'))))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"


def test_an_old_run_folder_says_not_available(ran, tmp_path):
    import shutil

    _, _, folder, _ = ran
    old = tmp_path / "loop-run"
    shutil.copytree(folder, old)
    (old / PREDICTED).unlink()
    result = analyze([str(old)], sections=["prediction"])
    rows = result["report"]["prediction"]
    assert result["notes"] == []  # the section itself says it
    assert rows and all(r["forward_predicted"] is None and r["in_range"] is None for r in rows)
    assert all(r["note"].startswith("not available: ") and "does not exist" in r["note"] for r in rows)
    assert rows[0]["forward_recorded"] > 0  # the recorded side is still there
    result = CliRunner().invoke(app, ["report", str(old), "--section", "prediction"])
    assert result.exit_code == 0 and "not available" in result.output
    # a prediction of another run is not taken for this one's
    doc = json.loads((folder / PREDICTED).read_text())
    (old / PREDICTED).write_text(json.dumps({**doc, "job_hash": "0" * 16}))
    store, plan_doc = open_runs([str(old)])[0]
    got, why = read_prediction(store, plan_doc)
    assert got is None and "not of this run's plan.json" in why
    assert predictions([(store, plan_doc)]) == {"loop-run": why}
    notes = analyze([str(old)], sections=["prediction"])["notes"]  # a foreign prediction is worth a note
    assert notes == [f"prediction of run loop-run: {why}"]
    (old / PREDICTED).write_text("{not json")
    assert read_prediction(store, plan_doc)[0] is None
    # a records table without predictions at all (a notebook's): the section still reads
    con = connect([str(old)])
    try:
        assert all(r["note"].startswith("not available") for r in build_report(con, ["prediction"])["prediction"])
    finally:
        con.close()


def test_pricing_follows_the_pool(tmp_path, monkeypatch):
    monkeypatch.setenv("ROBUSTSWEEP_CACHE", str(tmp_path))
    gpu, why = pricing_profile(RunOptions(device="h200", efficiency=0.4), use_gpu=True)
    assert (gpu.name, gpu.efficiency) == ("h200", 0.4) and "--device h200" in why
    none, why = pricing_profile(RunOptions(), use_gpu=False)  # a CPU pool, nothing measured here
    assert none is None and why.startswith("not priced") and "bench cost" in why
    measured = {"flops_per_second": 2e10, "what": "this CPU"}
    cpu, _ = pricing_profile(RunOptions(), use_gpu=False, measured=measured)
    assert (cpu.name, cpu.flops_per_second) == ("cpu", 2e10)
    assert pricing_profile(RunOptions(device="cpu"), use_gpu=True)[0] is None  # never stops a run


def test_an_unpriced_prediction_has_no_seconds_and_is_deterministic(cnn, tmp_path, monkeypatch):
    monkeypatch.setenv("ROBUSTSWEEP_CACHE", str(tmp_path / "cache"))
    job = load_job(_job_file(tmp_path, cnn))
    units = plan(job, 355)
    a = prediction_document(units, "r", job.hash, None, "not priced: a CPU-only pool")
    assert all(u["seconds"] is None and u["flops"] is not None for u in a["units"]) and a["profile"] is None
    assert json.dumps(a) == json.dumps(prediction_document(units, "r", job.hash, None, "not priced: a CPU-only pool"))
    # written once: a second write leaves the file as it was
    store = Store(str(tmp_path / "out"))
    options = RunOptions(out=str(tmp_path / "out"))
    assert write_prediction(store, "r", job.hash, units, options, False) is None
    before = (tmp_path / "out" / "r" / PREDICTED).read_bytes()
    assert write_prediction(store, "r", job.hash, units, RunOptions(device="a100"), True) is None
    assert (tmp_path / "out" / "r" / PREDICTED).read_bytes() == before
    # an RDC on the optimal model has no network: its FLOPs (hence seconds) are unknown, not zero
    rdc = load_job(_rdc_job(tmp_path))
    doc = prediction_document(plan(rdc, 355), "r", rdc.hash, device_profile("h100"), "the run's device profile")
    assert all(u["flops"] is None and u["seconds"] is None and u["forward"][0] > 0 for u in doc["units"])


def _rdc_job(tmp_path: Path) -> Path:
    path = tmp_path / "rdc.toml"
    path.write_text("""name = "rdc"
[data]
dataset = "digits"
limit = 2
[[defenses]]
kind = "rdc"
model = "optimal"
timesteps = 3
[[attacks]]
kind = "none"
""")
    return path


@pytest.mark.slow
def test_run_job_writes_the_prediction_and_a_resume_leaves_it(ray_cluster, cnn, tmp_path):
    from pipeline.runtime import run_job

    job = load_job(_job_file(tmp_path, cnn))
    options = RunOptions(out=str(tmp_path / "out"), workers=1, report=False)
    result = run_job(job, options, progress=False)
    assert result.ok
    path = Path(result.uri) / PREDICTED
    first = path.read_bytes()
    doc = json.loads(first)
    planned = json.loads((Path(result.uri) / "plan.json").read_text())["units"]
    assert [u["unit_id"] for u in doc["units"]] == [u["unit_id"] for u in planned]
    rows = analyze([result.uri], sections=["prediction"])["report"]["prediction"]
    assert rows and all(r["in_range"] for r in rows)
    # resume: one unit's file removed, the run redoes it and leaves predicted.json as it was
    victim = next(Path(result.uri).glob("records/**/*.parquet"))
    victim.unlink()
    again = run_job(job, options, progress=False)
    assert again.done == 1 and path.read_bytes() == first

"""Hostile and careless input, round two: names that look like console markup, rows of another
run or job, pickles that ask for more memory than they hold, glob characters in paths, export
names that collide, file system errors, plan.json of the wrong shape, deep or oddly typed input.

Each case ends in one clear error (exit 2, naming the file, field or path, no traceback) or in
output that shows the input as it is; nothing committed is lost or counted twice."""

from __future__ import annotations

import collections
import copyreg
import json
import os
import pickle
import re
import resource
import shutil
import subprocess
import sys
import time
import types
import warnings
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from typer.testing import CliRunner

from analytics_data import write_sweep
from pipeline.cli import app
from pipeline.errors import BadFileError, CheckpointError
from pipeline.models.safe_pickle import read_pickle
from pipeline.store import Store
from pipeline.store.binding import check_binding


def invoke(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def clean_exit_2(result, *words):
    """The command refused its input: exit 2, one message naming `words`, no traceback."""
    text = " ".join(result.output.split())
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    for word in words:
        assert str(word) in text, (word, text)


@pytest.fixture
def run(tmp_path) -> str:
    return write_sweep(str(tmp_path / "runs" / "sweep-0001"), images=False)


# -- 1: every table cell is text, never console markup ---------------------------------------------


def test_names_in_brackets_show_as_they_are(run):
    result = invoke("report", run, "--section", "summary")
    assert result.exit_code == 0, result.output
    assert "rdc-optimal[timesteps=5]" in result.output and "rdc-optimal[timesteps=20]" in result.output
    result = invoke("compare", run, "--a", "rdc-optimal[timesteps=5]", "--b", "rdc-optimal[timesteps=20]",
                    "--resamples", "10")
    assert result.exit_code == 0, result.output
    assert "rdc-optimal[timesteps=5]" in result.output
    result = invoke("sql", run, """SELECT '[/x]' AS "[/y]", '[link=http://example.com]z[/link]' AS w, '[bold]b' AS v""")
    assert result.exit_code == 0, result.output
    for text in ("[/x]", "[/y]", "[link=http://example.com]z[/link]", "[bold]b"):
        assert text in result.output


# -- 3: pickles that ask for memory they do not hold, or rewrite the reader's records -------------


def test_a_stride_zero_memory_bomb_is_refused_at_once(tmp_path):
    path = tmp_path / "bomb.pkl"
    path.write_bytes(pickle.dumps({"ema": torch.zeros(1).as_strided((100_000, 100_000), (0, 0))}))
    assert path.stat().st_size < 1000  # 40 GB declared in a few hundred bytes
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    start = time.perf_counter()
    with pytest.raises(CheckpointError, match=r"bomb\.pkl: tensor of size \(100000, 100000\) has 10000000000 elements, "
                                              r"more than its storage"):
        read_pickle(path)
    assert time.perf_counter() - start < 0.5
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 100 * 1024  # under 100 MiB more, at peak
    # A repeated element along a dimension is refused even within the storage's size.
    path.write_bytes(pickle.dumps({"ema": torch.zeros(4).as_strided((2, 2), (0, 1))}))
    with pytest.raises(CheckpointError, match=r"stride \(0, 1\): a zero stride repeats one element"):
        read_pickle(path)
    path.write_bytes(pickle.dumps({"ema": torch.arange(6.0).view(2, 3).t()}))  # an ordinary view still reads
    assert torch.equal(read_pickle(path)["ema"], torch.arange(6.0).view(2, 3).t())


class _WithState:
    """Pickles as `reduce` plus a BUILD of `state` onto what it returns."""

    def __init__(self, reduce, args, state):
        self.reduce, self.args, self.state = reduce, args, state

    def __reduce__(self):
        return (self.reduce, self.args, self.state)


@pytest.fixture
def persistence(monkeypatch):
    """A module torch_utils.persistence whose hook only pickles (the reader never imports it)."""
    package, module = types.ModuleType("torch_utils"), types.ModuleType("torch_utils.persistence")

    def _reconstruct_persistent_obj(meta):
        raise RuntimeError("only pickled")

    _reconstruct_persistent_obj.__module__ = module.__name__
    _reconstruct_persistent_obj.__qualname__ = "_reconstruct_persistent_obj"
    module._reconstruct_persistent_obj = _reconstruct_persistent_obj
    package.persistence = module
    monkeypatch.setitem(sys.modules, "torch_utils", package)
    monkeypatch.setitem(sys.modules, "torch_utils.persistence", module)
    return _reconstruct_persistent_obj


def test_build_opcodes_cannot_rewrite_the_readers_records(tmp_path, persistence):
    from torch._utils import _rebuild_tensor_v2

    path = tmp_path / "build.pkl"
    meta = {"type": "class", "version": 6, "module_src": "", "class_name": "VPPrecond", "state": {}}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TypedStorage is deprecated, yet it is what a plain pickle of a tensor holds
        storage = torch.zeros(4).storage()
    cases = {
        "PersistentObject": _WithState(persistence, (meta,), {"class_name": 5, "state": 1}),
        "TensorRef": _WithState(_rebuild_tensor_v2, (storage, 0, (2,), (1,), False, collections.OrderedDict()),
                                {"size": "xx"}),
        "Sequential": _WithState(copyreg._reconstructor, (torch.nn.Sequential, object, None), [1, 2]),
    }
    for name, payload in cases.items():
        path.write_bytes(pickle.dumps({"ema": payload}, protocol=2))
        with pytest.raises(CheckpointError, match=r"build\.pkl.*the pickle sets .*state on "):
            read_pickle(path)
    # What one load sets on a stand-in function does not reach the next load.
    from pipeline.models import safe_pickle

    first, second = safe_pickle._globals(), safe_pickle._globals()
    assert first[("torch._utils", "_rebuild_tensor_v2")] is not second[("torch._utils", "_rebuild_tensor_v2")]


# -- 2: rows of another run or job are refused by name ----------------------------------------------


def reseal(path: Path, **footer) -> None:
    """Rewrite a unit file with other footer values (as a file of another run or job would have)."""
    table = pq.read_table(path)
    meta = {k.decode(): v.decode() for k, v in table.schema.metadata.items() if k.startswith(b"robustsweep.")}
    keep = {k: v for k, v in meta.items() if k.split(".", 1)[1] in ("unit_id", "run_id", "job_hash")}
    keep.update({f"robustsweep.{k}": v for k, v in footer.items()})
    Store(str(path.parent)).write_table(path.name, table.replace_schema_metadata(None), keep)


def records(run: str) -> list[Path]:
    return sorted(Path(run, "records").rglob("*.parquet"))


def total_rows(run: str, *extra) -> int:
    result = invoke("report", run, "--section", "summary", "--format", "json", *extra)
    assert result.exit_code == 0, result.output
    return sum(r["n"] for r in json.loads(result.stdout)["summary"])


FOREIGN = {
    # case: (footer of the stray file, words of the reason)
    "another job's unit": ({"job_hash": "k"}, "rows of job 'k', not of this run's job 'j' (a file of another job)"),
    "another run's unit": ({"run_id": "other-run"}, "rows of run 'other-run', not of this run 'sweep-0001'"),
    "a unit the job never planned": ({"unit_id": "eps-0.5-unit"}, "unit 'eps-0.5-unit' is not in this run's plan.json"),
}


@pytest.mark.parametrize("case", sorted(FOREIGN))
def test_a_file_of_another_run_or_job_is_refused_by_name(case, run, tmp_path):
    footer, words = FOREIGN[case]
    good = total_rows(run)
    other = write_sweep(str(tmp_path / "other" / "sweep-0001"), images=False)
    stray = records(other)[0]
    reseal(stray, **footer)
    copied = Path(run, "records", "defense=extra", stray.name)
    copied.parent.mkdir()
    shutil.copy(stray, copied)
    for args in (["report", run], ["compare", run, "--a", "plain-erm", "--b", "mi-pl", "--resamples", "10"],
                 ["sql", run, "SELECT count(*) FROM results"], ["status", run]):
        clean_exit_2(invoke(*args), copied, words, "--skip-bad")
    assert total_rows(run, "--skip-bad") == good  # nothing counted twice, nothing lost
    status = json.loads(invoke("status", run, "--skip-bad").stdout)
    assert (status["units"], status["done"], status["rows"]) == (5, 5, 100)


def test_records_linked_to_another_runs_are_refused(run, tmp_path):
    other = write_sweep(str(tmp_path / "other" / "sweep-0001"), images=False)
    for path in records(other):
        reseal(path, run_id="other-run")
    shutil.rmtree(Path(run, "records"))
    Path(run, "records").symlink_to(Path(other, "records"))
    clean_exit_2(invoke("status", run), "records/defense=mi-pl", "rows of run 'other-run'")
    clean_exit_2(invoke("report", run), "rows of run 'other-run'")
    status = json.loads(invoke("status", run, "--skip-bad").stdout)
    assert (status["done"], status["rows"], len(status["skipped"])) == (0, 0, 5)


# -- 10: plan.json of the wrong shape, stray files in failures/ ------------------------------------


@pytest.mark.parametrize("plan, words", [
    ([], "it holds a JSON list, not an object"),
    ({"run_id": "sweep-0001", "job_hash": "j"}, "field 'units' is absent, not a list"),
    ({"run_id": "sweep-0001", "job_hash": "j", "units": [{"unit_id": "u"}]}, "units[0].path is absent, not text"),
    ({"run_id": 3, "job_hash": "j", "units": []}, "field 'run_id' is 3, not text"),
])
def test_a_plan_of_the_wrong_shape_is_named(run, plan, words):
    plan_file = Path(run, "plan.json")
    plan_file.write_text(json.dumps(plan))
    for args in (["status", run], ["report", run], ["sql", run, "SELECT 1"]):
        clean_exit_2(invoke(*args), plan_file, words)
    # --skip-bad reads the records by their seals alone, and says so.
    result = invoke("report", run, "--skip-bad", "--section", "summary", "--format", "json")
    assert result.exit_code == 0 and sum(r["n"] for r in json.loads(result.stdout)["summary"]) == 100
    assert f"skipped {plan_file}: {words}" in " ".join(result.output.split())
    with pytest.raises(BadFileError, match=re.escape(words)):  # what `run` checks first, under its lease
        check_binding(Store(str(Path(run).parent)), Path(run).name, "j", {})


def test_a_stray_file_in_failures_is_not_a_failure(run):
    failures = Path(run, "failures")
    failures.mkdir()
    (failures / "notes.json").write_text("{}")
    (failures / "README.txt").write_text("why unit 3 failed")
    (failures / "unit-not-planned.json").write_text("{}")
    result = invoke("status", run)
    assert result.exit_code == 0, result.output
    status = json.loads(result.stdout)
    assert (status["units"], status["done"], status["failed"], status["left"]) == (5, 5, 0, 0)
    assert invoke("report", run, "--section", "summary").exit_code == 0


# -- 4: paths are literal ---------------------------------------------------------------------------


def test_glob_characters_in_paths_are_literal(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for folder in ("runs[1]/t1", "runs*/t1", "runsx/t1", "runs1/t1"):
        write_sweep(folder, images=False)
    for path in records("runs1/t1")[:2]:  # runs1 differs from runs[1]: two units fewer
        path.unlink()
    assert total_rows("runs*/t1") == 100  # not runsx's rows besides
    assert total_rows("runs[1]/t1") == 100 and total_rows("runs1/t1") == 60
    result = invoke("sql", "runs[1]/t1", "SELECT count(*) AS n FROM results", "--format", "json")
    assert result.exit_code == 0 and json.loads(result.stdout) == [{"n": 100}]
    assert json.loads(invoke("status", "runs[1]/t1").stdout)["rows"] == 100
    clean_exit_2(invoke("report", "runs?/t2"), "runs?/t2 is not a run folder")
    # What `run` checks first in a new output folder: nothing there yet, and no error.
    store = Store("runs[2]")
    assert store.check(["r/records/unit-0.parquet"]) == {"r/records/unit-0.parquet": "missing"}
    store.write_json("r/plan.json", {"x": 1})
    assert store.read_json("r/plan.json") == {"x": 1} and not Path("runs2").exists()


# -- 7: file system errors are named, not tracebacks ------------------------------------------------

JOB = """name = "probe"
seed = 0
[data]
dataset = "digits"
limit = 8
shard_size = 4
[[defenses]]
kind = "plain"
[[attacks]]
kind = "pgd"
eps = 0.03
steps = 2
"""


@pytest.fixture
def read_only():
    """Make a folder read-only, even to root (who ignores permission bits): chattr +i as root,
    chmod 555 otherwise; undone afterwards."""
    made = []

    def make(path: Path) -> Path:
        if os.geteuid() == 0:
            proc = subprocess.run(["chattr", "+i", str(path)], capture_output=True, text=True)
            if proc.returncode:
                pytest.skip(f"cannot make {path} immutable here (chattr: {proc.stderr.strip()})")
        else:
            path.chmod(0o555)
        made.append(path)
        return path

    yield make
    for path in made:
        if os.geteuid() == 0:
            subprocess.run(["chattr", "-i", str(path)], check=True)
        else:
            path.chmod(0o755)


def test_outputs_that_cannot_be_written_are_refused_before_any_work(tmp_path, read_only):
    from pipeline.config.job import load_job
    from pipeline.runtime.plan import run_id_for

    job = tmp_path / "job.toml"
    job.write_text(JOB)
    run_id = run_id_for(load_job(job))
    (tmp_path / "a-file").write_text("x")
    (tmp_path / "loop").symlink_to(tmp_path / "loop")
    (tmp_path / "with-lease" / run_id / "lease.json").mkdir(parents=True)
    (tmp_path / "ro").mkdir()
    read_only(tmp_path / "ro")
    cases = {
        "a-file": (tmp_path / "a-file", "a-file is a file, not a folder"),
        "under a file": (tmp_path / "a-file" / "out", "a-file is a file, not a folder"),
        "a symbolic link loop": (tmp_path / "loop", "loop as a folder: Too many levels of symbolic links"),
        "read-only": (tmp_path / "ro" / "out", "ro is read-only"),
        "lease.json a folder": (tmp_path / "with-lease", "lease.json is not a file"),
    }
    for case, (out, words) in cases.items():
        for args in (["validate", job, "--out", out], ["run", job, "--out", out, "--no-report"]):
            clean_exit_2(invoke(*args), "out (--out)", words)
    assert os.listdir(tmp_path / "ro") == [] and (tmp_path / "a-file").read_text() == "x"


def test_report_outputs_that_cannot_be_written_are_refused_before_reading(run, tmp_path, read_only):
    (tmp_path / "a-file").write_text("x")
    (tmp_path / "a-folder").mkdir()
    (tmp_path / "ro").mkdir()
    read_only(tmp_path / "ro")
    cases = [
        (["--html", tmp_path / "a-folder"], "--html", "a-folder is a folder; give a file name"),
        (["--html", tmp_path / "ro" / "page.html"], "--html", "ro is read-only"),
        (["--html", tmp_path / "a-file" / "page.html"], "--html", "a-file is a file, not a folder"),
        (["--plot", tmp_path / "a-file"], "--plot", "a-file is a file, not a folder"),
        (["--plot", tmp_path / "ro" / "figures"], "--plot", "ro is read-only"),
        (["--robustbench", tmp_path / "a-file"], "--robustbench", "a-file is a file, not a folder"),
    ]
    for extra, field, words in cases:
        clean_exit_2(invoke("report", run, "--section", "summary", *extra), field, words)
    assert os.listdir(tmp_path / "ro") == []


@pytest.mark.slow
def test_a_finished_run_on_read_only_storage_resumes_by_reading(ray_cluster, cnn, tmp_path, read_only):
    from pipeline.config.job import load_job
    from pipeline.config.run import RunOptions
    from pipeline.runtime import run_job

    job = tmp_path / "job.toml"
    job.write_text(JOB.replace('kind = "plain"', f'kind = "plain"\nmodel = "{cnn}"'))
    out = tmp_path / "out"
    first = run_job(load_job(job), RunOptions(out=str(out), workers=1, address=ray_cluster, run_id="r"), progress=False)
    assert first.ok and first.rows == 8
    before = {p: p.read_bytes() for p in (out / "r").rglob("*") if p.is_file()}
    (out / "r" / "lease.json").unlink(missing_ok=True)  # as a copy of the run onto read-only storage would have it
    before.pop(out / "r" / "lease.json", None)
    read_only(out / "r")
    result = invoke("run", job, "--out", out, "--run-id", "r", "--address", ray_cluster)
    assert result.exit_code == 0, result.output
    assert "0 units done, 2 already committed" in " ".join(result.output.split())
    assert {p: p.read_bytes() for p in (out / "r").rglob("*") if p.is_file()} == before
    # With a unit missing, the run says what is left instead of failing to write.
    shutil.copytree(out, tmp_path / "partial")
    records(str(tmp_path / "partial" / "r"))[0].unlink()
    read_only(tmp_path / "partial" / "r")
    clean_exit_2(invoke("run", job, "--out", tmp_path / "partial", "--run-id", "r", "--address", ray_cluster),
                 "is read-only and 1 of 2 units are not committed there")


# -- 6: names whose file names collide -------------------------------------------------------------


def test_defense_names_that_become_one_file_name_are_refused(tmp_path):
    job = tmp_path / "job.toml"
    job.write_text(JOB.replace('[[defenses]]\nkind = "plain"',
                               '[[defenses]]\nkind = "plain"\nname = "x/y"\n[[defenses]]\nkind = "plain"\nname = "x_y"'))
    for args in (["validate", job], ["run", job, "--out", tmp_path / "out", "--no-report"]):
        clean_exit_2(invoke(*args), "defenses:", "'x/y' and 'x_y' (file name x_y)")
    assert not (tmp_path / "out").exists()


def rename_defense(path: Path, name: str) -> None:
    """Rewrite a unit file with another defense name in its rows (footer kept, seal renewed)."""
    table = pq.read_table(path)
    meta = {k.decode(): v.decode() for k, v in table.schema.metadata.items()
            if k.split(b".", 1)[-1] in (b"unit_id", b"run_id", b"job_hash")}
    table = table.set_column(table.schema.get_field_index("defense"), "defense", pa.array([name] * table.num_rows))
    Store(str(path.parent)).write_table(path.name, table.replace_schema_metadata(None), meta)


def test_a_report_over_defenses_whose_file_names_collide_writes_no_export(run, tmp_path):
    for path in records(run):
        if "defense=plain-erm" in str(path):
            rename_defense(path, "x/y")
        elif "defense=mi-pl" in str(path):
            rename_defense(path, "x_y")
    assert total_rows(run) == 100  # the report itself still reads every row
    for option in ("--robustbench", "--plot"):
        clean_exit_2(invoke("report", run, option, tmp_path / "exports"), "'x/y' and 'x_y' (file name x_y)")
    assert not (tmp_path / "exports").exists()


# -- 11: deep or oddly typed input ----------------------------------------------------------------


@pytest.mark.parametrize("depth", [40, 500, 5000])
def test_a_job_nested_deep_is_refused_by_name(tmp_path, depth):
    job = tmp_path / "deep.toml"
    job.write_text(JOB.replace('kind = "plain"', 'kind = "plain"\nx = ' + "[" * depth + "]" * depth))
    assert job.stat().st_size < 11_000
    words = "defenses[0].x[0][0]" if depth < 100 else "nests its arrays or tables too deeply"  # past Python's stack
    for args in (["validate", job], ["run", job, "--out", tmp_path / "out", "--no-report"],
                 ["submit", job, "--address", "http://127.0.0.1:9"]):
        clean_exit_2(invoke(*args), "deep.toml", words)
    assert not (tmp_path / "out").exists()


def test_a_checkpoint_config_nested_deep_is_refused_by_name(tmp_path, cnn):
    folder = tmp_path / "ckpt"
    shutil.copytree(cnn, folder)
    job = tmp_path / "job.toml"
    job.write_text(JOB.replace('kind = "plain"', f'kind = "plain"\nmodel = "{folder}"'))
    doc = json.loads((folder / "config.json").read_text())
    for depth, words in ((40, "config.x[0][0]"), (100_000, "nests its values too deeply")):
        doc["config"]["x"] = "DEEP"
        (folder / "config.json").write_text(json.dumps(doc).replace('"DEEP"', "[" * depth + "]" * depth))
        clean_exit_2(invoke("validate", job), "config.json", words)


def test_import_model_refuses_odd_config_and_out(tmp_path):
    src = tmp_path / "model.pt"
    torch.save({"w": torch.zeros(1)}, src)
    (tmp_path / "list.json").write_text("[1, 2]")
    (tmp_path / "deep.json").write_text("[" * 100_000 + "]" * 100_000)
    (tmp_path / "a-file").write_text("x")
    base = ["import-model", src, "--format", "edm-pt", "--arch", "edm-cifar10-cond-vp"]
    clean_exit_2(invoke(*base, "--out", tmp_path / "out", "--config", tmp_path / "list.json"),
                 "--config", "list.json: expected a JSON object", "got a list")
    clean_exit_2(invoke(*base, "--out", tmp_path / "out", "--config", tmp_path / "deep.json"),
                 "deep.json: nested too deeply")
    clean_exit_2(invoke(*base, "--out", tmp_path / "a-file" / "ckpt"), "--out", "a-file is a file, not a folder")
    assert (tmp_path / "a-file").read_text() == "x" and not (tmp_path / "out").exists()


def test_sql_explain_with_options_is_judged_like_its_statement(run):
    result = invoke("sql", run, "EXPLAIN (FORMAT JSON) SELECT count(*) FROM results", "--format", "json")
    assert result.exit_code == 0, result.output
    clean_exit_2(invoke("sql", run, "EXPLAIN (FORMAT JSON) COPY results TO 'x.csv'"), "read-only")
    clean_exit_2(invoke("sql", run, "EXPLAIN (FORMAT JSON SELECT 1"), "bad SQL")


def test_run_redoes_a_unit_file_of_another_run_or_job_at_its_path(run):
    from pipeline.store.unit import check_units

    store, rid = Store(str(Path(run).parent)), Path(run).name
    plan = json.loads(Path(run, "plan.json").read_text())
    units = [types.SimpleNamespace(unit_id=u["unit_id"], path=u["path"], example_ids=u["example_ids"]) for u in plan["units"]]
    assert set(check_units(store, rid, units, "j").values()) == {None}
    first, second = (Path(run, u.path) for u in units[:2])
    reseal(first, run_id="other-run")
    reseal(second, job_hash="k")
    found = check_units(store, rid, units, "j")
    assert found[units[0].unit_id] == "footer run_id is 'other-run', expected 'sweep-0001'"
    assert found[units[1].unit_id] == "footer job_hash is 'k', expected 'j'"
    assert [found[u.unit_id] for u in units[2:]] == [None] * 3

"""Every shipped job validates on its own files: stand-ins in the layouts researchers download
(tests/standins.py) where the job says, then `robustsweep validate` as a user runs it; and the
typed model references leave every shipped job's hashes as they were."""

from __future__ import annotations

import hashlib
import json
import tomllib
from pathlib import Path

import pytest
from typer.testing import CliRunner

from pipeline.cli import app
from pipeline.config.job import content_hash, load_job
from pipeline.config.model_ref import parse_model_ref
from pipeline.data import load_split
from pipeline.runtime.plan import plan
from standins import models_in

REPO = Path(__file__).resolve().parents[1]
JOBS = sorted((REPO / "jobs").glob("*.toml"))
# Computed from the shipped jobs before model references were typed: each file's job hash, its
# unit ids and its parsed defense specs as dumped (what the workers' build cache hashes).
HASHES = json.loads((Path(__file__).parent / "fixtures" / "shipped_job_hashes.json").read_text())


def _uses_files(doc: dict) -> bool:
    models = models_in(doc["defenses"]) + models_in(doc["attacks"])
    return bool(doc["data"].get("root")) or any(parse_model_ref(m).path for m in models)


@pytest.mark.parametrize("path", JOBS, ids=[p.name for p in JOBS])
def test_every_shipped_job_validates_on_its_own_files(path, standins, tmp_path, monkeypatch):
    doc = tomllib.loads(path.read_text())
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("ROBUSTSWEEP_DATA", raising=False)
    if _uses_files(doc):
        # Before its files are there: exit 2, naming what is missing, no traceback.
        missing = CliRunner().invoke(app, ["validate", str(path)])
        assert missing.exit_code == 2, missing.output
        assert "error:" in missing.output and "Traceback" not in missing.output
    standins.job(doc, tmp_path)
    result = CliRunner().invoke(app, ["validate", str(path)])
    assert result.exit_code == 0, result.output
    assert f"ok {path}" in " ".join(result.output.split())


@pytest.mark.parametrize("path", JOBS, ids=[p.name for p in JOBS])
def test_typed_model_references_leave_shipped_job_hashes_unchanged(path):
    # A shipped job's hash names its run folders: editing the file on purpose means recording it
    # here again (tests/fixtures/shipped_job_hashes.json), so that no change moves them by accident.
    want = HASHES.get(path.name)
    assert want is not None, f"{path.name} has no recorded hashes in tests/fixtures/shipped_job_hashes.json"
    assert want["file_sha256"] == hashlib.sha256(path.read_bytes()).hexdigest(), \
        f"{path.name} changed since its hashes were recorded; record them again if the change is meant"
    job = load_job(path)
    n = 10_000 if job.spec.data.dataset in ("cifar10", "cifar100") else load_split(job.spec.data.dataset, job.spec.data.split)[0].shape[0]
    assert job.hash == want["job_hash"]
    assert content_hash(sorted(u.unit_id for u in plan(job, n))) == want["units"]
    assert content_hash([[d.name, d.spec.model_dump()] for d in job.defenses]) == want["defense_specs"]


@pytest.mark.parametrize("path", JOBS, ids=[p.name for p in JOBS])
def test_every_shipped_model_reference_dumps_as_written(path):
    job = load_job(path)
    for d in job.defenses:
        written = d.table.get("model", "default")
        assert d.spec.model_dump()["model"] == written
        assert d.spec.model_dump(mode="json")["model"] == written
        assert str(d.spec.model) == written and parse_model_ref(written) == d.spec.model


@pytest.mark.parametrize("page", ["README.md", "docs/jobs.md"])
def test_the_job_files_the_docs_show_validate(page, tmp_path, monkeypatch):
    """A reader copies the job a page shows into a file and validates it, as the page says."""
    text = (REPO / page).read_text()
    blocks = [b for b in text.split("```toml\n")[1:]]
    jobs = [b.split("```", 1)[0] for b in blocks if "[data]" in b.split("```", 1)[0]]
    assert jobs, f"{page} shows no job file"
    monkeypatch.chdir(tmp_path)
    for i, job in enumerate(jobs):
        path = tmp_path / f"job{i}.toml"
        path.write_text(job)
        result = CliRunner().invoke(app, ["validate", str(path)])
        assert result.exit_code == 0, f"{page}, job {i}: {result.output}"

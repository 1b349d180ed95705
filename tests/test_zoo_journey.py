"""The journey of a researcher with a RobustBench model: its file where RobustBench's loader keeps
it (models/cifar10/Linf/NAME.pt), CIFAR-10 binary files, an MI job naming the model by its zoo
name -> `robustsweep validate` -> `run` -> `report`, each a real command in a fresh process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from pipeline.cli import app
from pipeline.models.registry import build_model
from pipeline.models.robustbench_zoo import buildable
from test_data import CIFAR10_TRAIN_FILES, binary_records
from zoo_cases import random_state, wrap

ROOT = Path(__file__).parent.parent
JOB = """\
name = "mi-zoo"
seed = 0

[data]
dataset = "cifar10"
split = "test"
root = "{root}"
limit = 2
shard_size = 2

[[defenses]]
kind = "mi"
mode = "combined"
name = "mi-combined-wong"
model = "{model}"
n_pl = 2
n_ol = 2

[[attacks]]
kind = "pgd"
eps = 0.03137254901960784
steps = 2
passes = 2
"""


def lay_out(folder: Path, name: str = "Wong2020Fast") -> Path:
    """RobustBench's file of `name` at random weights (its state dict under 'state_dict' with
    DataParallel's "module.", no mu/sigma: as the published Wong2020Fast file), and CIFAR-10 binary
    files whose training batches hold every class (MI draws from each class)."""
    entry = buildable("cifar10", "Linf", name)
    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in build_model(entry.config).state_dict().items()}
    path = folder / "models" / "cifar10" / "Linf" / f"{name}.pt"
    path.parent.mkdir(parents=True)
    torch.save(wrap(random_state(shapes, 5, drop=("mu", "sigma")), "state_dict+module."), path)
    data = folder / "data" / "cifar10"
    data.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i, file in enumerate(CIFAR10_TRAIN_FILES + ["test_batch.bin"]):
        labels = np.arange(10) if file != "test_batch.bin" else rng.integers(0, 10, 4)
        pixels = rng.integers(0, 256, size=(len(labels), 3, 32, 32), dtype=np.uint8)
        (data / file).write_bytes(binary_records(pixels, labels, cifar100=False))
    return path


def cli(*args, cwd: Path, timeout: int = 600, models: Path | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    env.pop("ROBUSTBENCH_MODELS", None)  # RobustBench's default place: ./models
    if models is not None:  # where the driver, and through it the workers, find RobustBench's folder
        env["ROBUSTBENCH_MODELS"] = str(models)
    env.pop("RAY_ADDRESS", None)
    return subprocess.run([sys.executable, "-m", "pipeline.cli", *map(str, args)], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)


@pytest.mark.slow
def test_mi_on_a_robustbench_model_by_name_runs_and_reports(tmp_path, ray_cluster):
    lay_out(tmp_path)
    # The data root is absolute and the models' folder named by ROBUSTBENCH_MODELS: the run goes to
    # the session's Ray cluster, whose workers start in another folder (the variable travels to them).
    (tmp_path / "job.toml").write_text(JOB.format(model="robustbench:Linf/Wong2020Fast", root=tmp_path / "data" / "cifar10"))
    validate = cli("validate", "job.toml", cwd=tmp_path)  # RobustBench's default place, ./models
    assert validate.returncode == 0, validate.stderr
    run = cli("run", "job.toml", "--out", tmp_path / "results", "--workers", "1", "--address", ray_cluster,
              "--no-report", cwd=tmp_path, models=tmp_path / "models")
    assert run.returncode == 0, run.stderr
    (run_dir,) = [p for p in (tmp_path / "results").iterdir() if p.is_dir()]
    report = cli("report", str(run_dir), "--format", "json", "--robustbench", "rb", cwd=tmp_path, timeout=300)
    assert report.returncode == 0, report.stderr
    assert "mi-combined-wong" in report.stdout
    entries = [json.loads(p.read_text()) for p in (tmp_path / "rb").rglob("*.json")]
    assert entries and all("PreActResNet-18" in json.dumps(e) for e in entries)


def test_a_job_naming_a_model_we_cannot_build_exits_2_before_any_work(tmp_path, monkeypatch):
    lay_out(tmp_path)
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("ROBUSTBENCH_MODELS", raising=False)
    (tmp_path / "job.toml").write_text(JOB.format(model="robustbench:Linf/Kang2021Stable", root="data/cifar10"))
    result = CliRunner().invoke(app, ["validate", "job.toml"])
    assert result.exit_code == 2
    assert "defense 'mi-combined-wong'.model: RobustBench's cifar10 Linf model Kang2021Stable" in result.output
    assert "is not supported: its ODE block is not implemented here" in result.output
    (tmp_path / "job.toml").write_text(JOB.format(model="robustbench:Linf/Standard", root="data/cifar10"))
    result = CliRunner().invoke(app, ["validate", "job.toml"])
    assert result.exit_code == 2 and "defense 'mi-combined-wong'.model: model file models/cifar10/Linf/Standard.pt not found; download it" in result.output
    (tmp_path / "job.toml").write_text(JOB.format(model="robustbench:Linf/Wong2020Fast", root="data/cifar10"))
    result = CliRunner().invoke(app, ["validate", "job.toml"])
    assert result.exit_code == 0, result.output

"""A researcher's journey with a published model, command by command as they run it: a small EDM
network saved as the RDC authors save theirs -> `import-model` -> an RDC job on CIFAR-10 binary
files -> `validate` -> `run` on Ray -> `report` with the RobustBench export. Exit codes, the rows
and the export are checked; the rows' clean logits against the same defense built in this process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import torch

from edm_cases import DDPMPP
from pipeline.config.defense import parse_defense
from pipeline.data import load_split
from pipeline.defenses.build import build_defense
from pipeline.models.checkpoint import load_checkpoint
from pipeline.models.edm import build_edm
from pipeline.models.registry import build_model
from pipeline.protocol.evaluate import pass_seed
from pipeline.protocol.predict import predict
from standins import write_cifar_binary

REPO = Path(__file__).resolve().parents[1]
# DDPM++ as the authors configure it (positional embedding, standard encoder and decoder), at a width
# that runs on a CPU in seconds; 32x32, 3 channels and 10 labels, as CIFAR-10 needs.
TINY = {**DDPMPP, "img_resolution": 32, "channel_mult": [1, 2], "attn_resolutions": [16], "label_dim": 10,
        "precond": "edm"}


def cli(*args, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pipeline.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=300, cwd=cwd, env={**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"})


def test_edm_journey_import_validate_run_report(tmp_path, ray_cluster):
    # The authors' layout (DiffusionClassifier, get_edm_cifar_cond): torch.save of an EDMPrecond's state_dict().
    torch.manual_seed(0)
    net = build_edm(TINY)
    (tmp_path / "checkpoints").mkdir()
    torch.save(net.state_dict(), tmp_path / "checkpoints" / "edm_cifar_cond_tiny.pt")
    (tmp_path / "tiny_edm.json").write_text(json.dumps(TINY))
    write_cifar_binary(tmp_path / "data" / "cifar10", n_test=4)
    folder = tmp_path / "checkpoints" / "tiny-edm"

    imported = cli("import-model", "checkpoints/edm_cifar_cond_tiny.pt", "--format", "edm-pt", "--config",
                   "tiny_edm.json", "--out", folder, cwd=tmp_path)
    assert imported.returncode == 0, imported.stderr
    model, config, meta = load_checkpoint(folder, build_model)
    assert meta["source"]["format"] == "edm-pt" and config["arch"] == "edm"
    assert all(torch.equal(model.state_dict()[k], v) for k, v in net.state_dict().items())

    # The workers run in their own folders: the job names its files by absolute path.
    job = tmp_path / "job.toml"
    job.write_text(f'''name = "journey-edm"
[data]
dataset = "cifar10"
root = "{tmp_path / 'data' / 'cifar10'}"
limit = 2
shard_size = 2
[[defenses]]
kind = "rdc"
name = "rdc-tiny-edm"
model = "{folder}"
elbo = "edm"
timesteps = 2
[[attacks]]
kind = "pgd"
eps = 0.03137254901960784
steps = 1
''')
    validated = cli("validate", job, cwd=tmp_path)
    assert validated.returncode == 0, validated.stderr
    assert "1 defenses, 1 attacks, 1 units" in " ".join(validated.stdout.split() + validated.stderr.split())

    ran = cli("run", job, "--out", tmp_path / "results", "--workers", "1", "--address", ray_cluster, "--no-report",
              cwd=tmp_path)
    assert ran.returncode == 0, ran.stderr
    (run_dir,) = (tmp_path / "results").iterdir()
    (records,) = run_dir.glob("records/**/*.parquet")
    rows = sorted(pq.read_table(records).to_pylist(), key=lambda r: r["example_id"])
    assert [(r["example_id"], r["label"], r["defense"], r["attack"], r["path"]) for r in rows] == [
        (0, 0, "rdc-tiny-edm", "pgd-ce", "adaptive"), (1, 1, "rdc-tiny-edm", "pgd-ce", "adaptive")]
    assert all(r["linf"] <= 0.03137254901960784 + 1e-6 for r in rows)
    # The clean logits of the first scoring pass, as the same defense gives them here.
    defense = build_defense(parse_defense({"kind": "rdc", "name": "rdc-tiny-edm", "model": str(folder), "elbo": "edm",
                                           "timesteps": 2, "dataset": "cifar10",
                                           "data_root": str(tmp_path / "data" / "cifar10")}))
    x, y = load_split("cifar10", "test", root=str(tmp_path / "data" / "cifar10"))
    want = predict(defense, x[:2], torch.arange(2), seed=pass_seed(0, 0))
    assert torch.allclose(torch.tensor([r["clean_logits"] for r in rows]), want, rtol=1e-5, atol=1e-5)
    assert [r["clean_pred"] for r in rows] == want.argmax(1).tolist()

    reported = cli("report", run_dir, "--format", "json", "--section", "headline", "--robustbench", tmp_path / "rb",
                   cwd=tmp_path)
    assert reported.returncode == 0, reported.stderr
    (headline,) = json.loads(reported.stdout)["headline"]
    assert (headline["defense"], headline["norm"], headline["n"]) == ("rdc-tiny-edm", "Linf", 2)
    assert headline["robust_acc"] in (0.0, 0.5, 1.0)
    (export,) = (tmp_path / "rb").glob("**/*.json")
    entry = json.loads(export.read_text())
    ours = entry["robustsweep"]  # what a sweep knows beyond RobustBench's model_info keys
    assert (entry["dataset"], ours["threat_model"], entry["eps"], ours["n_examples"]) == ("cifar10", "Linf", "8/255", 2)
    assert ours["defense_table"]["model"] == str(folder)
    assert float(entry["clean_acc"]) == 100 * sum(r["clean_correct"] for r in rows) / 2

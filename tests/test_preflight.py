"""`validate` and `run` refuse, before any work and with exit 2, every value that a run would
trip over later (the issue's probes: overflowing or non-finite numbers, booleans and strings
as numbers, names too long for a file, missing checkpoints, binary job files, an output the
workers cannot share, worker counts below one, a job without examples)."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from pipeline.cli import app
from pipeline.errors import ConfigError
from pipeline.models.checkpoint import save_checkpoint
from pipeline.models.registry import build_model, check_config

BASE = """name = "probe"
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

PROBES = {  # name: (edit of BASE, words the message must hold)
    "eps = 1e308": (("eps = 0.03", "eps = 1e308"), "eps: 1e+308 exceeds the largest Linf perturbation"),
    "eps = inf": (("eps = 0.03", "eps = inf"), "attacks[0].eps: must be a finite number"),
    "eps = true": (("eps = 0.03", "eps = true"), "eps: expected a number, got the boolean true"),
    "eps = '0.03'": (("eps = 0.03", 'eps = "0.03"'), "eps: expected a number, got the string '0.03'"),
    "seed = 2**64": (("seed = 0", "seed = 18446744073709551616"), "seed: Input should be less than or equal to"),
    "seed = true": (("seed = 0", "seed = true"), "seed: Input should be a valid integer"),
    "300-character name": (('name = "probe"', f'name = "{"n" * 300}"'), "name: String should have at most 100"),
    "limit = '4'": (("limit = 8", 'limit = "4"'), "data.limit: Input should be a valid integer"),
    "missing checkpoint": (('kind = "plain"', 'kind = "plain"\nmodel = "/no/such/ckpt"'),
                           "checkpoint folder"),
    "MI threshold = nan": (('kind = "plain"', 'kind = "mi"\nthreshold = nan'), "defenses[0].threshold: must be a finite number"),
    "RDC temperature = inf": (('kind = "plain"', 'kind = "rdc"\nmodel = "optimal"\ntemperature = inf'),
                              "defenses[0].temperature: must be a finite number"),
    "L2 eps past the image": (("eps = 0.03", 'eps = 9.0\nnorm = "L2"'), "exceeds the largest L2 perturbation"),
    "zero examples": (("limit = 8", "ids = []"), "the job selects no examples"),
}


def invoke(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


@pytest.mark.parametrize("probe", sorted(PROBES))
def test_validate_and_run_refuse_each_probe(probe, tmp_path):
    (old, new), words = PROBES[probe]
    assert old in BASE
    job = tmp_path / "job.toml"
    job.write_text(BASE.replace(old, new))
    out = tmp_path / "out"
    for args in (["validate", job], ["run", job, "--out", out, "--no-report"]):
        result = invoke(*args)
        assert result.exit_code == 2, (args, result.output)
        assert words in " ".join(result.output.split()), result.output
        assert "Traceback" not in result.output
    assert not out.exists()  # refused before anything was written


def test_base_job_validates(tmp_path):
    job = tmp_path / "job.toml"
    job.write_text(BASE)
    result = invoke("validate", job, "--out", tmp_path / "out")
    assert result.exit_code == 0, result.output
    assert "2 units" in result.output and not (tmp_path / "out").exists()


RUN_OPTIONS = {
    "--out memory://x": (["--out", "memory://x"], "lives in one process's memory"),
    "--workers -1": (["--workers", "-1"], "workers (--workers) must be"),
    "--workers 0": (["--workers", "0"], "got 0"),
    "--run-id too long": (["--run-id", "r" * 300], "run_id (--run-id): expected 1-100 characters"),
    "--run-id with a slash": (["--run-id", "a/b"], "run_id (--run-id)"),
}


@pytest.mark.parametrize("case", sorted(RUN_OPTIONS))
def test_run_refuses_bad_options_before_any_work(case, tmp_path):
    args, words = RUN_OPTIONS[case]
    job = tmp_path / "job.toml"
    job.write_text(BASE)
    if "--out" not in args:
        args = args + ["--out", tmp_path / "out"]
    result = invoke("run", job, "--no-report", "--address", "127.0.0.1:1", *args)
    assert result.exit_code == 2, result.output
    assert words in " ".join(result.output.split())
    assert not (tmp_path / "out").exists()
    if "memory" in case:
        assert invoke("validate", job, "--out", "memory://x").exit_code == 2


def test_binary_job_file_exits_2(tmp_path):
    job = tmp_path / "job.toml"
    job.write_bytes(bytes(range(256)))
    for args in (["validate", job], ["run", job, "--out", tmp_path / "out"]):
        result = invoke(*args)
        assert result.exit_code == 2 and "is not text (UTF-8 TOML)" in result.output


@pytest.mark.parametrize("width", [-1, 0, 10**9, 1e9, True, "32"])
def test_checkpoint_config_range_checked_before_allocation(width, tmp_path):
    config = {"arch": "cnn", "in_channels": 1, "num_classes": 10, "image_size": 8, "width": width}
    with pytest.raises(ConfigError, match="model config width: expected integers in"):
        check_config(config)
    with pytest.raises(ConfigError, match="width"):
        build_model(config)
    folder = tmp_path / "ckpt"
    good = build_model({**config, "width": 8})
    save_checkpoint(folder, good, good.config, {})
    doc = json.loads((folder / "config.json").read_text())
    doc["config"]["width"] = width
    (folder / "config.json").write_text(json.dumps(doc))
    job = tmp_path / "job.toml"
    job.write_text(BASE.replace('kind = "plain"', f'kind = "plain"\nmodel = "{folder}"'))
    result = invoke("validate", job)
    assert result.exit_code == 2 and "width" in result.output and str(folder) in " ".join(result.output.split())


def test_a_model_too_large_is_refused_without_allocating():
    # A UNet with 4096 base channels holds billions of parameters: refused on the meta device, nothing allocated.
    with pytest.raises(ConfigError, match="parameters, more than"):
        check_config({"arch": "unet", "in_channels": 1, "image_size": 8, "num_classes": 10, "base_channels": 4096,
                      "channel_mult": [1, 2], "num_res_blocks": 2})


def test_run_address_that_refuses_exits_1_naming_it(tmp_path, monkeypatch):
    import socket

    with socket.socket() as s:  # a loopback port with nothing listening
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("ROBUSTSWEEP_RAY_RETRY_SECONDS", "1")
    job = tmp_path / "job.toml"
    job.write_text(BASE)
    result = invoke("run", job, "--out", tmp_path / "out", "--address", f"127.0.0.1:{port}", "--no-report")
    assert result.exit_code == 1, result.output  # README: a cluster that cannot be reached is a runtime failure
    text = " ".join(result.output.split())
    assert f"no Ray cluster answers at 127.0.0.1:{port}" in text and "retried for 1 s" in text
    assert "Traceback" not in result.output and not (tmp_path / "out").exists()

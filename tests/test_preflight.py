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
    "--run-id with a trailing newline": (["--run-id", "r1\n"], "run_id (--run-id): expected 1-100 characters"),
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


# --- models that do not fit their dataset: exit 2 in validate and run, naming model, field and both values ---

def _cifar_job(model: str, kind: str = "rdc") -> str:
    extra = 'elbo = "edm"\ntimesteps = 2\n' if kind == "rdc" else ""
    return (f'name = "fit"\n[data]\ndataset = "cifar10"\nroot = "data/cifar10"\nlimit = 2\n'
            f'[[defenses]]\nkind = "{kind}"\nmodel = "{model}"\n{extra}[[attacks]]\nkind = "none"\n')


def _edm_folder(path, **change):
    from edm_cases import DDPMPP
    from standins import write_folder

    return write_folder(path, {"arch": "edm", **DDPMPP, "precond": "edm", "img_resolution": 32, "label_dim": 10, **change})


def _digits_cnn(path, **change):
    from standins import write_folder

    return write_folder(path, {"arch": "cnn", "in_channels": 1, "num_classes": 10, "image_size": 8, **change})


MISFITS = {  # name: (write the model under tmp_path -> (dataset, model string, defense kind), words of the message)
    "16x16 EDM network on 32x32 CIFAR-10": (
        lambda t, s: ("cifar10", str(_edm_folder(t / "edm16", img_resolution=16)), "rdc"),
        "has img_resolution = 16, but dataset cifar10 has 32x32 images (img_resolution = 32 needed)"),
    "1-channel EDM network on CIFAR-10": (
        lambda t, s: ("cifar10", str(_edm_folder(t / "edm1c", img_channels=1)), "rdc"),
        "has img_channels = 1, but dataset cifar10 has 3-channel images (img_channels = 3 needed)"),
    "folder whose config says 7 classes": (
        lambda t, s: ("digits", str(_digits_cnn(t / "cnn7", num_classes=7)), "plain"),
        "has num_classes = 7, but dataset digits has 10 classes (num_classes = 10 needed)"),
    "3-channel classifier on digits": (
        lambda t, s: ("digits", str(_digits_cnn(t / "cnn3", in_channels=3)), "mi"),
        "has in_channels = 3, but dataset digits has 1-channel images (in_channels = 1 needed)"),
    "16x16 classifier on 8x8 digits": (
        lambda t, s: ("digits", str(_digits_cnn(t / "cnn16", image_size=16)), "plain"),
        "has image_size = 16, but dataset digits has 8x8 images (image_size = 8 needed)"),
    "CIFAR-100 EDM preset on CIFAR-10": (
        lambda t, s: ("cifar10", f"edm:rdc-cifar100-cond-edm:{_edm_file(s, t, 'rdc-cifar100-cond-edm')}", "rdc"),
        "has label_dim = 100, but dataset cifar10 has 10 classes (label_dim = 10 needed)"),
    "CIFAR-100 EDM file under a CIFAR-10 preset": (
        lambda t, s: ("cifar10", f"edm:rdc-cifar10-cond-edm:{_edm_file(s, t, 'rdc-cifar100-cond-edm')}", "rdc"),
        "does not fit rdc-cifar10-cond-edm (label_dim 10, precond edm): first mismatch: tensor 'model.map_label.weight' "
        "has shape (128, 100) in the file, the model expects (128, 10)"),
    "100-class RobustBench file on CIFAR-10": (
        lambda t, s: ("cifar10", f"robustbench:small-cnn:{_rb_file(t, 100)}", "plain"),
        "does not fit small-cnn (10 classes): first mismatch"),
}


def _edm_file(standins, where, preset):
    from pipeline.config.model_ref import ModelRef

    standins.model(ModelRef("edm", f"{preset}.pt", preset), "cifar10", where)
    return where / f"{preset}.pt"


def _rb_file(where, classes):
    from standins import write_robustbench

    return write_robustbench(where / f"rb{classes}.pt", "small-cnn", classes)


@pytest.mark.parametrize("case", sorted(MISFITS))
def test_a_model_that_does_not_fit_its_dataset_is_refused_before_any_work(case, tmp_path, standins, monkeypatch):
    write, words = MISFITS[case]
    monkeypatch.chdir(tmp_path)
    dataset, model, kind = write(tmp_path, standins)
    text = _cifar_job(model, kind)
    if dataset == "digits":
        text = text.replace('dataset = "cifar10"\nroot = "data/cifar10"', 'dataset = "digits"').replace(
            'elbo = "edm"\n', "")
    else:
        standins.data("cifar10", "data/cifar10", tmp_path)
    job = tmp_path / "job.toml"
    job.write_text(text)
    out = tmp_path / "out"
    for args in (["validate", job], ["run", job, "--out", out, "--no-report"]):
        result = invoke(*args)
        said = " ".join(result.output.split())
        assert result.exit_code == 2, (args, result.output)
        assert "defense " in said and ".model: model " in said and model in said, said
        assert words in said, said
        assert "Traceback" not in result.output
    assert not out.exists()


def test_a_folder_whose_weights_do_not_fit_its_config_is_refused_from_the_header(tmp_path):
    from safetensors.torch import load_file, save_file
    from standins import write_folder

    folder = write_folder(tmp_path / "cnn", {"arch": "cnn", "in_channels": 1, "num_classes": 10, "image_size": 8})
    job = tmp_path / "job.toml"
    job.write_text(BASE.replace('kind = "plain"', f'kind = "plain"\nmodel = "{folder}"'))
    assert invoke("validate", job).exit_code == 0
    state = load_file(str(folder / "model.safetensors"))
    name = sorted(state)[0]
    save_file({**state, name: state[name][:1].contiguous()}, str(folder / "model.safetensors"))
    result = invoke("validate", job)
    said = " ".join(result.output.split())
    assert result.exit_code == 2 and f"first mismatch: tensor '{name}': shape (1," in said, said
    (folder / "model.safetensors").unlink()
    result = invoke("validate", job)
    assert result.exit_code == 2 and "model.safetensors not found (the folder has a config but no weights)" in " ".join(
        result.output.split())


def test_the_authors_lm_network_must_be_unconditional(tmp_path, standins, monkeypatch):
    monkeypatch.chdir(tmp_path)
    standins.data("cifar10", "data/cifar10", tmp_path)
    cond, uncond = _edm_folder(tmp_path / "cond"), _edm_folder(tmp_path / "uncond", label_dim=0)
    job = tmp_path / "job.toml"
    text = _cifar_job(str(cond))
    lm = 'lm = {{ variant = "authors", model = "{}" }}\n'
    job.write_text(text.replace("timesteps = 2\n", "timesteps = 2\n" + lm.format(cond)))
    out = tmp_path / "out"
    for args in (["validate", job], ["run", job, "--out", out, "--no-report"]):
        result = invoke(*args)
        said = " ".join(result.output.split())
        assert result.exit_code == 2, said
        assert (f"defense 'rdc-cond-edmw-alm'.lm.model: model {cond} has label_dim = 10, but this network must be "
                f"unconditional (label_dim = 0 needed)") in said, said
    assert not out.exists()
    job.write_text(text.replace("timesteps = 2\n", "timesteps = 2\n" + lm.format(uncond)))
    assert invoke("validate", job).exit_code == 0

"""RobustBench's zoo by name: architectures and loading equal to RobustBench's own code.

The fixtures (tests/fixtures/robustbench_zoo.*) were made by running RobustBench's model
classes and its `load_model` on the random weights of tests/zoo_cases.py; only their logits,
and the digests of their state dicts' names and shapes, are kept.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from pipeline.cli import app
from pipeline.config.model_ref import parse_model_ref
from pipeline.errors import CheckpointError, ConfigError
from pipeline.models.registry import build_model
from pipeline.models.robustbench_zoo import ZOO, ZooEntry, ZooError, buildable, default_file, fit_zoo_state, zoo_entries
from pipeline.models.zoo import load_model
from zoo_cases import ARCH_CASES, NAME_CASES, random_state, signature, wrap

FIXTURES = Path(__file__).parent / "fixtures"
TENSORS = load_file(FIXTURES / "robustbench_zoo.safetensors")
DOC = json.loads((FIXTURES / "robustbench_zoo.json").read_text())


def shapes_of(model) -> dict:
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.mark.parametrize("case", sorted(ARCH_CASES))
def test_architectures_equal_robustbench_classes(case):
    spec = ARCH_CASES[case]
    model = build_model({"num_classes": 10, "in_channels": 3, **spec["config"]}).eval()
    shapes = shapes_of(model)
    assert signature(shapes) == DOC["arch"][case]["signature"]  # RobustBench's names and shapes
    state = random_state(shapes, spec["seed"], drop=spec.get("drop", ()))
    model.load_state_dict(state, strict=not spec.get("drop"))
    with torch.no_grad():
        logits = model(TENSORS["x"].clone())
    ref = TENSORS[f"arch.{case}"]
    assert ref.std() > 0.01 and logits.shape == ref.shape
    assert rel(logits, ref) < 1e-5


@pytest.mark.parametrize("key", sorted(NAME_CASES))
def test_zoo_names_load_as_robustbench_loads_them(key, tmp_path, monkeypatch):
    """Files in RobustBench's layout, wrapped as published files are ({'state_dict'}, "module.",
    "model.", {'last', 'best'}, no mu/sigma, no num_batches_tracked), found by name."""
    dataset, threat, name = key.split("/")
    spec = NAME_CASES[key]
    entry = buildable(dataset, threat, name)
    with torch.device("meta"):
        shapes = shapes_of(build_model(entry.config))
    monkeypatch.setenv("ROBUSTBENCH_MODELS", str(tmp_path / "models"))
    path = default_file(dataset, threat, name)
    assert path == tmp_path / "models" / dataset / threat / f"{name}.pt"
    path.parent.mkdir(parents=True)
    torch.save(wrap(random_state(shapes, spec["seed"], drop=spec.get("drop", ())), spec["variant"]), path)
    ref = TENSORS[f"name.{key}"]
    for model_ref in (f"robustbench:{threat}/{name}", f"robustbench:{threat}/{name}:{path}"):
        model, config, meta = load_model(parse_model_ref(model_ref), dataset, "erm")
        with torch.no_grad():
            assert rel(model(TENSORS["x"].clone()), ref) < 1e-5
        assert meta["source"]["zoo"] == key and config == entry.config


def test_every_supported_entry_has_robustbench_names_and_shapes():
    """Every entry marked supported builds, with exactly the state-dict names and shapes of
    RobustBench's model class; every other one is refused by name with its reason."""
    for (dataset, threat, name), entry in ZOO.items():
        key = f"{dataset}/{threat}/{name}"
        if entry.supported:
            with torch.device("meta"):
                model = build_model(entry.config)
            assert signature(shapes_of(model)) == DOC["signatures"][key], key
            assert model.num_classes == {"cifar10": 10, "cifar100": 100}[dataset]
        else:
            with pytest.raises(ZooError) as err:
                load_model(parse_model_ref(f"robustbench:{threat}/{name}"), dataset, "erm")
            assert name in str(err.value) and entry.reason in str(err.value)
    c10_linf = zoo_entries("cifar10", "Linf")
    assert len(c10_linf) == 76 and sum(e.supported for e in c10_linf) >= 60
    assert len(zoo_entries("cifar10", "L2")) == 21 and len(zoo_entries("cifar100", "Linf")) == 38
    dm = [e for e in ZOO.values() if e.config and e.config["arch"] in ("dm-wrn", "dm-preact-resnet")]
    assert len(dm) == sum("DM" in e.arch for e in ZOO.values())


def test_a_file_that_does_not_fit_is_refused_strictly(tmp_path):
    entry = buildable("cifar10", "Linf", "Rebuffi2021Fixing_R18_ddpm")
    with torch.device("meta"):
        shapes = shapes_of(build_model(entry.config))
    path = tmp_path / "r18.pt"
    torch.save(random_state(shapes, 0, drop=("layer_0.0.conv_2d_1.weight",)), path)
    with pytest.raises(CheckpointError, match=r"which RobustBench loads strictly: tensor "
                                              r"'layer_0.0.conv_2d_1.weight' is missing from the file \(1 missing"):
        load_model(parse_model_ref(f"robustbench:Linf/Rebuffi2021Fixing_R18_ddpm:{path}"), "cifar10", "erm")
    # Wong2020Fast may lack mu and sigma, and nothing else.
    wong = buildable("cifar10", "Linf", "Wong2020Fast")
    with torch.device("meta"):
        shapes = shapes_of(build_model(wong.config))
    torch.save(random_state(shapes, 0, drop=("mu", "sigma", "linear.bias")), path)
    with pytest.raises(CheckpointError, match="tensor 'mu' is missing from the file \\(3 missing"):
        load_model(parse_model_ref(f"robustbench:Linf/Wong2020Fast:{path}"), "cifar10", "erm")
    shapes["linear.weight"] = (10, 256)
    torch.save(random_state(shapes, 0), path)
    with pytest.raises(CheckpointError, match=r"'linear.weight' has shape \(10, 256\) in the file, the model expects \(10, 512\)"):
        load_model(parse_model_ref(f"robustbench:Linf/Wong2020Fast:{path}"), "cifar10", "erm")


def test_names_we_do_not_have_are_refused_by_name(tmp_path, monkeypatch):
    monkeypatch.setenv("ROBUSTBENCH_MODELS", str(tmp_path))
    with pytest.raises(ZooError, match="RobustBench has no cifar10 Linf model named 'Wang2023Better_WRN-28-11'; "
                                       "did you mean one of .*Wang2023Better_WRN-28-10"):
        load_model(parse_model_ref("robustbench:Linf/Wang2023Better_WRN-28-11"), "cifar10", "erm")
    with pytest.raises(ZooError, match="no cifar10 L2 model named 'Carmon2019Unlabeled'"):
        load_model(parse_model_ref("robustbench:L2/Carmon2019Unlabeled"), "cifar10", "erm")
    with pytest.raises(ZooError, match="dataset is 'digits'"):
        load_model(parse_model_ref("robustbench:Linf/Standard"), "digits", "erm")
    with pytest.raises(ZooError, match=r"Kang2021Stable \(WRN-70-16 \+ neural ODE block \(SODEF\)\) is not supported"):
        load_model(parse_model_ref("robustbench:Linf/Kang2021Stable"), "cifar10", "erm")
    with pytest.raises(CheckpointError, match=f"RobustBench model file {tmp_path}/cifar100/Linf/Gowal2020Uncovering.pt "
                                              "not found"):
        load_model(parse_model_ref("robustbench:Linf/Gowal2020Uncovering"), "cifar100", "erm")


def test_an_arch_preset_on_a_zoo_file_is_refused_not_loaded_unnormalised(tmp_path):
    """robustbench:ARCH:PATH on Wong2020Fast's file would drop the normalisation its class applies."""
    path = tmp_path / "models" / "cifar10" / "Linf" / "Wong2020Fast.pt"
    path.parent.mkdir(parents=True)
    with torch.device("meta"):
        shapes = shapes_of(build_model(buildable("cifar10", "Linf", "Wong2020Fast").config))
    torch.save(random_state(shapes, 0, drop=("mu", "sigma")), path)
    with pytest.raises(ZooError, match=f"name it instead: robustbench:Linf/Wong2020Fast:{path}"):
        load_model(parse_model_ref(f"robustbench:preact-resnet-18:{path}"), "cifar10", "erm")


def test_zoo_reference_parse_and_default_place(monkeypatch):
    ref = parse_model_ref("robustbench:Linf/Wang2023Better_WRN-28-10")
    assert (ref.kind, ref.threat, ref.name, ref.path) == ("robustbench", "Linf", "Wang2023Better_WRN-28-10", None)
    monkeypatch.delenv("ROBUSTBENCH_MODELS", raising=False)
    assert ref.zoo_path("cifar10") == Path("models/cifar10/Linf/Wang2023Better_WRN-28-10.pt")
    monkeypatch.setenv("ROBUSTBENCH_MODELS", "/data/rb")
    assert ref.zoo_path("cifar100") == Path("/data/rb/cifar100/Linf/Wang2023Better_WRN-28-10.pt")
    assert parse_model_ref("robustbench:L2/Standard:x/y.pt").zoo_path("cifar10") == Path("x/y.pt")
    for bad in ("robustbench:Linfinity/Standard", "robustbench:Linf/", "robustbench:Linf/A/B"):
        with pytest.raises(ConfigError, match="robustbench:THREAT/NAME"):
            parse_model_ref(bad)


def test_models_command_lists_presets_and_the_zoo():
    result = CliRunner().invoke(app, ["models", "--dataset", "cifar10", "--threat", "Linf", "--format", "json"])
    assert result.exit_code == 0, result.output
    rows = json.loads(result.output)
    assert len(rows) == 76 and all(r["dataset"] == "cifar10" for r in rows)
    by_name = {r["model"]: r for r in rows}
    assert by_name["robustbench:Linf/Wang2023Better_WRN-28-10"]["arch"] == "DMWideResNet-28-10 (SiLU)"
    assert by_name["robustbench:Linf/Kang2021Stable"]["supported"] is False
    text = CliRunner().invoke(app, ["models"]).output
    assert "edm:rdc-cifar10-cond-edm:PATH" in text and "robustbench:wrn-28-10:PATH" in text
    assert "robustbench:Linf/Gowal2020Uncovering_extra" in text  # CIFAR-100's too
    bad = CliRunner().invoke(app, ["models", "--threat", "L3"])
    assert bad.exit_code == 2 and "--threat 'L3'" in bad.output


def test_a_meansparse_file_that_would_update_its_statistics_is_refused():
    config = {"num_classes": 10, "in_channels": 3, **ARCH_CASES["dm-wrn-10-2-meansparse"]["config"]}
    entry = ZooEntry("cifar10", "Linf", "Amini2024MeanSparse_S-WRN-94-16", "MeanSparse DMWideResNet", config)
    model = build_model(config)
    state = random_state(shapes_of(model), 0)
    fit_zoo_state(model, dict(state), entry, "ok.pt")
    state["layer.1.block.0.meansparse_2.flag_update_statistics"] = torch.tensor(1)
    with pytest.raises(CheckpointError, match="bad.pt: layer.1.block.0.meansparse_2.flag_update_statistics is set: "
                                              "RobustBench's Amini2024MeanSparse_S-WRN-94-16 .* would update"):
        fit_zoo_state(build_model(config), state, entry, "bad.pt")

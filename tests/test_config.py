"""Config parsed once and carried as types: the dataset registry, defense specs, planned names, surrogates."""

import typing
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from pipeline.cli import app
from pipeline.config.datasets import DATASETS, DatasetName, dataset_info
from pipeline.config.defense import PlainSpec, RDCSpec
from pipeline.config.job import parse_job
from pipeline.config.model_ref import ModelRef
from pipeline.config.run import RunOptions
from pipeline.data import load_split
from pipeline.errors import ConfigError, DatasetError
from pipeline.runtime import plan, run_job
from pipeline.runtime.worker import Worker, WorkerContext
from pipeline.store import Store


def test_registry_names_the_datasets_the_specs_accept():
    assert set(typing.get_args(DatasetName)) == set(DATASETS)
    with pytest.raises(DatasetError, match="unknown dataset 'mnist'.*'digits'"):
        dataset_info("mnist")


def test_digits_images_have_the_registered_shape_and_classes():
    info = dataset_info("digits")
    x, y = load_split("digits", "test")
    assert tuple(x.shape[1:]) == info.shape
    assert int(y.max()) + 1 == info.classes
    assert not info.needs_root



def transfer_doc(cnn, surrogate=None, seed=3):
    return {
        "name": "transfer", "seed": seed,
        "data": {"dataset": "digits", "split": "test", "limit": 4, "shard_size": 2},
        "defenses": [{"kind": "rdc", "model": "optimal", "timesteps": 2}],
        "attacks": [{"kind": "transfer", "surrogate": surrogate or {"kind": "plain", "model": cnn},
                     "attack": {"kind": "pgd", "eps": 0.1, "steps": 2}, "passes": 1}],
    }


def test_units_carry_parsed_specs_and_the_surrogate_inherits_from_the_attacked_defense(cnn):
    job = parse_job(transfer_doc(cnn, seed=3))
    units = plan(job, 355)
    assert len(units) == 2
    for u in units:
        assert isinstance(u.defense_spec, RDCSpec) and u.defense_spec.temperature == 1.0
        assert u.attack_spec.kind == "transfer"
        assert isinstance(u.surrogate_spec, PlainSpec)
        assert (u.surrogate_spec.dataset, u.surrogate_spec.seed, u.surrogate_spec.model) == ("digits", 3, ModelRef("folder", cnn))
    # Its own seed wins over the inherited one.
    (u, _) = plan(parse_job(transfer_doc(cnn, {"kind": "plain", "model": cnn, "seed": 9})), 355)
    assert u.surrogate_spec.seed == 9


@pytest.mark.parametrize("surrogate,field", [({"kind": "magic"}, "attacks[0].surrogate.kind"),
                                             ({"kind": "plain", "method": "magic"}, "attacks[0].surrogate.method"),
                                             ({"kind": "plain", "dataset": "cifar10"}, "attacks[0].surrogate.dataset")])
def test_a_bad_surrogate_fails_with_the_job_naming_its_field(cnn, surrogate, field):
    with pytest.raises(ConfigError, match=field.replace("[", r"\[").replace("]", r"\]")):
        parse_job(transfer_doc(cnn, surrogate))


def test_validate_exits_2_on_a_magic_surrogate(tmp_path):
    job = tmp_path / "job.toml"
    job.write_text('[data]\ndataset = "digits"\nlimit = 2\n'
                   '[[defenses]]\nkind = "rdc"\nmodel = "optimal"\ntimesteps = 2\n'
                   '[[attacks]]\nkind = "transfer"\nsurrogate = { kind = "magic" }\nattack = { kind = "pgd" }\n')
    result = CliRunner().invoke(app, ["validate", str(job)])
    assert result.exit_code == 2
    assert "attacks[0].surrogate.kind" in result.output and "magic" in result.output


def test_the_worker_builds_the_surrogate_once_on_its_device(cnn, tmp_path):
    job = parse_job(transfer_doc(cnn))
    units = plan(job, 355)
    worker = Worker("w0", "cpu")
    ctx = WorkerContext("r", job.hash, str(tmp_path), job.spec.seed, job.spec.data)
    for u in units:
        worker.run_unit(u, ctx)
    built = list(worker.defenses.values())
    assert sorted(type(d).__name__ for d in built) == ["Plain", "RDC"]  # one of each for both units
    assert all(p.device == torch.device(worker.device) for d in built for p in d.parameters())
    records = Store(str(tmp_path)).read_records("r/records").to_pylist()
    assert len(records) == 4
    # The surrogate stands on a checkpoint folder: named by it, not by a training method it may not have had.
    assert {r["path"] for r in records} == {f"transfer:plain-{Path(cnn).name}"}
    assert {(r["defense"], r["attack"]) for r in records} == {("rdc-optimal", "transfer-pgd-ce")}


@pytest.mark.slow
def test_swept_defenses_and_attacks_keep_their_names_in_the_records(ray_cluster, tmp_path):
    job = parse_job({
        "name": "names", "seed": 0,
        "data": {"dataset": "digits", "split": "test", "limit": 2, "shard_size": 2},
        "defenses": [{"kind": "rdc", "model": "optimal", "timesteps": 2, "sweep": {"temperature": [0.5, 1.0]}}],
        "attacks": [{"kind": "none", "sweep": {"passes": [1, 2]}}],
    })
    result = run_job(job, RunOptions(out=str(tmp_path), workers=1), progress=False)
    assert result.ok and result.units == 4
    table = Store(result.uri).read_records()
    pairs = set(zip(table.column("defense").to_pylist(), table.column("attack").to_pylist()))
    assert pairs == {(d, a) for d in ("rdc-optimal[temperature=0.5]", "rdc-optimal[temperature=1.0]")
                     for a in ("clean[passes=1]", "clean[passes=2]")}


def test_a_unit_read_back_from_plan_json_has_the_same_specs_and_names(cnn):
    from pipeline.runtime.plan import Unit

    for u in plan(parse_job(transfer_doc(cnn)), 355):
        back = Unit.from_dict(u.as_dict())
        assert (back.unit_id, back.defense, back.attack, back.path) == (u.unit_id, u.defense, u.attack, u.path)
        assert (back.defense_spec, back.attack_spec, back.surrogate_spec) == (u.defense_spec, u.attack_spec, u.surrogate_spec)


@pytest.mark.parametrize("text", ["default", "optimal", "checkpoints/cifar10-unet", "s3://bucket/ckpt", "C:/models/x",
                                  "edm:ckpt/edm-cifar10-32x32-cond-vp.pkl", "edm:rdc-cifar10-cond-edm:ckpt/a:b.pt",
                                  "robustbench:wrn-28-10:models/cifar10/Linf/Standard.pt"])
def test_a_model_reference_is_parsed_once_and_dumped_as_written(text):
    from pipeline.config.defense import parse_defense
    from pipeline.config.model_ref import parse_model_ref

    ref = parse_model_ref(text)
    assert str(ref) == text and parse_model_ref(str(ref)) == ref
    kind = "plain" if ref.kind in ("folder", "robustbench", "default") else "rdc"
    spec = parse_defense({"kind": kind, "model": text})
    assert spec.model == ref and isinstance(spec.model, ModelRef)
    assert spec.model_dump()["model"] == spec.model_dump(mode="json")["model"] == text
    assert parse_defense(spec.model_dump()) == spec


def test_a_bad_model_reference_names_the_field():
    from pipeline.config.defense import parse_defense
    from pipeline.errors import ConfigError

    with pytest.raises(ConfigError, match=r"defense\.model: .*unknown prefix 'hf'"):
        parse_defense({"kind": "plain", "model": "hf:org/model"})
    with pytest.raises(ConfigError, match=r"defense\.model: .*model must be a non-empty string, got 3"):
        parse_defense({"kind": "plain", "model": 3})
    with pytest.raises(ConfigError, match=r"defense\.model: .*edm model 'edm:x\.pkl' cannot be a classifier"):
        parse_defense({"kind": "plain", "model": "edm:x.pkl"})

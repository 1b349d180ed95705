"""build_defense from job tables, the public API, and the CLI's exit codes."""

import json
import subprocess
import sys

import pytest
import torch

from pipeline.models.checkpoint import save_checkpoint
from pipeline.data import load_split
from pipeline.defenses import MixupInference, Plain, RDC, build_defense
from pipeline.errors import CheckpointError, ConfigError
from pipeline.config import spec
from pipeline.config.defense import parse_defense


def test_load_split_contract():
    x, y = load_split("digits", "test")
    assert x.dtype == torch.float32 and y.dtype == torch.int64
    assert x.shape == (355, 1, 8, 8) and y.shape == (355,)
    assert 0 <= float(x.min()) and float(x.max()) <= 1


def test_build_rdc_on_the_optimal_model():
    d = build_defense(spec({"kind": "rdc", "model": "optimal", "dataset": "digits", "timesteps": 100,
                            "lm": {"steps": 5, "timesteps": 10, "gradient": "exact"}, "seed": 3}))
    assert isinstance(d, RDC) and d.name == "rdc-optimal-lm"
    assert d.ts.numel() == 100 and d.lm.steps == 5 and d.lm.gradient == "exact" and d.draws.seed == 3
    assert d.lm.fixed_t.numel() == 10
    assert build_defense(spec({"kind": "rdc", "model": "optimal"})).ts.numel() == 1000


@pytest.fixture(scope="module")
def cnn_checkpoint(tmp_path_factory):
    from pipeline.models.registry import build_model

    folder = tmp_path_factory.mktemp("ckpt") / "cnn"
    model = build_model({"arch": "cnn", "in_channels": 1, "num_classes": 10, "image_size": 8})
    save_checkpoint(folder, model, model.config, {"method": "test"})
    return folder


def test_build_plain_and_mi_from_a_checkpoint(cnn_checkpoint):
    plain = build_defense(spec({"kind": "plain", "model": str(cnn_checkpoint)}))
    assert isinstance(plain, Plain) and plain.name == "plain-cnn"  # the folder's name, not a training method
    mi = build_defense(spec({"kind": "mi", "mode": "combined", "model": str(cnn_checkpoint), "name": "mine"}))
    assert isinstance(mi, MixupInference) and mi.name == "mine" and (mi.n_pl, mi.n_ol) == (5, 15)
    assert len(mi.pool_y) == 1442  # the pool is the training split
    out = mi(torch.rand(2, 1, 8, 8))
    assert out.shape == (2, 10)


def test_a_checkpoint_for_another_dataset_is_refused(cnn_checkpoint):
    with pytest.raises(CheckpointError, match="num_classes"):
        build_defense(spec({"kind": "plain", "model": str(cnn_checkpoint), "dataset": "cifar100"}))
    with pytest.raises(CheckpointError, match="does not exist"):
        build_defense(spec({"kind": "plain", "model": "/nonexistent/ckpt"}))


@pytest.mark.parametrize("table, field", [
    ({"kind": "nope"}, "defense.kind"),
    ({"kind": "rdc", "timesteps": -3}, "defense.timesteps"),
    ({"kind": "rdc", "lm": {"eta": -1}}, "defense.lm.eta"),
    ({"kind": "rdc", "colour": "red"}, "defense.colour"),
    ({"kind": "mi", "mode": "both"}, "defense.mode"),
    ({"kind": "mi", "dataset": "mnist"}, "defense.dataset"),
])
def test_bad_tables_name_the_field(table, field):
    with pytest.raises(ConfigError) as info:
        parse_defense(table)
    assert str(info.value).startswith(field)


@pytest.mark.slow
def test_cli_accuracy_and_exit_codes():
    ok = subprocess.run([sys.executable, "-m", "pipeline.cli", "accuracy",
                         json.dumps({"kind": "rdc", "model": "optimal", "timesteps": 10}), "--limit", "20"],
                        capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0, ok.stderr
    result = json.loads(ok.stdout)
    assert result["n"] == 20 and result["accuracy"] >= 0.8
    bad = subprocess.run([sys.executable, "-m", "pipeline.cli", "accuracy", json.dumps({"kind": "rdc", "timesteps": 0})],
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "defense.timesteps" in bad.stderr


def test_building_a_defense_never_trains(tmp_path, monkeypatch):
    cache = tmp_path / "empty-cache"
    monkeypatch.setenv("ROBUSTSWEEP_CACHE", str(cache))
    with pytest.raises(CheckpointError) as info:
        build_defense(spec({"kind": "plain"}))
    message = str(info.value)
    assert str(cache / "models" / "digits-erm") in message
    assert "robustsweep train classifier --method erm --dataset digits --out" in message
    with pytest.raises(CheckpointError, match="robustsweep train diffusion --dataset digits"):
        build_defense(spec({"kind": "rdc", "model": "default", "timesteps": 2}))
    assert not (cache / "models" / "digits-erm").exists()  # nothing was trained


def test_the_prepare_step_knows_which_default_model_a_table_uses():
    from pipeline.config.defense import parse_defense
    from pipeline.training.defaults import default_model_of

    def of(table):
        return default_model_of(parse_defense(table))

    assert of({"kind": "plain"}) == ("digits", "erm")
    assert of({"kind": "mi", "dataset": "cifar10"}) == ("cifar10", "mixup")
    assert of({"kind": "mi", "method": "iat"}) == ("digits", "iat")
    assert of({"kind": "rdc", "model": "default"}) == ("digits", "diffusion")
    assert of({"kind": "rdc", "model": "optimal"}) is None
    assert of({"kind": "plain", "model": "/some/checkpoint"}) is None


def test_each_mi_mode_keeps_its_name_from_the_plan_to_the_records(cnn, digits):
    from pipeline.config.job import parse_job
    from pipeline.protocol import Batch, build_attack, evaluate
    from pipeline.runtime.plan import plan

    job = parse_job({"name": "modes", "data": {"dataset": "digits", "split": "test", "limit": 3},
                     "defenses": [{"kind": "mi", "mode": m, "model": cnn} for m in ("pl", "ol", "combined")],
                     "attacks": [{"kind": "none", "passes": 2}]})
    seen = {}
    for u in plan(job, len(digits.y_test)):
        mi = build_defense(u.defense_spec, name=u.defense)
        ids = list(u.example_ids)
        result = evaluate(mi, build_attack(u.attack_spec, mi.num_classes, name=u.attack),
                          Batch(digits.x_test[ids], digits.y_test[ids], ids), 0)
        seen[u.defense] = ({r.defense for r in result.records}, mi.mode, (mi.n_pl, mi.n_ol), result.forward_per_prediction)
    # Draws per prediction: y^, the mixes, and F(x) again for Combined's gap.
    # Named by mode and by the checkpoint folder they stand on (conftest's `cnn`, a folder "ckpt").
    assert seen == {"mi-pl-ckpt": ({"mi-pl-ckpt"}, "pl", (10, 0), 11), "mi-ol-ckpt": ({"mi-ol-ckpt"}, "ol", (0, 30), 31),
                    "mi-combined-ckpt": ({"mi-combined-ckpt"}, "combined", (5, 15), 22)}

"""Public entries answer bad tensors and options with typed errors: defense inputs of any float
dtype, evaluate's labels and images, accuracy's options."""

from __future__ import annotations

import pytest
import torch
from typer.testing import CliRunner

from pipeline.cli import app
from pipeline.data import load_split
from pipeline.defenses import build_defense
from pipeline.errors import ConfigError, InputError
from pipeline.config import spec
from pipeline.protocol import Batch, build_attack, evaluate

PGD = {"kind": "pgd", "eps": 0.03, "steps": 1}


@pytest.fixture(scope="module")
def digits():
    x, y = load_split("digits", "test")
    return x[:4], y[:4]



@pytest.mark.parametrize("kind", ["rdc-optimal", "mi"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_defense_takes_any_float_dtype_as_float32(kind, dtype, digits, cnn):
    x, _ = digits
    table = ({"kind": "rdc", "model": "optimal", "timesteps": 4} if kind == "rdc-optimal"
             else {"kind": "mi", "mode": "pl", "n_pl": 2, "model": cnn})
    defense = build_defense(spec({**table, "dataset": "digits", "seed": 0}))
    defense.bind([0, 1, 2, 3], seed=0)
    want = defense(x)
    defense.bind([0, 1, 2, 3], seed=0)
    got = defense(x.to(dtype))
    assert got.dtype == torch.float32 and got.shape == (4, 10)
    # The cast rounds the images (float16 keeps 11 bits): the same predictions on these examples.
    assert torch.equal(got.argmax(1), want.argmax(1))


def test_defense_refuses_uint8_images(digits):
    defense = build_defense(spec({"kind": "rdc", "model": "optimal", "timesteps": 4, "dataset": "digits"}))
    with pytest.raises(InputError, match="float tensor of images in \\[0, 1\\], got dtype torch.uint8"):
        defense((digits[0] * 255).to(torch.uint8))


@pytest.mark.parametrize("labels, words", [
    ([0, 1, 2, 15], "labels must lie in \\[0, 10\\) for a 10-class defense, found range \\[0, 15\\]"),
    ([0, -1, 2, 3], "found range \\[-1, 3\\]"),
    ([0.0, 1.0, 2.0, 3.0], "labels must be an integer tensor, got dtype torch.float32"),
])
def test_evaluate_checks_labels(labels, words, digits):
    x, _ = digits
    defense = build_defense(spec({"kind": "rdc", "model": "optimal", "timesteps": 4, "dataset": "digits"}))
    with pytest.raises(InputError, match=words):
        evaluate(defense, build_attack(spec(PGD), 10), Batch(x, torch.tensor(labels), [0, 1, 2, 3]), 0)


def test_evaluate_checks_images(digits):
    x, y = digits
    defense = build_defense(spec({"kind": "rdc", "model": "optimal", "timesteps": 4, "dataset": "digits"}))
    with pytest.raises(InputError, match="evaluate: input must be a float tensor"):
        evaluate(defense, build_attack(spec(PGD), 10), Batch((x * 255).to(torch.uint8), y, [0, 1, 2, 3]), 0)
    with pytest.raises(ConfigError, match="evaluate: x has 4 rows"):
        evaluate(defense, build_attack(spec(PGD), 10), Batch(x, y[:3], [0, 1, 2, 3]), 0)


@pytest.mark.parametrize("option, value", [("--limit", -3), ("--limit", 0), ("--batch-size", 0)])
def test_accuracy_refuses_bad_options(option, value):
    result = CliRunner().invoke(app, ["accuracy", '{"kind": "rdc", "model": "optimal", "timesteps": 2}', option, str(value)])
    assert result.exit_code == 2 and f"{option} must be >= 1" in result.output

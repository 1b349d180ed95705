"""Models, checkpoints and training: UNet, SmallCNN, ResNet-18, build_model, safetensors checkpoints."""

from __future__ import annotations

import json

import pytest
import torch

from pipeline.models.checkpoint import CONFIG_NAME, WEIGHTS_NAME, load_checkpoint, read_config, save_checkpoint
from pipeline.training.classifier import evaluate_accuracy, train_classifier
from pipeline.training.diffusion import train_diffusion
from pipeline.models.unet import UNet, unet_config
from pipeline.errors import CheckpointError, ConfigError
from pipeline.models.registry import build_model

CNN = {"arch": "cnn", "in_channels": 1, "num_classes": 10, "image_size": 8, "width": 16}
# A CIFAR-shaped UNet, shrunk so that a forward pass is fast: same code paths (3 levels, attention).
SMALL_CIFAR_UNET = {"arch": "unet", "in_channels": 3, "image_size": 32, "num_classes": 10, "base_channels": 16,
                    "channel_mult": [1, 2, 2], "num_res_blocks": 1, "attn_resolutions": [16], "dropout": 0.1}


def _unet_inputs(cfg, B=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, cfg["in_channels"], cfg["image_size"], cfg["image_size"], generator=g)
    t = torch.randint(0, 1000, (B,), generator=g)
    y = torch.randint(0, cfg["num_classes"], (B,), generator=g)
    return x, t, y


def _perturbed(model):
    """Randomise the zero-initialised output layers so that outputs depend on the inputs."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return model.eval()


# -- checkpoints -----------------------------------------------------------------------------


def test_checkpoint_round_trip_gives_identical_outputs(tmp_path):
    model = _perturbed(build_model(unet_config("digits")))
    save_checkpoint(tmp_path / "ck", model, model.config, {"dataset": "digits", "note": "test"})
    assert sorted(p.name for p in (tmp_path / "ck").iterdir()) == [CONFIG_NAME, WEIGHTS_NAME]  # no temp files left
    loaded, config, meta = load_checkpoint(tmp_path / "ck", build_model, expected={"num_classes": 10, "in_channels": 1})
    assert config == model.config and meta == {"dataset": "digits", "note": "test"}
    x, t, y = _unet_inputs(config)
    with torch.no_grad():
        assert torch.equal(model(x, t, y), loaded(x, t, y))

    cnn = _perturbed(build_model(CNN))
    save_checkpoint(tmp_path / "cnn", cnn, cnn.config)
    cnn2, _, meta2 = load_checkpoint(tmp_path / "cnn", build_model)
    assert meta2 is None
    xs = torch.rand(5, 1, 8, 8)
    assert torch.equal(cnn(xs), cnn2(xs))


def test_checkpoint_expected_config_mismatch_names_the_key(tmp_path):
    model = build_model(CNN)
    save_checkpoint(tmp_path, model, model.config)
    with pytest.raises(CheckpointError, match=r"num_classes.*10.*100") as err:
        load_checkpoint(tmp_path, build_model, expected={"num_classes": 100})
    assert CONFIG_NAME in str(err.value)


def test_checkpoint_wrong_tensor_shape_names_the_tensor(tmp_path):
    from safetensors.torch import load_file, save_file

    model = build_model(CNN)
    save_checkpoint(tmp_path, model, model.config)
    state = load_file(str(tmp_path / WEIGHTS_NAME))
    state["head.3.weight"] = torch.zeros(10, 7)
    save_file(state, str(tmp_path / WEIGHTS_NAME))
    with pytest.raises(CheckpointError, match=r"head\.3\.weight.*\(10, 7\).*\(10, 64\)"):
        load_checkpoint(tmp_path, build_model)


def test_checkpoint_missing_and_unexpected_tensors(tmp_path):
    from safetensors.torch import load_file, save_file

    model = build_model(CNN)
    save_checkpoint(tmp_path, model, model.config)
    state = load_file(str(tmp_path / WEIGHTS_NAME))
    state["extra.weight"] = state.pop("head.1.bias")
    save_file(state, str(tmp_path / WEIGHTS_NAME))
    with pytest.raises(CheckpointError, match=r"missing tensors head\.1\.bias.*unexpected tensors extra\.weight"):
        load_checkpoint(tmp_path, build_model)


def test_checkpoint_missing_or_broken_files(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tmp_path / "nowhere", build_model)
    model = build_model(CNN)
    save_checkpoint(tmp_path, model, model.config)
    (tmp_path / CONFIG_NAME).write_text("{not json")
    with pytest.raises(CheckpointError, match=r"config\.json.*unreadable"):
        load_checkpoint(tmp_path, build_model)
    (tmp_path / CONFIG_NAME).write_text(json.dumps({"config": model.config, "meta": None}))
    assert read_config(tmp_path) == (model.config, None)
    (tmp_path / WEIGHTS_NAME).unlink()
    with pytest.raises(CheckpointError, match=r"model\.safetensors.*not found"):
        load_checkpoint(tmp_path, build_model)
    (tmp_path / WEIGHTS_NAME).write_bytes(b"\x00garbage")
    with pytest.raises(CheckpointError, match=r"model\.safetensors.*unreadable"):
        load_checkpoint(tmp_path, build_model)


# -- UNet ------------------------------------------------------------------------------------


@pytest.mark.parametrize("cfg", [unet_config("digits"), SMALL_CIFAR_UNET], ids=["digits", "cifar-like"])
def test_unet_shapes_null_class_and_stem_trunk_split(cfg):
    model = _perturbed(build_model(cfg))
    assert model.config == cfg and json.loads(json.dumps(model.config)) == cfg
    x, t, y = _unet_inputs(cfg)
    with torch.no_grad():
        out = model(x, t, y)
        assert out.shape == x.shape and torch.isfinite(out).all()
        null = model(x, t, torch.full_like(y, cfg["num_classes"]))  # the NULL class is a valid label
        assert null.shape == x.shape and not torch.allclose(null, out)
        other = model(x, t, (y + 1) % cfg["num_classes"])
        assert not torch.allclose(other, out)
        assert torch.allclose(model.trunk(model.stem(x), t, y), out, atol=1e-6)
        # The stem broadcast over classes (stride-0 expanded view) gives each class's forward.
        K = cfg["num_classes"]
        h = model.stem(x[:1]).expand(K, -1, -1, -1)
        per_class = model.trunk(h, t[:1].expand(K), torch.arange(K))
        direct = model(x[:1].expand(K, -1, -1, -1), t[:1].expand(K), torch.arange(K))
        assert torch.allclose(per_class, direct, atol=1e-5)


def test_unet_presets():
    assert unet_config("cifar100")["num_classes"] == 100
    cifar = unet_config("cifar10")
    assert (cifar["base_channels"], cifar["channel_mult"], cifar["num_res_blocks"], cifar["attn_resolutions"]) == (128, [1, 2, 2, 2], 2, [16])
    with pytest.raises(ConfigError, match="imagenet"):
        unet_config("imagenet")


def test_build_model_rejects_unknown_arch_and_bad_fields():
    with pytest.raises(ConfigError, match="vit"):
        build_model({"arch": "vit"})
    with pytest.raises(ConfigError, match="arch"):
        build_model({"num_classes": 10})
    with pytest.raises(ConfigError, match="cnn"):
        build_model({"arch": "cnn", "depth": 3})


def test_classifier_shapes():
    cnn = build_model(CNN)
    assert cnn(torch.rand(3, 1, 8, 8)).shape == (3, 10)
    resnet = build_model({"arch": "resnet18", "num_classes": 100, "in_channels": 3}).eval()
    assert resnet.config == {"arch": "resnet18", "num_classes": 100, "in_channels": 3}
    with torch.no_grad():
        assert resnet(torch.rand(2, 3, 32, 32)).shape == (2, 100)


# -- training --------------------------------------------------------------------------------


@pytest.mark.slow  # six epochs of training
def test_erm_training_reaches_high_accuracy(digits):
    x, y, x_test, y_test = digits
    model, stats = train_classifier(x, y, CNN, method="erm", epochs=6, batch_size=64, lr=2e-3, progress=False)
    assert evaluate_accuracy(model, x_test, y_test) > 0.85
    assert stats["epochs"] == 6 and stats["seconds"] > 0


def test_mixup_training_is_deterministic_for_a_seed(digits):
    x, y = digits[0][:256], digits[1][:256]
    runs = [train_classifier(x, y, CNN, method="mixup", epochs=2, batch_size=64, lr=1e-3, seed=3, progress=False)[0] for _ in range(2)]
    other = train_classifier(x, y, CNN, method="mixup", epochs=2, batch_size=64, lr=1e-3, seed=4, progress=False)[0]
    a, b, c = (m.state_dict() for m in (*runs, other))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


@pytest.mark.parametrize("method", ["iat", "pgd_at"])
def test_adversarial_training_runs(digits, method):
    x, y = digits[0][:128], digits[1][:128]
    model, stats = train_classifier(x, y, CNN, method=method, epochs=1, batch_size=64, lr=1e-3, eps=0.1, pgd_steps=2, progress=False)
    assert torch.isfinite(torch.tensor(stats["loss"]))
    with pytest.raises(ConfigError, match="eps"):
        train_classifier(x, y, CNN, method=method, epochs=1, batch_size=64, lr=1e-3, progress=False)


def test_pgd_stays_in_the_ball_and_raises_the_loss(digits):
    from pipeline.training.classifier import PGD

    x, y = digits[2][:64], digits[3][:64]
    model = _perturbed(build_model(CNN))
    x_adv = PGD(0.1, 5)(model, x, y, torch.Generator().manual_seed(0))
    assert (x_adv - x).abs().max() <= 0.1 + 1e-6 and x_adv.min() >= 0 and x_adv.max() <= 1
    ce = torch.nn.functional.cross_entropy
    with torch.no_grad():
        assert ce(model(x_adv), y) > ce(model(x), y)


def test_unknown_training_method():
    with pytest.raises(ConfigError, match="cutmix"):
        train_classifier(torch.rand(8, 1, 8, 8), torch.zeros(8, dtype=torch.long), CNN, method="cutmix", epochs=1, batch_size=4, lr=1e-3)


@pytest.mark.slow  # 150 diffusion training steps
def test_ddpm_loss_decreases(digits):
    x, y = digits[0], digits[1]
    cfg = dict(unet_config("digits"), base_channels=16)
    model, stats = train_diffusion(x, y, cfg, steps=150, batch_size=64, lr=2e-3, ema_decay=0.99, warmup=20, progress=False)
    losses = stats["losses"]
    assert len(losses) == stats["steps"] == 150
    first, last = sum(losses[:20]) / 20, sum(losses[-20:]) / 20
    assert last < 0.6 * first, (first, last)
    assert not model.training and isinstance(model, UNet)
    again = train_diffusion(x, y, cfg, steps=5, batch_size=16, lr=2e-3, ema_decay=0.99, progress=False, seed=7)[1]["losses"]
    assert again == train_diffusion(x, y, cfg, steps=5, batch_size=16, lr=2e-3, ema_decay=0.99, progress=False, seed=7)[1]["losses"]

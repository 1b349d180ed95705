"""EDM networks (pipeline.models.edm): the published state-dict layouts, outputs equal to NVlabs/edm's
own networks, the preconditioners' closed forms, config checking."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from edm_cases import ADM_NARROW, TINY, fill_weights, inputs
from pipeline.errors import ConfigError
from pipeline.models import build_edm, build_model
from pipeline.models.checkpoint import load_checkpoint, save_checkpoint
from pipeline.models.edm import EDM_PRESETS, EDMPrecond, VEPrecond, VPPrecond

FIXTURES = Path(__file__).parent / "fixtures"
# Published counts: parameters, state-dict entries (parameters and buffers).
PUBLISHED = {
    "edm-cifar10-cond-vp": (55_735_299, 427),
    "edm-cifar100-cond-vp": (55_746_819, 427),
    "edm-cifar10-cond-ve": (56_400_643, 434),
    "edm-imagenet64-cond-adm": (295_899_267, 553),
}


@pytest.fixture(scope="module")
def reference():
    return load_file(str(FIXTURES / "edm_tiny.safetensors"))


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("preset", sorted(PUBLISHED))
def test_full_size_state_dict_is_the_published_one(preset):
    with torch.device("meta"):
        net = build_edm({"preset": preset})
    state = net.state_dict()
    want = json.loads((FIXTURES / "edm_state_dicts.json").read_text())[preset]
    params, entries = PUBLISHED[preset]
    assert {k: list(v.shape) for k, v in state.items()} == want["shapes"]
    assert sum(p.numel() for p in net.parameters()) == params == want["parameters"]
    assert len(state) == entries


@pytest.mark.parametrize("case", sorted(TINY))
def test_tiny_outputs_equal_nvlabs(case, reference):
    cfg = TINY[case]
    net = build_edm(cfg).eval()
    fill_weights(net)
    inp = inputs(cfg)
    for k in ("x", "sigma", "class_labels", "augment_labels"):
        assert torch.equal(inp[k], reference[f"inputs.{k}"])
    x = inp["x"].clone().requires_grad_(True)
    D = net(x, inp["sigma"], inp["class_labels"], inp["augment_labels"])
    w = torch.linspace(-1, 1, D.numel()).reshape(D.shape)
    (g,) = torch.autograd.grad((D * w).sum(), x)
    want = reference[f"{case}.D"]
    # D = c_skip x + c_out F: compare the network's part too, which x would otherwise dominate.
    assert _rel(D.detach(), want) < 1e-5
    assert _rel(D.detach() - inp["x"], want - inp["x"]) < 1e-5
    assert _rel(g, reference[f"{case}.grad_x"]) < 1e-5
    with torch.no_grad():
        D0 = net(inp["x"], inp["sigma"])
    assert _rel(D0 - inp["x"], reference[f"{case}.D_unlabelled"] - inp["x"]) < 1e-5
    # The class matters: a wrong label wiring would leave these equal.
    assert _rel(D0 - inp["x"], want - inp["x"]) > 1e-3


@pytest.mark.parametrize("case", ["ddpmpp-vp", "ncsnpp-ve", "adm-edm"])
def test_tiny_imports_from_a_state_dict_and_trains(case):
    cfg = TINY[case]
    src = build_edm(cfg)
    fill_weights(src)
    net = build_edm(cfg)
    net.load_state_dict(src.state_dict(), strict=True)
    net.train()
    inp = inputs(cfg)
    D = net(inp["x"], inp["sigma"], inp["class_labels"], inp["augment_labels"])
    ((D - inp["x"]) ** 2).mean().backward()
    for name, p in net.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    assert sum(int(p.grad.abs().sum() > 0) for p in net.parameters()) >= 0.9 * len(list(net.parameters()))


class _Identity(torch.nn.Module):
    """F(z) = z: then D = (c_skip + c_out c_in) x, and the noise label is recorded."""

    def forward(self, z, c_noise, class_labels, augment_labels=None):
        self.c_noise = c_noise
        return z


@pytest.mark.parametrize("precond", ["vp", "ve", "edm"])
def test_preconditioning_coefficients_closed_forms(precond):
    net = build_edm(dict(TINY[f"ddpmpp-{precond}"]))
    sigma = torch.tensor([1e-3, 0.02, 0.5, 1.0, 7.0, 80.0])
    s = sigma.double()
    if precond == "vp":
        beta_d, beta_min = 19.9, 0.1
        t = ((beta_min**2 + 2 * beta_d * torch.log1p(s**2)).sqrt() - beta_min) / beta_d
        # EDM evaluates log(1 + sigma^2) in float32, as the published networks were trained: the
        # noise label is 5% below the float64 one at sigma = 1e-3, 1e-4 at 0.02, 1e-7 from 0.5 up.
        t32 = ((beta_min**2 + 2 * beta_d * torch.log(1 + sigma**2)).sqrt() - beta_min) / beta_d
        want = (torch.ones_like(s), -s, 1 / (1 + s**2).sqrt(), 999 * t32.double())
        assert torch.allclose(want[3][2:], 999 * t[2:], rtol=1e-6)
        # sigma(t) inverts sigma_inv: sigma(t) = sqrt(exp(beta_d t^2 / 2 + beta_min t) - 1).
        assert torch.allclose(torch.sqrt(torch.expm1(0.5 * beta_d * t**2 + beta_min * t)), s, rtol=1e-9)
        assert net.sigma_min == pytest.approx(math.sqrt(math.expm1(0.5 * 19.9 * 1e-10 + 0.1 * 1e-5)))
    elif precond == "ve":
        want = (torch.ones_like(s), s, torch.ones_like(s), torch.log(s / 2))
    else:
        d = 0.5
        want = (d**2 / (s**2 + d**2), s * d / (s**2 + d**2).sqrt(), 1 / (s**2 + d**2).sqrt(), torch.log(s) / 4)
        c_skip, c_out = want[0], want[1]
        # EDM eq. 8-9: the effective training target (x_0 - c_skip x) / c_out has unit variance.
        assert torch.allclose((1 - c_skip) ** 2 * d**2 + c_skip**2 * s**2, c_out**2, rtol=1e-12)
    got = net.coefficients(sigma.reshape(-1, 1, 1, 1))
    for g, w in zip(got, want):
        g = torch.as_tensor(g, dtype=torch.float64).flatten().expand(s.numel())
        assert torch.allclose(g, w, rtol=2e-6), (precond, g, w)
    net.model = _Identity()
    x = torch.randn(sigma.numel(), 3, 8, 8)
    D = net(x, sigma, torch.zeros(sigma.numel(), 4))
    factor = (want[0] + want[1] * want[2]).float().view(-1, 1, 1, 1)
    assert torch.allclose(D, factor * x, rtol=1e-5, atol=1e-6)
    assert torch.allclose(net.model.c_noise.double(), want[3], rtol=1e-5)


def test_presets_match_the_published_training_configs():
    vp = EDM_PRESETS["edm-cifar10-cond-vp"]
    assert (vp["model_channels"], vp["channel_mult"], vp["augment_dim"], vp["label_dim"]) == (128, [2, 2, 2], 9, 10)
    assert isinstance(build_edm({"preset": "edm-cifar10-cond-ve", "model_channels": 8, "channel_mult": [1],
                                 "num_blocks": 1}), VEPrecond)
    adm = EDM_PRESETS["edm-imagenet64-cond-adm"]
    assert (adm["model_type"], adm["model_channels"], adm["channel_mult"], adm["label_dim"]) == (
        "DhariwalUNet", 192, [1, 2, 3, 4], 1000)
    with torch.device("meta"):
        assert isinstance(build_edm({"preset": "rdc-cifar10-cond-edm"}), EDMPrecond)
        assert isinstance(build_model({"arch": "edm", "preset": "edm-cifar10-cond-vp"}), VPPrecond)


@pytest.mark.parametrize("change, field", [
    ({"precond": "vpp"}, "precond"),
    ({"model_type": "UNet"}, "model_type"),
    ({"channel_mult": []}, "channel_mult"),
    ({"channel_mult": [1, 2, 2, 2, 2]}, "img_resolution"),
    ({"model_channels": 0}, "model_channels"),
    ({"dropout": 1.5}, "dropout"),
    ({"embedding_type": "sinusoidal"}, "embedding_type"),
    ({"resample_filter": "11"}, "resample_filter"),
    ({"sigma_data": 0.5}, "sigma_data"),
    ({"model_channels": 100_000 // 25, "channel_mult": [8, 8]}, "parameters"),
    ({"preset": "edm-cifar10"}, "preset"),
    ({"img_resolution": 32.0}, "img_resolution"),
])
def test_config_errors_name_the_field(change, field):
    cfg = {**TINY["ddpmpp-vp"], **change}
    with pytest.raises(ConfigError, match=field):
        build_edm(cfg)


def test_adm_narrow_levels_have_nvlabs_head_counts_and_outputs():
    """A level narrower than 64 channels has no attention, as in NVlabs' UNetBlock (width // 64 heads)."""
    reference = load_file(str(FIXTURES / "edm_adm_narrow.safetensors"))
    net = build_edm(ADM_NARROW).eval()
    heads = {n: m.num_heads for n, m in net.model.named_modules() if hasattr(m, "num_heads")}
    assert heads["enc.8x8_block0"] == 0 and not hasattr(net.model.enc["8x8_block0"], "qkv")
    assert heads["enc.4x4_block0"] == 1 and heads["enc.2x2_block0"] == 1 and heads["dec.2x2_in0"] == 1
    assert net.model.enc["2x2_block0"].qkv.weight.shape[0] == 3 * 96
    fill_weights(net)
    inp = inputs(ADM_NARROW)
    for k in ("x", "sigma", "class_labels", "augment_labels"):
        assert torch.equal(inp[k], reference[f"inputs.{k}"])
    x = inp["x"].clone().requires_grad_(True)
    D = net(x, inp["sigma"], inp["class_labels"], inp["augment_labels"])
    w = torch.linspace(-1, 1, D.numel()).reshape(D.shape)
    (g,) = torch.autograd.grad((D * w).sum(), x)
    assert _rel(D.detach() - inp["x"], reference["adm-narrow-edm.D"] - inp["x"]) < 1e-5
    assert _rel(g, reference["adm-narrow-edm.grad_x"]) < 1e-5
    with torch.no_grad():
        D0 = net(inp["x"], inp["sigma"], None, inp["augment_labels"])
    assert _rel(D0 - inp["x"], reference["adm-narrow-edm.D_unlabelled"] - inp["x"]) < 1e-5


def test_adm_heads_that_do_not_divide_the_width_are_refused():
    # 200 channels -> 3 heads of 66.67: NVlabs' reshape fails on it at the first call.
    with pytest.raises(ConfigError, match="200 channels in 3 heads"):
        build_edm({**TINY["adm-edm"], "model_channels": 200, "channel_mult": [1, 1]})


def test_checkpoint_round_trip(tmp_path):
    cfg = {"arch": "edm", **TINY["ncsnpp-ve"]}
    net = build_model(cfg)
    fill_weights(net)
    save_checkpoint(tmp_path / "ck", net, cfg)
    loaded, config, _ = load_checkpoint(tmp_path / "ck", build_model)
    assert config == cfg
    inp = inputs(TINY["ncsnpp-ve"])
    with torch.no_grad():
        assert torch.equal(loaded(inp["x"], inp["sigma"], inp["class_labels"]), net.eval()(inp["x"], inp["sigma"], inp["class_labels"]))

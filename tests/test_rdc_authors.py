"""The RDC authors' setting (huanranchen/DiffusionClassifier: EDMDC.py, EDMLM.py, RDCN+TK.py) against
tests/fixtures/rdc_authors.safetensors: what their code computed on a tiny random EDM network
(tests/edm_cases.py, DDPM++ under EDM's preconditioning, 4 classes, 8x8 images) with the noise it
drew, recorded beside the outputs. Our defense is given the same noise and must give the same
numbers: logits of the prediction path (noise shared by the classes), logits and input gradients
of the gradient path (noise per class), their LM's output, and the whole LM -> classifier demo.
Also: the fixed-draw mode, the grid by name, and the cost of the shipped jobs per evaluation."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from edm_cases import TINY, fill_weights
from pipeline.config import spec
from pipeline.config.defense import AuthorsGrid, parse_defense
from pipeline.config.job import load_job
from pipeline.defenses.build import build_defense, rdc_schedule
from pipeline.defenses.lm import AuthorsLM
from pipeline.defenses.rdc import RDC
from pipeline.diffusion.denoiser import DenoiserEps
from pipeline.diffusion.schedule import EDMGrid
from pipeline.errors import CheckpointError, ConfigError
from pipeline.models import build_edm
from pipeline.rng import Draw

REPO = Path(__file__).resolve().parent.parent
FIXTURE = REPO / "tests" / "fixtures" / "rdc_authors.safetensors"
K = 4


@pytest.fixture(scope="module")
def fx() -> dict:
    with safe_open(str(FIXTURE), "pt") as f:
        out = {k: f.get_tensor(k) for k in f.keys()}
        out["meta"] = json.loads(f.metadata()["meta"])
    return out


def _net(label_dim: int, seed: int):
    net = build_edm(dict(TINY["ddpmpp-edm"], label_dim=label_dim)).eval().requires_grad_(False)
    fill_weights(net, seed=seed)
    return net


@pytest.fixture(scope="module")
def cond():
    return _net(K, 7)


@pytest.fixture(scope="module")
def uncond():
    return _net(0, 8)


def _draw(B: int) -> Draw:
    ids = torch.arange(B)
    return Draw(0, ids, torch.zeros_like(ids))


def _rdc(cond, levels: int, **kw) -> RDC:
    grid = EDMGrid(T=levels)
    return RDC(DenoiserEps(cond, grid, K), K, 3, 8, schedule=grid, batch_size=97, **kw)


def _supply_elbo_noise(rdc: RDC, shared: torch.Tensor | None = None, per_class: torch.Tensor | None = None):
    """The engine's noise replaced by recorded noise: shared (B, levels, ...), per_class (B, K, levels, ...)."""
    def noise(draw, ts, x, per=False):
        field = per_class if per else shared
        assert field is not None, "a noise the fixture does not hold was asked for"
        return field[..., ts, :, :, :].to(x)
    rdc.elbo.noise = noise


def _supply_lm_draws(lm: AuthorsLM, sigma: torch.Tensor, noise: torch.Tensor):
    lm.step_draws = lambda draw, step, shape, dtype, device=None: (sigma[:, step].to(dtype), noise[:, step].to(dtype))


def _close(got: torch.Tensor, want: torch.Tensor, rtol: float) -> float:
    """The largest difference relative to the largest value of want; asserts it is within rtol."""
    err = float((got - want).abs().max() / want.abs().max())
    assert err <= rtol, (err, got, want)
    return err


def test_fixture_is_their_demo_setting(fx):
    assert fx["meta"]["levels"] == 125 and fx["pred_noise"].shape[1] == 125
    assert fx["meta"]["lm"] == {"steps": 5, "lr": 0.1, "sigma": [0.4, 0.6]}
    assert ((fx["lm_sigma"] >= 0.4) & (fx["lm_sigma"] <= 0.6)).all()


def test_prediction_logits_equal_the_authors(fx, cond):
    """EDMEulerIntegralDC.forward with share_noise: one noise per (image, level) for every class."""
    rdc = _rdc(cond, 125)
    _supply_elbo_noise(rdc, shared=fx["pred_noise"])
    with torch.no_grad():
        got = rdc.evaluate(fx["x"], _draw(2))
    _close(got, fx["pred_logits"], 2e-6)
    assert rdc.cost.forward == 2 * 125 * K  # 125 levels x K classes per image
    assert (got.argmax(1) == fx["pred_logits"].argmax(1)).all()


def test_gradient_path_logits_and_input_gradient_equal_the_authors(fx, cond):
    """Their autograd Function: noise per class, logits and d(w . logits)/dx."""
    rdc = _rdc(cond, 125, attack_noise="per-class")
    _supply_elbo_noise(rdc, per_class=fx["grad_noise"])
    x = fx["x"][:1].clone().requires_grad_(True)
    logits = rdc.evaluate(x, _draw(1))
    (g,) = torch.autograd.grad((logits * fx["grad_w"]).sum(), x)
    _close(logits.detach(), fx["grad_logits"], 2e-6)
    _close(g, fx["grad_x"], 1e-5)
    rdc.elbo.JACOBIAN_VALUES = 0  # the recomputing backward draws the same per-class noise
    (g_rec,) = torch.autograd.grad((rdc.evaluate(x, _draw(1)) * fx["grad_w"]).sum(), x)
    _close(g_rec, fx["grad_x"], 1e-5)
    # A gang's backward (the sum of its members' VJPs) is the same gradient.
    shards = rdc.shards(3)
    g_gang = sum(rdc.grid_partial_vjp(x.detach(), cells, _draw(1), fx["grad_w"]) for cells in shards)
    _close(g_gang, fx["grad_x"], 1e-5)
    # The prediction path of the same defense still shares its noise.
    _supply_elbo_noise(rdc, shared=fx["pred_noise"][:1])
    with torch.no_grad():
        _close(rdc.evaluate(fx["x"][:1], _draw(1)), fx["pred_logits"][:1], 2e-6)


def test_authors_lm_output_equals_theirs(fx, uncond):
    """likelihood_maximization_T1: Adam, lr 0.1, 5 steps, sigma ~ U[0.4, 0.6], on the unconditional network."""
    lm = AuthorsLM(uncond, steps=5, lr=0.1, sigma=(0.4, 0.6))
    _supply_lm_draws(lm, fx["lm_sigma"], fx["lm_noise"])
    x = fx["x"]
    out = lm(x, _draw(2))
    _close(out, fx["lm_out"], 1e-5)
    assert (out - x).abs().max() > 0.05  # it moved (no eps-ball), and stayed in the box
    assert out.min() >= 0 and out.max() <= 1


def test_the_whole_demo_pipeline_equals_theirs(fx, cond, uncond):
    """RDCN+TK.py: their LM, then their classifier on its output, every draw fixed by their reseed."""
    lm = AuthorsLM(uncond, steps=5, lr=0.1, sigma=(0.4, 0.6))
    _supply_lm_draws(lm, fx["lm_sigma"], fx["lm_noise"])
    rdc = _rdc(cond, 125, lm=lm, draws="fixed")
    _supply_elbo_noise(rdc, shared=fx["pipe_noise"])
    with torch.no_grad():
        got = rdc(fx["x"])
    _close(got, fx["pipe_logits"], 2e-6)
    assert rdc.cost.forward == 2 * (125 * K + 5) and rdc.cost.backward == 2 * 5


def test_bpda_through_the_authors_lm_and_exact_is_refused(uncond):
    lm = AuthorsLM(uncond, steps=2)
    x = torch.rand(1, 3, 8, 8, generator=torch.Generator().manual_seed(1)).requires_grad_(True)
    (g,) = torch.autograd.grad(lm(x, _draw(1)).sum(), x)
    assert torch.equal(g, torch.ones_like(x))
    with pytest.raises(ConfigError, match="crossed by BPDA only"):
        lm.gradient = "exact"


def test_fixed_draws_make_the_defense_a_function_of_its_input(cond):
    x = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(3))
    fixed, fresh = _rdc(cond, 6, draws="fixed"), _rdc(cond, 6)
    assert not fixed.stochastic and fresh.stochastic
    with torch.no_grad():
        first = fixed(x)
        fixed.bind([5, 9], seed=123)  # other examples, another pass seed, later calls: the same logits
        assert torch.equal(fixed(x), first) and torch.equal(fixed(x.flip(0)), first.flip(0))
        assert not torch.equal(fresh(x), fresh(x))


def test_per_class_noise_differs_by_class_and_only_under_a_gradient(cond):
    rdc = _rdc(cond, 5, attack_noise="per-class")
    x = torch.rand(1, 3, 8, 8, generator=torch.Generator().manual_seed(4))
    e = rdc.elbo.noise(_draw(1), torch.arange(5), x, True)
    assert e.shape == (1, K, 5, 3, 8, 8) and not torch.equal(e[0, 0], e[0, 1])
    shared = rdc.elbo.noise(_draw(1), torch.arange(5), x)
    assert not torch.equal(e[0, 0], shared[0])
    with torch.no_grad():
        plain = rdc.evaluate(x, _draw(1))
    under_attack = rdc.evaluate(x.clone().requires_grad_(True), _draw(1))
    assert torch.equal(plain, _rdc(cond, 5).evaluate(x, _draw(1)))  # prediction: shared noise
    assert not torch.allclose(under_attack.detach(), plain)


def test_authors_grid_by_name_is_their_linspace():
    spec = parse_defense({"kind": "rdc", "elbo": "edm", "timesteps": "authors"})
    assert spec.timesteps == AuthorsGrid(125) and spec.model_dump()["timesteps"] == "authors"
    grid = rdc_schedule(spec)
    theirs = torch.linspace(1e-4, 3, 126, dtype=torch.float64)
    assert torch.allclose(grid.levels, theirs[:-1], rtol=1e-12) and torch.allclose(grid.d_sigma, theirs.diff(), rtol=1e-9)
    assert rdc_schedule(parse_defense({"kind": "rdc", "elbo": "edm", "timesteps": "authors:40"})).T == 40
    # "authors:1000" is the 1000-level grid elbo = "edm" runs with timesteps = "all".
    assert torch.equal(rdc_schedule(parse_defense({"kind": "rdc", "elbo": "edm", "timesteps": "authors:1000"})).w,
                       EDMGrid().w)
    with pytest.raises(ConfigError, match='needs elbo = "edm"'):
        parse_defense({"kind": "rdc", "timesteps": "authors"})
    with pytest.raises(ConfigError, match=r"defense.timesteps: .*\"authors:N\""):
        parse_defense({"kind": "rdc", "elbo": "edm", "timesteps": "authors:0"})


def _job_rdc(name: str, cond10, lm: bool = False) -> RDC:
    """The RDC of a shipped job's defense with a tiny 10-class network in place of the published file."""
    (d,) = load_job(REPO / "jobs" / name).defenses
    spec = d.spec
    grid = rdc_schedule(spec)
    timesteps = None if spec.timesteps == "all" or isinstance(spec.timesteps, AuthorsGrid) else spec.timesteps
    return RDC(DenoiserEps(cond10, grid, 10), 10, 3, 8, schedule=grid, timesteps=timesteps, batch_size=2048,
               draws=spec.draws, attack_noise=spec.attack_noise), spec


def test_shipped_jobs_run_the_authors_setting_at_1250_calls_per_evaluation():
    cond10 = _net(10, 7)
    faithful, spec = _job_rdc("rdc_cifar10_edm.toml", cond10)
    honest, hspec = _job_rdc("rdc_cifar10_edm_honest.toml", cond10)
    assert spec.elbo == "edm" and spec.timesteps == AuthorsGrid(125) and spec.engine.autocast == "fp16"
    assert spec.lm.variant == "authors" and (spec.lm.steps, spec.lm.lr, spec.lm.sigma) == (5, 0.1, (0.4, 0.6))
    assert "uncond" in spec.lm.model and not faithful.stochastic and honest.stochastic
    assert {k: v for k, v in hspec.model_dump().items() if k not in ("name", "draws", "attack_noise")} == \
        {k: v for k, v in spec.model_dump().items() if k not in ("name", "draws", "attack_noise")}
    x = torch.rand(1, 3, 8, 8, generator=torch.Generator().manual_seed(8))
    with torch.no_grad():
        faithful(x)
    assert faithful.cost.forward == 125 * 10 == 1250
    # Before: the VP ELBO on all 1000 timesteps, 8x the calls.
    before = parse_defense({"kind": "rdc", "dataset": "cifar10", "timesteps": "all"})
    assert rdc_schedule(before).T * 10 == 10_000 == 8 * faithful.cost.forward


def test_authors_lm_from_a_table_loads_its_own_unconditional_network(tmp_path):
    from pipeline.models.checkpoint import save_checkpoint

    def folder(name, label_dim):
        cfg = {"arch": "edm", **TINY["ddpmpp-edm"], "img_channels": 1, "label_dim": label_dim}
        net = build_edm(cfg)
        fill_weights(net)
        return str(save_checkpoint(tmp_path / name, net, cfg))

    cond10, uncond = folder("cond", 10), folder("uncond", 0)
    table = {"kind": "rdc", "model": cond10, "dataset": "digits", "elbo": "edm", "timesteps": "authors:3",
             "draws": "fixed", "lm": {"variant": "authors", "model": uncond, "steps": 2}}
    rdc = build_defense(spec(table))
    assert isinstance(rdc.lm, AuthorsLM) and rdc.lm.denoiser.label_dim == 0 and rdc.ts.numel() == 3
    assert rdc.name == "rdc-unet-edmw-alm-fixed" and not rdc.stochastic
    x = torch.rand(2, 1, 8, 8, generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        assert torch.equal(rdc(x), rdc(x))
    with pytest.raises(CheckpointError, match=r"defense.lm.model: the authors' LM runs an unconditional EDM network "
                                              r"\(label_dim 0\): .*'label_dim' is 10, expected 0"):
        build_defense(spec({**table, "lm": {"variant": "authors", "model": cond10}}))


def test_a_job_asking_the_exact_lm_gradient_of_the_authors_lm_is_refused():
    from pipeline.config.job import parse_job

    doc = {"name": "j", "data": {"dataset": "digits"},
           "defenses": [{"kind": "rdc", "model": "optimal", "elbo": "edm", "timesteps": "authors:4",
                         "lm": {"variant": "authors", "model": "edm:rdc-cifar10-uncond-edm:u.pt"}}],
           "attacks": [{"kind": "pgd", "lm_gradient": "exact"}]}
    with pytest.raises(ConfigError, match=r"attacks\[0\].lm_gradient: \"exact\" .* defense 'rdc-optimal-edmw-alm' "
                                          r"runs the authors' LM, which attacks cross by BPDA only"):
        parse_job(doc)
    doc["attacks"][0]["lm_gradient"] = "bpda"
    assert parse_job(doc).attacks[0].spec.lm_gradient == "bpda"

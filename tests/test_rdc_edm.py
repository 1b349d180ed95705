"""RDC and LM on EDM denoisers: the engine against a loop over the paper's formula (both ELBO
weightings), grid partials, LM, and defense tables that name an EDM checkpoint folder."""

from __future__ import annotations

import math

import pytest
import torch

from edm_cases import TINY, fill_weights
from pipeline import rng
from pipeline.config import spec
from pipeline.defenses.build import build_defense
from pipeline.defenses.lm import LikelihoodMaximization
from pipeline.defenses.rdc import RDC
from pipeline.diffusion.denoiser import DenoiserEps
from pipeline.diffusion.schedule import EDMGrid, VPSchedule
from pipeline.errors import CheckpointError
from pipeline.models import build_edm
from pipeline.models.checkpoint import save_checkpoint
from pipeline.rng import Draw

K = 4


@pytest.fixture(scope="module")
def net():
    net = build_edm(TINY["ddpmpp-vp"]).eval().requires_grad_(False)
    fill_weights(net)
    return net


def _draw(B):
    ids = torch.arange(B) + 40
    return Draw(5, ids, torch.zeros_like(ids))


def loop_logits(net, x, ts, draw, elbo):
    """The paper's formula one (example, class, timestep) at a time, calling the denoiser directly."""
    e_all = draw.normal(rng.ELBO_NOISE, ts, tuple(x.shape[1:]), dtype=x.dtype)
    x0 = 2 * x - 1
    rows = []
    for b in range(x.shape[0]):
        row = []
        for y in range(K):
            label = torch.nn.functional.one_hot(torch.tensor([y]), K).float()
            total = 0
            for j, t in enumerate(ts.tolist()):
                e = e_all[b, j]
                if elbo == "vp":
                    a = VPSchedule().alpha[t].item()
                    sigma = math.sqrt((1 - a) / a)  # the VP timestep's noise level
                    xn = (x0[b] + sigma * e).unsqueeze(0)
                    eps_hat = (xn - net(xn, torch.tensor([sigma]), label)) / sigma
                    total = total + ((eps_hat[0] - e) ** 2).sum() / len(ts)
                else:
                    # The RDC authors' EDM weighting on linspace(1e-4, 3, 1001)[:-1], summed over levels.
                    grid = torch.linspace(1e-4, 3, 1001, dtype=torch.float64)
                    s, ds = grid[t].item(), (grid[t + 1] - grid[t]).item()
                    p = math.exp(-((math.log(s) + 1.2) ** 2) / 2 * 1.2**2) / (s * 1.2 * math.sqrt(2 * math.pi))
                    w = (s**2 + 0.25) / (s * 0.5) ** 2 * p * ds
                    xn = (x0[b] + s * e).unsqueeze(0)
                    mse = ((net(xn, torch.tensor([s]), label)[0] - x0[b]) ** 2).mean()
                    total = total + (1000 / len(ts)) * w * mse
            row.append(-total)
        rows.append(torch.stack(row))
    return torch.stack(rows)


@pytest.mark.parametrize("elbo", ["vp", "edm"])
def test_rdc_on_an_edm_denoiser_equals_the_formula(net, elbo):
    schedule = VPSchedule() if elbo == "vp" else EDMGrid()
    rdc = RDC(DenoiserEps(net, schedule, K), K, 3, 8, schedule=schedule, timesteps=5, batch_size=7)
    x = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(3)).requires_grad_(True)
    draw = _draw(2)
    ref = loop_logits(net, x, rdc.ts, draw, elbo)
    w = torch.randn(2, K, generator=torch.Generator().manual_seed(4))
    (g_ref,) = torch.autograd.grad((ref * w).sum(), x)
    got = rdc.evaluate(x, draw)
    assert torch.allclose(got, ref, rtol=1e-4, atol=1e-5 * ref.abs().max().item())
    (g_fwd,) = torch.autograd.grad((got * w).sum(), x)  # gradients taken in forward
    assert (g_fwd - g_ref).norm() / g_ref.norm() < 1e-4
    rdc.elbo.JACOBIAN_VALUES = 0  # the recomputing backward
    (g_rec,) = torch.autograd.grad((rdc.evaluate(x, draw) * w).sum(), x)
    assert (g_rec - g_ref).norm() / g_ref.norm() < 1e-4
    # The classes differ: a denoiser that ignored the label would make every column equal.
    assert (ref - ref.mean(1, keepdim=True)).abs().max() > 1e-3 * ref.abs().max()


def test_edm_weights_are_the_authors_and_integrate_the_density():
    grid = EDMGrid()
    assert grid.T == 1000 and grid.levels[0] == pytest.approx(1e-4) and grid.levels[-1] == pytest.approx(3 - 2.9999 / 1000)
    # alpha = 1 / (1 + sigma^2): the VP x_t of level i, divided by sqrt(alpha), is x_0 + sigma_i e.
    assert torch.allclose(grid.noise_level(torch.arange(1000)), grid.levels, rtol=1e-12)
    t = torch.tensor([0, 250, 999])
    s = grid.levels[t]
    lam = grid.weight(t, 3 * 32 * 32)
    p = torch.exp(-((s.log() + 1.2) ** 2) * 1.2**2 / 2) / (s * 1.2 * math.sqrt(2 * math.pi))
    want = 1000 * (s**2 + 0.25) / (s * 0.5) ** 2 * p * (2.9999 / 1000) * s**2 / (3 * 32 * 32)
    assert torch.allclose(lam, want, rtol=1e-9)
    assert torch.equal(VPSchedule().weight(t, 10), torch.ones(3, dtype=torch.float64))


@pytest.mark.parametrize("elbo", ["vp", "edm"])
def test_grid_partials_sum_to_the_full_output(net, elbo):
    schedule = VPSchedule() if elbo == "vp" else EDMGrid()
    rdc = RDC(DenoiserEps(net, schedule, K), K, 3, 8, schedule=schedule, timesteps=6, batch_size=16)
    x, draw = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(5)), _draw(2)
    with torch.no_grad():
        full = rdc.evaluate(x, draw)
        total = sum(rdc.partial(x, shard, draw) for shard in rdc.shards(3))
    assert torch.allclose(total, full, rtol=1e-5, atol=1e-6 * full.abs().max().item())


@pytest.mark.parametrize("elbo", ["vp", "edm"])
def test_lm_on_an_edm_denoiser_stays_in_the_ball_and_lowers_the_loss(net, elbo):
    schedule = VPSchedule() if elbo == "vp" else EDMGrid()
    eps = DenoiserEps(net, schedule, K)
    lm = LikelihoodMaximization(eps, K, schedule, steps=3, eta=8 / 255, timesteps=8)
    x, draw = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(6)), _draw(2)
    x_lm = lm(x, draw)
    assert (x_lm - x).abs().max() <= 8 / 255 + 1e-6 and (x_lm - x).abs().max() > 0
    t, noise = lm.step_draws(draw, 0, (3, 8, 8), x.dtype)
    with torch.no_grad():
        assert (lm.loss(x_lm, t, noise) < lm.loss(x, t, noise)).all()


def _edm_digits_checkpoint(folder, **change):
    cfg = {"arch": "edm", **TINY["ddpmpp-vp"], "img_channels": 1, "label_dim": 10, **change}
    net = build_edm(cfg)
    fill_weights(net)
    return save_checkpoint(folder, net, cfg)


def test_defense_table_takes_an_edm_checkpoint_folder(tmp_path):
    folder = _edm_digits_checkpoint(tmp_path / "edm")
    x = torch.rand(2, 1, 8, 8, generator=torch.Generator().manual_seed(7))
    for elbo in ("vp", "edm"):
        rdc = build_defense(spec({"kind": "rdc", "model": str(folder), "dataset": "digits", "timesteps": 3,
                                  "elbo": elbo, "lm": {"steps": 1, "timesteps": 2}}))
        assert isinstance(rdc.eps_model, DenoiserEps) and rdc.name.startswith("rdc-edm")  # the folder's name
        with torch.no_grad():
            logits = rdc(x)
        assert logits.shape == (2, 10) and torch.isfinite(logits).all()
    bad = _edm_digits_checkpoint(tmp_path / "bad", label_dim=7)
    with pytest.raises(CheckpointError, match="label_dim"):
        build_defense(spec({"kind": "rdc", "model": str(bad), "dataset": "digits"}))


def test_optimal_model_under_the_edm_weighting_classifies_digits():
    from pipeline.data import load_split

    rdc = build_defense(spec({"kind": "rdc", "model": "optimal", "dataset": "digits", "timesteps": 20, "elbo": "edm"}))
    assert rdc.name == "rdc-optimal-edmw"
    x, y = load_split("digits", "test")
    with torch.no_grad():
        acc = (rdc(x[:60]).argmax(1) == y[:60]).float().mean().item()
    assert acc >= 0.9, acc

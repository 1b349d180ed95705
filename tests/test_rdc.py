"""RDC, the optimal model and LM against closed forms, brute force and invariants."""

import math

import pytest
import torch

from pipeline import rng
from pipeline.defenses.lm import LikelihoodMaximization
from pipeline.defenses.rdc import RDC
from pipeline.defenses.reference import reference_logits
from pipeline.diffusion.optimal import OptimalEps
from pipeline.diffusion.schedule import VPSchedule
from pipeline.errors import ConfigError, InputError
from pipeline.rng import Draw


def draw_for(ids, seed=0, calls=None):
    ids = torch.as_tensor(ids)
    return Draw(seed, ids, torch.zeros_like(ids) if calls is None else torch.as_tensor(calls))


@pytest.fixture(scope="module")
def optimal(digits):
    xtr, ytr = digits.x_train, digits.y_train
    return OptimalEps(xtr, ytr, 10)


def brute_force_eps(x_train, y_train, x_t, t, y, num_classes):
    """The paper's formula, one training point at a time, float64."""
    sch = VPSchedule()
    out = torch.zeros_like(x_t)
    for k in range(x_t.shape[0]):
        a = sch.alpha[t[k]]
        s = math.sqrt(1 - a)
        members = [i for i in range(len(y_train)) if y[k] == num_classes or y_train[i] == y[k]]
        d = torch.stack([((x_t[k] - a.sqrt() * (2 * x_train[i] - 1)) ** 2).sum() for i in members])
        w = torch.softmax(-d / (2 * s * s), 0)
        out[k] = sum(w[n] * (x_t[k] - a.sqrt() * (2 * x_train[i] - 1)) / s for n, i in enumerate(members))
    return out


def test_schedule_matches_ddpm():
    sch = VPSchedule()
    beta = torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64)
    assert torch.allclose(sch.alpha, torch.cumprod(1 - beta, 0))
    assert sch.alpha[0] == pytest.approx(1 - 1e-4)
    assert torch.allclose(sch.sigma**2 + sch.alpha, torch.ones(1000, dtype=torch.float64))
    ts = sch.subsample(100)
    assert ts.tolist()[:3] == [5, 15, 25] and ts[-1] == 995 and len(ts) == 100
    assert torch.equal(sch.subsample(None), torch.arange(1000))


def test_optimal_model_equals_brute_force():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(30, 2, 3, 3, generator=g, dtype=torch.float64)
    y = torch.arange(30) % 3
    model = OptimalEps(x, y, 3)
    x_t = torch.randn(6, 2, 3, 3, generator=g, dtype=torch.float64)
    t = torch.tensor([0, 3, 100, 500, 800, 999])
    cls = torch.tensor([0, 1, 2, 3, 1, 0])  # 3 = null class
    ref = brute_force_eps(x, y, x_t, t, cls, 3)
    assert torch.allclose(model(x_t, t, cls), ref, atol=1e-10)
    every = model.all_classes(x_t, t)
    assert every.shape == (6, 3, 2, 3, 3)
    for c in range(3):
        assert torch.allclose(every[:, c], brute_force_eps(x, y, x_t, t, torch.full((6,), c), 3), atol=1e-10)


def test_rdc_engine_matches_the_formula_values_and_gradients(digits, optimal):
    xte = digits.x_test
    model = optimal
    x = xte[:3].double().requires_grad_(True)
    draw = draw_for([7, 8, 9])
    prior = torch.tensor([0.05] * 5 + [0.15] * 5, dtype=torch.float64)
    rdc = RDC(model, 10, 1, 8, timesteps=7, batch_size=5, temperature=2.0, prior=prior)
    got = rdc.evaluate(x, draw)
    ref = reference_logits(model, x, rdc.ts, draw, 10, temperature=2.0, log_prior=torch.log(prior / prior.sum()))
    assert torch.allclose(got, ref, atol=1e-9)
    w = torch.randn(3, 10, dtype=torch.float64)
    (g_engine,) = torch.autograd.grad((got * w).sum(), x)
    (g_ref,) = torch.autograd.grad((ref * w).sum(), x)
    assert torch.allclose(g_engine, g_ref, atol=1e-8)
    assert g_engine.abs().sum() > 0


def test_rdc_unet_path_matches_the_formula():
    """The per-evaluation (network) path, with a small conditional network standing in for a UNet."""

    class TinyEps(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = torch.nn.Embedding(4, 4)
            self.lin = torch.nn.Linear(4 + 4 + 1, 4)

        def forward(self, x_t, t, y):
            h = torch.cat([x_t.flatten(1), self.emb(y), t[:, None].float() / 1000], 1)
            return self.lin(h).view_as(x_t)

    torch.manual_seed(0)
    net = TinyEps().double()
    x = torch.rand(4, 1, 2, 2, dtype=torch.float64, requires_grad=True)
    draw = draw_for([0, 1, 2, 3])
    rdc = RDC(net, 3, 1, 2, timesteps=11, batch_size=7)
    got = rdc.evaluate(x, draw)
    ref = reference_logits(net, x, rdc.ts, draw, 3)
    assert torch.allclose(got, ref, atol=1e-10)
    (g1,) = torch.autograd.grad(got.logsumexp(1).sum(), x)
    (g2,) = torch.autograd.grad(ref.logsumexp(1).sum(), x)
    assert torch.allclose(g1, g2, atol=1e-10)


def test_rdc_optimal_classifies_digits(digits, optimal):
    xte, yte = digits.x_test, digits.y_test
    rdc = RDC(optimal, 10, 1, 8, timesteps=20)
    with torch.no_grad():
        acc = (rdc(xte).argmax(1) == yte).float().mean().item()
    assert acc >= 0.95, acc


def test_partials_sum_to_the_output_for_any_split(digits, optimal):
    xte = digits.x_test
    x, draw = xte[:5], draw_for([3, 1, 4, 1, 5])
    rdc = RDC(optimal, 10, 1, 8, timesteps=20, prior=torch.linspace(1, 2, 10).tolist(), temperature=0.5)
    full = rdc.evaluate(x, draw)
    cells = rdc.grid()
    assert cells.shape == (200, 2)
    g = torch.Generator().manual_seed(1)
    for parts in (2, 3, 7):
        perm = torch.randperm(len(cells), generator=g)
        total = sum(rdc.partial(x, cells[perm[i::parts]], draw) for i in range(parts))
        assert torch.allclose(total, full, atol=1e-4, rtol=1e-5)
    singles = sum(rdc.partial(x, cells[i:i + 1], draw) for i in range(0, len(cells)))
    assert torch.allclose(singles, full, atol=1e-3, rtol=1e-5)


def test_logits_do_not_depend_on_batch_size_or_order(digits, optimal):
    xte = digits.x_test
    x, ids = xte[:32], torch.arange(100, 132)
    rdc = RDC(optimal, 10, 1, 8, timesteps=10)
    together = rdc.evaluate(x, draw_for(ids))
    alone = torch.cat([rdc.evaluate(x[i:i + 1], draw_for(ids[i:i + 1])) for i in range(32)])
    assert torch.allclose(together, alone, atol=1e-4, rtol=1e-5)
    perm = torch.randperm(32, generator=torch.Generator().manual_seed(0))
    shuffled = rdc.evaluate(x[perm], draw_for(ids[perm]))
    assert torch.allclose(shuffled, together[perm], atol=1e-4, rtol=1e-5)
    small_batches = RDC(optimal, 10, 1, 8, timesteps=10, batch_size=3).evaluate(x, draw_for(ids))
    assert torch.allclose(small_batches, together, atol=1e-4, rtol=1e-5)


def test_noise_is_shared_across_classes_and_fresh_across_calls(digits, optimal):
    xte = digits.x_test
    rdc = RDC(optimal, 10, 1, 8, timesteps=10).bind([0, 1])
    first, second = rdc(xte[:2]), rdc(xte[:2])
    assert not torch.allclose(first, second)  # EOT sees fresh noise per call
    rdc.bind([0, 1], seed=0)
    assert torch.equal(rdc(xte[:2]), first)  # and a restart reproduces it
    # One noise per (example, t): the same stream whatever the subsample.
    d = draw_for([0])
    e_all = d.normal(rng.ELBO_NOISE, torch.arange(1000), (1, 8, 8))
    e_sub = d.normal(rng.ELBO_NOISE, torch.tensor([5, 995]), (1, 8, 8))
    assert torch.equal(e_all[:, [5, 995]], e_sub)


def _random_unet():
    from pipeline.models.unet import UNet, unet_config

    torch.manual_seed(0)
    model = UNet(**{k: v for k, v in unet_config("digits").items() if k != "arch"}).double().eval()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(0.2 * torch.randn_like(p))
    return model


def test_pruned_scoring_evaluates_each_term_once():
    """Stages [(4, 5), (8, 2)] on K = 10: 10 * 4 + 5 * 8 = 80 network evaluations per example, no more."""
    model = _random_unet()
    rows = []
    hook = model.class_embed.register_forward_hook(lambda m, inputs, out: rows.append(inputs[0].numel()))
    rdc = RDC(model, 10, 1, 8, pruning=[(4, 5), (8, 2)])
    x = torch.rand(3, 1, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    try:
        with torch.no_grad():
            rdc.evaluate(x, draw_for([0, 1, 2]))
        assert sum(rows) == 3 * 80
        assert rdc.cost.forward == 3 * 80
        rows.clear()
        rdc.evaluate(x.clone().requires_grad_(True), draw_for([0, 1, 2]))  # with a gradient: still once each in forward
        assert sum(rows) == 3 * 80
    finally:
        hook.remove()


def test_the_last_stage_keep_is_honoured(digits, optimal):
    """keep = 2 in the last stage: two finalists per example keep their estimates; the other classes of that
    stage are capped prune_margin below the weaker finalist (keep = 5 leaves all five uncapped)."""
    xte = digits.x_test
    margin = 1e3
    with torch.no_grad():
        all_five = RDC(optimal, 10, 1, 8, pruning=[(10, 5), (20, 5)], prune_margin=margin).evaluate(xte[:4], draw_for(range(4)))
        two = RDC(optimal, 10, 1, 8, pruning=[(10, 5), (20, 2)], prune_margin=margin).evaluate(xte[:4], draw_for(range(4)))
    top = all_five.topk(5, 1)
    finalists = top.indices[:, :2]
    assert torch.equal(two.gather(1, finalists), all_five.gather(1, finalists))
    floor = two.gather(1, finalists).min(1, keepdim=True).values
    assert torch.allclose(two.gather(1, top.indices[:, 2:]), (floor - margin).expand(-1, 3))
    assert torch.equal(two.argmax(1), all_five.argmax(1))


def test_pruning_keeps_the_finalists_on_top(digits, optimal):
    xte, yte = digits.x_test, digits.y_test
    rdc = RDC(optimal, 10, 1, 8, pruning=[(10, 3), (50, 1)])
    with torch.no_grad():
        logits = rdc(xte[:60])
    assert (logits.argmax(1) == yte[:60]).float().mean() >= 0.95
    top2 = logits.topk(2, 1).values
    assert (top2[:, 0] - top2[:, 1] >= 1.0 - 1e-5).all()  # the last stage keeps 1: the rest sit a margin below
    x = xte[:2].clone().requires_grad_(True)
    rdc.bind([0, 1])
    (g,) = torch.autograd.grad(rdc(x)[:, 0].sum(), x)
    assert torch.isfinite(g).all() and g.abs().sum() > 0


def test_lm_stays_in_the_ball_and_lowers_the_loss(digits, optimal):
    xte = digits.x_test
    x = xte[:16]
    draw = draw_for(torch.arange(16))
    lm = LikelihoodMaximization(optimal, 10)
    assert lm.steps == 10 and lm.mu == 1.0 and lm.eta == pytest.approx(8 / 255) and lm.gamma == pytest.approx(0.8 / 255)
    x_prime = lm(x, draw)
    assert (x_prime - x).abs().max() <= 8 / 255 + 1e-6
    assert x_prime.min() >= 0 and x_prime.max() <= 1
    ts = VPSchedule().subsample(100).expand(16, 100)
    noise = draw_for(torch.arange(16), seed=99).normal(rng.ELBO_NOISE, torch.arange(100), (1, 8, 8))
    with torch.no_grad():
        before, after = lm.loss(x, ts, noise), lm.loss(x_prime, ts, noise)
    assert after.mean() < before.mean()
    assert (after < before).float().mean() >= 0.75


def test_lm_gradient_paths(digits, optimal):
    xte = digits.x_test
    model = optimal
    # Pixels off the box edges so that no gradient is exactly zero (sign(0) would jump under
    # finite differences); the dark pixels still hit the box at 0 within the steps.
    x0 = (0.01 + 0.98 * xte[:1]).double()
    draw = draw_for([0])
    bpda = LikelihoodMaximization(model, 10, steps=3, samples=2, gradient="bpda")
    exact = LikelihoodMaximization(model, 10, steps=3, samples=2, gradient="exact")
    w = torch.randn_like(x0)
    x = x0.clone().requires_grad_(True)
    (g_bpda,) = torch.autograd.grad((bpda(x, draw) * w).sum(), x)
    assert torch.equal(g_bpda, w)  # the identity
    x = x0.clone().requires_grad_(True)
    (g_exact,) = torch.autograd.grad((exact(x, draw) * w).sum(), x)
    # Finite differences of the exact map along a random direction.
    v = torch.randn_like(x0)
    h = 1e-6
    with torch.no_grad():
        fd = ((exact.run(x0 + h * v, draw) * w).sum() - (exact.run(x0 - h * v, draw) * w).sum()) / (2 * h)
    assert float((g_exact * v).sum()) == pytest.approx(float(fd), rel=1e-4, abs=1e-6)
    assert not torch.equal(g_exact, w)  # the box clip at 0 shows up


def test_rdc_rejects_bad_input(optimal):
    rdc = RDC(optimal, 10, 1, 8, timesteps=5)
    with pytest.raises(InputError, match="NaN"):
        rdc(torch.full((1, 1, 8, 8), float("nan")))
    with pytest.raises(InputError, match=r"\[0, 1\]"):
        rdc(torch.full((1, 1, 8, 8), 1.5))
    with pytest.raises(InputError, match="3 channels, expected 1"):
        rdc(torch.rand(1, 3, 8, 8))
    with pytest.raises(InputError, match="16x16, expected 8x8"):
        rdc(torch.rand(1, 1, 16, 16))
    with pytest.raises(ConfigError, match="timesteps"):
        RDC(optimal, 10, 1, 8, timesteps=0)
    with pytest.raises(ConfigError, match="pruning"):
        RDC(optimal, 10, 1, 8, pruning=[(10, 11)])

"""Mixup Inference: its draws, its limits and its switch, on a small classifier trained here."""

import math

import pytest
import torch

from pipeline.defenses.mi import MixupInference
from pipeline.defenses.plain import Plain
from pipeline.errors import ConfigError, InputError
from pipeline.rng import Draw


@pytest.fixture(scope="module")
def setup(linear_classifier, digits):
    return (linear_classifier, *digits)


def draw_for(ids, seed=0):
    ids = torch.as_tensor(ids)
    return Draw(seed, ids, torch.zeros_like(ids))


def test_defaults_follow_the_reference(setup):
    net, xtr, ytr, *_ = setup
    pl = MixupInference(net, xtr, ytr, 10, mode="pl")
    ol = MixupInference(net, xtr, ytr, 10, mode="ol")
    comb = MixupInference(net, xtr, ytr, 10, mode="combined")
    assert (pl.lam, pl.n_pl, pl.n_ol) == (0.5, 10, 0)
    assert (ol.n_pl, ol.n_ol) == (0, 30)
    assert (comb.n_pl, comb.n_ol, comb.threshold) == (5, 15, 0.2)
    assert comb.grid().shape == (20, 2)


def test_lambda_one_is_the_base_classifier(setup):
    net, xtr, ytr, xte, _ = setup
    for mode in ("pl", "ol", "combined"):
        mi = MixupInference(net, xtr, ytr, 10, mode=mode, lam=1.0)
        with torch.no_grad():
            out = mi.evaluate(xte, draw_for(torch.arange(len(xte))))
            base = torch.log_softmax(net(xte), 1)
        assert torch.equal(out.argmax(1), base.argmax(1))
        assert torch.allclose(out, base, atol=1e-4)


def test_pl_draws_from_the_predicted_class_and_ol_never(setup):
    net, xtr, ytr, xte, _ = setup
    mi = MixupInference(net, xtr, ytr, 10, mode="combined", n_pl=40, n_ol=60)
    draw = draw_for(torch.arange(50))
    y_hat = mi.predicted(xte[:50])
    idx = mi.samples(y_hat, mi.grid(), draw)
    classes = mi.pool_y[idx]
    kind = mi.grid()[:, 0]
    assert (classes[:, kind == 0] == y_hat[:, None]).all()
    assert (classes[:, kind == 1] != y_hat[:, None]).all()
    # OL covers every other class, and the draws are spread over the pool of a class.
    assert set(classes[0, kind == 1].tolist()) == set(range(10)) - {int(y_hat[0])}
    assert idx[:, kind == 0].unique().numel() > 200


def test_draws_are_a_function_of_seed_id_and_index(setup):
    net, xtr, ytr, xte, _ = setup
    mi = MixupInference(net, xtr, ytr, 10, mode="ol")
    ids = torch.arange(10, 30)
    together = mi.evaluate(xte[:20], draw_for(ids))
    alone = torch.cat([mi.evaluate(xte[i:i + 1], draw_for(ids[i:i + 1])) for i in range(20)])
    assert torch.allclose(together, alone, atol=1e-5)
    other_seed = mi.evaluate(xte[:20], draw_for(ids, seed=1))
    assert not torch.allclose(together, other_seed)
    cells = mi.grid()
    parts = mi.partial(xte[:20], cells[::2], draw_for(ids)) + mi.partial(xte[:20], cells[1::2], draw_for(ids))
    assert torch.allclose(mi.finish(xte[:20], parts, draw_for(ids)), together, atol=1e-5)


def test_combined_switches_at_the_threshold(setup):
    net, xtr, ytr, xte, _ = setup
    x, draw = xte[:40], draw_for(torch.arange(40))
    comb = MixupInference(net, xtr, ytr, 10, mode="combined")
    with torch.no_grad():
        total = comb.partial(x, comb.grid(), draw)
        p_pl, p_ol = total[:, 0] / comb.n_pl, total[:, 1] / comb.n_ol
        gap = torch.softmax(net(x), 1).max(1).values - p_pl.max(1).values
        for k in range(3):
            comb.threshold = float(gap[k]) + 1e-4  # gap below the threshold: MI-PL
            assert torch.allclose(comb.evaluate(x, draw)[k], torch.log(p_pl[k]), atol=1e-5)
            comb.threshold = float(gap[k]) - 1e-4  # at or above: MI-OL
            assert torch.allclose(comb.evaluate(x, draw)[k], torch.log(p_ol[k]), atol=1e-5)


class Ramp(torch.nn.Module):
    """Two classes on constant images of value v: logits (0, w (v - 1/2)), so max softmax F = sigmoid(w |v - 1/2|)."""

    def __init__(self, w: float):
        super().__init__()
        self.w = w
        self.batches: list[int] = []  # rows of each call, to count the draws

    def forward(self, x):
        self.batches.append(x.shape[0])
        v = x.mean((1, 2, 3))
        return torch.stack([torch.zeros_like(v), self.w * (v - 0.5)], 1)


def ramp_mi(w=8.0, **kw):
    """MI on Ramp with a crossed pool: every class-0 image is 1, every class-1 image is 0, so each
    mix is one closed-form point: m = v/2 + s/2 with s the partner's value, whatever the draw."""
    pool_x = torch.cat([torch.ones(6, 1, 2, 2), torch.zeros(6, 1, 2, 2)])
    pool_y = torch.tensor([0] * 6 + [1] * 6)
    return MixupInference(Ramp(w), pool_x, pool_y, 2, mode="combined", **kw)


def sigmoid(t):
    return 1 / (1 + math.exp(-t))


def test_combined_is_pl_below_the_threshold_and_ol_above_per_example():
    w = 8.0
    mi = ramp_mi(w)
    v = [0.02, 0.1, 0.25, 0.4, 0.6, 0.7, 0.75, 0.85, 0.9, 0.98]
    x = torch.tensor(v).view(-1, 1, 1, 1).expand(-1, 1, 2, 2).contiguous()
    out = mi.evaluate(x, draw_for(torch.arange(len(v))))
    chose = []
    for i, vi in enumerate(v):
        y_hat = int(vi > 0.5)
        s_pl, s_ol = (0.0, 1.0) if y_hat == 1 else (1.0, 0.0)  # partners: the predicted class, the other
        m_pl, m_ol = vi / 2 + s_pl / 2, vi / 2 + s_ol / 2  # MI eq. (5), lambda 1/2
        gap = sigmoid(w * abs(vi - 0.5)) - sigmoid(w * abs(m_pl - 0.5))
        log_p = {m: torch.log_softmax(torch.tensor([0.0, w * (mix - 0.5)]), 0) for m, mix in (("pl", m_pl), ("ol", m_ol))}
        assert (log_p["pl"] - log_p["ol"]).abs().max() > 0.1  # the two answers are told apart
        chose.append("pl" if gap < 0.2 else "ol")
        assert torch.allclose(out[i], log_p[chose[-1]], atol=1e-5), (vi, gap, out[i], log_p)
        assert abs(float(mi.gap(x[i:i + 1], mi.partial(x[i:i + 1], mi.grid(), draw_for([i])))) - gap) < 1e-5
    assert chose == ["ol", "ol", "pl", "pl", "pl", "pl", "pl", "ol", "ol", "ol"]


def test_combined_spends_five_pl_and_fifteen_ol_draws():
    mi = ramp_mi()
    kind = mi.grid()[:, 0]
    assert (int((kind == 0).sum()), int((kind == 1).sum())) == (5, 15)
    x = torch.rand(3, 1, 2, 2)
    mi.classifier.batches.clear()
    mi.cost.reset()
    out = mi.evaluate(x, draw_for([0, 1, 2]))
    # y^ on x, 20 mixed inputs per example, F(x) once more for the gap.
    assert mi.classifier.batches == [3, 60, 3] and mi.cost.forward == 66
    assert torch.allclose(out.exp().sum(1), torch.ones(3), atol=1e-5)  # p_PL / 5 and p_OL / 15 are distributions
    other = ramp_mi(n_pl=2, n_ol=7)
    assert tuple(other.grid().shape) == (9, 2) and int((other.grid()[:, 0] == 0).sum()) == 2


def test_output_is_a_log_probability_with_gradients(setup):
    net, xtr, ytr, xte, _ = setup
    mi = MixupInference(net, xtr, ytr, 10, mode="pl").bind(torch.arange(8))
    x = xte[:8].clone().requires_grad_(True)
    out = mi(x)
    assert torch.allclose(out.exp().sum(1), torch.ones(8), atol=1e-5)
    (g,) = torch.autograd.grad(out[torch.arange(8), out.argmax(1)].sum(), x)
    assert torch.isfinite(g).all() and g.abs().sum() > 0


def test_bad_configs_and_inputs(setup):
    net, xtr, ytr, *_ = setup
    with pytest.raises(ConfigError, match="mode"):
        MixupInference(net, xtr, ytr, 10, mode="xx")
    with pytest.raises(ConfigError, match="lambda"):
        MixupInference(net, xtr, ytr, 10, lam=1.5)
    with pytest.raises(ConfigError, match="lacks classes"):
        MixupInference(net, xtr[ytr != 3], ytr[ytr != 3], 10)
    plain = Plain(net, 10, 1, 8)
    with pytest.raises(InputError, match="expected 1"):
        plain(torch.rand(2, 3, 8, 8))
    with pytest.raises(InputError, match="bound to 3 example ids but got 2 rows"):
        plain.bind([1, 2, 3])(torch.rand(2, 1, 8, 8))

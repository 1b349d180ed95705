"""Mixup Inference: its draws, its limits and its switch, on a small classifier trained here."""

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

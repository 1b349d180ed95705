"""The cost model (pipeline/protocol/cost.py): network evaluations predicted from the defense and
attack objects alone equal what `evaluate` records where no outcome decides them, and lie in
the predicted range where one does."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from pipeline.config import spec
from pipeline.defenses.lm import LikelihoodMaximization
from pipeline.defenses.mi import MixupInference
from pipeline.defenses.plain import Plain
from pipeline.defenses.rdc import RDC
from pipeline.diffusion.optimal import OptimalEps
from pipeline.models.registry import build_model
from pipeline.models.unet import unet_config
from pipeline.protocol import Batch, build_attack, evaluate
from pipeline.defenses.build import defense_structure
from pipeline.protocol.cost import calls, elbo_evaluations, per_prediction, unit_cost

N = 4  # examples per unit


@pytest.fixture(scope="module")
def defenses(linear_classifier, digits):
    """Small defenses of every kind, on networks that cost milliseconds (their accuracy is beside the point)."""
    torch.manual_seed(0)
    optimal = OptimalEps(digits.x_train, digits.y_train, 10)
    unet = build_model(unet_config("digits")).eval().requires_grad_(False)
    pool = (digits.x_train, digits.y_train)
    lm = LikelihoodMaximization(optimal, 10, steps=2, timesteps="random", samples=2)
    return {
        "plain": Plain(linear_classifier, 10, 1, 8),
        "mi-pl": MixupInference(linear_classifier, *pool, 10, mode="pl", n_pl=3),
        "mi-ol": MixupInference(linear_classifier, *pool, 10, mode="ol", n_ol=4),
        "mi-combined": MixupInference(linear_classifier, *pool, 10, mode="combined", n_pl=2, n_ol=3),
        "rdc-optimal": RDC(optimal, 10, 1, 8, timesteps=4),
        "rdc-optimal-lm": RDC(optimal, 10, 1, 8, timesteps=3, lm=lm),
        "rdc-unet-pruned": RDC(unet, 10, 1, 8, pruning=[(1, 3), (2, 1)]),
        # the RDC authors' setting: one fixed draw (a deterministic defense), per-class noise under attack
        "rdc-optimal-fixed": RDC(optimal, 10, 1, 8, timesteps=3, draws="fixed", attack_noise="per-class"),
    }


def _recorded(defense, table, x, y, surrogate=None):
    attack = build_attack(spec(table), defense.num_classes, surrogate=surrogate)
    records = evaluate(defense, attack, Batch(x, y, range(x.shape[0])), 0).records
    return attack, sum(r.forward_passes for r in records), sum(r.backward_passes for r in records)


CLEAN = {"kind": "none", "passes": 3}
PGD_EPS0 = {"kind": "pgd", "eps": 0.0, "steps": 3, "eot": 2, "passes": 3}
PGD = {"kind": "pgd", "eps": 0.1, "steps": 2, "eot": 2, "restarts": 2, "passes": 2}
AA_RAND = {"kind": "autoattack", "version": "rand", "eps": 0.1, "n_iter": 2, "eot_iter": 2, "passes": 2}
AA_STANDARD = {"kind": "autoattack", "version": "standard", "eps": 0.1, "n_iter": 2, "n_target_classes": 2,
               "square_queries": 5, "passes": 2}


@pytest.mark.parametrize("name", ["plain", "mi-pl", "mi-ol", "mi-combined", "rdc-optimal", "rdc-optimal-lm",
                                  "rdc-unet-pruned", "rdc-optimal-fixed"])
@pytest.mark.parametrize("table", [CLEAN, PGD_EPS0], ids=["none", "pgd-eps0"])
def test_predicted_equals_recorded_where_no_outcome_decides(defenses, digits, name, table):
    defense = defenses[name]
    x, y = digits.x_test[:N], digits.y_test[:N]
    attack, fwd, bwd = _recorded(defense, table, x, y)
    cost = unit_cost(defense, attack, N)
    assert cost.exact
    assert (cost.forward.lo, cost.backward.lo) == (fwd, bwd)


RANGED = [pytest.param(name, table, id=f"{name}-{tid}")
          for name in ("plain", "mi-pl", "mi-combined", "rdc-optimal-lm", "rdc-optimal-fixed")
          for tid, table in (("pgd", PGD), ("aa-rand", AA_RAND), ("aa-rand-single", {**AA_RAND, "batched": False}))]
# the network's pruned RDC (the slowest to run) under PGD: its calls with gradients, per class
RANGED.append(pytest.param("rdc-unet-pruned", PGD, id="rdc-unet-pruned-pgd"))


@pytest.mark.parametrize("name, table", RANGED)
def test_recorded_lies_in_the_predicted_range(defenses, digits, name, table):
    defense = defenses[name]
    x, y = digits.x_test[:N], digits.y_test[:N]
    attack, fwd, bwd = _recorded(defense, table, x, y)
    cost = unit_cost(defense, attack, N)
    assert fwd in cost.forward and bwd in cost.backward, (cost.forward, fwd, cost.backward, bwd)


def test_autoattack_standard_on_a_deterministic_model_lies_in_the_range(defenses, digits):
    for path in ("adaptive", "oblivious"):
        defense = defenses["plain" if path == "adaptive" else "mi-pl"]
        x, y = digits.x_test[:N], digits.y_test[:N]
        attack, fwd, bwd = _recorded(defense, {**AA_STANDARD, "path": path}, x, y)
        cost = unit_cost(defense, attack, N)
        assert fwd in cost.forward and bwd in cost.backward, (path, cost.forward, fwd, cost.backward, bwd)


def test_a_transfer_attack_costs_its_surrogate_and_the_defense(defenses, digits, linear_classifier):
    defense, surrogate = defenses["rdc-optimal"], Plain(linear_classifier, 10, 1, 8)
    x, y = digits.x_test[:N], digits.y_test[:N]
    table = {"kind": "transfer", "surrogate": {"kind": "plain"}, "attack": {"kind": "pgd", "eps": 0.1, "steps": 2},
             "passes": 2}
    attack, fwd, bwd = _recorded(defense, table, x, y, surrogate=surrogate)
    cost = unit_cost(defense, attack, N)
    assert fwd in cost.forward and bwd in cost.backward
    # On the surrogate the attack's backward passes are plain classifier images: at most one
    # for the masking check plus steps x eot per example; RDC spends none of them.
    assert cost.backward.hi == N * (1 + 2)


def test_pgd_given_the_examples_attacked_is_exact(defenses, digits, linear_classifier):
    plain = defenses["plain"]
    x, y = digits.x_test[:8], digits.y_test[:8]
    table = {"kind": "pgd", "eps": 0.05, "steps": 3, "eot": 2, "passes": 1}
    attack = build_attack(spec(table), 10)
    records = evaluate(plain, attack, Batch(x, y, range(8)), 0).records
    attacked = sum(r.clean_correct for r in records)  # a deterministic model attacks what it gets right
    assert 0 < attacked < 8  # the linear model misses one of these: the count matters
    cost = unit_cost(plain, attack, 8, attacked=attacked)
    assert cost.exact
    assert cost.forward.lo == sum(r.forward_passes for r in records)
    assert cost.backward.lo == sum(r.backward_passes for r in records)
    # closed form: the masking check (8 images) + the selection's first judgement (8), then on
    # each attacked image 3 steps x EOT 2 with gradients, EOT 2 at the last iterate, 2 judgements;
    # 2 scoring passes of 8; each record keeps its rounded share of the attack's evaluations
    assert cost.attack.forward.lo == 8 + 8 + attacked * (3 * 2 + 2 + 2)
    assert cost.scoring.forward.lo == 16
    assert cost.forward.lo == 8 * round(cost.attack.forward.lo / 8 + 2)
    assert cost.attack.backward.lo == 8 + attacked * 3 * 2
    assert cost.backward.lo == 8 * round(cost.attack.backward.lo / 8)


def test_convergence_is_a_range_up_to_the_cap(defenses, digits):
    defense = defenses["mi-pl"]
    base = build_attack(spec(AA_RAND), 10)
    capped = build_attack(spec({**AA_RAND, "converge": True, "converge_cap": 2}), 10)
    one, three = unit_cost(defense, base, N), unit_cost(defense, capped, N)
    # doublings 1x, 2x and 4x iterations and EOT: APGD's gradient calls scale as (k n + 1)(k e)
    per_run = lambda k: (2 * k + 1) * 2 * k  # noqa: E731
    grads = defense.grid().shape[0]
    stage_bwd = N * per_run(1) * grads * 2  # two stages, apgd-ce and apgd-dlr
    assert one.backward.hi - N * grads == stage_bwd
    assert three.backward.hi - N * grads == stage_bwd * (per_run(1) + per_run(2) + per_run(4)) / per_run(1)
    x, y = digits.x_test[:N], digits.y_test[:N]
    attack, fwd, bwd = _recorded(defense, {**AA_RAND, "converge": True, "converge_cap": 2}, x, y)
    assert fwd in three.forward and bwd in three.backward


def test_calls_follow_the_defense_objects(defenses):
    # RDC: timesteps x classes; the optimal model's evaluation serves all classes of a pair
    assert elbo_evaluations(defenses["rdc-optimal"]) == 4
    # pruning: 1 timestep on 10 classes, then 2 on the 3 kept
    assert elbo_evaluations(defenses["rdc-unet-pruned"]) == 1 * 10 + 2 * 3
    # LM: steps x samples forward and backward, whether or not the attack differentiates
    assert calls(defenses["rdc-optimal-lm"], 5)["lm steps"] == (5 * 2 * 2, 5 * 2 * 2)
    assert per_prediction(defenses["mi-combined"]) == 1 + 2 + 3 + 1
    assert calls(defenses["mi-combined"], 2, backwards=1)["mi draws"] == (10, 10)


@pytest.mark.parametrize("table", [
    {"kind": "plain"}, {"kind": "mi", "mode": "ol"}, {"kind": "mi", "mode": "combined", "n_pl": 2},
    {"kind": "rdc", "model": "optimal", "timesteps": 10, "lm": {"steps": 3, "samples": 2}},
    {"kind": "rdc", "model": "default", "timesteps": "all", "pruning": [[50, 5], [500, 1]]},
])
def test_structure_costs_as_the_real_defense(defenses, table):
    """A structure (no weights, no data) costs what the defense build_defense builds costs."""
    d = defense_structure(spec(table))
    real = {"plain": defenses["plain"], "mi": None, "rdc": None}[table["kind"]]
    if table["kind"] == "mi":
        real = MixupInference(defenses["plain"].classifier, torch.zeros(10, 1, 8, 8), torch.arange(10), 10,
                              mode=table["mode"], n_pl=table.get("n_pl"))
    if table["kind"] == "rdc":
        eps = defenses["rdc-optimal"].eps_model if table["model"] == "optimal" else defenses["rdc-unet-pruned"].eps_model
        lm = LikelihoodMaximization(eps, 10, steps=3, samples=2) if "lm" in table else None
        real = RDC(eps, 10, 1, 8, timesteps=table["timesteps"] if table["timesteps"] != "all" else None,
                   pruning=table.get("pruning"), lm=lm)
    for rows, backwards in ((1, 0), (7, 1), (3, 10)):
        assert calls(d, rows, backwards) == calls(real, rows, backwards)


# --- FLOPs, the estimate, `plan` and the budget guard ------------------------------------------
def test_flops_of_an_evaluation_are_the_closed_form_and_kept_in_the_cache(cnn, tmp_path, monkeypatch):
    from pipeline.defenses.flops import evaluation_flops

    monkeypatch.setenv("ROBUSTSWEEP_CACHE", str(tmp_path))
    plain = spec({"kind": "plain", "model": cnn})
    w = 32  # SmallCNN's width on digits: 3x3 convolutions at 8x8 then 4x4, then two linear layers
    closed = 2 * 9 * 64 * (1 * w + w * w) + 2 * 9 * 16 * (w * 2 * w + 2 * w * 2 * w) + 2 * (8 * w * 4 * w + 4 * w * 10)
    # the input gradient with frozen weights: each layer's transpose, as many FLOPs as its forward
    assert evaluation_flops(plain) == (closed, closed)
    cached = json.loads((tmp_path / "flops.json").read_text())
    assert list(cached.values()) == [[closed, closed]]
    (tmp_path / "flops.json").write_text(json.dumps({k: [7, 8] for k in cached}))  # counted once: the cache answers
    assert evaluation_flops(plain) == (7, 8)
    assert evaluation_flops(spec({"kind": "rdc", "model": "optimal"})) is None  # no network


@pytest.mark.slow
def test_edm_ddpmpp_costs_the_published_flops(tmp_path, monkeypatch):
    """EDM's DDPM++ CIFAR-10 network: 42.4 GFLOP a forward, 85.1 with the input gradient."""
    from pipeline.defenses.flops import evaluation_flops

    monkeypatch.setenv("ROBUSTSWEEP_CACHE", str(tmp_path))
    forward, backward = evaluation_flops(spec({"kind": "rdc", "dataset": "cifar10", "elbo": "edm",
                                               "model": "edm:rdc-cifar10-cond-edm:absent.pt"}))
    assert round(forward / 1e9, 1) == 42.4 and round((forward + backward) / 1e9, 1) == 85.1


def _job(tmp_path, cnn, extra: str = "") -> Path:
    path = tmp_path / "job.toml"
    path.write_text(f"""name = "tiny"
{extra}
[data]
dataset = "digits"
split = "test"
limit = 6
shard_size = 4

[[defenses]]
kind = "plain"
model = "{cnn}"

[[attacks]]
kind = "pgd"
eps = [0.0, 0.1]
steps = 5
""")
    return path


def test_the_estimate_sums_unit_costs_and_prices_them_on_a_profile(cnn, tmp_path, monkeypatch):
    from pipeline.config.job import load_job
    from pipeline.defenses.flops import evaluation_flops
    from pipeline.runtime.estimate import device_profile, estimate_job

    monkeypatch.setenv("ROBUSTSWEEP_CACHE", str(tmp_path))
    job = load_job(_job(tmp_path, cnn))
    profile = device_profile("a100", 0.5)
    est = estimate_job(job, 355, profile, workers=2)
    zero, attacked = est.rows
    assert (zero.eps, zero.units, zero.examples) == (0.0, 2, 6)
    # eps 0, per example: the masking check and the selection's judgement, then one scoring pass
    # of the clean and one of the adversarial input (a deterministic defense is scored once)
    assert zero.forward.exact and zero.forward.lo == 6 * 4 and zero.backward.lo == 6
    F, B = evaluation_flops(job.defenses[0].spec)
    assert zero.flops.lo == pytest.approx(6 * (4 * F + B))
    assert zero.hours.lo == pytest.approx(zero.flops.lo / (312e12 * 0.5) / 3600)
    assert not attacked.forward.exact and attacked.forward.lo == zero.forward.lo
    assert est.hours.hi == pytest.approx(zero.hours.hi + attacked.hours.hi)


def test_plan_prints_the_table_and_json_and_refuses_bad_profiles(cnn, tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from pipeline.cli import app

    monkeypatch.setenv("ROBUSTSWEEP_CACHE", str(tmp_path))
    job = str(_job(tmp_path, cnn))
    table = CliRunner().invoke(app, ["plan", job, "--device", "h200", "--workers", "3"])
    assert table.exit_code == 0, table.output
    assert "defense" in table.output and "device-h" in table.output and "on 3 worker(s)" in table.output
    doc = json.loads(CliRunner().invoke(app, ["plan", job, "--json", "--efficiency", "0.25"]).output)
    assert doc["device"] == "h100" and doc["efficiency"] == 0.25 and len(doc["rows"]) == 2
    assert doc["rows"][0]["forward"] == [24, 24]
    for args, message in ((["--device", "tpu"], "device (--device) 'tpu' is unknown"),
                          (["--efficiency", "0"], "efficiency (--efficiency) must be in (0, 1]"),
                          (["--efficiency", "1.5"], "efficiency (--efficiency) must be in (0, 1]"),
                          (["--workers", "0"], "workers (--workers) must be >= 1")):
        result = CliRunner().invoke(app, ["plan", job, *args])
        assert result.exit_code == 2 and message in result.output, (args, result.output)


def test_the_budget_guard_refuses_before_any_work(cnn, tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from pipeline.cli import app
    from pipeline.config.job import load_job
    from pipeline.config.run import RunOptions
    from pipeline.errors import BudgetError
    from pipeline.runtime.estimate import guard
    from pipeline.runtime.plan import plan
    from pipeline.runtime.run import run_job

    monkeypatch.setenv("ROBUSTSWEEP_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "results"
    # the job file's budget: about 1e-12 device-hours is far below this job's
    job = load_job(_job(tmp_path, cnn, "max_gpu_hours = 1e-15"))
    with pytest.raises(BudgetError, match=r"up to .* device-hours on h100, above its budget max_gpu_hours = 1e-15"):
        run_job(job, RunOptions(out=str(out)))
    assert not any(out.rglob("*"))  # no run folder, lease, plan or model was written
    # the command line's budget wins over the job file's, either way
    units = plan(job, 355)
    assert guard(job, units, RunOptions(out=str(out), max_gpu_hours=1.0)).hours.hi < 1.0
    result = CliRunner().invoke(app, ["run", str(_job(tmp_path, cnn)), "--out", str(out), "--max-gpu-hours", "1e-15",
                                      "--device", "a100"])
    assert result.exit_code == 2
    assert "above its budget max_gpu_hours = 1e-15" in result.output and "PFLOP" in result.output
    assert not any(out.rglob("*"))
    # a budget that is no number of hours is refused as input
    with pytest.raises(Exception, match="max_gpu_hours"):
        load_job(_job(tmp_path, cnn, "max_gpu_hours = -1"))


def test_progress_counts_what_is_left_at_the_runs_own_speed(cnn, tmp_path, monkeypatch):
    from pipeline.config.job import load_job
    from pipeline.runtime.estimate import progress
    from pipeline.runtime.plan import plan

    monkeypatch.setenv("ROBUSTSWEEP_CACHE", str(tmp_path))
    units = plan(load_job(_job(tmp_path, cnn)), 355)  # eps 0 (exact) and 0.1 (a range), two shards each
    done = units[0]  # 4 examples at eps 0: 4 x (4 forward + 1 backward) evaluations
    out = progress(units, {done.unit_id}, forward=16, backward=4, seconds=2.0)
    assert out["evaluations_spent"] == 20 and out["seconds_per_evaluation"] == 0.1
    left = out["evaluations_left"]
    assert left[0] == out["evaluations_estimated"][0] - 20 and left[1] == out["evaluations_estimated"][1] - 20
    assert out["eta_worker_seconds"] == [round(left[0] * 0.1, 1), round(left[1] * 0.1, 1)]

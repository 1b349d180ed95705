"""`robustsweep bench cost`: the arithmetic of a wall time predicted from another run (runtime/calibration.py,
bench/cost.py) on a tiny real run, and its options; no timings are asserted."""

from __future__ import annotations

import math

import pytest
from typer.testing import CliRunner

from pipeline.protocol.cost import Span
from pipeline.runtime.calibration import landed, makespan, point, range_key, unit_point


@pytest.fixture(scope="module")
def tiny_run(cnn, tmp_path_factory):
    """A committed run of a plain CNN under PGD (eps 0: exact; eps 0.1: a range), written unit by unit
    the way an actor writes it (Worker.run_unit), with its plan.json; no Ray."""
    from pipeline.config.job import parse_job
    from pipeline.runtime.plan import plan, plan_document
    from pipeline.runtime.worker import Worker, WorkerContext
    from pipeline.store import Store

    out = tmp_path_factory.mktemp("runs")
    job = parse_job({"name": "tiny-cost", "seed": 3,
                     "data": {"dataset": "digits", "split": "test", "limit": 6, "shard_size": 2},
                     "defenses": [{"kind": "plain", "model": cnn}],
                     "attacks": [{"kind": "pgd", "eps": [0.0, 0.1], "steps": 3}]})
    units = plan(job, 355)
    run_id = "tiny-cost-run"
    worker = Worker("w0", "cpu", threads=1)
    ctx = WorkerContext(run_id, job.hash, str(out), job.spec.seed, job.spec.data)
    for u in units:
        worker.run_unit(u, ctx)
    Store(str(out)).write_json(f"{run_id}/plan.json", plan_document(job, units, run_id))
    return str(out / run_id), units


def test_makespan_is_list_scheduling_in_queue_order():
    # n equal units on W workers: ceil(n / W) rounds, whatever the actors' queue depth
    for n, w in [(7, 2), (8, 2), (5, 3), (1, 4)]:
        for inflight in (1, 2):
            assert makespan([1.5] * n, w, inflight=inflight) == pytest.approx(math.ceil(n / w) * 1.5)
    # list scheduling puts each unit on the first actor free: 3 | 1+1+1
    assert makespan([3, 1, 1, 1], 2) == 3
    # two in flight per actor, as the scheduler dispatches: the third unit is queued behind the long one
    assert makespan([3, 1, 1, 1], 2, inflight=2) == 4
    # a gang of 2 waits for both actors to be idle
    assert makespan([1, 2], 2, gangs=[1, 2]) == 3
    assert makespan([], 3) == 0


def test_a_point_in_a_range_is_where_the_calibration_landed():
    assert point(Span(10, 30), 0.25) == 15
    assert landed(15, Span(10, 30)) == 0.25
    assert landed(40, Span(10, 30)) == 1.0 and landed(0, Span(10, 30)) == 0.0
    assert landed(5, Span(5, 5)) is None  # an exact count has no width to place it in


def test_calibrated_rates_reproduce_the_calibration_runs_own_seconds(tiny_run):
    from pipeline.bench.cost import calibrate_on, predict_units, read_run
    from pipeline.defenses.flops import evaluation_flops
    from pipeline.runtime.calibration import network_key

    uri, units = tiny_run
    _, planned, sums, workers = read_run(uri)
    assert workers == 1 and len(sums) == len(units) == 6
    recorded = sum(s["seconds"] for s in sums.values())
    cal = calibrate_on(uri, wall=recorded + 2.0)
    (key,) = cal.rates
    assert key == network_key(units[0].defense_spec)
    w = cal.weights[key]
    forward_flops, backward_flops = evaluation_flops(units[0].defense_spec)
    assert w == backward_flops / forward_flops  # a backward evaluation weighs its FLOPs in forward ones
    evaluations = sum(s["forward"] + w * s["backward"] for s in sums.values())
    assert cal.rates[key] * evaluations == pytest.approx(recorded)
    # one worker: the units run one after another, the rest of the wall time is start-up
    assert cal.makespan == pytest.approx(recorded) and cal.startup == pytest.approx(2.0)

    prediction = predict_units(planned, cal, workers=1)
    by_id = {u.unit_id: u for u in planned}
    for unit_id, p in prediction["units"].items():
        lo, hi = p["range_forward"]
        if lo == hi:
            assert p["how"] == "exact" and p["forward"] == sums[unit_id]["forward"]  # eps 0
        else:
            f, _ = cal.fractions[range_key(by_id[unit_id])]
            assert p["how"] == "calibrated" and p["forward"] == pytest.approx(lo + f * (hi - lo))
    # the fraction is taken over the sums, so the calibration job predicted by itself spends
    # exactly its recorded evaluations and seconds
    assert sum(p["forward"] for p in prediction["units"].values()) == pytest.approx(sum(s["forward"] for s in sums.values()))
    assert sum(p["seconds"] for p in prediction["units"].values()) == pytest.approx(recorded)
    assert prediction["wall"] == pytest.approx(cal.startup + prediction["makespan"])
    assert prediction["makespan"] == pytest.approx(sum(p["seconds"] for p in prediction["units"].values()))


def test_a_range_without_calibration_falls_back_to_its_midpoint(tiny_run):
    from pipeline.bench.cost import calibrate_on
    from pipeline.runtime.calibration import Calibration
    from pipeline.runtime.estimate import unit_cost_of

    uri, units = tiny_run
    cal = calibrate_on(uri, wall=100.0)
    empty = Calibration(cal.rates, cal.weights, {}, cal.startup, 1, cal.wall, cal.makespan, None, "")
    u = next(u for u in units if u.eps > 0)
    cost, _ = unit_cost_of(u, {})
    forward, backward, how = unit_point(u, cost, empty)
    assert how == "midpoint" and forward == (cost.forward.lo + cost.forward.hi) / 2


@pytest.mark.parametrize("args, message", [
    (["--calibration", "runs/x"], "--calibration and --calibration-wall go together"),
    (["--measured-wall", "12"], "--measured and --measured-wall go together"),
    (["--calibration", "runs/x", "--calibration-wall", "-3"], "--calibration-wall must be a positive number"),
    (["--workers", "0"], "--workers must be >= 1"),
    (["--job", "no/such.toml"], "--job: no job file at no/such.toml"),
    (["runs/x", "--calibration", "runs/y"], "--calibration is for the wall-time prediction"),
    (["--predict", "jobs/demo.toml"], "--predict needs RUN_URI"),
])
def test_bad_options_exit_2_naming_the_option(args, message):
    from pipeline.cli import app

    result = CliRunner().invoke(app, ["bench", "cost", *args])
    assert result.exit_code == 2, result.output
    assert message in " ".join(result.output.split())


def test_a_folder_without_a_plan_is_refused(tmp_path):
    from pipeline.cli import app

    result = CliRunner().invoke(app, ["bench", "cost", "--calibration", str(tmp_path), "--calibration-wall", "5",
                                      "--measured", str(tmp_path), "--measured-wall", "5"])
    assert result.exit_code == 2 and "no plan.json" in result.output


def test_a_network_the_calibration_did_not_run_is_priced_by_its_flops(tiny_run):
    from pipeline.bench.cost import calibrate_on
    from pipeline.runtime.calibration import Calibration, calibrated_unit_seconds
    from pipeline.runtime.estimate import unit_cost_of

    uri, units = tiny_run
    cal = calibrate_on(uri, wall=100.0)
    other = Calibration({}, {}, cal.fractions, cal.startup, 1, cal.wall, cal.makespan, 2e9, "")
    u = next(u for u in units if u.eps > 0)
    cost, flops = unit_cost_of(u, {})
    seconds, forward, backward, how = calibrated_unit_seconds(u, cost, flops, other)
    assert how == "calibrated, FLOP/s" and seconds == pytest.approx((forward * flops[0] + backward * flops[1]) / 2e9)
    unknown = Calibration({}, {}, cal.fractions, cal.startup, 1, cal.wall, cal.makespan, None, "")
    assert calibrated_unit_seconds(u, cost, flops, unknown)[0] is None


def tiny_job_file(cnn, folder):
    """tiny_run's job as a job file."""
    job = folder / "tiny.toml"
    job.write_text(f'name = "tiny-cost"\nseed = 3\n[data]\ndataset = "digits"\nsplit = "test"\nlimit = 6\n'
                   f'shard_size = 2\n[[defenses]]\nkind = "plain"\nmodel = "{cnn}"\n'
                   f'[[attacks]]\nkind = "pgd"\neps = [0.0, 0.1]\nsteps = 3\n')
    return job


def test_a_run_predicted_from_itself_takes_its_own_wall_time(tiny_run, cnn, tmp_path):
    """`bench cost --calibration RUN --measured RUN` on the same run: every unit's seconds are its
    records', so the predicted wall is the given one (start-up = wall - makespan, added back)."""
    from pipeline.bench.cost import bench_cost, format_cost

    uri, units = tiny_run
    job = tiny_job_file(cnn, tmp_path)
    result = bench_cost(str(job), calibration=uri, calibration_wall=30.0, measured=uri, measured_wall=30.0,
                        workers=1, save=False)
    assert result["predicted"]["wall"] == pytest.approx(30.0)
    assert result["ratio"] == pytest.approx(1.0)
    assert result["measured"]["makespan_of_recorded"] == pytest.approx(result["calibration"]["makespan"])
    assert any("predicted / measured = 1.000" in line for line in format_cost(result))


def test_plan_with_a_calibration_run_prices_the_job_at_that_runs_speed(tiny_run, cnn, tmp_path):
    """`plan JOB --calibration RUN`: the job of a finished run, planned again at the speed its records
    show, takes the run's own wall time; the wall time alone is refused."""
    import json

    from typer.testing import CliRunner

    from pipeline.cli import app

    uri, units = tiny_run
    job = tiny_job_file(cnn, tmp_path)
    result = CliRunner().invoke(app, ["plan", str(job), "--calibration", uri, "--calibration-wall", "30", "--json"])
    assert result.exit_code == 0, result.output
    calibrated = json.loads(result.output)["calibrated"]
    assert calibrated["wall"] == pytest.approx(30.0) and not calibrated["unknown"]
    assert sorted(calibrated["unit_seconds"]) == sorted(u.unit_id for u in units)
    text = CliRunner().invoke(app, ["plan", str(job), "--calibration", uri])
    assert text.exit_code == 0 and "start-up not known" in text.output
    alone = CliRunner().invoke(app, ["plan", str(job), "--calibration-wall", "30"])
    assert alone.exit_code == 2 and "--calibration-wall" in alone.output

"""The per-unit deadline fed by the cost model (runtime/run.py `unit_deadline`, `Deadlines`): no
deadline before a unit of the defense has committed, then factor x the unit's predicted
evaluations x the seconds per evaluation this run measured, never below the floor."""

from __future__ import annotations

import dataclasses

import pytest

from pipeline.config.job import parse_job
from pipeline.config.run import RunOptions
from pipeline.errors import ConfigError
from pipeline.runtime import plan
from pipeline.runtime.estimate import unit_evaluations
from pipeline.runtime.run import Deadlines, unit_deadline
from pipeline.runtime.worker import Worker, WorkerContext
from pipeline.store import Store


def _job(cnn, steps=3):
    return parse_job({"name": "deadline", "seed": 1, "data": {"dataset": "digits", "split": "test", "limit": 4, "shard_size": 2},
                      "defenses": [{"kind": "plain", "model": cnn}],
                      "attacks": [{"kind": "pgd", "eps": 0.1, "steps": steps}]})


def test_the_deadline_is_factor_times_predicted_evaluations_times_the_measured_rate(cnn, tmp_path):
    job = _job(cnn)
    first, second = plan(job, 355)
    options = RunOptions(deadline_factor=4, deadline_floor=1e-6)
    deadlines = Deadlines(options)
    assert deadlines(first) is None and deadlines(second) is None  # nothing measured yet: no limit
    ctx = WorkerContext(run_id="r", job_hash=job.hash, out=str(tmp_path), seed=1, data=job.spec.data)
    done = Worker("worker-0", "cpu").run_unit(first, ctx)
    table = Store(str(tmp_path)).read_table(f"r/{first.path}")
    # The evaluations the worker reports are its records' passes, within the cost model's span
    # (PGD skips examples the model already gets wrong: the upper count is what a deadline needs).
    spent = sum(table.column("forward_passes").to_pylist()) + sum(table.column("backward_passes").to_pylist())
    predicted = unit_evaluations(second)
    assert done.evaluations == spent and spent in unit_evaluations(first) and predicted.hi > predicted.lo
    deadlines.record(first, done)
    assert deadlines.rate(first.defense) == pytest.approx(done.seconds / spent)
    assert deadlines.rate("another defense") is None
    assert deadlines(second) == pytest.approx(4 * predicted.hi * done.seconds / spent)
    deadlines.record(first, dataclasses.replace(done, seconds=3 * done.seconds))  # a unit 3 times slower:
    assert deadlines(second) == pytest.approx(4 * predicted.hi * 2 * done.seconds / spent)  # the rate is the mean


def test_the_floor_the_explicit_timeout_and_the_rate_of_several_units(cnn):
    units = plan(_job(cnn, steps=5), 355)
    predicted = unit_evaluations(units[0]).hi
    options = RunOptions(deadline_factor=3, deadline_floor=60)
    assert unit_deadline(units[0], options, rate=None) is None
    assert 3 * predicted > 60 > 3 * predicted * 0.01
    assert unit_deadline(units[0], options, rate=1.0) == 3 * predicted  # above the floor
    assert unit_deadline(units[0], options, rate=0.01) == 60  # below it: the floor
    assert unit_deadline(units[0], RunOptions(unit_timeout=7), rate=1.0) == 7  # given by hand: it wins
    assert unit_deadline(units[0], RunOptions(unit_timeout=7), rate=None) == 7


def test_the_default_deadline_leaves_a_real_unit_room_and_bad_settings_are_refused():
    options = RunOptions()
    assert (options.deadline_factor, options.deadline_floor) == (4.0, 300.0)
    assert RunOptions(deadline_factor=2, deadline_floor=30).run_flags() == ["--deadline-factor", "2", "--deadline-floor", "30"]
    with pytest.raises(ConfigError, match=r"deadline_factor \(--deadline-factor\) must be a number >= 1, got 0.5"):
        RunOptions(deadline_factor=0.5)
    with pytest.raises(ConfigError, match=r"deadline_floor \(--deadline-floor\) must be > 0 seconds, got 0"):
        RunOptions(deadline_floor=0)

"""`robustsweep bench cost`: a job's wall time predicted from a run of another job, against its own.

The calibration run (a small built-in job on digits with the demo's kinds of defenses and
attacks, on other examples, another seed and smaller budgets; or a run given by its folder)
is read back: per unit, its records' seconds and evaluations beside the evaluations
pipeline/protocol/cost.py predicts for it. runtime/calibration.py turns them into seconds per
evaluation of each network, where in each outcome-dependent range the spend landed, and the
start-up (its wall seconds less the makespan of its units). The target job (jobs/demo.toml)
is then predicted unit by unit and scheduled on the same worker count, run fresh (its models
trained first, untimed) and compared: wall seconds, and per (defense, attack) seconds and
evaluations, predicted against recorded.

Each run is timed from the start of a Ray cluster of its own (`local_ray`, one CPU per
worker) to the end of `run_job`: what `robustsweep run` spends less the interpreter's start.
"""

from __future__ import annotations

import os
import tempfile

from pipeline.bench.common import load_average, local_ray, machine_info, timed
from pipeline.config.job import Job, parse_job
from pipeline.config.run import RunOptions
from pipeline.errors import ConfigError
from pipeline.runtime.calibration import calibrate, calibrate_on, makespan, network_key, predict_units, read_run, unit_label
from pipeline.runtime.estimate import save_measured_profile
from pipeline.runtime.plan import Unit
from pipeline.runtime.scheduler import INFLIGHT, gang_size

EPS = [8 / 255, 16 / 255, 32 / 255, 64 / 255]


def calibration_job() -> dict:
    """The built-in calibration job: the demo's defenses under the demo's kinds of attacks, on 32
    other digits test examples (ids 100-131; the demo takes the first 48), seed 1, and about half
    the demo's attack budgets, so that it costs less than the job it predicts."""
    return {
        "name": "cost-calibration", "seed": 1,
        "data": {"dataset": "digits", "split": "test", "ids": list(range(100, 132)), "shard_size": 16},
        "defenses": [{"kind": "plain"}, {"kind": "mi", "mode": "pl"}, {"kind": "mi", "mode": "ol"},
                     {"kind": "rdc", "model": "optimal", "timesteps": 10, "lm": {"steps": 10, "timesteps": "random"}},
                     {"kind": "rdc", "model": "default", "timesteps": 5}],
        "attacks": [
            {"kind": "autoattack", "version": "standard", "eps": EPS, "n_target_classes": 3, "square_queries": 500,
             "defenses": ["plain-*"]},
            {"kind": "autoattack", "version": "rand", "eps": EPS, "n_iter": 10, "eot_iter": 2, "passes": 5,
             "defenses": ["mi-*"]},
            {"kind": "autoattack", "version": "rand", "eps": EPS, "n_iter": 5, "eot_iter": 2, "passes": 5,
             "defenses": ["rdc-*"]},
        ],
    }


def timed_run(job: Job, out: str, workers: int) -> dict:
    """Run `job` fresh under `out` on a Ray cluster of its own with `workers` actors (its models are
    trained first, untimed): {"uri", "wall", "load"} (wall seconds from the cluster's start)."""
    from pipeline.runtime.run import prepare_models, run_job

    prepare_models(job, progress=False)
    load = load_average()

    def run():
        with local_ray(workers):
            return run_job(job, RunOptions(out=out, workers=workers, fresh=True), progress=False)

    wall, result = timed(run)
    if not result.ok:
        raise RuntimeError(f"run {result.uri} failed units {result.failed}: the figures would not be comparable")
    return {"uri": result.uri, "wall": wall, "load": [load, load_average()]}


def compare(units: list[Unit], prediction: dict, sums: dict[str, dict]) -> list[dict]:
    """Per (defense, attack) in plan order: predicted and recorded seconds and evaluations."""
    rows: dict[tuple, dict] = {}
    for u in units:
        p, r = prediction["units"][u.unit_id], sums.get(u.unit_id, {})
        row = rows.setdefault(unit_label(u), {"defense": unit_label(u)[0], "attack": unit_label(u)[1], "network": network_key(u.defense_spec),
                                          "units": 0, "predicted_seconds": 0.0, "recorded_seconds": 0.0,
                                          "predicted_forward": 0.0, "recorded_forward": 0.0,
                                          "predicted_backward": 0.0, "recorded_backward": 0.0, "how": set()})
        row["units"] += 1
        row["how"].add(p["how"])
        row["predicted_seconds"] = None if row["predicted_seconds"] is None or p["seconds"] is None else row["predicted_seconds"] + p["seconds"]
        row["predicted_forward"] += p["forward"]
        row["predicted_backward"] += p["backward"]
        row["recorded_seconds"] += r.get("seconds", 0.0)
        row["recorded_forward"] += r.get("forward", 0.0)
        row["recorded_backward"] += r.get("backward", 0.0)
    out = []
    for row in rows.values():
        row["how"] = ", ".join(sorted(row["how"]))
        p, r = row["predicted_seconds"], row["recorded_seconds"]
        row["ratio"] = p / r if p is not None and r > 0 else None
        out.append(row)
    return out


def bench_cost(job_path: str = "jobs/demo.toml", *, calibration: str | None = None, calibration_wall: float | None = None,
               measured: str | None = None, measured_wall: float | None = None, workers: int | None = None,
               out: str | None = None, endpoint_url: str | None = None, save: bool = True) -> dict:
    """Predict `job_path`'s wall time from a calibration run (run here, or the folder `calibration`
    with its wall seconds) on `workers` actors (default: one per CPU, as `robustsweep run`), then
    run it fresh (or read the run `measured` with its wall seconds) and compare."""
    from pipeline.config.job import load_job
    from pipeline.data import load_split

    job = load_job(job_path)
    workers = workers or os.cpu_count() or 1
    out = out or tempfile.mkdtemp(prefix="bench-cost-")
    result: dict = {"job": str(job_path), "workers": workers, "out": out, "machine": machine_info()}
    ran = calibration is None
    if ran:
        run = timed_run(parse_job(calibration_job(), "<calibration job>"), out, workers)
        calibration, calibration_wall = run["uri"], run["wall"]
        result["calibration_load"] = run["load"]
    # a given run ran on as many actors as wrote its records
    cal = calibrate_on(calibration, calibration_wall, endpoint_url, workers if ran else None)
    if save:
        save_measured_profile(calibrate(calibration, endpoint_url))
    result["calibration"] = {"uri": calibration, "wall": cal.wall, "makespan": cal.makespan, "startup": cal.startup,
                             "what": cal.what, "seconds_per_evaluation": cal.rates, "backward_weight": cal.weights,
                             "flops_per_second": cal.flops_per_second,
                             "fractions": {" / ".join(k): list(v) for k, v in cal.fractions.items()}}
    data = job.spec.data
    from pipeline.runtime.plan import plan

    units = plan(job, load_split(data.dataset, data.split, root=data.root)[0].shape[0])
    prediction = predict_units(units, cal, workers)
    result["predicted"] = {k: prediction[k] for k in ("startup", "makespan", "wall", "unknown", "how")}
    if measured is None:
        run = timed_run(job, out, workers)
        measured, measured_wall = run["uri"], run["wall"]
        result["measured_load"] = run["load"]
    _, measured_units, sums, _ = read_run(measured, endpoint_url)
    if {u.unit_id for u in measured_units} != {u.unit_id for u in units}:
        raise ConfigError(f"--measured: {measured} is not a run of {job_path} (its planned units differ)")
    missing = [u.unit_id for u in units if u.unit_id not in sums]
    if missing:
        raise ConfigError(f"--measured: {measured} has {len(missing)} of {len(units)} units not committed; finish it first")
    result["measured"] = {"uri": measured, "wall": measured_wall,
                          "makespan_of_recorded": _recorded_makespan(units, sums, workers)}
    result["ratio"] = prediction["wall"] / measured_wall
    result["rows"] = compare(units, prediction, sums)
    return result


def _recorded_makespan(units: list[Unit], sums: dict[str, dict], workers: int) -> float:
    return makespan([sums[u.unit_id]["seconds"] for u in units], workers,
                    [gang_size(u.grid_workers, u.defense_spec.kind, workers, len(units)) for u in units], INFLIGHT)


def _s(v: float | None, fmt: str = ".1f") -> str:
    return "?" if v is None else format(v, fmt)


def format_cost(r: dict) -> list[str]:
    """The comparison for a person: wall seconds predicted and measured, then per (defense, attack)."""
    c, p, m = r["calibration"], r["predicted"], r["measured"]
    lines = [f"calibration: {c['what']}: wall {c['wall']:.1f} s = start-up {c['startup']:.1f} s + units' makespan "
             f"{c['makespan']:.1f} s",
             f"{r['job']} on {r['workers']} workers: predicted {p['wall']:.1f} s (start-up {p['startup']:.1f} + makespan "
             f"{p['makespan']:.1f}), measured {m['wall']:.1f} s (its records' makespan {m['makespan_of_recorded']:.1f}); "
             f"predicted / measured = {r['ratio']:.3f}"]
    lines.append("seconds per evaluation (forward + w x backward): " + ", ".join(
        f"{k} {v * 1e6:.1f} us (w {c['backward_weight'][k]:.2f})" for k, v in c["seconds_per_evaluation"].items()))
    if p["unknown"]:
        lines.append(f"{len(p['unknown'])} units have no known speed and are not in the prediction")
    head = ("defense", "attack", "units", "pred s", "rec s", "pred/rec", "pred fwd", "rec fwd", "pred bwd", "rec bwd", "range point")
    table = [head] + [(row["defense"], row["attack"], str(row["units"]), _s(row["predicted_seconds"]),
                       _s(row["recorded_seconds"]), _s(row["ratio"], ".2f"), f"{row['predicted_forward']:.4g}",
                       f"{row['recorded_forward']:.4g}", f"{row['predicted_backward']:.4g}",
                       f"{row['recorded_backward']:.4g}", row["how"]) for row in r["rows"]]
    widths = [max(len(t[i]) for t in table) for i in range(len(head))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(t, widths)).rstrip() for t in table]
    mach = r["machine"]
    loads = [f"{name} {r[key][0][0]:g} -> {r[key][1][0]:g}" for name, key in
             (("calibration", "calibration_load"), ("measured run", "measured_load")) if key in r]
    lines.append(f"machine: {mach['processor']}, {mach['cpus']} CPUs, torch {mach['torch']}"
                 + (f"; 1-minute load before -> after: {', '.join(loads)}" if loads else ""))
    return lines


__all__ = ["bench_cost", "calibration_job", "compare", "format_cost", "timed_run"]

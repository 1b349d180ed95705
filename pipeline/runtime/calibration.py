"""A job's seconds and wall time predicted from a run of another job (or of itself, resumed).

A run on the same machine gives three things a FLOP count cannot: the seconds one evaluation of
each network takes there (RDC's optimal model has no FLOPs at all), where in a range [lo, hi] the
spend of an outcome-dependent attack lands (later AutoAttack stages attack only the survivors),
and the start-up a run pays before and around its units. A run is read back (`read_run`) and
fitted (`calibrate_on`: per unit, its records' seconds and evaluations beside the evaluations
pipeline/protocol/cost.py predicts for it); planned units are then predicted one by one and
scheduled as the run's scheduler would (`predict_units`). `robustsweep plan --calibration` and
`robustsweep bench cost` use it.
"""

from __future__ import annotations

from dataclasses import dataclass

from pipeline.config.attack import TransferSpec
from pipeline.errors import ConfigError
from pipeline.protocol.cost import Span, UnitCost
from pipeline.runtime.estimate import network_flops, unit_cost_of
from pipeline.runtime.plan import Unit
from pipeline.runtime.scheduler import INFLIGHT, gang_size
from pipeline.store import Store


def network_key(spec) -> str:
    """What prices an evaluation: the defense's kind and network (model card), not its budgets:
    kind, dataset, model and training method."""
    return ":".join(str(v) for v in (spec.kind, spec.dataset, spec.model, getattr(spec, "method", None)) if v is not None)


def range_key(unit: Unit) -> tuple[str, str, str]:
    """Where a unit's spend lands in its range depends on the defense (network and mode) and
    on the attack's kind, version and path; not on its iterations, which scale lo and hi alike."""
    spec, table = unit.defense_spec, unit.attack_table
    defense = network_key(spec) + (f":{spec.mode}" if getattr(spec, "mode", None) else "")
    attack = ":".join(str(table.get(k, "")) for k in ("kind", "version", "path"))
    return defense, attack, format(float(unit.eps), ".6g")


def point(span: Span, fraction: float) -> float:
    """The point of [lo, hi] at `fraction` of its width: lo + fraction (hi - lo)."""
    return span.lo + fraction * (span.hi - span.lo)


def landed(recorded: float, span: Span) -> float | None:
    """Where `recorded` lies in `span` as a fraction of its width, clipped to [0, 1]; None for an
    exact span (no width to place it in)."""
    if span.hi <= span.lo:
        return None
    return min(1.0, max(0.0, (recorded - span.lo) / (span.hi - span.lo)))


def makespan(seconds: list[float], workers: int, gangs: list[int] | None = None, inflight: int = 1) -> float:
    """Seconds until the last of `seconds` (units in queue order) ends on `workers` actors, dispatched
    as the run's scheduler does (runtime/scheduler.py): a one-actor unit to the actor with the fewest
    units in flight (lowest slot among equals) while it has fewer than `inflight`, where it runs after
    those; a gang of G waits at the head of the queue until G actors are idle and takes the lowest.
    With inflight 1 this is list scheduling: each unit starts on the first actor to be free."""
    if workers < 1:
        raise ConfigError(f"workers must be >= 1, got {workers}")
    gangs = gangs or [1] * len(seconds)
    ends: list[list[float]] = [[] for _ in range(workers)]  # each actor's units' end times, in order
    now = 0.0
    for s, g in zip(seconds, gangs):
        g = min(max(1, g), workers)
        while True:
            load = [sum(1 for e in ends[a] if e > now) for a in range(workers)]
            if g == 1 and min(load) < inflight:
                a = min(range(workers), key=lambda i: (load[i], i))
                start = max([now] + ends[a][-1:])
                ends[a].append(start + s)
                break
            idle = [a for a in range(workers) if load[a] == 0]
            if g > 1 and len(idle) >= g:
                for a in idle[:g]:
                    ends[a].append(now + s)
                break
            now = min(e for a in range(workers) for e in ends[a] if e > now)
    return max((e[-1] for e in ends if e), default=0.0)


@dataclass(frozen=True)
class Observed:
    """One committed unit of a calibration run: its recorded seconds and evaluations (sums over
    its records) beside its predicted evaluations and the FLOPs of one evaluation of its network."""

    unit: Unit
    seconds: float
    forward: float
    backward: float
    cost: UnitCost
    flops: tuple[int, int] | None  # (forward, backward) of one network evaluation; None: not known


@dataclass(frozen=True)
class Calibration:
    """What a calibration run measured. rates: seconds per evaluation of each network (forward
    + backward x its weight); weights: a backward evaluation in forward ones (its FLOP ratio where
    known, else 1); fractions: range_key (and range_key without eps) -> where the recorded forward
    and backward evaluations landed in their ranges; startup: its wall seconds less its units'
    makespan; flops_per_second: the fallback for a network it did not run (None: none known)."""

    rates: dict[str, float]
    weights: dict[str, float]
    fractions: dict[tuple, tuple[float | None, float | None]]
    startup: float
    workers: int
    wall: float
    makespan: float
    flops_per_second: float | None
    what: str


def backward_weight(flops: tuple[int, int] | None) -> float:
    """A backward evaluation in forward ones: the network's FLOP ratio where known, else 1."""
    return flops[1] / flops[0] if flops and flops[0] > 0 else 1.0


def _ratio(num: float, den: float) -> float | None:
    return num / den if den > 0 else None


def fit_calibration(observed: list[Observed], workers: int, wall: float, what: str = "") -> Calibration:
    """The Calibration of a run whose units are `observed` (in plan order), which took `wall`
    seconds on `workers` actors."""
    if not observed:
        raise ConfigError("the calibration run has no committed units to calibrate on")
    rates, weights, flops_total, flops_seconds = {}, {}, 0.0, 0.0
    by_net: dict[str, list[Observed]] = {}
    for o in observed:
        by_net.setdefault(network_key(o.unit.defense_spec), []).append(o)
    for key, members in by_net.items():
        w = weights[key] = backward_weight(members[0].flops)
        evaluations = sum(o.forward + w * o.backward for o in members)
        seconds = sum(o.seconds for o in members)
        if evaluations > 0:
            rates[key] = seconds / evaluations
        if members[0].flops is not None:
            f, b = members[0].flops
            flops_total += sum(o.forward * f + o.backward * b for o in members)
            flops_seconds += seconds
    sums: dict[tuple, list[float]] = {}
    for o in observed:
        k = range_key(o.unit)
        for key in (k, k[:2]):
            acc = sums.setdefault(key, [0.0] * 6)
            for i, v in enumerate((o.forward, o.cost.forward.lo, o.cost.forward.hi,
                                   o.backward, o.cost.backward.lo, o.cost.backward.hi)):
                acc[i] += v
    fractions = {key: (landed(a[0], Span(a[1], a[2])), landed(a[3], Span(a[4], a[5]))) for key, a in sums.items()}
    span = makespan([o.seconds for o in observed], workers, inflight=INFLIGHT)
    return Calibration(rates, weights, fractions, max(0.0, wall - span), workers, wall, span,
                       _ratio(flops_total, flops_seconds), what)


def unit_point(unit: Unit, cost: UnitCost, calibration: Calibration) -> tuple[float, float, str]:
    """A unit's forward and backward evaluations as single numbers: where the calibration run's
    landed in the same (defense, attack, eps) ranges, else in the same (defense, attack), else
    the midpoint; and which of the three it used ("exact" where the range has no width)."""
    if cost.exact:
        return cost.forward.lo, cost.backward.lo, "exact"
    k = range_key(unit)
    for key, how in ((k, "calibrated"), (k[:2], "calibrated, other eps")):
        if key in calibration.fractions:
            f, b = calibration.fractions[key]
            return point(cost.forward, 0.5 if f is None else f), point(cost.backward, 0.5 if b is None else b), how
    return point(cost.forward, 0.5), point(cost.backward, 0.5), "midpoint"


def calibrated_unit_seconds(unit: Unit, cost: UnitCost, flops: tuple[int, int] | None,
                            calibration: Calibration) -> tuple[float | None, float, float, str]:
    """(seconds, forward, backward, how) of a unit predicted from a calibration: its point
    evaluations at the seconds per evaluation measured for its network, else (a network the
    calibration run did not have) its FLOPs at the calibration's FLOP/s; seconds None where neither
    is known."""
    forward, backward, how = unit_point(unit, cost, calibration)
    key = network_key(unit.defense_spec)
    if key in calibration.rates:
        w = calibration.weights.get(key, backward_weight(flops))
        return calibration.rates[key] * (forward + w * backward), forward, backward, how
    if flops is not None and calibration.flops_per_second:
        return (forward * flops[0] + backward * flops[1]) / calibration.flops_per_second, forward, backward, how + ", FLOP/s"
    return None, forward, backward, how + ", speed unknown"


def predicted_wall(unit_seconds: list[float], gangs: list[int], calibration: Calibration, workers: int) -> dict:
    """The wall seconds of a run: the calibration's start-up plus the makespan of its units'
    predicted seconds (plan order) on `workers` actors."""
    span = makespan(unit_seconds, workers, gangs, inflight=INFLIGHT)
    return {"startup": calibration.startup, "makespan": span, "wall": calibration.startup + span}


def read_run(uri: str, endpoint_url: str | None = None) -> tuple[str, list[Unit], dict[str, dict], int]:
    """(run id, planned units, {unit id: sums of its records' seconds, forward_passes,
    backward_passes and their count}, workers: the distinct actors that wrote them)."""
    store = Store(uri, endpoint_url=endpoint_url)
    if not store.exists("plan.json"):
        raise ConfigError(f"{uri}: no plan.json; expected a run folder written by `robustsweep run`")
    doc = store.read_json("plan.json")
    units = [Unit.from_dict(u) for u in doc["units"]]
    table = store.read_records("records", columns=["unit_id", "seconds", "forward_passes", "backward_passes", "worker"])
    sums: dict[str, dict] = {}
    workers = set()
    for unit_id, sec, fwd, bwd, worker in zip(*(table.column(c).to_pylist() for c in table.column_names)):
        s = sums.setdefault(unit_id, {"seconds": 0.0, "forward": 0.0, "backward": 0.0, "records": 0})
        s["seconds"] += sec
        s["forward"] += fwd
        s["backward"] += bwd
        s["records"] += 1
        workers.add(worker)
    return doc["run_id"], units, sums, max(1, len(workers))


def calibrate(uri: str, endpoint_url: str | None = None) -> dict:
    """A measured profile from a run's own records: the FLOPs its committed units spent (records'
    forward / backward evaluations x the defense network's FLOPs) over their worker-seconds.
    Transfer units, networks of unknown FLOPs and the authors' LM are left out.
    {"flops_per_second", "what"}: the `cpu` profile of `plan --device cpu`."""
    run_id, units, sums, _ = read_run(uri, endpoint_url)
    known: dict[str, tuple[int, int] | None] = {}
    flops = seconds = 0.0
    n = 0
    for u in units:
        s = sums.get(u.unit_id)
        if s is None or isinstance(u.attack_spec, TransferSpec):
            continue
        if u.defense not in known:
            known[u.defense] = network_flops(u.defense_spec).network
        per = known[u.defense]
        if per is None or getattr(getattr(u.defense_spec, "lm", None), "variant", None) == "authors":
            continue
        flops, seconds, n = flops + s["forward"] * per[0] + s["backward"] * per[1], seconds + s["seconds"], n + s["records"]
    if not n or seconds <= 0:
        raise ConfigError(f"{uri}: no committed records of a defense whose network FLOPs are known to calibrate on")
    return {"flops_per_second": flops / seconds, "what": f"this machine, calibrated on run {run_id} ({n} records)"}


def calibrate_on(uri: str, wall: float, endpoint_url: str | None = None, workers: int | None = None) -> Calibration:
    """The Calibration of the run at `uri`, which took `wall` seconds (on `workers` actors; default:
    as many as wrote its records)."""
    run_id, units, sums, found = read_run(uri, endpoint_url)
    workers = workers or found
    cache: dict = {}
    observed = []
    for u in units:
        s = sums.get(u.unit_id)
        if s is None or u.surrogate_spec is not None:
            continue  # not committed, or a transfer unit (two networks)
        cost, flops = unit_cost_of(u, cache, gang_size(u.grid_workers, u.defense_spec.kind, workers, len(units)))
        observed.append(Observed(u, s["seconds"], s["forward"], s["backward"], cost, flops))
    return fit_calibration(observed, workers, wall, f"run {run_id} ({len(observed)} units, {workers} workers)")


def unit_label(u: Unit) -> tuple[str, str]:
    """(defense, attack) as the prediction's rows name them: an attack's oblivious units apart from its adaptive ones."""
    path = u.attack_table.get("path")
    return u.defense, u.attack + (f" ({path})" if path else "")


def predict_units(units: list[Unit], calibration: Calibration, workers: int) -> dict:
    """The prediction of planned `units` on `workers` actors: per unit seconds and evaluations,
    per (defense, attack) sums, and the wall seconds; units whose speed is not known are listed
    and left out of the makespan."""
    cache: dict = {}
    per_unit, seconds, gangs, unknown, hows = {}, [], [], [], set()
    for u in units:
        gang = gang_size(u.grid_workers, u.defense_spec.kind, workers, len(units))
        cost, flops = unit_cost_of(u, cache, gang)
        sec, fwd, bwd, how = calibrated_unit_seconds(u, cost, flops, calibration)
        hows.add(how)
        per_unit[u.unit_id] = {"seconds": sec, "forward": fwd, "backward": bwd, "how": how,
                               "range_forward": cost.forward.as_list(), "range_backward": cost.backward.as_list()}
        if sec is None:
            unknown.append(u.unit_id)
        else:
            seconds.append(sec)
            gangs.append(gang)
    wall = predicted_wall(seconds, gangs, calibration, workers)
    return {"units": per_unit, "workers": workers, "unknown": unknown, "how": sorted(hows), **wall}


def format_calibrated(units: list[Unit], prediction: dict, calibration: Calibration) -> list[str]:
    """A prediction for a person: seconds per (defense, attack) summed over its units, then the
    wall time on the prediction's workers and where the speeds came from."""
    rows: dict[tuple[str, str], list] = {}
    for u in units:
        p = prediction["units"][u.unit_id]
        row = rows.setdefault(unit_label(u), [0, 0.0, set()])
        row[0] += 1
        row[1] = None if p["seconds"] is None or row[1] is None else row[1] + p["seconds"]
        row[2].add(p["how"])
    head = ("defense", "attack", "units", "seconds", "range point")
    table = [head] + [(d, a, str(n), "?" if sec is None else f"{sec:.1f}", "; ".join(sorted(how)))
                      for (d, a), (n, sec, how) in rows.items()]
    widths = [max(len(t[i]) for t in table) for i in range(len(head))]
    lines = ["  ".join(v.ljust(w) for v, w in zip(t, widths)).rstrip() for t in table]
    startup = f"start-up {prediction['startup']:.1f} s + " if calibration.wall else "start-up not known (no wall time given) + "
    lines.append(f"calibrated on {calibration.what}: {startup}makespan {prediction['makespan']:.1f} s = "
                 f"{prediction['wall']:.1f} s wall on {prediction['workers']} worker(s)")
    if prediction["unknown"]:
        lines.append(f"{len(prediction['unknown'])} units run networks of no known speed and are left out")
    return lines


__all__ = ["Calibration", "calibrate", "format_calibrated", "Observed", "backward_weight", "calibrate_on", "calibrated_unit_seconds", "fit_calibration",
           "landed", "makespan", "network_key", "point", "predict_units", "predicted_wall", "range_key", "read_run", "unit_label", "unit_point"]

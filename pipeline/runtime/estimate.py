"""What a job will cost before it runs: network evaluations, FLOPs and device-hours per
(defense, attack, eps), from its planned units, and the budget guard of `run`.

Each unit is costed by pipeline/protocol/cost.py on its defense's structure (no weights or
data read), its FLOPs by one network evaluation's count (pipeline/defenses/flops.py), its time
by a device profile: a peak FLOP/s and the fraction of it that a run reaches (`efficiency`),
or a speed measured from a run's own records (`calibrate`).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass

from pipeline.atomic import atomic_write
from pipeline.config.attack import TransferSpec
from pipeline.config.job import Job
from pipeline.defenses.build import defense_structure
from pipeline.defenses.flops import evaluation_flops, network_config
from pipeline.data import load_split
from pipeline.errors import BudgetError, ConfigError, DatasetError, RobustsweepError
from pipeline.models.unet import unet_config
from pipeline.models.zoo import cache_dir
from pipeline.protocol.build import build_attack
from pipeline.protocol.cost import ZERO, Span, Tally, UnitCost, unit_cost
from pipeline.runtime.plan import Unit, plan
from pipeline.runtime.scheduler import gang_size
from pipeline.store.verify import PREDICTED
from pipeline.training.classifier import default_classifier_config

PREDICTION_FORMAT = 1  # predicted.json's layout; a reader refuses one it does not know
EFFICIENCY = 0.3  # the fraction of a GPU's dense peak a run is assumed to reach unless told


@dataclass(frozen=True)
class DeviceProfile:
    """A device as the estimate sees it: `peak` FLOP/s, of which a run reaches `efficiency`."""

    name: str
    peak: float
    efficiency: float
    what: str

    @property
    def flops_per_second(self) -> float:
        return self.peak * self.efficiency


# Dense (no sparsity) tensor-core peaks from the vendor's data sheets, SXM parts.
PEAKS: dict[str, tuple[float, str]] = {
    "h100": (989e12, "NVIDIA H100 SXM, dense bf16"),
    "h100-tf32": (494.7e12, "NVIDIA H100 SXM, dense TF32"),
    "h200": (989e12, "NVIDIA H200 SXM, dense bf16 (the H100's compute, more memory)"),
    "h200-tf32": (494.7e12, "NVIDIA H200 SXM, dense TF32"),
    "a100": (312e12, "NVIDIA A100 SXM, dense bf16"),
    "a100-tf32": (156e12, "NVIDIA A100 SXM, dense TF32"),
}


def measured_profile() -> dict | None:
    """The CPU profile `robustsweep bench cost` saved on this machine (model cache, profiles.json), if any."""
    path = cache_dir() / "profiles.json"
    return json.loads(path.read_text()).get("cpu") if path.is_file() else None


def save_measured_profile(profile: dict) -> None:
    """Keep a measured CPU profile for `plan --device cpu` (model cache, profiles.json)."""
    data = json.dumps({"cpu": profile}, indent=1).encode()
    atomic_write(cache_dir() / "profiles.json", lambda f: f.write(data))


def device_profile(name: str, efficiency: float | None = None, measured: dict | None = None) -> DeviceProfile:
    """A named profile: one of PEAKS at `efficiency` (default EFFICIENCY), or "cpu", the speed
    `robustsweep bench cost` measured on this machine (`measured`: its saved profile), whose
    efficiency is already in it (1 unless told)."""
    if efficiency is not None and not (isinstance(efficiency, (int, float)) and 0 < efficiency <= 1):
        raise ConfigError(f"efficiency (--efficiency) must be in (0, 1], got {efficiency!r}")
    key = name.lower()
    if key == "cpu":
        measured = measured or measured_profile()
        if not measured:
            raise ConfigError("device 'cpu' has no measured speed yet: run `robustsweep bench cost` on this "
                              "machine first (it saves the profile in the model cache)")
        return DeviceProfile("cpu", float(measured["flops_per_second"]), efficiency or 1.0,
                             measured.get("what", "this CPU, measured"))
    if key not in PEAKS:
        raise ConfigError(f"device (--device) {name!r} is unknown; expected one of {', '.join(sorted(PEAKS))}, cpu")
    peak, what = PEAKS[key]
    return DeviceProfile(key, peak, EFFICIENCY if efficiency is None else float(efficiency), what)


# --- FLOPs ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Flops:
    """FLOPs of one evaluation of a defense's network, and of one of its LM's steps (the same
    network, or the authors' LM's own); None where not known."""

    network: tuple[int, int] | None  # (forward, backward)
    lm: tuple[int, int] | None

    def of(self, component: str) -> tuple[int, int] | None:
        return self.lm if component == "lm steps" else self.network


def network_flops(spec) -> Flops:
    """FLOPs of one evaluation of the networks of defense `spec`; an untrained default model is
    counted from its training recipe's config, which is what will be trained."""
    out = []
    for lm in (False, True):
        config = network_config(spec, lm)
        if config is None and (spec.model.kind == "default" and not (lm and getattr(getattr(spec, "lm", None), "variant", None) == "authors")):
            config = unet_config(spec.dataset) if spec.kind == "rdc" else default_classifier_config(spec.dataset)
        out.append(evaluation_flops(spec, config=config, lm=lm) if config is not None else None)
    return Flops(*out)


def _tally_flops(tally: Tally, flops: Flops) -> Span | None:
    total = ZERO
    for (_, component), (f, b) in tally.parts.items():
        per = flops.of(component)
        if per is None:
            return None
        total = total + f * per[0] + b * per[1]
    return total


def _unit_flops(cost: UnitCost, attacked: Flops, defense: Flops) -> Span | None:
    a, s = _tally_flops(cost.attack, attacked), _tally_flops(cost.scoring, defense)
    return None if a is None or s is None else a + s


# --- the estimate -----------------------------------------------------------------------------
@dataclass(frozen=True)
class Row:
    """One (defense, attack, eps): its units and their predicted totals; flops and hours None
    where a network's FLOPs are not known (RDC's optimal model is no network)."""

    defense: str
    attack: str
    eps: float
    units: int
    examples: int
    forward: Span
    backward: Span
    flops: Span | None
    hours: Span | None  # device-hours on the profile
    unit_hours: float | None  # the longest unit's upper estimate

    def as_dict(self) -> dict:
        return {"defense": self.defense, "attack": self.attack, "eps": self.eps, "units": self.units,
                "examples": self.examples, "forward": self.forward.as_list(), "backward": self.backward.as_list(),
                "pflop": None if self.flops is None else [v / 1e15 for v in self.flops.as_list()],
                "hours": None if self.hours is None else self.hours.as_list()}


@dataclass(frozen=True)
class Estimate:
    rows: tuple[Row, ...]
    profile: DeviceProfile
    workers: int

    @property
    def hours(self) -> Span:
        """Device-hours of the rows whose FLOPs are known."""
        return sum((r.hours for r in self.rows if r.hours is not None), ZERO)

    @property
    def unknown(self) -> list[Row]:
        return [r for r in self.rows if r.hours is None]

    @property
    def wall_hours(self) -> Span:
        """Hours on `workers` devices: the work shared evenly, but never below the longest unit."""
        longest = max((r.unit_hours or 0.0 for r in self.rows), default=0.0)
        h = self.hours
        return Span(max(h.lo / self.workers, min(longest, h.lo)), max(h.hi / self.workers, longest))

    def as_dict(self) -> dict:
        return {"device": self.profile.name, "what": self.profile.what, "peak_flops": self.profile.peak,
                "efficiency": self.profile.efficiency, "workers": self.workers,
                "rows": [r.as_dict() for r in self.rows], "hours": self.hours.as_list(),
                "wall_hours": self.wall_hours.as_list(), "unknown": [f"{r.defense} / {r.attack}" for r in self.unknown]}


def _shape(unit: Unit, gang: int) -> tuple:
    """What a unit's cost depends on: the tables, not the names (an attack's adaptive and oblivious
    units share its name), eps, its number of examples and its gang."""
    return (json.dumps([unit.defense_table, unit.attack_table], sort_keys=True, default=str), unit.eps,
            len(unit.example_ids), gang)


def _unit_cost(unit: Unit, cache: dict, gang: int = 1) -> tuple[UnitCost, Flops, Flops]:
    """The unit's predicted cost on `gang` actors, and the FLOPs of its attacked and its defense networks."""
    key = _shape(unit, gang)
    if key not in cache:
        defense = defense_structure(unit.defense_spec, unit.defense)
        surrogate = defense_structure(unit.surrogate_spec) if unit.surrogate_spec is not None else None
        attack = build_attack(unit.attack_spec, defense.num_classes, surrogate=surrogate, name=unit.attack)
        d_flops = network_flops(unit.defense_spec)
        a_flops = network_flops(unit.surrogate_spec) if isinstance(unit.attack_spec, TransferSpec) else d_flops
        cache[key] = (unit_cost(defense, attack, len(unit.example_ids), gang=gang), a_flops, d_flops)
    return cache[key]


def unit_cost_of(unit: Unit, cache: dict, gang: int = 1) -> tuple[UnitCost, tuple[int, int] | None]:
    """A unit's predicted cost on `gang` actors and the (forward, backward) FLOPs of one evaluation of
    its defense's network (None: not known); `cache` is shared across calls."""
    cost, _, d_flops = _unit_cost(unit, cache, gang)
    return cost, d_flops.network


def predicted_unit_seconds(unit: Unit, profile: DeviceProfile, _cache: dict | None = None) -> float | None:
    """The upper estimate of one unit's seconds on `profile` (None: its FLOPs are not known),
    e.g. for a per-unit deadline."""
    cost, a_flops, d_flops = _unit_cost(unit, {} if _cache is None else _cache)
    flops = _unit_flops(cost, a_flops, d_flops)
    return None if flops is None else flops.hi / profile.flops_per_second


def unit_evaluations(unit: Unit, _cache: dict | None = None, gang: int = 1) -> Span:
    """The network evaluations (forward + backward) the cost model predicts for one unit on `gang`
    actors: what its records' `forward_passes` + `backward_passes` will sum to (e.g. for a
    per-unit deadline)."""
    cost = _unit_cost(unit, {} if _cache is None else _cache, gang)[0]
    return cost.forward + cost.backward


def estimate_units(units: list[Unit], profile: DeviceProfile, workers: int = 1) -> Estimate:
    """The estimate of planned units, one row per (defense, attack, eps) in plan order, on a pool of
    `workers` actors (a unit's gang is sized on it as the run sizes it: scheduler.gang_size)."""
    if workers < 1:
        raise ConfigError(f"workers (--workers) must be >= 1, got {workers}")
    cache: dict = {}
    groups: dict[tuple, list[Unit]] = {}
    for u in units:
        groups.setdefault((u.defense, u.attack, u.eps), []).append(u)
    rows = []
    gangs = {u.unit_id: gang_size(u.grid_workers, u.defense_spec.kind, workers, len(units)) for u in units}
    for (d, a, eps), members in groups.items():
        fwd = bwd = ZERO
        flops: Span | None = ZERO
        longest = 0.0
        for u in members:
            cost, a_flops, d_flops = _unit_cost(u, cache, gangs[u.unit_id])
            fwd, bwd = fwd + cost.forward, bwd + cost.backward
            f = _unit_flops(cost, a_flops, d_flops)
            flops = None if f is None or flops is None else flops + f
            if f is not None:
                longest = max(longest, f.hi / profile.flops_per_second / 3600)
        hours = None if flops is None else flops * (1 / profile.flops_per_second / 3600)
        rows.append(Row(d, a, eps, len(members), sum(len(u.example_ids) for u in members), fwd, bwd, flops, hours,
                        longest if flops is not None else None))
    return Estimate(tuple(rows), profile, workers)


def split_size(job: Job) -> tuple[int, str | None]:
    """The number of examples of the job's split, counted here, and a note when it could not be:
    without the split (its data may live on the cluster only), the examples the job names
    (data.ids / data.limit) are enough to plan them. DatasetError when the job names none."""
    data = job.spec.data
    try:
        return load_split(data.dataset, data.split, root=data.root)[0].shape[0], None
    except DatasetError as exc:
        if data.ids is None and data.limit is None:
            raise DatasetError(f"{exc}; the estimate needs the split, or data.limit / data.ids to count the "
                               f"examples") from None
        n = max(data.ids) + 1 if data.ids is not None else data.limit
        return n, f"data: {data.dataset} {data.split} not found here; planned on the examples the job names ({n})"


def estimate_job(job: Job, n_examples: int, profile: DeviceProfile, workers: int = 1) -> Estimate:
    """The estimate of every unit `job` plans over a split of n_examples."""
    return estimate_units(plan(job, n_examples), profile, workers)


def progress(units: list[Unit], done: set[str], forward: float, backward: float, seconds: float) -> dict:
    """Spent / estimated / left of a run in network evaluations (forward + backward), and an ETA
    in worker-seconds at the speed its committed units ran: `forward`, `backward`, `seconds` are
    the sums over their records, `done` their unit ids."""
    cache: dict = {}
    total = left = ZERO
    for u in units:
        cost = _unit_cost(u, cache)[0]
        evaluations = cost.forward + cost.backward
        total = total + evaluations
        if u.unit_id not in done:
            left = left + evaluations
    spent = forward + backward
    rate = seconds / spent if spent else None
    return {"evaluations_spent": spent, "evaluations_estimated": total.as_list(), "evaluations_left": left.as_list(),
            "seconds_per_evaluation": rate,
            "eta_worker_seconds": None if rate is None else [round(v * rate, 1) for v in left.as_list()]}


# --- the prediction a run keeps beside its plan ---------------------------------------------------
def _number(v: float):
    """A count as JSON writes it best: an int where it is one (evaluations, FLOPs), else the float."""
    return int(v) if float(v).is_integer() else float(v)


def _pair(s: Span | None) -> list | None:
    return None if s is None else [_number(s.lo), _number(s.hi)]


def pricing_profile(options, use_gpu: bool, measured: dict | None = None) -> tuple[DeviceProfile | None, str]:
    """The profile a run's prediction prices seconds on, and why that one.

    On GPUs: the run's own `--device` / `--efficiency` (those its budget is counted on). On a
    CPU-only pool: the CPU profile `robustsweep bench cost` saved in the driver's model cache
    (`measured`, else read from there), where there is one; else (None, why): evaluations and
    FLOPs only, no seconds. A GPU profile that cannot be made (`--device cpu` without a measured
    speed) prices nothing either: the prediction never stops a run."""
    if use_gpu:
        try:
            profile = device_profile(options.device, options.efficiency, measured)
        except ConfigError as exc:
            return None, f"not priced: {exc}"
        return profile, f"the run's device profile (--device {profile.name}, efficiency {profile.efficiency:g})"
    measured = measured or measured_profile()
    if not measured:
        return None, ("not priced: a CPU-only pool and no measured CPU profile on the driver (`robustsweep bench "
                      "cost` saves one)")
    return (device_profile("cpu", None, measured),
            "the CPU profile measured by `robustsweep bench cost` on the driver's machine")


def prediction_document(units: list[Unit], run_id: str, job_hash: str, profile: DeviceProfile | None,
                        pricing: str, workers: int = 1) -> dict:
    """predicted.json: per planned unit (plan order) its predicted network evaluations in forward
    and backward as [lo, hi] (`parts`: an index into the document's `parts`, the evaluations by
    (phase, component), shared by the units of one shape), its FLOPs [lo, hi] (None where a
    network's FLOPs are not known) and its seconds on `profile` (None when unpriced), each unit on
    the gang the run gives it on a pool of `workers` actors. Nothing in it depends on the clock, so
    the same plan, profile and pool give the same bytes."""
    cache: dict = {}
    shapes: dict[tuple, int] = {}
    parts: list[list[dict]] = []
    rows = []
    for u in units:
        gang = gang_size(u.grid_workers, u.defense_spec.kind, workers, len(units))
        cost, a_flops, d_flops = _unit_cost(u, cache, gang)
        key = _shape(u, gang)
        if key not in shapes:
            shapes[key] = len(parts)
            parts.append([{**r, "forward": [_number(v) for v in r["forward"]],
                           "backward": [_number(v) for v in r["backward"]]}
                          for r in cost.attack.as_rows() + cost.scoring.as_rows()])
        flops = _unit_flops(cost, a_flops, d_flops)
        seconds = None if flops is None or profile is None else flops * (1 / profile.flops_per_second)
        rows.append({"unit_id": u.unit_id, "defense": u.defense, "attack": u.attack, "eps": u.eps,
                     "examples": len(u.example_ids), "forward": _pair(cost.forward), "backward": _pair(cost.backward),
                     "flops": _pair(flops), "seconds": _pair(seconds), "parts": shapes[key]})
    priced = None if profile is None else {"device": profile.name, "what": profile.what, "peak_flops": profile.peak,
                                           "efficiency": profile.efficiency,
                                           "flops_per_second": profile.flops_per_second}
    return {"format": PREDICTION_FORMAT, "run_id": run_id, "job_hash": job_hash, "profile": priced,
            "pricing": pricing, "units": rows, "parts": parts}


def write_prediction(store, run_id: str, job_hash: str, units: list[Unit], options, use_gpu: bool,
                     workers: int = 1) -> str | None:
    """Write `{run_id}/predicted.json` once (a resume leaves the one there), the units costed on a
    pool of `workers` actors; returns why none was written, None when it was (or is there). A
    unit the cost model cannot cost leaves the run folder without one: the run goes on, its
    report says the prediction is not available."""
    rel = f"{run_id}/{PREDICTED}"
    if store.exists(rel):
        return None
    try:
        profile, pricing = pricing_profile(options, use_gpu)
        doc = prediction_document(units, run_id, job_hash, profile, pricing, workers)
    except RobustsweepError as exc:
        return f"no {PREDICTED}: {exc}"
    store.write_json(rel, doc)
    return None


def _span(s: Span | None, fmt: str) -> str:
    if s is None:
        return "?"
    return format(s.lo, fmt) if s.exact else f"{format(s.lo, fmt)}-{format(s.hi, fmt)}"


def format_estimate(estimate: Estimate) -> str:
    """The estimate as a text table: one line per (defense, attack, eps), then the totals."""
    p = estimate.profile
    head = ("defense", "attack", "eps", "units", "forward", "backward", "PFLOP", "device-h")
    lines = [head] + [(r.defense, r.attack, f"{r.eps:.4g}", str(r.units), _span(r.forward, ".4g"),
                       _span(r.backward, ".4g"), _span(None if r.flops is None else r.flops * 1e-15, ".3g"),
                       _span(r.hours, ".3g")) for r in estimate.rows]
    widths = [max(len(line[i]) for line in lines) for i in range(len(head))]
    out = ["  ".join(c.ljust(w) for c, w in zip(line, widths)).rstrip() for line in lines]
    out.append(f"device {p.name} ({p.what}): {p.peak / 1e12:.4g} TFLOP/s at efficiency {p.efficiency:g}; "
               f"total {_span(estimate.hours, '.3g')} device-hours, "
               f"{_span(estimate.wall_hours, '.3g')} h wall on {estimate.workers} worker(s)")
    if estimate.unknown:
        out.append("? : FLOPs not known before the model exists (RDC's optimal model is no network; an EDM pickle "
                   "carries its own config): not in the totals")
    return "\n".join(out)


def guard(job: Job, units: list[Unit], options) -> Estimate | None:
    """The budget guard of `run`, before any work: BudgetError when the estimate of `units` on
    options.device is above options.max_gpu_hours, else the job file's max_gpu_hours; None
    when neither sets a budget."""
    budget = options.max_gpu_hours if options.max_gpu_hours is not None else job.spec.max_gpu_hours
    if budget is None:
        return None
    estimate = estimate_units(units, device_profile(options.device, options.efficiency), options.workers or 1)
    check_budget(estimate, budget)
    return estimate


def check_budget(estimate: Estimate, max_hours: float) -> None:
    """BudgetError (exit 2) when the upper estimate of device-hours is above max_hours."""
    if not (isinstance(max_hours, (int, float)) and max_hours > 0 and math.isfinite(max_hours)):
        raise ConfigError(f"max_gpu_hours (--max-gpu-hours) must be a positive number, got {max_hours!r}")
    hours = estimate.hours.hi
    if hours > max_hours:
        raise BudgetError(f"the job's estimate is up to {hours:.3g} device-hours on {estimate.profile.name}, above "
                          f"its budget max_gpu_hours = {max_hours:g}; nothing was started. Lower the attacks' "
                          f"budgets or the examples, or raise the budget (job file max_gpu_hours, run "
                          f"--max-gpu-hours):\n{format_estimate(estimate)}")


__all__ = ["unit_cost_of", "DeviceProfile", "Estimate", "PEAKS", "Row", "check_budget", "device_profile", "format_estimate", "estimate_job",
           "estimate_units", "guard", "progress", "measured_profile", "network_flops", "save_measured_profile", "predicted_unit_seconds",
           "prediction_document", "pricing_profile", "split_size", "write_prediction", "unit_evaluations"]

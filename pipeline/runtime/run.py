"""Run a job: plan it, hand its units to a pool of Ray worker actors, commit, resume.

The queue is runtime/scheduler.py: at most `INFLIGHT` units per actor; a unit whose actor or
node is lost goes back in the queue and the actor is replaced; a unit that raises is retried;
after `TRIES` attempts a unit is recorded in `failures/` with its error and traceback and the
job goes on. Committed units (footer present, row count right) are skipped, so a rerun
resumes for free. This module is the Ray side: `RayActors` is the scheduler's `Actors`.
"""

from __future__ import annotations

import os
import sys
import time
import traceback
from dataclasses import dataclass, field

import ray
from ray.exceptions import ActorDiedError, ActorUnavailableError, NodeDiedError, RayActorError, RayTaskError, WorkerCrashedError

from pipeline.data import load_split
from pipeline.errors import ClusterError, ConfigError
from pipeline.store import Store
from pipeline.store.binding import PLAN, check_binding
from pipeline.store.lease import RunLease
from pipeline.store.unit import check_units
from pipeline.models.zoo import model_card
from pipeline.runtime import faults
from pipeline.training.defaults import prepare_defaults, role_of
from pipeline.runtime.plan import Unit, plan, plan_document, run_id_for
from pipeline.runtime.estimate import guard
from pipeline.runtime.preflight import preflight_run
from pipeline.runtime.reach import check_reachable
from pipeline.runtime.scheduler import Failed, Outcome, Scheduler, gang_size
from pipeline.config.job import Job
from pipeline.config.run import RunOptions
from pipeline.runtime.worker import UnitResult, Worker, WorkerContext

LOST = (RayActorError, ActorDiedError, ActorUnavailableError, NodeDiedError, WorkerCrashedError)


@dataclass
class RunResult:
    run_id: str
    uri: str
    units: int
    skipped: int
    done: int
    failed: list[str] = field(default_factory=list)
    rows: int = 0
    seconds: float = 0.0
    workers: int = 0
    redone: dict = field(default_factory=dict)  # unit id -> why its committed file was redone
    lost: int = 0  # actors lost on the way (their units or gang calls were redone elsewhere)

    @property
    def ok(self) -> bool:
        return not self.failed


def connect(address: str | None) -> bool:
    """Join or start a Ray cluster; True if this call started it (so we shut it down after)."""
    if ray.is_initialized():
        return False
    if address is None:
        ray.init(include_dashboard=False, logging_level="ERROR", log_to_driver=False)
        return True
    ray.init(address=address, logging_level="ERROR", log_to_driver=False)
    return False


def default_workers(gpus_per_worker: float = 1.0) -> tuple[int, bool]:
    """(workers, use_gpu): one per GPU of the cluster (1 / gpus_per_worker per GPU), else one per CPU."""
    res = ray.cluster_resources()
    gpus = float(res.get("GPU", 0))
    if gpus >= gpus_per_worker > 0:
        return int(gpus // gpus_per_worker + 1e-9), True
    return max(1, int(res.get("CPU", 1))), False


def wait_for_gpus(min_gpus: int, wait_s: float) -> None:
    """Block until the cluster declares `min_gpus` GPUs; ClusterError after `wait_s` seconds."""
    deadline = time.monotonic() + wait_s
    while float(ray.cluster_resources().get("GPU", 0)) < min_gpus:
        if time.monotonic() > deadline:
            have = float(ray.cluster_resources().get("GPU", 0))
            raise ClusterError(f"the cluster has {have:g} GPUs after {wait_s:.0f} s; --min-gpus asked for {min_gpus}")
        time.sleep(1.0)


def prepare_models(job: Job, progress: bool = True) -> None:
    """Train the default models the job needs (its defenses' and its transfer surrogates'), once,
    before any worker asks for them: workers never train (pipeline.models.zoo)."""
    specs = [d.spec for d in job.defenses] + [s for a in job.attacks for s in a.surrogates.values()]
    prepare_defaults(specs, progress=progress)


def model_cards(job: Job) -> dict[str, dict]:
    """{defense name: model card (models/zoo.py)}: what plan.json says each defense's model is."""
    return {d.name: {**model_card(d.spec.model, d.spec.dataset, role_of(d.spec)),
                     **({"method": d.spec.method} if d.spec.kind != "rdc" else {})} for d in job.defenses}


def run_job(job: Job, options: RunOptions = RunOptions(), *, progress: bool = True, wait_s: float = 600.0,
            lease_wait: float = 0.0) -> RunResult:
    """Run (or resume) `job`, writing under `{options.out}/{run_id}/`. See the module docstring.

    Everything a run could trip over is checked first (runtime/preflight.py). The run folder is
    bound to the job (another job under the same run id: RunMismatchError) and leased to this
    driver while it runs (another driver on it: LeaseHeldError, after waiting up to
    `lease_wait` seconds); a unit whose file fails its checks is redone.

    options.min_gpus: wait up to `wait_s` seconds for the cluster to hold that many GPUs before
    sizing the pool (GPU nodes of a fresh cluster join after the head; without it the pool is sized
    by what is there at the start, CPUs if no GPU has joined yet).
    """
    preflight_run(job, options.out, workers=options.workers, run_id=options.run_id)
    start = time.perf_counter()
    run_id = run_id_for(job, options.fresh, options.run_id)
    store = Store(options.out, endpoint_url=options.endpoint_url)
    data = job.spec.data
    x, _ = load_split(data.dataset, data.split, root=data.root)
    units = plan(job, x.shape[0])
    if not units:
        raise ConfigError("the job selects no examples (data.ids / data.limit): nothing to run")
    guard(job, units, options)  # a job above its budget stops here, before the lease and any training
    if options.address is not None:
        # Before the lease, the checks and any model training; also when this process already
        # holds a Ray connection, so that a wrong address is never silently replaced by it.
        check_reachable(options.address)
    with RunLease(store, run_id, wait=lease_wait) as lease:
        return _run_leased(job, options, store, units, run_id, start, lease, progress=progress, wait_s=wait_s)


def _run_leased(job: Job, options: RunOptions, store: Store, units: list[Unit], run_id: str, start: float,
                lease: RunLease, *, progress: bool, wait_s: float) -> RunResult:
    """run_job once this driver holds the run folder's lease: bind, check, dispatch."""
    data = job.spec.data
    stored = check_binding(store, run_id, job.hash, job.spec.model_dump(mode="json"))
    found = check_units(store, run_id, units)
    todo = [u for u in units if found[u.unit_id] is not None]
    result = RunResult(run_id, store.join(run_id), len(units), len(units) - len(todo), 0)
    result.redone = {u: r for u, r in found.items() if r not in (None, "missing")}
    for unit_id, reason in result.redone.items() if progress else ():
        print(f"unit {unit_id}: its records file fails its checks ({reason}); redoing it", file=sys.stderr)
    if todo:
        prepare_models(job, progress)  # first, so that plan.json can say what each model is
    if stored is None:
        store.write_json(f"{run_id}/{PLAN}", plan_document(job, units, run_id, models=model_cards(job)))
    if not todo:
        result.seconds = time.perf_counter() - start
        return result
    started = connect(options.address)
    try:
        wait_for_gpus(options.min_gpus, wait_s)
        n, use_gpu = default_workers(options.gpus_per_worker)
        n = options.workers or n
        result.workers = n
        ctx = WorkerContext(run_id, job.hash, options.out, job.spec.seed, data, endpoint_url=options.endpoint_url)
        _drain(todo, ctx, store, result, n, use_gpu, options.gpus_per_worker, progress, lease)
    finally:
        if started:
            ray.shutdown()
    result.seconds = time.perf_counter() - start
    return result


class RayActors:
    """The scheduler's `Actors` (runtime/scheduler.py) as Ray worker actors (runtime/worker.py)."""

    def __init__(self, ctx: WorkerContext, use_gpu: bool, gpus_per_worker: float):
        self.ctx, self.use_gpu, self.gpus_per_worker = ctx, use_gpu, gpus_per_worker
        self.resource = "GPU" if use_gpu else "CPU"

    def start(self, slot: int):
        options = {"num_cpus": 1, "max_restarts": 0}
        if os.environ.get(faults.ENV):  # tests of the queue: the faults travel to the workers
            options["runtime_env"] = {"env_vars": {faults.ENV: os.environ[faults.ENV]}}
        cls = ray.remote(Worker)
        if self.use_gpu:
            # The GPU does the work; the CPU share only keeps Ray from packing more actors than cores.
            options["num_cpus"] = min(1.0, self.gpus_per_worker)
            return cls.options(num_gpus=self.gpus_per_worker, **options).remote(f"worker-{slot}", "cuda", 1)
        return cls.options(**options).remote(f"worker-{slot}", "cpu", 1)

    def ping(self, handle):
        return handle.ping.remote()

    def submit(self, handle, unit: Unit, peers: list):
        return handle.run_unit.remote(unit, self.ctx, peers or None)

    def wait(self, futures: list, num_returns: int, timeout: float) -> list:
        done, _ = ray.wait(futures, num_returns=num_returns, timeout=timeout)
        return done

    def outcome(self, future) -> Outcome:
        try:
            value = ray.get(future)
        except LOST:
            return Outcome(error="worker lost", trace=traceback.format_exc(), lost=True)
        except RayTaskError as exc:
            return Outcome(error=str(exc.cause if exc.cause else exc), trace=traceback.format_exc())
        return Outcome(value=value, lost_peers=value.lost_peers if isinstance(value, UnitResult) else ())

    def kill(self, handle) -> None:
        ray.kill(handle)


def _drain(todo: list[Unit], ctx: WorkerContext, store: Store, result: RunResult, n: int, use_gpu: bool,
           gpus_per_worker: float, progress: bool, lease: RunLease) -> None:
    """Hand the units to the pool until every one is committed or failed (module docstring), or
    until another driver takes the run folder's lease over (LeaseLostError; the pool is stopped)."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    gangs = {u.unit_id: gang_size(u.grid_workers, u.defense_spec.kind, n, len(todo)) for u in todo}
    # Failure notes of earlier runs, listed once: a unit that now succeeds drops its stale note.
    stale = set(store.list(f"{result.run_id}/failures", ".json"))
    examples, t0 = 0, time.perf_counter()
    bar = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[rate]}"),
                   TimeElapsedColumn(), TimeRemainingColumn(), console=Console(stderr=True), disable=not progress)
    scheduler = Scheduler(todo, RayActors(ctx, use_gpu, gpus_per_worker), n, gangs=gangs)
    try:
        with bar:
            task = bar.add_task(f"{result.run_id}", total=len(todo), rate="")
            while scheduler.pending:
                lease.check()
                for event in scheduler.step():
                    unit = event.unit
                    failure = f"{result.run_id}/failures/unit-{unit.unit_id}.json"
                    if isinstance(event, Failed):
                        result.failed.append(unit.unit_id)
                        store.write_json(failure, {"unit": unit.as_dict(), "tries": event.tries, "error": event.error,
                                                   "traceback": event.trace})
                        continue
                    result.done += 1
                    result.rows += event.value.rows
                    examples += len(unit.example_ids)
                    if failure in stale:
                        store.remove(failure)
                    rate = examples / max(time.perf_counter() - t0, 1e-9)
                    bar.update(task, advance=1, rate=f"{rate:.2f} ex/s")
    finally:
        scheduler.shutdown()
        result.lost = scheduler.lost

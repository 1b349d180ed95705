"""Run a job: plan it, hand its units to a pool of Ray worker actors, commit, resume.

The queue is runtime/scheduler.py: at most `INFLIGHT` units per actor; a unit whose actor or
node is lost goes back in the queue and the actor is replaced; a unit that raises is retried;
after `TRIES` attempts a unit is recorded in `failures/` with its error and traceback and the
job goes on. Committed units (footer present, row count right) are skipped, so a rerun
resumes for free. This module is the Ray side: `RayActors` is the scheduler's `Actors`.
"""

from __future__ import annotations

import os
import time
import traceback
from dataclasses import dataclass, field

import ray
from ray.exceptions import ActorDiedError, ActorUnavailableError, NodeDiedError, RayActorError, RayTaskError, WorkerCrashedError

from pipeline.data import load_split
from pipeline.errors import ClusterError
from pipeline.store import Store
from pipeline.models.zoo import default_checkpoint, model_card
from pipeline.runtime import faults
from pipeline.runtime.plan import Unit, plan, plan_document, run_id_for
from pipeline.runtime.scheduler import Failed, Outcome, Scheduler, gang_size
from pipeline.config.job import Job
from pipeline.config.run import RunOptions
from pipeline.runtime.worker import Worker

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


def _role(spec) -> str:
    """Which default model a defense stands on: the diffusion model, or a classifier's training method."""
    return "diffusion" if spec.kind == "rdc" else spec.method


def prepare_models(job: Job, progress: bool = True) -> None:
    """Train the default models the job needs, once, before any worker asks for them."""
    specs = [d.spec for d in job.defenses] + [s for a in job.attacks for s in a.surrogates.values()]
    for spec in specs:
        if spec.model == "default":
            default_checkpoint(spec.dataset, _role(spec), progress=progress)


def model_cards(job: Job) -> dict[str, dict]:
    """{defense name: model card (models/zoo.py)}: what plan.json says each defense's model is."""
    return {d.name: {**model_card(d.spec.model, d.spec.dataset, _role(d.spec)),
                     **({"method": d.spec.method} if d.spec.kind != "rdc" else {})} for d in job.defenses}


def run_job(job: Job, options: RunOptions = RunOptions(), *, progress: bool = True, wait_s: float = 600.0) -> RunResult:
    """Run (or resume) `job`, writing under `{options.out}/{run_id}/`. See the module docstring.

    options.min_gpus: wait up to `wait_s` seconds for the cluster to hold that many GPUs before
    sizing the pool (GPU nodes of a fresh cluster join after the head; without it the pool is sized
    by what is there at the start, CPUs if no GPU has joined yet).
    """
    start = time.perf_counter()
    run_id = options.run_id or run_id_for(job, options.fresh)
    store = Store(options.out, endpoint_url=options.endpoint_url)
    data = job.spec.data
    x, _ = load_split(data.dataset, data.split, root=data.root)
    units = plan(job, x.shape[0])
    plan_path = f"{run_id}/plan.json"
    todo = [u for u in units if not store.committed(f"{run_id}/{u.path}", len(u.example_ids))]
    result = RunResult(run_id, store.join(run_id), len(units), len(units) - len(todo), 0)
    if todo:
        prepare_models(job, progress)  # first, so that plan.json can say what each model is
    if not store.exists(plan_path):
        store.write_json(plan_path, plan_document(job, units, run_id, models=model_cards(job)))
    if not todo:
        result.seconds = time.perf_counter() - start
        return result
    started = connect(options.address)
    try:
        wait_for_gpus(options.min_gpus, wait_s)
        n, use_gpu = default_workers(options.gpus_per_worker)
        n = options.workers or n
        result.workers = n
        ctx = {"run_id": run_id, "out": options.out, "endpoint_url": options.endpoint_url, "seed": job.spec.seed,
               "data": {"dataset": data.dataset, "split": data.split, "root": data.root}}
        _drain(todo, ctx, store, result, n, use_gpu, options.gpus_per_worker, progress)
    finally:
        if started:
            ray.shutdown()
    result.seconds = time.perf_counter() - start
    return result


class RayActors:
    """The scheduler's `Actors` (runtime/scheduler.py) as Ray worker actors (runtime/worker.py)."""

    def __init__(self, ctx: dict, use_gpu: bool, gpus_per_worker: float):
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
        lost_peers = tuple(value.get("lost_peers", ())) if isinstance(value, dict) else ()
        return Outcome(value=value, lost_peers=lost_peers)

    def kill(self, handle) -> None:
        ray.kill(handle)


def _drain(todo: list[Unit], ctx: dict, store: Store, result: RunResult, n: int, use_gpu: bool,
           gpus_per_worker: float, progress: bool) -> None:
    """Hand the units to the pool until every one is committed or failed (module docstring)."""
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
                for event in scheduler.step():
                    unit = event.unit
                    failure = f"{result.run_id}/failures/unit-{unit.unit_id}.json"
                    if isinstance(event, Failed):
                        result.failed.append(unit.unit_id)
                        store.write_json(failure, {"unit": unit.as_dict(), "tries": event.tries, "error": event.error,
                                                   "traceback": event.trace})
                        continue
                    result.done += 1
                    result.rows += event.value["rows"]
                    examples += len(unit.example_ids)
                    if failure in stale:
                        store.remove(failure)
                    rate = examples / max(time.perf_counter() - t0, 1e-9)
                    bar.update(task, advance=1, rate=f"{rate:.2f} ex/s")
    finally:
        scheduler.shutdown()
        result.lost = scheduler.lost

"""Run a job: plan it, hand its units to a pool of Ray worker actors, commit, resume.

The queue keeps at most `INFLIGHT` units per actor. A unit whose actor or node is lost goes
back in the queue and the actor is replaced; a unit that raises is retried; after `TRIES`
attempts a unit is recorded in `failures/` with its error and traceback and the job goes on.
Committed units (footer present, row count right) are skipped, so a rerun resumes for free.
"""

from __future__ import annotations

import collections
import time
import traceback
from dataclasses import dataclass, field

import ray
from ray.exceptions import ActorDiedError, ActorUnavailableError, NodeDiedError, RayActorError, RayTaskError, WorkerCrashedError

from ..data import load_split
from ..errors import RobustsweepError
from ..store import Store
from ..zoo import default_checkpoint
from .plan import Unit, plan, plan_document, run_id_for
from .spec import Job
from .worker import Worker

INFLIGHT = 2
TRIES = 3
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


def default_workers() -> tuple[int, bool]:
    """(workers, use_gpu): one per GPU of the cluster, else one per CPU."""
    res = ray.cluster_resources()
    gpus = int(res.get("GPU", 0))
    return (gpus, True) if gpus >= 1 else (max(1, int(res.get("CPU", 1))), False)


def prepare_models(job: Job, progress: bool = True) -> None:
    """Train the default models the job needs, once, before any worker asks for them."""
    for d in job.defenses:
        t = d.table
        if t.get("model", "default") != "default":
            continue
        role = "diffusion" if t["kind"] == "rdc" else t.get("method", "mixup" if t["kind"] == "mi" else "erm")
        default_checkpoint(t["dataset"], role, progress=progress)


def run_job(job: Job, out: str, *, workers: int | None = None, address: str | None = None, run_id: str | None = None,
            fresh: bool = False, endpoint_url: str | None = None, progress: bool = True,
            gpus_per_worker: float = 1.0) -> RunResult:
    """Run (or resume) `job`, writing under `{out}/{run_id}/`. See the module docstring."""
    start = time.perf_counter()
    run_id = run_id or run_id_for(job, fresh)
    store = Store(out, endpoint_url=endpoint_url)
    data = job.spec.data
    x, _ = load_split(data.dataset, data.split, root=data.root)
    units = plan(job, x.shape[0])
    plan_path = f"{run_id}/plan.json"
    if not store.exists(plan_path):
        store.write_json(plan_path, plan_document(job, units, run_id))
    todo = [u for u in units if not store.committed(f"{run_id}/{u.path}", len(u.example_ids))]
    result = RunResult(run_id, store.join(run_id), len(units), len(units) - len(todo), 0)
    if not todo:
        result.seconds = time.perf_counter() - start
        return result
    prepare_models(job, progress)
    started = connect(address)
    try:
        n, use_gpu = default_workers()
        n = workers or n
        result.workers = n
        ctx = {"run_id": run_id, "out": out, "endpoint_url": endpoint_url, "seed": job.spec.seed,
               "data": {"dataset": data.dataset, "split": data.split, "root": data.root}}
        _drain(todo, ctx, store, result, n, use_gpu, gpus_per_worker, progress)
    finally:
        if started:
            ray.shutdown()
    result.seconds = time.perf_counter() - start
    return result


def _actor(index: int, use_gpu: bool, gpus_per_worker: float):
    import os

    from .faults import ENV

    options = {"num_cpus": 1, "max_restarts": 0}
    if os.environ.get(ENV):  # tests of the queue: the faults travel to the workers
        options["runtime_env"] = {"env_vars": {ENV: os.environ[ENV]}}
    cls = ray.remote(Worker)
    if use_gpu:
        return cls.options(num_gpus=gpus_per_worker, **options).remote(f"worker-{index}", "cuda", 1)
    return cls.options(**options).remote(f"worker-{index}", "cpu", 1)


def _drain(todo: list[Unit], ctx: dict, store: Store, result: RunResult, n: int, use_gpu: bool,
           gpus_per_worker: float, progress: bool) -> None:
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    queue = collections.deque(todo)
    # Failure notes of earlier runs, listed once: a unit that now succeeds drops its stale note.
    stale = set(store.list(f"{result.run_id}/failures", ".json"))
    tries: collections.Counter = collections.Counter()
    actors = {i: _actor(i, use_gpu, gpus_per_worker) for i in range(n)}
    inflight: dict = {}  # ObjectRef -> (unit, actor index, actor handle)
    examples, t0 = 0, time.perf_counter()
    bar = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[rate]}"),
                   TimeElapsedColumn(), TimeRemainingColumn(), console=Console(stderr=True), disable=not progress)
    with bar:
        task = bar.add_task(f"{result.run_id}", total=len(todo), rate="")
        while queue or inflight:
            for i, handle in list(actors.items()):
                while queue and sum(1 for (_, j, _) in inflight.values() if j == i) < INFLIGHT:
                    unit = queue.popleft()
                    inflight[handle.run_unit.remote(unit.as_dict(), ctx)] = (unit, i, handle)
            ready, _ = ray.wait(list(inflight), num_returns=1, timeout=1.0)
            for ref in ready:
                unit, i, handle = inflight.pop(ref)
                try:
                    summary = ray.get(ref)
                except LOST:
                    if actors.get(i) is handle:  # replace a lost actor once, not per unit
                        actors[i] = _actor(i, use_gpu, gpus_per_worker)
                    _retry(unit, tries, queue, store, result, "worker lost", traceback.format_exc())
                    continue
                except RayTaskError as exc:
                    _retry(unit, tries, queue, store, result, str(exc.cause if exc.cause else exc), traceback.format_exc())
                    continue
                result.done += 1
                result.rows += summary["rows"]
                examples += len(unit.example_ids)
                failure = f"{result.run_id}/failures/unit-{unit.unit_id}.json"
                if failure in stale:
                    store.remove(failure)
                rate = examples / max(time.perf_counter() - t0, 1e-9)
                bar.update(task, advance=1, rate=f"{rate:.2f} ex/s")
    for handle in actors.values():
        ray.kill(handle)


def _retry(unit: Unit, tries, queue, store: Store, result: RunResult, error: str, trace: str) -> None:
    tries[unit.unit_id] += 1
    if tries[unit.unit_id] < TRIES:
        queue.appendleft(unit)
        return
    result.failed.append(unit.unit_id)
    store.write_json(f"{result.run_id}/failures/unit-{unit.unit_id}.json",
                     {"unit": unit.as_dict(), "tries": tries[unit.unit_id], "error": error, "traceback": trace})

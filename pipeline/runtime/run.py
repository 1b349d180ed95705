"""Run a job: plan it, hand its units to a pool of Ray worker actors, commit, resume.

The queue keeps at most `INFLIGHT` units per actor. A unit whose actor or node is lost goes
back in the queue and the actor is replaced; a unit that raises is retried; after `TRIES`
attempts a unit is recorded in `failures/` with its error and traceback and the job goes on.
Committed units (footer present, row count right) are skipped, so a rerun resumes for free.
"""

from __future__ import annotations

import collections
import sys
import time
import traceback
from dataclasses import dataclass, field

import ray
from ray.exceptions import ActorDiedError, ActorUnavailableError, NodeDiedError, RayActorError, RayTaskError, WorkerCrashedError

from pipeline.data import load_split
from pipeline.errors import ClusterError, ConfigError, RobustsweepError
from pipeline.store import Store
from pipeline.store.binding import PLAN, check_binding
from pipeline.store.lease import RunLease
from pipeline.store.unit import check_units
from pipeline.models.zoo import default_checkpoint, model_card
from pipeline.runtime.plan import Unit, plan, plan_document, run_id_for
from pipeline.runtime.preflight import preflight_run
from pipeline.runtime.reach import check_reachable
from pipeline.config.job import Job
from pipeline.config.run import RunOptions
from pipeline.runtime.worker import Worker

INFLIGHT = 2
TRIES = 3
START_GRACE = 60.0  # seconds a gang waits for an actor that is still starting
STARTUP_TIMEOUT = 600.0  # seconds with no actor started and nothing running before the run gives up
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


def gang_size(grid_workers: int | str, kind: str, workers: int, units: int) -> int:
    """The gang a unit runs on (DESIGN.md, "The grid"; README, "Grid sharding").

    An integer asks for that many actors (at most the pool). "auto": data parallelism while
    units fill the pool, gangs only where workers would idle otherwise: gangs of
    floor(workers / units) when there are fewer units than workers (few examples, or a few
    one-example units whose exact gradients are the bottleneck). A gang costs a round trip
    per call and a recompute in backward, so it never replaces data parallelism that fills
    the pool. A plain classifier has one cell and always runs alone.
    """
    if kind == "plain":
        return 1
    if grid_workers == "auto":
        return max(1, min(workers, workers // max(units, 1)))
    return max(1, min(int(grid_workers), workers))


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
    if options.address is not None and not ray.is_initialized():
        check_reachable(options.address)  # before the lease, the checks and any model training
    with RunLease(store, run_id, wait=lease_wait):
        return _run_leased(job, options, store, units, run_id, start, progress=progress, wait_s=wait_s)


def _run_leased(job: Job, options: RunOptions, store: Store, units: list[Unit], run_id: str, start: float, *,
                progress: bool, wait_s: float) -> RunResult:
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
        ctx = {"run_id": run_id, "job_hash": job.hash, "out": options.out, "endpoint_url": options.endpoint_url, "seed": job.spec.seed,
               "data": {"dataset": data.dataset, "split": data.split, "root": data.root}}
        _drain(todo, ctx, store, result, n, use_gpu, options.gpus_per_worker, progress)
    finally:
        if started:
            ray.shutdown()
    result.seconds = time.perf_counter() - start
    return result


def _actor(index: int, use_gpu: bool, gpus_per_worker: float):
    import os

    from pipeline.runtime.faults import ENV

    options = {"num_cpus": 1, "max_restarts": 0}
    if os.environ.get(ENV):  # tests of the queue: the faults travel to the workers
        options["runtime_env"] = {"env_vars": {ENV: os.environ[ENV]}}
    cls = ray.remote(Worker)
    if use_gpu:
        # The GPU does the work; the CPU share only keeps Ray from packing more actors than cores.
        options["num_cpus"] = min(1.0, gpus_per_worker)
        return cls.options(num_gpus=gpus_per_worker, **options).remote(f"worker-{index}", "cuda", 1)
    return cls.options(**options).remote(f"worker-{index}", "cpu", 1)


class Pool:
    """The worker actors: started (answering a ping) or starting; a lost one is replaced.

    Work goes only to started actors, so an actor that cannot be placed (its node is gone and
    no other has room) holds nothing up while the others finish.
    """

    MAX_REPLACEMENTS = 3

    def __init__(self, n: int, use_gpu: bool, gpus_per_worker: float):
        self.use_gpu, self.gpus_per_worker = use_gpu, gpus_per_worker
        self.handles: dict[int, object] = {}
        self.starting: dict = {}  # ping ref -> index
        self.ready: set[int] = set()
        self.replaced: collections.Counter = collections.Counter()
        self.since: dict[int, float] = {}
        for i in range(n):
            self._start(i)

    def _start(self, i: int) -> None:
        self.handles[i] = _actor(i, self.use_gpu, self.gpus_per_worker)
        self.starting[self.handles[i].ping.remote()] = i
        self.since[i] = time.perf_counter()

    def expected(self) -> int:
        """Actors started, plus those starting for less than START_GRACE seconds (a gang waits for them)."""
        now = time.perf_counter()
        return len(self.ready) + sum(1 for i in self.starting.values() if now - self.since[i] < START_GRACE)

    def poll(self) -> None:
        """Move the actors whose ping came back to `ready`; replace those that died starting."""
        if not self.starting:
            return
        done, _ = ray.wait(list(self.starting), num_returns=len(self.starting), timeout=0)
        for ref in done:
            i = self.starting.pop(ref)
            try:
                ray.get(ref)
                self.ready.add(i)
            except LOST:
                self.replace(i)

    def replace(self, i: int) -> None:
        """Kill (if alive) and restart actor i, up to MAX_REPLACEMENTS times per slot."""
        self.ready.discard(i)
        old = self.handles.pop(i, None)
        if old is not None:
            ray.kill(old)
        self.replaced[i] += 1
        if self.replaced[i] <= self.MAX_REPLACEMENTS:
            self._start(i)

    def recheck(self, i: int) -> None:
        """Ping actor i again before giving it more work (a gang peer after a failed unit)."""
        if i in self.ready:
            self.ready.discard(i)
            self.starting[self.handles[i].ping.remote()] = i
            self.since[i] = time.perf_counter()

    def refs(self) -> list:
        return list(self.starting)

    def shutdown(self) -> None:
        for handle in self.handles.values():
            ray.kill(handle)


def _drain(todo: list[Unit], ctx: dict, store: Store, result: RunResult, n: int, use_gpu: bool,
           gpus_per_worker: float, progress: bool) -> None:
    """Hand the units to the pool until every one is committed or failed (module docstring).

    Gangs: a unit with a gang of G waits at the head of the queue until G actors are idle,
    takes them all at once (the driver is one thread, so two gangs never hold parts of each
    other) and gives them back when it ends; while it waits, nothing new goes to idle actors,
    so it cannot starve.
    """
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    queue = collections.deque(todo)
    sizes = {u.unit_id: gang_size(u.grid_workers, u.defense_spec.kind, n, len(todo)) for u in todo}
    # Failure notes of earlier runs, listed once: a unit that now succeeds drops its stale note.
    stale = set(store.list(f"{result.run_id}/failures", ".json"))
    tries: collections.Counter = collections.Counter()
    pool = Pool(n, use_gpu, gpus_per_worker)
    inflight: dict = {}  # ObjectRef -> (unit, leader index, leader handle, [(peer index, peer handle)])
    busy: collections.Counter = collections.Counter()
    reserved: set[int] = set()
    examples, t0, idle_since = 0, time.perf_counter(), time.perf_counter()
    bar = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[rate]}"),
                   TimeElapsedColumn(), TimeRemainingColumn(), console=Console(stderr=True), disable=not progress)
    try:
        with bar:
            task = bar.add_task(f"{result.run_id}", total=len(todo), rate="")
            while queue or inflight:
                pool.poll()
                _dispatch(queue, sizes, pool, busy, reserved, inflight, ctx)
                if inflight or pool.ready:
                    idle_since = time.perf_counter()
                elif time.perf_counter() - idle_since > STARTUP_TIMEOUT:
                    raise RobustsweepError(f"no worker actor could start in {STARTUP_TIMEOUT:.0f} s; does the cluster "
                                           f"have the resources ({'GPU' if use_gpu else 'CPU'}) for {n} workers?")
                ready, _ = ray.wait(list(inflight) + pool.refs(), num_returns=1, timeout=1.0)
                for ref in ready:
                    if ref not in inflight:
                        continue  # a ping: pool.poll takes it next turn
                    unit, i, handle, peers = inflight.pop(ref)
                    busy[i] -= 1
                    for j, _ in peers:
                        reserved.discard(j)
                    if peers:
                        reserved.discard(i)
                    try:
                        summary = ray.get(ref)
                    except (*LOST, RayTaskError) as exc:
                        if isinstance(exc, LOST):
                            error = "worker lost"
                            result.lost += 1
                            if pool.handles.get(i) is handle:  # replace a lost actor once, not per unit
                                pool.replace(i)
                        else:
                            error = str(exc.cause if exc.cause else exc)
                        for j, h in peers:  # a gang's peers may be gone too: ping before more work
                            if pool.handles.get(j) is h:
                                pool.recheck(j)
                        _retry(unit, tries, queue, store, result, error, traceback.format_exc())
                        continue
                    for lost in summary.get("lost_peers", []):
                        result.lost += 1
                        j, h = peers[lost]
                        if pool.handles.get(j) is h:
                            pool.replace(j)
                    result.done += 1
                    result.rows += summary["rows"]
                    examples += len(unit.example_ids)
                    failure = f"{result.run_id}/failures/unit-{unit.unit_id}.json"
                    if failure in stale:
                        store.remove(failure)
                    rate = examples / max(time.perf_counter() - t0, 1e-9)
                    bar.update(task, advance=1, rate=f"{rate:.2f} ex/s")
    finally:
        pool.shutdown()


def _dispatch(queue, sizes, pool: Pool, busy, reserved, inflight, ctx) -> None:
    """Give units to ready actors: one-actor units up to INFLIGHT each, gangs only to idle actors."""
    while queue:
        unit = queue[0]
        free = sorted(i for i in pool.ready if i not in reserved)
        g = min(sizes[unit.unit_id], max(pool.expected(), 1))
        if g == 1:
            open_ = [i for i in free if busy[i] < INFLIGHT]
            if not open_:
                return
            i = min(open_, key=lambda k: busy[k])
            peers = []
        else:
            idle = [i for i in free if busy[i] == 0]
            if len(idle) < g:
                return  # wait for actors to drain; nothing overtakes the gang
            i, peers = idle[0], [(j, pool.handles[j]) for j in idle[1:g]]
            reserved.update([i] + [j for j, _ in peers])
        queue.popleft()
        handle = pool.handles[i]
        ref = handle.run_unit.remote(unit, ctx, [h for _, h in peers] or None)
        inflight[ref] = (unit, i, handle, peers)
        busy[i] += 1


def _retry(unit: Unit, tries, queue, store: Store, result: RunResult, error: str, trace: str) -> None:
    tries[unit.unit_id] += 1
    if tries[unit.unit_id] < TRIES:
        queue.appendleft(unit)
        return
    result.failed.append(unit.unit_id)
    store.write_json(f"{result.run_id}/failures/unit-{unit.unit_id}.json",
                     {"unit": unit.as_dict(), "tries": tries[unit.unit_id], "error": error, "traceback": trace})

"""Run a job: plan it, hand its units to a pool of Ray worker actors, commit, resume.

The queue is runtime/scheduler.py: at most `INFLIGHT` units per actor; a unit whose actor or
node is lost goes back in the queue (spending no try) and the actor is replaced; a unit past
its deadline (`unit_deadline`) is taken back and its actor replaced; a unit that raises is
retried; after `TRIES` attempts a unit is recorded in `failures/` with its error and traceback
and the job goes on. Committed units (footer present, row count right) are skipped, so a rerun
resumes for free. This module is the Ray side: `RayActors` is the scheduler's `Actors`.

Workers get the storage credentials and endpoint of the driver's environment (`worker_env`,
through the actors' runtime_env, never printed), and the first actor to start writes and reads
a probe file before any unit runs, so a worker that cannot reach the store stops the run at
once. Without --workers the pool follows the cluster: nodes that join get actors.
"""

from __future__ import annotations

import os
import random
import signal
import sys
import threading
import time
import traceback
from dataclasses import dataclass, field

import ray
from ray.exceptions import (ActorDiedError, ActorUnavailableError, GetTimeoutError, NodeDiedError, RayActorError, RaySystemError,
                            RayTaskError, WorkerCrashedError)

from pipeline.data import load_split
from pipeline.scrub import scrub
from pipeline.errors import ClusterError, ClusterUnreachableError, ConfigError, CredentialsError, RobustsweepError
from pipeline.store import Store
from pipeline.store.binding import PLAN, check_binding
from pipeline.store.lease import RunLease
from pipeline.store.unit import check_units
from pipeline.models.zoo import model_card
from pipeline.runtime import faults
from pipeline.training.defaults import prepare_defaults, role_of
from pipeline.runtime.plan import Unit, plan, plan_document, run_id_for
from pipeline.runtime.estimate import guard, unit_evaluations, write_prediction
from pipeline.runtime.preflight import preflight_run
from pipeline.runtime.reach import RETRY_ENV as RAY_RETRY_ENV
from pipeline.runtime.reach import check_reachable, host_port, retry_seconds
from pipeline.runtime.scheduler import Failed, Outcome, Scheduler, gang_size
from pipeline.runtime.submit import AWS_CREDENTIALS, AWS_SETTINGS
from pipeline.config.job import Job
from pipeline.config.preflight import check_output
from pipeline.config.run import RunOptions
from pipeline.runtime.worker import UnitResult, Worker, WorkerContext

LOST = (RayActorError, ActorDiedError, ActorUnavailableError, NodeDiedError, WorkerCrashedError)
# What a worker needs of the driver's environment to reach the store as the driver does
# (credentials, region, endpoint, retry budget) and the folders its data and RobustBench files are
# found in; the values travel in the actors' runtime_env.
WORKER_ENV = (*AWS_CREDENTIALS, *AWS_SETTINGS, "AWS_ENDPOINT_URL_S3", "ROBUSTSWEEP_S3_RETRY_SECONDS",
              "ROBUSTSWEEP_DATA", "ROBUSTBENCH_MODELS", faults.ENV)
GROW_EVERY = 2.0  # seconds between looks at the cluster's size (a cheap GCS call)
PROBE_TIMEOUT = 300.0  # seconds the first actor's store probe may take (model-free; S3 retries included)


def worker_env() -> dict[str, str]:
    """The variables of WORKER_ENV set in this process (secrets among them: never print this)."""
    return {k: os.environ[k] for k in WORKER_ENV if os.environ.get(k)}


def unit_deadline(unit: Unit, options: RunOptions, rate: float | None = None, _cache: dict | None = None,
                  gang: int = 1) -> float | None:
    """Seconds `unit` may run before its actor is replaced and it is requeued; None: no limit.

    The one place a deadline is decided: the run's `unit_timeout` when given; else, once `rate`
    is known (seconds per network evaluation, measured in this run on committed units of the
    unit's defense: `Deadlines`), `deadline_factor` x the cost model's upper count of the unit's
    evaluations on its `gang` (runtime/estimate.py `unit_evaluations`) x `rate`, never below
    `deadline_floor`.
    Before any unit of its defense has committed there is nothing to scale a prediction by (a
    device profile's peak says little about a busy or slow node), so no limit.
    """
    if options.unit_timeout is not None:
        return options.unit_timeout
    if rate is None:
        return None
    predicted = unit_evaluations(unit, _cache, gang).hi
    return max(options.deadline_floor, options.deadline_factor * predicted * rate)


class Deadlines:
    """The scheduler's `deadline(unit)`: `unit_deadline` with the speed this run measured on each
    defense, from the committed units' results (their seconds over their records' evaluations)."""

    def __init__(self, options: RunOptions, gangs: dict[str, int] | None = None):
        self.options, self.gangs = options, gangs or {}
        self.spent: dict[str, list[float]] = {}  # defense -> [seconds, evaluations] of its committed units
        self.cache: dict = {}  # the cost model's units, by (defense, attack, eps, examples)

    def record(self, unit: Unit, result: UnitResult) -> None:
        if result.evaluations > 0:
            spent = self.spent.setdefault(unit.defense, [0.0, 0.0])
            spent[0] += result.seconds
            spent[1] += result.evaluations

    def rate(self, defense: str) -> float | None:
        """Seconds per network evaluation of `defense` in this run so far; None before one has committed."""
        spent = self.spent.get(defense)
        return spent[0] / spent[1] if spent else None

    def __call__(self, unit: Unit) -> float | None:
        return unit_deadline(unit, self.options, self.rate(unit.defense), self.cache, self.gangs.get(unit.unit_id, 1))


class Stopped(KeyboardInterrupt):
    """The driver was asked to stop (SIGTERM: `ray job stop`, `robustsweep stop`, Kubernetes)."""


@dataclass
class RunResult:
    """What `run_job` returns: run_id and uri (the run folder, {out}/{run_id}); units (planned),
    skipped (already committed: the resume), done (committed by this call), failed (unit ids
    written to failures/ after their tries); rows (records written by this call); seconds
    (wall time); workers (actors used); redone ({unit id: why} for committed files that failed
    their seal and were run again); lost (actors lost and replaced). `ok`: no unit failed.
    The results themselves are the run folder's records: `pipeline.analytics.connect([result.uri])`."""

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
    replaced: int = 0  # actors started again in place of lost or hung ones
    timed_out: int = 0  # units taken back at their deadline
    requeued: int = 0  # units put back in the queue (lost actor, deadline, error)
    copies: int = 0  # speculative copies issued

    @property
    def ok(self) -> bool:
        return not self.failed


def connect(address: str | None, budget: float | None = None) -> bool:
    """Join or start a Ray cluster; True if this call started it (so we shut it down after).

    Joining is retried with backoff for `budget` seconds (ROBUSTSWEEP_RAY_RETRY_SECONDS, like
    check_reachable): a ray:// client server that has just come up, or is busy, refuses the first
    handshake (ConnectionAbortedError) where a GCS address would have waited. A ray:// try is
    bounded (`_client_try`): Ray's own client retries three times with growing waits, about 30 s
    per call, which would swallow the budget in one try.
    """
    if ray.is_initialized():
        return False
    if address is None:
        # "local": a new cluster of our own, never one that happens to run on this machine.
        ray.init(address="local", include_dashboard=False, logging_level="ERROR", log_to_driver=False)
        return True
    budget = retry_seconds() if budget is None else budget
    deadline, delay = time.monotonic() + budget, 0.5
    client = address.startswith("ray://")
    while True:
        try:
            if client:
                _client_try(address)
            else:
                ray.init(address=address, logging_level="ERROR", log_to_driver=False)
            return False
        except (ConnectionError, TimeoutError, RaySystemError) as exc:
            error = exc
        except OSError as exc:  # the TCP look before a client try: refused, unreachable, unknown host
            error = exc
        if ray.is_initialized():
            ray.shutdown()
        if time.monotonic() + delay > deadline:
            break
        time.sleep(delay * random.uniform(0.5, 1.5))
        delay = min(2 * delay, 4.0)
    reason = str(error).splitlines()[0] if str(error) else ""
    raise ClusterUnreachableError(f"cannot join the Ray cluster at {address} (--address): {type(error).__name__}: "
                                  f"{reason}; retried for {budget:g} s ({RAY_RETRY_ENV}); check that the head is "
                                  f"up and its client port open") from None


CLIENT_TRY_S = 5.0  # seconds one ray:// try may wait for the TCP connection (Ray's client then waits up to 5 s more)


def _client_try(address: str) -> None:
    """One bounded try at a ray:// address: a TCP connect first (nothing listening fails here at
    once, not after Ray's client has waited), then Ray's client with one connection attempt
    (`connection_retries=1`: its channel waits at most RAY_CLIENT_INITIAL_CONNECTION_TIMEOUT_S,
    5 s by default). `ray.init` offers no way to pass that, so the client is called as ray.init
    calls it, with the same arguments: the job's namespace and runtime_env from the environment,
    and the remote ray.init's logging options."""
    import socket

    from ray.job_config import JobConfig
    from ray.util.client_connect import connect as client_connect

    target = host_port(address)
    if target is not None:
        socket.create_connection(target, timeout=CLIENT_TRY_S).close()
    config = JobConfig()
    if os.environ.get("RAY_NAMESPACE"):
        config.set_ray_namespace(os.environ["RAY_NAMESPACE"])
    if os.environ.get("RAY_RUNTIME_ENV"):
        import json

        config.set_runtime_env(json.loads(os.environ["RAY_RUNTIME_ENV"]))
    client_connect(address[len("ray://"):], connection_retries=1, job_config=config,
                   ray_init_kwargs={"logging_level": "ERROR", "log_to_driver": False})


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
    if options.fresh:  # the preflight checked the run folder a resume would use; this one is new
        check_output(options.out, run_id)
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
    if _read_only(store, run_id):
        return _finished(job, store, units, run_id, start)
    with RunLease(store, run_id, wait=lease_wait) as lease:
        return _run_leased(job, options, store, units, run_id, start, lease, progress=progress, wait_s=wait_s)


def _read_only(store: Store, run_id: str) -> bool:
    """Whether the run folder exists on local storage this process cannot write (a read-only
    mount, an immutable folder); the preflight let it through because it holds a plan."""
    if store.backend != "local":
        return False
    folder = store.local_path(run_id)
    return os.path.isdir(folder) and not os.access(folder, os.W_OK | os.X_OK)


def _finished(job: Job, store: Store, units: list[Unit], run_id: str, start: float) -> RunResult:
    """The result of a run in a folder that cannot be written: resuming a finished run only
    reads (no lease, no plan); ConfigError naming the folder when units are left to run."""
    check_binding(store, run_id, job.hash, job.spec.model_dump(mode="json"))
    found = check_units(store, run_id, units, job.hash)
    left = [u for u, reason in found.items() if reason is not None]
    if left:
        raise ConfigError(f"out (--out): {store.join(run_id)} is read-only and {len(left)} of {len(units)} units are "
                          f"not committed there; make it writable, or give another --out")
    return RunResult(run_id, store.join(run_id), len(units), len(units), 0, seconds=time.perf_counter() - start)


def resume_line(run_id: str, out: str, done: int, total: int) -> str:
    """What to do after a run that stopped before its end."""
    return (f"run {run_id} stopped with {done} of {total} units committed under {out}; they are kept: run the same "
            f"`robustsweep run` command again (same --out, same job or --run-id {run_id}) to resume the rest")


_SIGTERM = threading.Event()  # Ray's blocking calls re-raise a handler's exception as a plain KeyboardInterrupt


def _on_sigterm(signum, frame):
    _SIGTERM.set()
    raise Stopped()


def _run_leased(job: Job, options: RunOptions, store: Store, units: list[Unit], run_id: str, start: float,
                lease: RunLease, *, progress: bool, wait_s: float) -> RunResult:
    """run_job once this driver holds the run folder's lease: bind, check, dispatch."""
    data = job.spec.data
    stored = check_binding(store, run_id, job.hash, job.spec.model_dump(mode="json"))
    found = check_units(store, run_id, units, job.hash)
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
    for unit_id, reason in result.redone.items():  # fenced commits create only: clear the way, keep the evidence
        unit = next(u for u in todo if u.unit_id == unit_id)
        store.set_aside(f"{run_id}/{unit.path}", f".refused-{int(time.time())}")
    if progress:  # first, in the log: a head that dies takes the driver with it before it can say more
        print(f"run {run_id}: {len(todo)} units to do, {result.skipped} committed; if this run stops, the same "
              f"command resumes it", file=sys.stderr)
    started = connect(options.address)
    main = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _on_sigterm) if main else None
    _SIGTERM.clear()
    try:
        wait_for_gpus(options.min_gpus, wait_s)
        n, use_gpu = default_workers(options.gpus_per_worker)
        n = options.workers or n
        result.workers = n
        # The prediction, once the pool says what the units run on (it prices their seconds).
        missing = write_prediction(store, run_id, job.hash, units, options, use_gpu, n)
        if missing and progress:
            print(f"run {run_id}: {missing}; the report will say the prediction is not available", file=sys.stderr)
        ctx = WorkerContext(run_id, job.hash, options.out, job.spec.seed, data, endpoint_url=options.endpoint_url)
        _drain(todo, ctx, store, result, n, use_gpu, options, progress, lease)
    except KeyboardInterrupt:
        if _SIGTERM.is_set():
            raise ClusterError(f"stopped (SIGTERM); {resume_line(run_id, options.out, result.skipped + result.done, result.units)}") from None
        print(resume_line(run_id, options.out, result.skipped + result.done, result.units), file=sys.stderr)
        raise
    except (RaySystemError, ConnectionError) as exc:
        raise ClusterError(f"lost the Ray cluster ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}); "
                           f"{resume_line(run_id, options.out, result.skipped + result.done, result.units)}") from None
    finally:
        if main:
            signal.signal(signal.SIGTERM, previous)
        if started:
            ray.shutdown()
    result.seconds = time.perf_counter() - start
    return result


class RayActors:
    """The scheduler's `Actors` (runtime/scheduler.py) as Ray worker actors (runtime/worker.py)."""

    def __init__(self, ctx: WorkerContext, use_gpu: bool, gpus_per_worker: float):
        self.ctx, self.use_gpu, self.gpus_per_worker = ctx, use_gpu, gpus_per_worker
        self.resource = "GPU" if use_gpu else "CPU"
        self.env = worker_env()
        # One actor class for the run: each ray.remote() draws a new class id, which Ray exports
        # and keeps as another type of task for every actor started or replaced.
        self.cls = ray.remote(Worker)

    def start(self, slot: int):
        options = {"num_cpus": 1, "max_restarts": 0}
        if self.env:
            options["runtime_env"] = {"env_vars": dict(self.env)}
        cls = self.cls
        if self.use_gpu:
            # The GPU does the work; the CPU share only keeps Ray from packing more actors than cores.
            options["num_cpus"] = min(1.0, self.gpus_per_worker)
            return cls.options(num_gpus=self.gpus_per_worker, **options).remote(f"worker-{slot}", "cuda", 1)
        return cls.options(**options).remote(f"worker-{slot}", "cpu", 1)

    def ping(self, handle):
        return handle.ping.remote()

    def submit(self, handle, unit: Unit, peers: list, attempt: int = 1):
        return handle.run_unit.remote(unit, self.ctx, peers or None, attempt)

    def wait(self, futures: list, num_returns: int, timeout: float) -> list:
        done, _ = ray.wait(futures, num_returns=num_returns, timeout=timeout)
        return done

    def outcome(self, future) -> Outcome:
        # Errors travel into failure notes and the terminal: the credentials the workers were
        # given (runtime_env) never go with them, whatever Ray or a library put in a message.
        try:
            value = ray.get(future)
        except LOST:
            return Outcome(error="worker lost", trace=scrub(traceback.format_exc()), lost=True)
        except RayTaskError as exc:
            # Credentials fail every try the same way: no retry (the probe usually stops the run first).
            return Outcome(error=scrub(str(exc.cause if exc.cause else exc)), trace=scrub(traceback.format_exc()),
                           fatal=isinstance(exc.cause, CredentialsError))
        return Outcome(value=value, lost_peers=value.lost_peers if isinstance(value, UnitResult) else ())

    def kill(self, handle) -> None:
        ray.kill(handle)


def _drain(todo: list[Unit], ctx: WorkerContext, store: Store, result: RunResult, n: int, use_gpu: bool,
           options: RunOptions, progress: bool, lease: RunLease) -> None:
    """Hand the units to the pool until every one is committed or failed (module docstring), or
    until another driver takes the run folder's lease over (LeaseLostError; the pool is stopped)."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    gangs = {u.unit_id: gang_size(u.grid_workers, u.defense_spec.kind, n, len(todo)) for u in todo}
    # Failure notes of earlier runs, listed once: a unit that now succeeds drops its stale note.
    stale = set(store.list(f"{result.run_id}/failures", ".json"))
    examples, t0 = 0, time.perf_counter()
    bar = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[rate]}"),
                   TextColumn("{task.fields[pool]}"), TimeElapsedColumn(), TimeRemainingColumn(), console=Console(stderr=True),
                   disable=not progress)
    actors = RayActors(ctx, use_gpu, options.gpus_per_worker)
    deadlines = Deadlines(options, gangs)
    scheduler = Scheduler(todo, actors, n, gangs=gangs, deadline=deadlines, speculate=options.speculate)
    grown = time.monotonic()
    try:
        _probe(scheduler, ctx)
        with bar:
            task = bar.add_task(f"{result.run_id}", total=len(todo), rate="", pool="")
            while scheduler.pending:
                lease.check()
                if options.workers is None and time.monotonic() - grown > GROW_EVERY:
                    grown = time.monotonic()
                    scheduler.grow(default_workers(options.gpus_per_worker)[0])
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
                    deadlines.record(unit, event.value)
                    examples += len(unit.example_ids)
                    if failure in stale:
                        store.remove(failure)
                    rate = examples / max(time.perf_counter() - t0, 1e-9)
                    bar.update(task, advance=1, rate=f"{rate:.2f} ex/s")
                bar.update(task, pool=pool_line(scheduler))
    finally:
        scheduler.shutdown()
        result.workers = max(result.workers, scheduler.workers)
        result.lost, result.replaced, result.timed_out = scheduler.lost, scheduler.replacements, scheduler.timed_out
        result.requeued, result.copies = scheduler.requeued, scheduler.copies


def pool_line(scheduler: Scheduler) -> str:
    """The pool in a few words for the progress line: actors up, starting, lost, replaced."""
    line = f"{len(scheduler.ready)}/{len(scheduler.handles)} actors up"
    if scheduler.lost or scheduler.replacements or scheduler.timed_out:
        line += f", {scheduler.lost} lost, {scheduler.replacements} replaced"
        if scheduler.timed_out:
            line += f", {scheduler.timed_out} past deadline"
    return line


def _probe(scheduler: Scheduler, ctx: WorkerContext) -> None:
    """Before any unit: the first actor to start writes, reads and removes a file in the run
    folder with the environment every worker gets (the driver's own access proves nothing
    about theirs). A CredentialsError (or any StoreError) stops the run here."""
    slot = scheduler.first_started()
    try:
        ray.get(scheduler.handles[slot].probe.remote(ctx), timeout=PROBE_TIMEOUT)
    except RayTaskError as exc:
        if isinstance(exc.cause, RobustsweepError):  # keeps its type, hence its exit code
            raise type(exc.cause)(f"a worker cannot use the store: {exc.cause}") from None
        raise ClusterError(f"a worker cannot use the store: {scrub(str(exc.cause or exc))}") from None
    except (GetTimeoutError, *LOST):
        return  # the actor is the cluster's problem; the queue deals with it

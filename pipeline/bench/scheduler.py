"""`robustsweep bench scheduler`: the driver's queue at cluster scale, with simulated actors.

The run's `Scheduler` (runtime/scheduler.py) dispatches `units` units over `actors` simulated
actors. The units come in contiguous blocks, one per gang size (the plan's order is defense by
defense, and a gang size belongs to a defense), so the queue meets gangs, and gangs wait for
whole groups of idle actors. The simulated actors keep a simulated clock that jumps from one
event to the next (nothing sleeps): an actor starts in `START_S` seconds, a unit takes about
`UNIT_S` seconds of one actor, a gang of G takes that / (G x `GANG_EFFICIENCY`); a call loses its
actor with probability `P_LOST` (the actor's other calls are lost with it), loses a gang peer
with `P_PEER_LOST` per peer, raises with `P_RAISE`, and a fraction `P_BROKEN` of the units
raise every time (they fail after the scheduler's tries). Draws come from one seeded generator,
in the order of the calls, so the same arguments give the same schedule.

What is timed is the driver: the loop of `Scheduler.step` and the counting of its events, less
the time spent inside the simulated actors (measured around each of their methods), divided by
the units; in wall time, and in CPU time (the loop's CPU time times the driver's share of its
wall time), which other processes on the machine do not stretch. Memory is tracemalloc's peak over a second, identical run (tracemalloc slows Python
several times, so the timed run goes without it); the units are built before it starts, as a
run's plan is, so the peak is the scheduler's and the simulated actors' state.

`bench_scheduler_ray` measures the same driver through Ray itself: a local Ray cluster, real
Ray actors (one CPU each) reached through the run's own `RayActors` (submit, wait, get, kill),
whose units return at once, so that what is timed is the driver's cost a unit (the scheduler
plus Ray's client side: task submission, object fetches, the core worker's threads, all in
the driver's process CPU time) and the units a second the pool turns over.
"""

from __future__ import annotations

import hashlib
import heapq
import math
import random
import time
import tracemalloc
from dataclasses import dataclass

from pipeline.bench.common import load_average, local_ray, machine_info
from pipeline.runtime.run import RayActors
from pipeline.runtime.scheduler import Failed, Outcome, Scheduler

UNIT_S = 60.0
START_S = 30.0
GANG_EFFICIENCY = 0.8
P_LOST = 0.002
P_PEER_LOST = 0.002
P_RAISE = 0.01
P_BROKEN = 0.001

_DONE = {"rows": 1}
_RAISED = "the unit failed on purpose (simulated)"


@dataclass(frozen=True)
class SimUnit:
    unit_id: str
    gang: int
    broken: bool


class _Handle:
    """An actor: it runs one call at a time (`free_at`: when its last call ends) until `dies_at`."""

    __slots__ = ("slot", "free_at", "dies_at", "futures")

    def __init__(self, slot: int, free_at: float):
        self.slot, self.free_at, self.dies_at, self.futures = slot, free_at, math.inf, set()


class _Future:
    __slots__ = ("time", "begin", "members", "outcome", "handle", "delivered")

    def __init__(self, begin: float, end: float, members: int, outcome: Outcome, handle: _Handle):
        self.begin, self.time, self.members, self.outcome, self.handle = begin, end, members, outcome, handle
        self.delivered = False


class SimulatedActors:
    """The scheduler's `Actors` on a simulated clock (module docstring); `spent`: real seconds inside them."""

    resource = "CPU"

    def __init__(self, seed: int = 0):
        self.rng = random.Random(seed)
        self.clock = 0.0
        self.heap: list = []
        self.seq = 0
        self.spent = 0.0
        self.calls = 0
        self.actor_seconds = 0.0  # simulated seconds actors spent on calls (a gang counts each member)

    def now(self) -> float:
        return self.clock

    def _push(self, future: _Future) -> None:
        self.seq += 1
        heapq.heappush(self.heap, (future.time, self.seq, future))

    def _end(self, future: _Future, at: float, outcome: Outcome) -> None:
        future.time, future.outcome = at, outcome
        self._push(future)

    def _die(self, handle: _Handle, at: float) -> None:
        """The actor dies at `at`: its calls still running then end as lost."""
        handle.dies_at = min(handle.dies_at, at)
        for f in handle.futures:
            if not f.delivered and f.time > handle.dies_at:
                self._end(f, handle.dies_at, Outcome(error="worker lost", lost=True))

    def _call(self, handle: _Handle, seconds: float, members: int, outcome: Outcome, peers: list = ()) -> _Future:
        """A call that runs after the actor's earlier calls (a Ray actor runs one at a time)."""
        begin = max(self.clock, handle.free_at)
        f = _Future(begin, begin + seconds, members, outcome, handle)
        handle.free_at = f.time
        for peer in peers:
            peer.free_at = max(peer.free_at, f.time)
        if handle.dies_at < f.time:
            f.time, f.outcome = max(self.clock, handle.dies_at), Outcome(error="worker lost", lost=True)
        handle.futures.add(f)
        self._push(f)
        return f

    def start(self, slot: int) -> _Handle:
        return _Handle(slot, self.clock + START_S)

    def ping(self, handle: _Handle) -> _Future:
        t0 = time.perf_counter()
        f = self._call(handle, 0.0, 0, Outcome(value="pong"))
        self.spent += time.perf_counter() - t0
        return f

    def submit(self, handle: _Handle, unit: SimUnit, peers: list, attempt: int = 1) -> _Future:
        t0 = time.perf_counter()
        self.calls += 1
        g = 1 + len(peers)
        seconds = UNIT_S * self.rng.lognormvariate(0.0, 0.25) / (g * GANG_EFFICIENCY if g > 1 else 1.0)
        r = self.rng.random()
        lost_peers = ()
        if unit.broken or P_LOST <= r < P_LOST + P_RAISE:
            seconds *= self.rng.random()
            outcome = Outcome(error=_RAISED, trace="Traceback (simulated)")
        else:
            lost_peers = tuple(k for k in range(len(peers)) if self.rng.random() < P_PEER_LOST)
            outcome = Outcome(value=_DONE, lost_peers=lost_peers)
        f = self._call(handle, seconds, g, outcome, peers)
        for k in lost_peers:  # the gang redoes a lost peer's shards elsewhere; the call still ends well
            self._die(peers[k], f.begin + seconds * self.rng.random())
        if r < P_LOST and not unit.broken:
            self._die(handle, f.begin + seconds * self.rng.random())
        self.spent += time.perf_counter() - t0
        return f

    def wait(self, futures: list, num_returns: int, timeout: float) -> list:
        t0 = time.perf_counter()
        try:
            if timeout == 0:  # the scheduler's poll of the pings: those already done
                return [f for f in futures if f.time <= self.clock][:num_returns]
            while self.heap:
                at, _, f = self.heap[0]
                if f.delivered or at != f.time:
                    heapq.heappop(self.heap)  # superseded by a later entry (a call cut short by a death)
                    continue
                if at > self.clock + timeout:
                    self.clock += timeout
                    return []
                heapq.heappop(self.heap)
                self.clock = max(self.clock, at)
                return [f]
            self.clock += timeout
            return []
        finally:
            self.spent += time.perf_counter() - t0

    def outcome(self, future: _Future) -> Outcome:
        t0 = time.perf_counter()
        if not future.delivered:
            future.delivered = True
            future.handle.futures.discard(future)
            self.actor_seconds += max(0.0, future.time - future.begin) * future.members
        self.spent += time.perf_counter() - t0
        return future.outcome

    def kill(self, handle: _Handle) -> None:
        t0 = time.perf_counter()
        self._die(handle, self.clock)
        self.spent += time.perf_counter() - t0


def sim_units(units: int, gangs: tuple[int, ...], seed: int = 0) -> list[SimUnit]:
    """`units` units with 16-hex ids (as the planner's), in one contiguous block per gang size."""
    rng = random.Random(seed + 1)
    return [SimUnit(hashlib.sha256(f"{seed}:{i}".encode()).hexdigest()[:16], gangs[i * len(gangs) // units],
                    rng.random() < P_BROKEN) for i in range(units)]


def _drain(units: list[SimUnit], actors: int, seed: int) -> dict:
    sim = SimulatedActors(seed)
    start, cpu = time.perf_counter(), time.process_time()
    sizes = {u.unit_id: u.gang for u in units}  # the driver's table, as run.py builds it
    scheduler = Scheduler(units, sim, actors, gangs=sizes, clock=sim.now)
    done = failed = steps = 0
    while scheduler.pending:
        steps += 1
        for event in scheduler.step():
            if isinstance(event, Failed):
                failed += 1
            else:
                done += 1
    wall, cpu = time.perf_counter() - start, time.process_time() - cpu
    return {"done": done, "failed": failed, "steps": steps, "calls": sim.calls, "lost": scheduler.lost,
            "replaced": sum(scheduler.replaced.values()), "wall_s": wall, "cpu_s": cpu, "actors_s": sim.spent,
            "makespan_s": sim.clock, "actor_seconds": sim.actor_seconds}


def bench_scheduler(units: int = 100_000, actors: int = 1024, gangs: tuple[int, ...] = (1, 2, 4, 8),
                    seed: int = 0) -> dict:
    """Dispatch `units` units over `actors` simulated actors (module docstring); the driver's cost per unit."""
    work = sim_units(units, gangs, seed)
    load_before = load_average()
    timed = _drain(work, actors, seed)
    tracemalloc.start()
    try:
        traced = _drain(work, actors, seed)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    if {k: traced[k] for k in ("done", "failed", "calls", "lost")} != {k: timed[k] for k in ("done", "failed", "calls", "lost")}:
        raise AssertionError("the same arguments gave two different schedules")
    driver_s = timed["wall_s"] - timed["actors_s"]
    # CPU seconds of the driver alone: the loop's CPU time less the simulated actors' share of its
    # wall time (other processes on the machine stretch wall time, not CPU time).
    driver_cpu_s = timed["cpu_s"] * driver_s / timed["wall_s"]
    return {
        "units": units, "actors": actors, "gangs": list(gangs), "seed": seed,
        "unit_s": UNIT_S, "start_s": START_S, "gang_efficiency": GANG_EFFICIENCY,
        "p_lost": P_LOST, "p_peer_lost": P_PEER_LOST, "p_raise": P_RAISE, "p_broken": P_BROKEN,
        "done": timed["done"], "failed": timed["failed"], "calls": timed["calls"], "retries": timed["calls"] - units,
        "lost": timed["lost"], "replaced": timed["replaced"], "steps": timed["steps"],
        "wall_s": round(timed["wall_s"], 4), "cpu_s": round(timed["cpu_s"], 4), "actors_s": round(timed["actors_s"], 4),
        "driver_s": round(driver_s, 4), "driver_s_per_unit": driver_s / units,
        "driver_cpu_s": round(driver_cpu_s, 4), "driver_cpu_s_per_unit": driver_cpu_s / units, "peak_bytes": peak, "peak_bytes_per_unit": peak / units,
        "simulated_makespan_s": round(timed["makespan_s"], 1),
        "utilisation": timed["actor_seconds"] / (actors * timed["makespan_s"]),
        **machine_info("cpu"), "load_before": load_before, "load_after": load_average(),
    }


def format_scheduler(r: dict) -> list[str]:
    """The lines `robustsweep bench scheduler` prints for a result of `bench_scheduler`."""
    return [
        f"{r['units']:,} units over {r['actors']:,} simulated actors, gangs {r['gangs']} in blocks: "
        f"{r['done']:,} done, {r['failed']} failed, {r['calls']:,} calls ({r['retries']:,} retries), "
        f"{r['lost']} actors lost, {r['replaced']} replaced",
        f"driver: {1e6 * r['driver_s_per_unit']:.1f} us a unit of wall time ({r['driver_s']:.2f} s of {r['wall_s']:.2f} s; "
        f"{r['actors_s']:.2f} s in the simulated actors), {1e6 * r['driver_cpu_s_per_unit']:.1f} us of CPU time; "
        f"{r['steps']:,} steps",
        f"peak memory: {r['peak_bytes'] / 2**20:.1f} MiB ({r['peak_bytes_per_unit']:.0f} bytes a unit)",
        f"simulated: {r['simulated_makespan_s'] / 3600:.2f} h, actors busy {100 * r['utilisation']:.1f}% of the time",
        f"load average {r['load_before']} before, {r['load_after']} after",
    ]


class _Instant:
    """A Ray actor whose units end at once: the driver's side of a call, without the work."""

    def ping(self) -> str:
        return "pong"

    def run_unit(self, unit, ctx, peers=None, attempt: int = 1) -> dict:
        return {"rows": 1, "attempt": attempt}


class _InstantActors(RayActors):
    """The run's RayActors (submit, wait, outcome, kill unchanged) over `_Instant` actors."""

    def __init__(self):
        super().__init__({}, use_gpu=False, gpus_per_worker=1.0)

    def start(self, slot: int):
        import ray

        return ray.remote(_Instant).options(num_cpus=1, max_restarts=0).remote()


def bench_scheduler_ray(units: int = 2000, actors: int = 3, seed: int = 0) -> dict:
    """The driver's CPU time and wall time a unit with `units` instant units over `actors` real Ray
    actors of a local cluster (module docstring)."""
    work = sim_units(units, (1,), seed)
    load_before = load_average()
    with local_ray(num_cpus=actors):
        pool = _InstantActors()
        scheduler = Scheduler(work, pool, actors)
        scheduler.first_started(timeout=0.5)
        while len(scheduler.ready) < actors:  # every actor up before the clock starts
            scheduler.poll()
            pool.wait(list(scheduler.starting), 1, 0.5)
        start, cpu, done = time.perf_counter(), time.process_time(), 0
        while scheduler.pending:
            done += sum(1 for e in scheduler.step() if not isinstance(e, Failed))
        wall, cpu = time.perf_counter() - start, time.process_time() - cpu
        scheduler.shutdown()
    return {"units": units, "actors": actors, "done": done, "wall_s": round(wall, 4), "cpu_s": round(cpu, 4),
            "driver_cpu_s_per_unit": cpu / units, "driver_wall_s_per_unit": wall / units, "units_per_s": units / wall,
            "load_before": load_before, "load_after": load_average()}


def format_scheduler_ray(r: dict) -> list[str]:
    """The lines for a result of `bench_scheduler_ray`."""
    return [
        f"through Ray: {r['units']:,} instant units over {r['actors']} real actors (local cluster): {r['done']:,} done, "
        f"{r['units_per_s']:.0f} units/s",
        f"driver: {1e3 * r['driver_cpu_s_per_unit']:.2f} ms of CPU time a unit (scheduler and Ray client), "
        f"{1e3 * r['driver_wall_s_per_unit']:.2f} ms of wall time; load average {r['load_before']} before, "
        f"{r['load_after']} after",
    ]

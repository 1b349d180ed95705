"""The queue of a run as one object: units, actors, gangs, tries (after Ray's `util/actor_pool.py`).

All the scheduling state lives in `Scheduler`, and it reaches actors only through `Actors`
(start, ping, submit, wait, outcome, kill): `run.py` implements that with Ray, the tests and
`robustsweep bench scheduler` with fake actors, so every rule below is checked without a cluster.

- A one-actor unit goes to the started actor with the fewest units in flight (the lowest slot
  among equals), at most `inflight` per actor.
- A gang of G waits at the head of the queue until G started actors are idle, takes the G
  lowest idle slots at once (the driver is one thread, so two gangs never each hold part of the
  other) and gives them back when its unit ends. While it waits nothing is dispatched, so
  nothing overtakes it and it cannot starve.
- G is capped by the actors started or still starting within `start_grace` seconds: a gang
  larger than the live pool shrinks to it instead of waiting forever.
- Work goes only to started actors (they answered a ping), so an actor that cannot be placed
  holds nothing up.
- A unit whose actor is lost, or that raises, goes back to the head of the queue; its
  `tries`-th failure is final (a `Failed` event). A lost actor is killed and started again in
  its slot, at most `replacements` times; the peers of a gang whose unit failed are pinged
  again before they get more work.
- With nothing running and no actor started for `startup_timeout` seconds, the run stops.
"""

from __future__ import annotations

import collections
import heapq
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from pipeline.errors import ClusterError

INFLIGHT = 2
TRIES = 3
REPLACEMENTS = 3  # restarts of one actor slot
START_GRACE = 60.0  # seconds a gang waits for an actor that is still starting
STARTUP_TIMEOUT = 600.0  # seconds with no actor started and nothing running before the run gives up


def gang_size(grid_workers: int | str, kind: str, workers: int, units: int) -> int:
    """The gang a unit runs on (docs/ARCHITECTURE.md, "The grid"; docs/clusters.md, "Grid sharding").

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


@dataclass(frozen=True)
class Outcome:
    """What became of a call: its value, or an error (`lost`: the actor or its node died).

    lost_peers: positions, in the call's peer list, of gang members lost during a call that
    still succeeded (the gang redid their shards elsewhere).
    """

    value: Any = None
    error: str | None = None
    trace: str = ""
    lost: bool = False
    lost_peers: tuple[int, ...] = ()

    @property
    def ok(self) -> bool:
        return self.error is None


class Actors(Protocol):
    """What the scheduler needs of a pool of actors; futures and handles are opaque to it."""

    resource: str  # what an actor asks the cluster for ("GPU", "CPU"), named when none starts

    def start(self, slot: int) -> Any:
        """Create the actor of `slot`; returns its handle."""

    def ping(self, handle) -> Any:
        """A future that completes once the actor has started."""

    def submit(self, handle, unit, peers: list) -> Any:
        """Run `unit` on the actor, sharded over `peers` (handles) when there are any; a future."""

    def wait(self, futures: list, num_returns: int, timeout: float) -> list:
        """Up to `num_returns` of `futures` that are done, waiting at most `timeout` seconds for them."""

    def outcome(self, future) -> Outcome:
        """The outcome of a done future."""

    def kill(self, handle) -> None:
        """Stop an actor (alive or not)."""


@dataclass(frozen=True)
class Finished:
    """A unit that ended well; `value` is what its actor returned."""

    unit: Any
    value: Any


@dataclass(frozen=True)
class Failed:
    """A unit that failed its last try."""

    unit: Any
    tries: int
    error: str
    trace: str


@dataclass(frozen=True)
class _Running:
    unit: Any
    leader: int
    handle: Any
    peers: tuple[tuple[int, Any], ...]  # (slot, handle) of each gang peer


class Scheduler:
    """The units of a run over `workers` actor slots (module docstring for the rules).

    units: objects with a `unit_id`, in queue order. gangs: unit_id -> G (default 1).
    clock: seconds, for the start grace and the start-up timeout.
    """

    def __init__(self, units: Iterable, actors: Actors, workers: int, *, gangs: Mapping[str, int] | None = None,
                 inflight: int = INFLIGHT, tries: int = TRIES, replacements: int = REPLACEMENTS,
                 start_grace: float = START_GRACE, startup_timeout: float = STARTUP_TIMEOUT,
                 clock: Callable[[], float] = time.perf_counter):
        self.queue = collections.deque(units)
        self.gangs = gangs or {}
        self.actors = actors
        self.workers = workers
        self.max_inflight, self.max_tries, self.replacements = inflight, tries, replacements
        self.start_grace, self.startup_timeout, self.clock = start_grace, startup_timeout, clock
        self.handles: dict[int, Any] = {}
        self.starting: dict[Any, int] = {}  # ping future -> slot
        self.since: dict[int, float] = {}  # slot -> when its actor was (re)started or pinged again
        self.ready: set[int] = set()  # slots whose actor answered its ping
        self.replaced: collections.Counter = collections.Counter()
        self.busy: collections.Counter = collections.Counter()  # slot -> units in flight it leads
        self.reserved: set[int] = set()  # slots held by a running gang
        self.running: dict[Any, _Running] = {}
        self.tries: collections.Counter = collections.Counter()  # unit_id -> failed tries
        self.lost = 0  # actors lost on the way (calls found them dead)
        self.idle_since = clock()
        # Started, unreserved slots with room, by units in flight (b < inflight): the set of each
        # level and a min-heap of its slots, so a dispatch costs O(log workers), not a sort of the
        # pool. A heap may hold slots that left its level; they are dropped when they surface.
        self._level: dict[int, int] = {}
        self._open: list[set[int]] = [set() for _ in range(inflight)]
        self._heap: list[list[int]] = [[] for _ in range(inflight)]
        self._in_heap: list[set[int]] = [set() for _ in range(inflight)]
        for slot in range(workers):
            self._start(slot)

    @property
    def pending(self) -> bool:
        """Units queued or running."""
        return bool(self.queue or self.running)

    def step(self, timeout: float = 1.0) -> list[Finished | Failed]:
        """One turn of the driver: take started actors, dispatch, wait up to `timeout` for a call."""
        self.poll()
        self.dispatch()
        self._check_startup()
        done = self.actors.wait(list(self.running) + list(self.starting), 1, timeout)
        events = []
        for future in done:
            if future in self.running:  # a ping is taken by `poll` next turn
                event = self.finish(future)
                if event is not None:
                    events.append(event)
        return events

    def poll(self) -> None:
        """Mark the actors whose ping came back as started; restart those that died starting."""
        if not self.starting:
            return
        for future in self.actors.wait(list(self.starting), len(self.starting), 0):
            slot = self.starting.pop(future)
            outcome = self.actors.outcome(future)
            if outcome.lost:
                self.replace(slot)
            elif not outcome.ok:
                raise ClusterError(f"worker actor {slot} failed to start: {outcome.error}")
            else:
                self.ready.add(slot)
                self._refresh(slot)

    def expected(self) -> int:
        """Actors started, plus those starting for less than `start_grace` seconds (a gang waits for them)."""
        now = self.clock()
        return len(self.ready) + sum(1 for s in self.starting.values() if now - self.since[s] < self.start_grace)

    def gang(self, unit) -> int:
        """The gang the unit at the head of the queue runs on now: its G, capped by the live pool."""
        g = self.gangs.get(unit.unit_id, 1)
        return g if g == 1 else min(g, max(self.expected(), 1))

    def dispatch(self) -> None:
        """Hand queued units to started actors until the head of the queue cannot go."""
        while self.queue:
            unit = self.queue[0]
            g = self.gang(unit)
            if g == 1:
                leader = next((s for b in range(self.max_inflight) if (s := self._lowest(b)) is not None), None)
                if leader is None:
                    return
                peers = ()
            else:
                if len(self._open[0]) < g:
                    return  # wait for actors to drain; nothing overtakes the gang
                members = []
                for _ in range(g):  # the g lowest idle slots
                    members.append(self._lowest(0))
                    self.reserved.add(members[-1])
                    self._refresh(members[-1])
                leader, peers = members[0], tuple((s, self.handles[s]) for s in members[1:])
            self.queue.popleft()
            handle = self.handles[leader]
            future = self.actors.submit(handle, unit, [h for _, h in peers])
            self.running[future] = _Running(unit, leader, handle, peers)
            self.busy[leader] += 1
            self._refresh(leader)

    def finish(self, future) -> Finished | Failed | None:
        """Account for a done call: free its actors, replace lost ones, retry or report the unit."""
        run = self.running.pop(future)
        self.busy[run.leader] -= 1
        if run.peers:
            for slot in (run.leader, *(s for s, _ in run.peers)):
                self.reserved.discard(slot)
                self._refresh(slot)
        else:
            self._refresh(run.leader)
        outcome = self.actors.outcome(future)
        if not outcome.ok:
            if outcome.lost:
                self.lost += 1
                if self.handles.get(run.leader) is run.handle:  # replace a lost actor once, not per unit
                    self.replace(run.leader)
            for slot, handle in run.peers:  # a gang's peers may be gone too: ping before more work
                if self.handles.get(slot) is handle:
                    self.recheck(slot)
            return self._retry(run.unit, outcome)
        for k in outcome.lost_peers:
            self.lost += 1
            slot, handle = run.peers[k]
            if self.handles.get(slot) is handle:
                self.replace(slot)
        return Finished(run.unit, outcome.value)

    def replace(self, slot: int) -> None:
        """Kill (if alive) and start again the actor of `slot`, up to `replacements` times a slot."""
        self.ready.discard(slot)
        self._refresh(slot)
        old = self.handles.pop(slot, None)
        if old is not None:
            self.actors.kill(old)
        self.replaced[slot] += 1
        if self.replaced[slot] <= self.replacements:
            self._start(slot)

    def recheck(self, slot: int) -> None:
        """Ping a started actor again before giving it more work (a gang peer after a failed unit)."""
        if slot in self.ready:
            self.ready.discard(slot)
            self._refresh(slot)
            self._ping(slot)

    def shutdown(self) -> None:
        for handle in self.handles.values():
            self.actors.kill(handle)

    def _refresh(self, slot: int) -> None:
        """File `slot` under its level after a change to ready, reserved or busy."""
        busy = self.busy[slot]
        new = busy if busy < self.max_inflight and slot in self.ready and slot not in self.reserved else None
        old = self._level.get(slot)
        if new == old:
            return
        if old is not None:
            self._open[old].discard(slot)
            del self._level[slot]
        if new is not None:
            self._level[slot] = new
            self._open[new].add(slot)
            if slot not in self._in_heap[new]:
                self._in_heap[new].add(slot)
                heapq.heappush(self._heap[new], slot)

    def _lowest(self, level: int) -> int | None:
        """The lowest slot at `level`, or None."""
        heap, members = self._heap[level], self._open[level]
        while heap and heap[0] not in members:
            self._in_heap[level].discard(heapq.heappop(heap))
        return heap[0] if heap else None

    def _start(self, slot: int) -> None:
        self.handles[slot] = self.actors.start(slot)
        self._ping(slot)

    def _ping(self, slot: int) -> None:
        self.starting[self.actors.ping(self.handles[slot])] = slot
        self.since[slot] = self.clock()

    def _retry(self, unit, outcome: Outcome) -> Failed | None:
        self.tries[unit.unit_id] += 1
        if self.tries[unit.unit_id] < self.max_tries:
            self.queue.appendleft(unit)
            return None
        return Failed(unit, self.tries[unit.unit_id], outcome.error, outcome.trace)

    def _check_startup(self) -> None:
        if self.running or self.ready:
            self.idle_since = self.clock()
        elif self.clock() - self.idle_since > self.startup_timeout:
            raise ClusterError(f"no worker actor could start in {self.startup_timeout:.0f} s; does the cluster have "
                               f"the resources ({self.actors.resource}) for {self.workers} workers?")

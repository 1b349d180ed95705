"""The run's queue (runtime/scheduler.py) with fake actors whose calls end when a test says so: no Ray."""

from __future__ import annotations

import random
from dataclasses import dataclass

import pytest

from pipeline.errors import ClusterError
from pipeline.runtime.scheduler import Failed, Finished, Outcome, Scheduler, gang_size

OK = Outcome(value={"rows": 1})
LOST = Outcome(error="worker lost", trace="Traceback: lost", lost=True)


@dataclass(frozen=True)
class U:
    unit_id: str


class Handle:
    def __init__(self, slot: int, generation: int):
        self.slot, self.generation = slot, generation

    def __repr__(self):
        return f"Handle({self.slot}, {self.generation})"


class Future:
    def __init__(self, kind: str, handle: Handle, unit=None, peers=()):
        self.kind, self.handle, self.unit, self.peers = kind, handle, unit, list(peers)


class FakeActors:
    """Actors whose pings answer at once (unless a slot is told to hang) and whose calls end when `end` is called."""

    resource = "GPU"

    def __init__(self, hang: set[int] = frozenset()):
        self.hang = set(hang)
        self.generations: dict[int, int] = {}
        self.calls: list[Future] = []
        self.done: dict[Future, Outcome] = {}  # insertion order: the order calls ended
        self.killed: list[Handle] = []

    def start(self, slot):
        self.generations[slot] = self.generations.get(slot, 0) + 1
        return Handle(slot, self.generations[slot])

    def ping(self, handle):
        f = Future("ping", handle)
        if handle.slot not in self.hang:
            self.done[f] = Outcome(value="pong")
        return f

    def submit(self, handle, unit, peers, attempt=1):
        f = Future("unit", handle, unit, peers)
        self.calls.append(f)
        return f

    def wait(self, futures, num_returns, timeout):
        given = set(futures)
        return [f for f in self.done if f in given][:num_returns]

    def outcome(self, future):
        return self.done[future]

    def kill(self, handle):
        self.killed.append(handle)

    # What the tests use.
    def end(self, unit_id: str, outcome: Outcome = OK) -> Future:
        f = next(f for f in reversed(self.calls) if f.unit.unit_id == unit_id)
        assert f not in self.done, f"{unit_id} already ended"
        self.done[f] = outcome
        return f

    def answer(self, slot: int, outcome: Outcome = Outcome(value="pong")) -> None:
        """The pending ping of `slot` comes back."""
        self.hang.discard(slot)
        self.done[self.pings[slot]] = outcome

    def placed(self) -> list[tuple]:
        """(unit, leader slot, peer slots) of every call so far, in order."""
        return [(f.unit.unit_id, f.handle.slot, [h.slot for h in f.peers]) for f in self.calls]


def scheduler(units, workers, gangs=None, actors=None, **kw):
    actors = actors or FakeActors()
    pings: dict[int, Future] = {}
    real_ping = actors.ping

    def ping(handle):
        f = real_ping(handle)
        pings[handle.slot] = f
        return f

    actors.ping, actors.pings = ping, pings
    units = [U(u) for u in units]
    return Scheduler(units, actors, workers, gangs=gangs, **kw), actors


def drain(s: Scheduler, rounds: int = 3) -> list:
    """Step until nothing changes (calls that ended are taken, new units dispatched); the events."""
    events = []
    for _ in range(rounds):
        events += s.step(0)
    return events


def test_single_units_go_to_the_least_busy_lowest_slot_up_to_two_each():
    s, a = scheduler("abcdefg", 3)
    drain(s)
    assert a.placed() == [("a", 0, []), ("b", 1, []), ("c", 2, []), ("d", 0, []), ("e", 1, []), ("f", 2, [])]
    assert list(u.unit_id for u in s.queue) == ["g"]
    a.end("e")
    events = drain(s)
    assert [(type(e), e.unit.unit_id, e.value) for e in events] == [(Finished, "e", {"rows": 1})]
    assert a.placed()[-1] == ("g", 1, [])  # slot 1 had room first


def test_gang_is_reserved_whole_at_the_head_and_nothing_overtakes_it():
    s, a = scheduler(["a", "b", "g", "c", "d", "e"], 4, gangs={"g": 3})
    drain(s)
    # g needs 3 idle actors; only 2 and 3 are idle, so c waits behind it although 0 and 1 have room.
    assert a.placed() == [("a", 0, []), ("b", 1, [])]
    assert [u.unit_id for u in s.queue] == ["g", "c", "d", "e"]
    a.end("b")
    drain(s)
    assert a.placed()[2] == ("g", 1, [2, 3])  # the three lowest idle slots, taken at once
    assert s.reserved == {1, 2, 3}
    # The gang's actors get nothing else while it runs: c goes to slot 0 (its second unit), and
    # d waits although 2 and 3 have nothing in flight.
    assert a.placed()[3:] == [("c", 0, [])]
    assert [u.unit_id for u in s.queue] == ["d", "e"]
    a.end("g")
    drain(s)
    assert s.reserved == set()
    assert a.placed()[4:] == [("d", 1, []), ("e", 2, [])]


def test_two_gangs_never_hold_parts_of_each_other():
    s, a = scheduler(["g1", "g2", "x"], 4, gangs={"g1": 3, "g2": 3})
    drain(s)
    assert a.placed() == [("g1", 0, [1, 2])]  # g2 waits: one idle actor is not three
    assert [u.unit_id for u in s.queue] == ["g2", "x"]
    a.end("g1")
    drain(s)
    assert a.placed()[1:] == [("g2", 0, [1, 2]), ("x", 3, [])]


def test_retries_go_to_the_head_of_the_queue_and_the_third_failure_is_final():
    s, a = scheduler("abc", 1)
    drain(s)
    assert a.placed() == [("a", 0, []), ("b", 0, [])]
    boom = Outcome(error="boom", trace="Traceback: boom")
    for attempt in (1, 2):
        a.end("a", boom)
        assert drain(s) == []
        assert s.tries["a"] == attempt
        assert a.placed()[-1][0] == "a"  # back at the head: before c
        assert [u.unit_id for u in s.queue] == ["c"]
    a.end("a", boom)
    (event,) = drain(s)
    assert isinstance(event, Failed)
    assert (event.unit.unit_id, event.tries, event.error, event.trace) == ("a", 3, "boom", "Traceback: boom")
    assert a.placed()[-1][0] == "c"
    a.end("b")
    a.end("c")
    assert [type(e) for e in drain(s)] == [Finished, Finished]
    assert not s.pending


def test_tries_are_a_setting():
    s, a = scheduler("a", 1, tries=1)
    drain(s)
    a.end("a", Outcome(error="boom"))
    (event,) = drain(s)
    assert isinstance(event, Failed) and event.tries == 1


def test_a_lost_actor_is_replaced_once_and_its_units_spend_no_try():
    s, a = scheduler("abcd", 2)
    drain(s)
    assert a.placed() == [("a", 0, []), ("b", 1, []), ("c", 0, []), ("d", 1, [])]
    old = s.handles[0]
    a.end("a", LOST)
    assert drain(s, 1) == []
    assert s.lost == 1 and a.killed == [old] and s.handles[0].generation == 2
    assert s.tries["a"] == 0 and s.losses["a"] == 1 and [u.unit_id for u in s.queue] == ["a"]
    drain(s, 1)  # the new actor answers its ping and takes a; c still counts against the slot
    assert a.placed()[4:] == [("a", 0, [])] and a.calls[4].handle.generation == 2
    a.end("c", LOST)  # the old actor's other unit: lost too, but the slot is not replaced again
    drain(s)
    assert s.lost == 2 and a.killed == [old] and s.handles[0].generation == 2
    assert s.tries["c"] == 0 and s.losses["c"] == 1
    assert a.placed()[5:] == [("c", 0, [])] and a.calls[5].handle.generation == 2


def lose(a: FakeActors, s: Scheduler, slot: int) -> None:
    """Every call running on the actor of `slot` ends: the actor is gone."""
    for f in a.calls:
        if f.handle.slot == slot and f not in a.done:
            a.done[f] = LOST


def test_work_goes_only_to_started_actors_and_a_slot_is_replaced_every_time():
    s, a = scheduler([f"u{i}" for i in range(20)], 2, actors=FakeActors(hang={1}), tries=1)
    drain(s)
    assert a.placed() == [("u0", 0, []), ("u1", 0, [])]  # slot 1 has not answered its ping
    a.answer(1)
    drain(s)
    assert a.placed()[2:] == [("u2", 1, []), ("u3", 1, [])]
    for k in range(1, 5):
        lose(a, s, 1)
        drain(s)
        assert s.replaced[1] == k and s.handles[1].generation == k + 1 and a.calls[-1].handle is s.handles[1]
    assert s.lost == 8 and not s.tries  # two units in flight each time; one try each, none spent
    for _ in range(100):
        if not s.pending:
            break
        for f in a.calls:
            if f not in a.done:
                a.done[f] = OK
        drain(s, 1)
    assert not s.pending and len(s.done) == 20


def test_a_lost_gang_peer_is_replaced_and_the_unit_still_counts():
    s, a = scheduler(["g", "x"], 3, gangs={"g": 3})
    drain(s)
    assert a.placed() == [("g", 0, [1, 2])]
    a.end("g", Outcome(value={"rows": 1}, lost_peers=(1,)))
    events = drain(s, 1)
    assert [type(e) for e in events] == [Finished]
    assert s.lost == 1 and s.handles[2].generation == 2 and s.handles[1].generation == 1


def test_peers_of_a_failed_gang_unit_are_pinged_before_more_work():
    s, a = scheduler(["g", "x", "y"], 3, gangs={"g": 3})
    drain(s)
    a.hang = {1, 2}  # the peers' new pings do not come back yet
    a.end("g", Outcome(error="boom"))
    drain(s)
    assert s.ready == {0} and set(s.starting.values()) == {1, 2}
    # The retried gang counts its peers (within their start grace) and waits for them; x waits behind it.
    assert a.placed() == [("g", 0, [1, 2])]
    a.answer(1)
    a.answer(2)
    drain(s)
    assert a.placed()[1] == ("g", 0, [1, 2])


def test_a_gang_larger_than_the_live_pool_shrinks_to_it():
    now = [0.0]
    s, a = scheduler(["g", "x"], 3, gangs={"g": 8}, actors=FakeActors(hang={2}), clock=lambda: now[0], start_grace=60)
    drain(s)
    # Capped at the 3 actors expected (slot 2 is still within its start grace): it waits for it.
    assert a.placed() == [] and s.gang(s.queue[0]) == 3
    now[0] = 61.0  # slot 2 is past its grace: the gang takes the two started actors
    drain(s)
    assert a.placed() == [("g", 0, [1])]


def test_nothing_starting_for_the_startup_timeout_is_an_error_naming_the_resource():
    now = [0.0]
    s, a = scheduler("a", 4, actors=FakeActors(hang={0, 1, 2, 3}), clock=lambda: now[0], startup_timeout=600)
    drain(s)
    now[0] = 599.0
    drain(s)
    now[0] = 601.0
    with pytest.raises(ClusterError, match=r"no worker actor could start in 600 s; .*\(GPU\) for 4 workers"):
        s.step(0)


def test_a_ping_that_fails_without_losing_the_actor_is_an_error():
    s, a = scheduler("a", 1, actors=FakeActors(hang={0}))
    a.answer(0, Outcome(error="cannot import torch"))
    with pytest.raises(ClusterError, match="worker actor 0 failed to start: cannot import torch"):
        s.step(0)


def test_shutdown_kills_every_actor():
    s, a = scheduler("ab", 3)
    drain(s)
    s.shutdown()
    assert sorted(h.slot for h in a.killed) == [0, 1, 2]


def _random_run(seed: int, workers: int = 6, units: int = 60):
    """A run whose calls end in an order drawn from `seed`, with errors, losses and gangs."""
    rng = random.Random(seed)
    ids = [f"u{i:02d}" for i in range(units)]
    gangs = {u: rng.choice([1, 1, 1, 2, 3]) for u in ids}
    s, a = scheduler(ids, workers, gangs=gangs)
    events, seen = [], 0
    while s.pending:
        events += s.step(0)
        running = [f for f in a.calls if f not in a.done]
        if running:
            f = rng.choice(running)
            r = rng.random()
            a.done[f] = LOST if r < 0.05 else Outcome(error="boom") if r < 0.15 else OK
        seen += 1
        assert seen < 10_000
    return a.placed(), [(type(e).__name__, e.unit.unit_id) for e in events], s


def test_the_same_completions_give_the_same_dispatches():
    placed, events, s = _random_run(7)
    again, events_again, _ = _random_run(7)
    assert placed == again and events == events_again
    assert len({u for _, u in events}) == 60  # every unit ended once, finished or failed
    assert placed != _random_run(8)[0]


@pytest.mark.parametrize("seed", range(5))
def test_dispatch_follows_the_rules_at_every_call(seed):
    """Every call, checked against the state it was made in, with the rules computed here from scratch."""
    rng = random.Random(seed)
    ids = [f"u{i:02d}" for i in range(80)]
    gangs = {u: rng.choice([1, 1, 2, 4]) for u in ids}
    s, a = scheduler(ids, 5, gangs=gangs)
    checked = turns = 0
    while s.pending:
        turns += 1
        assert turns < 10_000, "the run does not end"
        s.poll()
        before = len(a.calls)
        ready, reserved, busy = set(s.ready), set(s.reserved), {x: s.busy[x] for x in range(5)}
        expected = len(ready) + len(s.starting)  # everything starting is within its grace here
        queue = [u.unit_id for u in s.queue]
        s.dispatch()
        for f in a.calls[before:]:
            unit = queue.pop(0)
            assert f.unit.unit_id == unit  # in queue order: nothing overtakes
            free = sorted(ready - reserved)
            g = min(gangs[unit], max(expected, 1))
            if g == 1:
                want = min((x for x in free if busy[x] < 2), key=lambda x: (busy[x], x))
                assert (f.handle.slot, f.peers) == (want, [])
                busy[want] += 1
            else:
                idle = [x for x in free if busy[x] == 0][:g]
                assert [f.handle.slot] + [h.slot for h in f.peers] == idle and len(idle) == g
                assert f.peers == [s.handles[x] for x in idle[1:]]
                reserved |= set(idle)
                busy[idle[0]] += 1
            checked += 1
        if queue:  # the head could not go: no room for it under the rules
            g = min(gangs[queue[0]], max(expected, 1))
            free = ready - reserved
            room = [x for x in free if busy[x] < 2] if g == 1 else [x for x in free if busy[x] == 0]
            assert len(room) < g
        running = [f for f in a.calls if f not in a.done]
        if running:
            a.done[rng.choice(running)] = LOST if rng.random() < 0.05 else OK
        for f in list(s.running):
            if f in a.done:
                s.finish(f)
    assert checked >= 80


def test_gang_size_rule():
    assert gang_size(1, "rdc", 8, 2) == 1
    assert gang_size(4, "rdc", 3, 10) == 3  # never more than the pool
    assert gang_size("auto", "rdc", 8, 20) == 1  # units fill the pool: data parallelism
    assert gang_size("auto", "rdc", 8, 2) == 4  # two units on eight workers: gangs of four
    assert gang_size("auto", "mi", 3, 1) == 3
    assert gang_size("auto", "plain", 8, 1) == 1  # one cell: nothing to shard


def test_bench_scheduler_accounts_for_every_unit():
    from pipeline.bench.scheduler import bench_scheduler, format_scheduler, sim_units

    units = sim_units(2000, (1, 2, 4, 8))
    assert [u.gang for u in units[::500]] == [1, 2, 4, 8]
    broken = sum(u.broken for u in units)
    r = bench_scheduler(units=2000, actors=64)
    assert r["done"] + r["failed"] == 2000
    assert r["failed"] >= broken  # a broken unit fails every try; others may fail three times by chance
    assert r["calls"] >= 2000 + 2 * broken and r["retries"] == r["calls"] - 2000
    assert r["lost"] >= 1 and 0 < r["utilisation"] <= 1
    assert r["driver_s_per_unit"] > 0 and 0 < r["driver_cpu_s"] <= r["cpu_s"] and r["peak_bytes"] > 0
    assert format_scheduler(r)[0].startswith("2,000 units over 64 simulated actors")


class Clock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


def test_a_unit_past_its_deadline_is_taken_back_its_actor_replaced_and_it_spends_a_try():
    clock = Clock()
    s, a = scheduler("ab", 2, deadline=lambda u: 10.0 if u.unit_id == "a" else None, clock=clock)
    drain(s)
    assert a.placed() == [("a", 0, []), ("b", 1, [])]
    clock.t = 10.0
    assert drain(s) == [] and s.timed_out == 0  # at the deadline, not past it
    old = s.handles[0]
    clock.t = 10.5
    drain(s)  # the hung call never ends; a goes back at once, to the live actor
    assert s.timed_out == 1 and a.killed == [old] and s.tries["a"] == 1 and s.handles[0].generation == 2
    assert a.placed()[-1] == ("a", 1, [])
    a.end("a")
    a.end("b")  # b has no deadline
    assert sorted(e.unit.unit_id for e in drain(s) if isinstance(e, Finished)) == ["a", "b"]
    assert not s.pending and s.attempts == {"a": 2, "b": 1}


def test_a_unit_that_keeps_hanging_fails_at_its_last_try():
    clock = Clock()
    s, a = scheduler("a", 1, tries=2, deadline=lambda u: 1.0, clock=clock)
    events = []
    for t in (0, 2, 4, 6):
        clock.t = t
        events += drain(s)
    (event,) = events
    assert isinstance(event, Failed) and event.tries == 2 and "deadline of 1 s" in event.error
    assert s.timed_out == 2 and not s.pending


def test_a_unit_survives_node_losses_and_fails_only_after_taking_down_many():
    s, a = scheduler("a", 1, losses=4)
    for k in range(3):
        drain(s)
        a.end("a", LOST)
    drain(s)
    a.end("a")
    (event,) = drain(s)
    assert isinstance(event, Finished) and s.losses["a"] == 3 and not s.tries and s.attempts["a"] == 4
    s, a = scheduler("a", 1, losses=2)
    events = []
    for _ in range(2):
        drain(s)
        a.end("a", LOST)
        events += drain(s)
    (event,) = events
    assert isinstance(event, Failed) and "2 actors lost" in event.error


def test_a_straggler_gets_one_copy_on_an_idle_actor_and_the_first_to_end_wins():
    clock = Clock()
    s, a = scheduler("ab", 2, speculate=True, clock=clock, inflight=1)
    drain(s)
    assert a.placed() == [("a", 0, []), ("b", 1, [])]
    a.end("b")
    assert [e.unit.unit_id for e in drain(s)] == ["b"]
    assert a.placed()[2:] == [("a", 1, [])] and s.copies == 1  # one copy only, on the idle actor
    a.end("a")  # the copy ends first
    (event,) = drain(s)
    assert isinstance(event, Finished) and not s.pending and s.orphans  # the original runs on unwatched
    a.done[a.calls[0]] = Outcome(error="commit refused")
    assert drain(s) == [] and not s.orphans and s.busy[0] == 0 and not s.tries


def test_the_pool_grows_when_asked_and_new_slots_take_work():
    s, a = scheduler([f"u{i}" for i in range(6)], 1)
    drain(s)
    assert {slot for _, slot, _ in a.placed()} == {0}
    s.grow(3)
    drain(s)
    assert {slot for _, slot, _ in a.placed()} == {0, 1, 2} and s.workers == 3 and len(a.placed()) == 6
    s.grow(2)  # never shrinks
    assert s.workers == 3


def test_a_deadline_counts_from_when_the_call_ahead_ends_and_a_killed_actors_other_unit_spends_nothing():
    clock = Clock()
    s, a = scheduler("abc", 1, deadline=lambda u: 10.0, clock=clock)
    drain(s)
    assert a.placed() == [("a", 0, []), ("b", 0, [])]
    clock.t = 8.0
    a.end("a")
    drain(s)  # b starts now, at 8; c is dispatched behind it
    clock.t = 17.0
    assert not s.timed_out
    clock.t = 18.5
    drain(s, 1)
    assert s.timed_out == 1 and s.tries["b"] == 1 and not s.tries["c"]
    assert [u.unit_id for u in s.queue] in (["b", "c"], []) and s.requeued == 2


def test_a_fatal_error_fails_the_unit_at_once():
    s, a = scheduler("ab", 1)
    drain(s)
    a.end("a", Outcome(error="no usable AWS credentials", fatal=True))
    (event,) = drain(s)
    assert isinstance(event, Failed) and event.tries == 1 and "credentials" in event.error
    assert a.placed().count(("a", 0, [])) == 1

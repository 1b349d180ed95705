"""The run folder's lease on a fake clock: who holds it, when it expires, who takes it over, and
what a lease document written by someone else (or by a careless hand) may and may not do.

The conditional backends run on an in-memory file system (fast) and on the loopback S3 server
(the slow tier); tests/test_store_trust.py keeps one test per backend with a real holder process
that is killed.
"""

from __future__ import annotations

import json
import os
import time
import uuid

import pytest
from typer.testing import CliRunner

from pipeline.cli import app
from pipeline.errors import LeaseHeldError, LeaseLostError
from pipeline.store import Store
from pipeline.store.io import Version
from pipeline.store.lease import MAX_TTL, RunLease, current_holder, expiry, renewal

TTL = 600.0  # renewal thread every 200 s of real time: it never runs within a test


class FakeClock:
    """Wall and monotonic time that move only when slept on or advanced. It starts in 2001, before
    any time a store gives its files, so that only what the lease observes itself counts."""

    def __init__(self, start: float = 978307200.0):
        self.now, self.mono, self.slept = start, 0.0, 0.0

    def time(self) -> float:
        return self.now

    def monotonic(self) -> float:
        return self.mono

    def sleep(self, seconds: float) -> None:
        self.advance(seconds)

    def advance(self, seconds: float) -> None:
        self.now += seconds
        self.mono += seconds
        self.slept += seconds


@pytest.fixture(params=["memory", pytest.param("s3", marks=pytest.mark.slow)])
def store(request) -> Store:
    if request.param == "memory":
        return Store(f"memory://lease-{uuid.uuid4().hex[:12]}")
    server = request.getfixturevalue("s3_server")
    bucket = request.getfixturevalue("s3_bucket")
    return Store(f"{bucket}/out", storage_options=server.storage_options)


def _lease(store, clock, **kw) -> RunLease:
    return RunLease(store, "r", ttl=kw.pop("ttl", TTL), clock=clock, **kw)


def test_a_renewed_lease_is_kept_and_a_stopped_one_taken_over(store):
    clock = FakeClock()
    a = _lease(store, clock).acquire()
    b = _lease(store, clock)
    with pytest.raises(LeaseHeldError) as err:
        b.acquire()
    assert f"pid {os.getpid()}" in str(err.value) and "(in 600 s)" in str(err.value)
    for _ in range(3):  # renewed within every period: held for three of them
        clock.advance(0.9 * TTL)
        a.renew()
        with pytest.raises(LeaseHeldError):
            b.acquire()
    clock.advance(TTL + 1)  # a stopped renewing
    b.acquire()
    assert not a.lost
    a.renew()  # a learns it at its next renewal
    assert a.lost
    with pytest.raises(LeaseLostError, match="was taken over by another driver"):
        a.check()
    a.release()  # never removes the new holder's lease
    assert json.loads(store.read_bytes("r/lease.json"))["token"] == b.token
    assert current_holder(store, "r", clock=clock)["pid"] == os.getpid()
    b.release()
    assert current_holder(store, "r", clock=clock) is None
    _lease(store, clock).acquire().release()  # released: free at once


def test_a_lost_lease_names_its_taker_even_after_the_takers_lease_ended(store):
    """The driver stops after its units in flight; by then the lease that took its place may have
    ended too. The message still names the taker, as read when the loss was found."""
    clock = FakeClock()
    a = _lease(store, clock).acquire()
    clock.advance(TTL + 1)
    b = _lease(store, clock).acquire()
    a.renew()
    taker = current_holder(store, "r", clock=clock)
    assert a.lost and taker["since"]
    clock.advance(3 * TTL)  # b stops renewing as well
    a.renew()  # a lost lease is not renewed again, nor its taker read again
    assert current_holder(store, "r", clock=clock) is None
    with pytest.raises(LeaseLostError) as err:
        a.check()
    assert f"pid {taker['pid']}, since {taker['since']}" in str(err.value) and "?" not in str(err.value)
    b.release()


def test_a_waiting_driver_takes_over_after_one_time_to_live_without_sleeping(store):
    clock = FakeClock()
    dead = _lease(store, clock).acquire()
    dead._stop.set()  # its renewals end, as when its process is killed
    start = time.monotonic()
    waiter = _lease(store, clock, wait=3 * TTL).acquire()
    # The wait is on the fake clock (TTL = 600 s of it); the real seconds only have to stay far
    # below that: an S3 round trip per poll takes seconds on a loaded 2-core machine.
    assert TTL <= clock.slept <= TTL + 2 and time.monotonic() - start < TTL / 5
    assert json.loads(store.read_bytes("r/lease.json"))["token"] == waiter.token
    waiter.release()


def test_of_two_drivers_taking_over_one_stale_lease_one_wins(store):
    clock = FakeClock()
    _lease(store, clock).acquire()._stop.set()
    first, second = _lease(store, clock), _lease(store, clock)
    for lease in (first, second):
        with pytest.raises(LeaseHeldError):
            lease.acquire()
    clock.advance(TTL + 1)
    first.acquire()
    with pytest.raises(LeaseHeldError):  # its take-over was conditional on the version both read
        second.acquire()
    first.release()


# -- lease documents that are not what a driver writes --------------------------------------------

UNREADABLE = {
    "expires soon": {"host": "h", "pid": 1, "expires": "soon"},
    "expires null": {"host": "h", "pid": 1, "expires": None},
    "expires true": {"host": "h", "pid": 1, "expires": True},
    "no expires": {"host": "h", "pid": 1},
    "a list": [1, 2],
    "not json": b"{\"host\": ",
    "Infinity": b'{"host": "h", "pid": 1, "expires": Infinity}',
    "NaN": b'{"host": "h", "pid": 1, "expires": NaN}',
    "binary": bytes(range(256)),
}


def _put(store: Store, doc) -> None:
    data = doc if isinstance(doc, bytes) else json.dumps(doc).encode()
    store.create_exclusive("r/lease.json", data)


@pytest.mark.parametrize("case", sorted(UNREADABLE))
def test_an_unreadable_lease_counts_as_expired(store, case):
    clock = FakeClock()
    _put(store, UNREADABLE[case])
    assert current_holder(store, "r", clock=clock) is None
    lease = _lease(store, clock).acquire()  # taken over at once
    assert json.loads(store.read_bytes("r/lease.json"))["token"] == lease.token
    lease.release()


@pytest.mark.parametrize("case", ["expires 1e300", "holder a day ahead", "ttl 1e300"])
def test_a_lease_from_the_future_expires_one_time_to_live_after_it_was_written(store, case):
    clock = FakeClock()
    doc = {"host": "ahead", "pid": 7, "since": "2001-01-02T00:00:00Z", "renewed": "2001-01-02T00:00:00Z",
           "token": "theirs", **{"expires 1e300": {"expires": 1e300},
                                 "holder a day ahead": {"expires": clock.now + 86400 + 60, "ttl": 60},
                                 "ttl 1e300": {"expires": 1e300, "ttl": 1e300}}[case]}
    _put(store, doc)
    ttl = 60.0
    lease = _lease(store, clock, ttl=ttl)
    with pytest.raises(LeaseHeldError) as err:
        lease.acquire()
    text = str(err.value)
    limit = MAX_TTL if case == "ttl 1e300" else ttl
    assert f"(in {limit:.0f} s)" in text and "host ahead, pid 7" in text
    assert "delete" in text and store.join("r/lease.json") in text  # how to clear a stuck one
    clock.advance(limit + 1)
    lease.acquire()
    assert json.loads(store.read_bytes("r/lease.json"))["token"] == lease.token
    lease.release()


def test_expiry_caps_the_holders_word_at_renewal_plus_its_time_to_live():
    v = Version("t", modified=1000.0)
    assert expiry({"expires": 1e300, "ttl": 60}, renewal(v, 5000.0), 30) == 1061.0  # the store's time
    assert expiry({"expires": 1e300, "ttl": 60}, renewal(v, 500.0), 30) == 560.0  # first seen earlier
    assert expiry({"expires": 1e300}, 500.0, 30) == 530.0  # no ttl declared: the reader's
    assert expiry({"expires": 520.0, "ttl": 60}, 500.0, 30) == 520.0  # the holder's word when sooner
    assert expiry({"expires": 1e300, "ttl": 1e300}, 0.0, 30) == MAX_TTL
    for bad in ({"expires": "soon"}, {"expires": None}, {"expires": float("inf")}, {}, None):
        assert expiry(bad, 500.0, 30) is None


# -- the commands, on S3, with a bad lease in the folder ------------------------------------------


@pytest.mark.parametrize("doc", [{"host": "h", "pid": 1, "expires": "soon"}, {"host": "h", "pid": 1, "expires": None}],
                         ids=["soon", "null"])
def test_run_and_status_take_an_unreadable_s3_lease_for_expired(doc, s3_server, s3_bucket, cnn, tmp_path, monkeypatch):
    from pipeline.config.job import load_job
    from pipeline.runtime.plan import plan, plan_document
    from pipeline.runtime.worker import Worker, WorkerContext

    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server.endpoint_url)
    out = f"{s3_bucket}/out"
    spec = tmp_path / "job.toml"
    spec.write_text(f'name = "lease"\n[data]\ndataset = "digits"\nlimit = 2\nshard_size = 2\n'
                    f'[[defenses]]\nkind = "plain"\nmodel = "{cnn}"\n[[attacks]]\nkind = "pgd"\nsteps = 1\neps = 0.1\n')
    job = load_job(spec)
    (unit,) = plan(job, 355)
    store = Store(out)
    store.write_json("r/plan.json", plan_document(job, [unit], "r"))
    Worker("w0", "cpu").run_unit(unit, WorkerContext(run_id="r", job_hash=job.hash, out=out, seed=job.spec.seed,
                                                     data=job.spec.data))
    store.write_json("r/lease.json", doc)
    runner = CliRunner()
    status = runner.invoke(app, ["status", f"{out}/r"])
    assert status.exit_code == 0 and status.exception is None, status.output
    assert json.loads(status.output)["driver"] is None and json.loads(status.output)["done"] == 1
    run = runner.invoke(app, ["run", str(spec), "--out", out, "--run-id", "r", "--no-report"])
    assert run.exit_code == 0 and run.exception is None, run.output  # every unit done: no cluster needed
    assert not store.exists("r/lease.json")  # taken over, then released

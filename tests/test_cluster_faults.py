"""What a real cluster does to a run, on a multi-node Ray cluster on loopback (`Cluster`: a head
that offers no CPU, worker nodes of one CPU started without any AWS variable): a hung actor, S3
credentials only in the driver, a node that joins, nodes that die under a unit, a late commit.
Each test checks that every example has exactly one row, and which attempt, on which node,
committed it. Units are tiny (the `cnn` fixture, no attack) so that the time is Ray's."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import pytest
import ray
from ray.cluster_utils import Cluster

from pipeline.config.job import parse_job
from pipeline.config.run import RunOptions
from pipeline.runtime import plan, run_job
from pipeline.runtime.faults import ENV
from pipeline.store import Store
from pipeline.store.adversarial import adversarial_path

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]
AWS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3",
       "AWS_DEFAULT_REGION", "AWS_REGION")


@contextmanager
def no_aws():
    """Processes started inside (Ray nodes and their workers) see no AWS variable."""
    saved = {k: os.environ.pop(k) for k in AWS if k in os.environ}
    try:
        yield
    finally:
        os.environ.update(saved)


def add_node(cluster: Cluster):
    with no_aws():
        node = cluster.add_node(num_cpus=1)
    cluster.wait_for_nodes()
    return node


@pytest.fixture(scope="module")
def nodes():
    """A head with no CPU for workers and two worker nodes of one CPU; this module's Ray
    connection (a session cluster the process was connected to is rejoined after)."""
    previous = ray.get_runtime_context().gcs_address if ray.is_initialized() else None
    if previous:
        ray.shutdown()
    with no_aws():
        cluster = Cluster(initialize_head=True, head_node_args={
            "num_cpus": 0, "include_dashboard": False,
            # A paused raylet fails its health checks by timing out, not by refusing: a short
            # timeout has a paused node declared dead in seconds.
            "_system_config": {"health_check_initial_delay_ms": 0, "health_check_period_ms": 500,
                               "health_check_timeout_ms": 1000, "health_check_failure_threshold": 4}})
    for _ in range(2):
        add_node(cluster)
    ray.init(address=cluster.address, logging_level="ERROR", log_to_driver=False)
    try:
        yield cluster
    finally:
        ray.shutdown()
        cluster.shutdown()
        if previous:
            ray.init(address=previous, logging_level="ERROR", log_to_driver=False)


def job(cnn, limit=8, shard=2):
    return parse_job({"name": "faults", "seed": 1, "data": {"dataset": "digits", "split": "test", "limit": limit,
                                                            "shard_size": shard},
                      "defenses": [{"kind": "plain", "model": cnn}], "attacks": [{"kind": "none"}]})


def faults(monkeypatch, folder: Path, **plan_) -> None:
    monkeypatch.setenv(ENV, json.dumps({"dir": str(folder), **plan_}))


def committed(uri: str, store_options=None, endpoint_url=None, limit=8):
    """The records, after checking that each example has exactly one row (none lost, none twice)."""
    table = Store(uri, endpoint_url=endpoint_url).read_records(columns=["example_id", "unit_id", "node", "attempt"])
    ids = sorted(table.column("example_id").to_pylist())
    assert ids == list(range(limit)), ids
    return table


def wait_for(predicate, timeout=120.0):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.1)


def test_a_hung_actor_loses_its_unit_at_the_deadline_and_the_run_ends(nodes, cnn, tmp_path, monkeypatch):
    j = job(cnn)
    hung = plan(j, 355)[0].unit_id
    faults(monkeypatch, tmp_path, stop_once=[hung])  # SIGSTOP before the commit: alive to Ray, answers nothing
    t0 = time.monotonic()
    result = run_job(j, RunOptions(out=str(tmp_path / "out"), workers=2, unit_timeout=5), progress=False)
    wall = time.monotonic() - t0
    assert result.ok and result.done == 4 and result.timed_out == 1 and result.replaced == 1 and not result.failed
    table = committed(result.uri)
    attempts = dict(zip(table.column("unit_id").to_pylist(), table.column("attempt").to_pylist()))
    assert attempts[hung] == 2  # (the unit queued behind it on that actor may be on its second too)
    print(f"FAULT hung actor: units redone 1, wall {wall:.1f} s")


def test_a_hung_actor_without_unit_timeout_loses_its_unit_at_the_cost_model_deadline(nodes, cnn, tmp_path, monkeypatch):
    j = job(cnn)
    hung = plan(j, 355)[0].unit_id
    faults(monkeypatch, tmp_path, stop_once=[hung])
    # No --unit-timeout: once a unit has committed, the others get 4 x predicted x measured rate,
    # at least the floor (5 s here: a real unit's first call, model load included, takes well under it).
    t0 = time.monotonic()
    result = run_job(j, RunOptions(out=str(tmp_path / "out"), workers=2, deadline_floor=5), progress=False)
    wall = time.monotonic() - t0
    assert result.ok and result.done == 4 and result.timed_out == 1 and result.replaced == 1 and not result.failed
    table = committed(result.uri)
    attempts = dict(zip(table.column("unit_id").to_pylist(), table.column("attempt").to_pylist()))
    assert attempts[hung] == 2
    print(f"FAULT hung actor, cost-model deadline: units redone 1, wall {wall:.1f} s")


def test_run_address_with_s3_output_and_credentials_only_in_the_driver(nodes, cnn, tmp_path, s3_server, s3_bucket):
    @ray.remote(num_cpus=1)
    def worker_key():
        return os.environ.get("AWS_ACCESS_KEY_ID")

    assert os.environ.get("AWS_ACCESS_KEY_ID") and ray.get(worker_key.remote()) is None  # the nodes have none
    t0 = time.monotonic()
    result = run_job(job(cnn), RunOptions(out=s3_bucket, workers=2, address=nodes.address,
                                          endpoint_url=s3_server.endpoint_url), progress=False)
    assert result.ok and result.done == 4 and result.rows == 8
    committed(result.uri, endpoint_url=s3_server.endpoint_url)
    print(f"FAULT credentials only in the driver: units redone 0, wall {time.monotonic() - t0:.1f} s")


def test_bench_scheduler_through_ray_accounts_for_every_unit(nodes):
    from pipeline.bench.scheduler import bench_scheduler_ray, format_scheduler_ray

    r = bench_scheduler_ray(units=100, actors=2)
    assert r["done"] == 100 and r["cpu_s"] > 0 and r["units_per_s"] > 0
    assert "units/s" in format_scheduler_ray(r)[0]



def test_stop_ends_with_one_line_saying_how_to_resume_and_exit_1(nodes, cnn, tmp_path, monkeypatch):
    import signal
    import subprocess
    import sys

    j = job(cnn)
    faults(monkeypatch, tmp_path, slow={u.unit_id: 1.0 for u in plan(j, 355)})
    (tmp_path / "job.toml").write_text(
        f'name = "faults"\nseed = 1\n[data]\ndataset = "digits"\nsplit = "test"\nlimit = 8\nshard_size = 2\n'
        f'[[defenses]]\nkind = "plain"\nmodel = "{cnn}"\n[[attacks]]\nkind = "none"\n')
    proc = subprocess.Popen([sys.executable, "-m", "pipeline.cli", "run", str(tmp_path / "job.toml"), "--out",
                             str(tmp_path / "out"), "--address", nodes.address, "--workers", "1", "--no-report"],
                            stderr=subprocess.PIPE, text=True)
    wait_for(lambda: any(tmp_path.glob("running-*")))
    proc.send_signal(signal.SIGTERM)  # what `ray job stop` and Kubernetes send
    _, err = proc.communicate(timeout=120)
    text = " ".join(err.split())
    assert proc.returncode == 1, err
    assert "stopped (SIGTERM)" in text and "run the same `robustsweep run` command again" in text
    assert "Traceback" not in err

def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# `connect` in a fresh process (this module's own holds a Ray connection, and connect keeps one it finds):
# prints "connecting", then "joined" or the error's type, the seconds connect took and the message.
CONNECT = """
import sys, time
from pipeline.runtime.run import connect
print("connecting", flush=True)
t0 = time.monotonic()
try:
    connect(sys.argv[1], budget=float(sys.argv[2]))
    print("joined", flush=True)
except Exception as exc:
    print(type(exc).__name__, round(time.monotonic() - t0, 1), exc, flush=True)
"""


def test_a_ray_client_address_is_retried_until_its_server_is_up(nodes):
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-c", CONNECT, f"ray://127.0.0.1:{port}", "60"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    server = None
    try:
        assert proc.stdout.readline().strip() == "connecting"
        time.sleep(3)  # not a wait for anything: the server comes up after connect's first tries were refused
        server = subprocess.Popen([sys.executable, "-m", "ray.util.client.server", "--address", nodes.address, "--host",
                                   "127.0.0.1", "--port", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0 and out.strip() == "joined", (out, err)
    finally:
        proc.kill()
        if server is not None:
            server.terminate()
            server.wait(timeout=30)


def test_a_ray_client_address_with_nothing_listening_is_unreachable_within_the_budget():
    address = f"ray://127.0.0.1:{free_port()}"
    out = subprocess.run([sys.executable, "-c", CONNECT, address, "3"], capture_output=True, text=True, timeout=120).stdout
    name, seconds, message = out.splitlines()[1].split(" ", 2)
    # Within the budget (the last backoff that would overrun it is not slept), plus one bounded try at most.
    assert name == "ClusterUnreachableError" and float(seconds) < 3 + 5, out
    assert message.startswith(f"cannot join the Ray cluster at {address} (--address): ConnectionRefusedError"), message


def test_run_with_an_unreachable_ray_client_address_exits_1_with_one_line(cnn, tmp_path):
    address = f"ray://127.0.0.1:{free_port()}"
    (tmp_path / "job.toml").write_text(
        f'name = "faults"\nseed = 1\n[data]\ndataset = "digits"\nsplit = "test"\nlimit = 2\nshard_size = 2\n'
        f'[[defenses]]\nkind = "plain"\nmodel = "{cnn}"\n[[attacks]]\nkind = "none"\n')
    proc = subprocess.run([sys.executable, "-m", "pipeline.cli", "run", str(tmp_path / "job.toml"), "--out",
                           str(tmp_path / "out"), "--address", address, "--no-report"], capture_output=True, text=True,
                          timeout=120, env={**os.environ, "ROBUSTSWEEP_RAY_RETRY_SECONDS": "2"})
    text = " ".join(proc.stderr.split())
    assert proc.returncode == 1, proc.stderr
    assert text.startswith("error: no Ray cluster answers at 127.0.0.1:") and f"(--address {address})" in text, text
    assert "Traceback" not in proc.stderr


class Background:
    """run_job in a thread (Ray's test cluster adds and removes nodes only from the main thread)."""

    def __init__(self, *args):
        self.result, self.error = None, None
        self.thread = threading.Thread(target=self._run, args=args)
        self.t0 = time.monotonic()
        self.thread.start()

    def _run(self, *args):
        try:
            self.result = run_job(*args, progress=False)
        except BaseException as exc:  # handed to the test
            self.error = exc

    def join(self):
        self.thread.join(timeout=240)
        if self.error is not None:
            raise self.error
        return self.result, time.monotonic() - self.t0


def test_a_node_that_joins_mid_run_gets_an_actor(nodes, cnn, tmp_path, monkeypatch):
    j = job(cnn, limit=16)
    units = plan(j, 355)
    # Units wait until released: 4 held by the two first actors (2 in flight each), 4 queued for the newcomer.
    faults(monkeypatch, tmp_path, hold=[u.unit_id for u in units])
    run = Background(j, RunOptions(out=str(tmp_path / "out")))  # no --workers: the pool follows the cluster
    added = None
    try:
        wait_for(lambda: any(tmp_path.glob("running-*")))
        added = add_node(nodes)
        wait_for(lambda: any(tmp_path.glob(f"running-*-{added.node_id}-*")))  # the new node's actor took a unit
        (tmp_path / "release").touch()
        result, wall = run.join()
        assert result.ok and result.done == len(units) and result.workers == 3
        table = committed(result.uri, limit=16)
        assert added.node_id in set(table.column("node").to_pylist())
        print(f"FAULT node joins: units redone 0, wall {wall:.1f} s")
    finally:
        (tmp_path / "release").touch()
        run.thread.join(timeout=240)
        if added is not None:
            nodes.remove_node(added)


def test_a_late_write_from_a_node_declared_dead_is_refused(nodes, cnn, tmp_path, monkeypatch):
    """The unit's first attempt is held on node A; A's raylet is paused (SIGSTOP) until the GCS
    declares the node dead; the driver requeues the unit and it commits on another node. Then the
    held worker, which was never stopped, is let go: it reaches its commit and is refused, and the
    committed files keep the second attempt's bytes."""
    from ray._private import ray_constants

    j = job(cnn, limit=2)
    (unit,) = plan(j, 355)
    faults(monkeypatch, tmp_path, hold_once=[unit.unit_id], after_commit=True)
    run = Background(j, RunOptions(out=str(tmp_path / "out"), workers=1))
    paused, raylet = None, None
    try:
        wait_for(lambda: any(tmp_path.glob("running-*")))
        marker = next(tmp_path.glob("running-*")).name
        paused = next(n for n in nodes.worker_nodes if n.node_id in marker)
        raylet = paused.all_processes[ray_constants.PROCESS_TYPE_RAYLET][0].process
        os.kill(raylet.pid, signal.SIGSTOP)  # the node stops answering; its worker goes on holding
        result, wall = run.join()
        assert result.ok and result.done == 1 and result.lost == 1
        table = committed(result.uri, limit=2)
        assert table.column("attempt").to_pylist() == [2, 2]
        assert paused.node_id not in set(table.column("node").to_pylist())
        files = [Path(result.uri) / unit.path, Path(result.uri) / adversarial_path(unit.path)]
        before = [f.read_bytes() for f in files]
        assert [json.loads(f.read_text()) for f in tmp_path.glob(f"commit-{unit.unit_id}-*.json")] == \
            [{"attempt": 2, "committed": True}]
        (tmp_path / "release").touch()  # the first attempt, on the dead node, goes on to its commit
        wait_for(lambda: any(tmp_path.glob(f"commit-{unit.unit_id}-1-*.json")), timeout=60)
        (late,) = tmp_path.glob(f"commit-{unit.unit_id}-1-*.json")
        assert json.loads(late.read_text()) == {"attempt": 1, "committed": False}
        assert [f.read_bytes() for f in files] == before
        table = committed(result.uri, limit=2)
        assert table.column("attempt").to_pylist() == [2, 2]
        print(f"FAULT late write from a dead node: units redone 1, late commit refused, wall {wall:.1f} s")
    finally:
        (tmp_path / "release").touch()
        run.thread.join(timeout=240)
        if raylet is not None:
            os.kill(raylet.pid, signal.SIGCONT)
            nodes.remove_node(paused, allow_graceful=False)
            add_node(nodes)  # the module's two worker nodes, for the tests after this one


def test_a_unit_survives_three_node_losses(nodes, cnn, tmp_path, monkeypatch):
    j = job(cnn, limit=2)
    (unit,) = plan(j, 355)
    faults(monkeypatch, tmp_path, slow={unit.unit_id: 2.0})
    for _ in range(2):  # four nodes: three to lose, one to finish on (this module's last test)
        add_node(nodes)
    run = Background(j, RunOptions(out=str(tmp_path / "out"), workers=1))
    killed = []
    for k in range(3):
        wait_for(lambda: len(list(tmp_path.glob("running-*"))) > k)
        marker = max(tmp_path.glob("running-*"), key=os.path.getmtime).name
        doomed = next(n for n in nodes.worker_nodes if n.node_id in marker)
        nodes.remove_node(doomed, allow_graceful=False)
        killed.append(doomed.node_id)
    result, wall = run.join()
    assert result.ok and result.done == 1 and result.lost == 3 and result.replaced == 3
    table = committed(result.uri, limit=2)
    assert table.column("attempt").to_pylist() == [4, 4]
    assert not set(table.column("node").to_pylist()) & set(killed)
    print(f"FAULT three node losses: units redone 3 times, wall {wall:.1f} s")

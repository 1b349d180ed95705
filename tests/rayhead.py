"""A Ray head of its own for tests that submit jobs: `ray start --head` on 127.0.0.1.

The head gets its own temp dir, ports and process group; it is stopped by killing that group and
the processes it spawned (never `ray stop`, which would stop every Ray cluster on the machine).

    with ray_head(project, cache) as head:   # head.address: the dashboard URL for the Jobs API
        ...
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

RAY = [sys.executable, "-m", "ray.scripts.scripts"]  # the venv's `ray`, whatever PATH holds


@dataclass(frozen=True)
class Head:
    address: str          # the dashboard URL, http://127.0.0.1:PORT
    project: Path         # the working dir the jobs travel with
    cache: Path           # ROBUSTSWEEP_CACHE of the jobs


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _processes() -> dict[int, tuple[int, int, str]]:
    """pid -> (parent pid, process group, state), read from /proc."""
    table = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()  # after "pid (comm) "
        table[int(entry.name)] = (int(fields[1]), int(fields[2]), fields[0])
    return table


def _head_processes(pgid: int) -> set[int]:
    """The head's processes (its group) and everything they spawned: Ray workers and job
    drivers move to process groups of their own."""
    table = _processes()
    found = {pid for pid, (_, group, _) in table.items() if group == pgid}
    grew = True
    while grew:
        more = {pid for pid, (parent, _, _) in table.items() if parent in found} - found
        found |= more
        grew = bool(more)
    found.discard(os.getpid())
    return found


def _alive(pids: set[int]) -> set[int]:
    table = _processes()
    return {pid for pid in pids if pid in table and table[pid][2] != "Z"}


def _kill_head(pgid: int) -> None:
    pids = _head_processes(pgid)
    for sig, grace in ((signal.SIGTERM, 2.0), (signal.SIGKILL, 5.0)):  # the GCS may ignore SIGTERM
        for pid in _alive(pids):
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + grace
        while _alive(pids) and time.monotonic() < deadline:
            time.sleep(0.1)


@contextlib.contextmanager
def ray_head(project: Path, cache: Path, num_cpus: int = 2, start_timeout: float = 90) -> Iterator[Head]:
    """A running head whose jobs use `project` as working dir and `cache` as ROBUSTSWEEP_CACHE."""
    # A short temp dir: Ray's unix socket paths live under it and must stay under 108 bytes.
    temp = Path(tempfile.mkdtemp(prefix="rs-head-", dir="/tmp"))
    dashboard = free_port()
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS")}
    env["RAY_AUTH_MODE"] = "disabled"  # hermetic: no token from ~/.ray decides how clients must talk
    start = subprocess.Popen(
        RAY + ["start", "--head", "--node-ip-address=127.0.0.1", f"--port={free_port()}",
               "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}",
               f"--ray-client-server-port={free_port()}", f"--dashboard-agent-listen-port={free_port()}",
               f"--num-cpus={num_cpus}", f"--temp-dir={temp}", "--disable-usage-stats"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    pgid = start.pid  # start_new_session: the `ray start` process leads a group its daemons stay in
    try:
        out, _ = start.communicate(timeout=start_timeout)
        assert start.returncode == 0, out[-3000:]
        yield Head(f"http://127.0.0.1:{dashboard}", project, cache)
    finally:
        _kill_head(pgid)
        shutil.rmtree(temp, ignore_errors=True)

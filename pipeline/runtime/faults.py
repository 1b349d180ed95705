"""Fault injection for tests of the queue: ROBUSTSWEEP_FAULTS names units that fail on purpose.

The variable holds JSON: {"dir": folder for once-markers, "raise_once": [unit ids],
"raise_always": [...], "crash_once": [...] (the worker process exits: a lost actor),
"sleep_s": seconds every unit waits first (a slow driver, for tests of two drivers),
"stop_once": [...] (the worker stops itself before its commit: a hung worker),
"slow": {unit id: seconds} (that unit waits first, every attempt; a marker
"running-{unit}-{node id}-{pid}" says where it has started), "hold": [...] (those units write the
same marker, then wait until a file "release" appears in "dir"), "hold_once": [...] (as "hold", for
the first attempt only: the next attempt runs at once), "after_commit": true (each commit writes
"commit-{unit}-{attempt}-{pid}.json" holding {"attempt", "committed"}: a refused late write is seen)}.
Unset, this does nothing. It is read by the workers, so it travels with their environment.
"""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

ENV = "ROBUSTSWEEP_FAULTS"


class InjectedFault(RuntimeError):
    """The error a unit raises when a test asked it to."""


def _once(folder: str, kind: str, unit_id: str) -> bool:
    """True the first time (kind, unit) is seen, across processes (an exclusive marker file)."""
    marker = Path(folder) / f"{kind}-{unit_id}"
    try:
        fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        return False
    os.close(fd)
    return True


def inject(unit_id: str) -> None:
    raw = os.environ.get(ENV)
    if not raw:
        return
    plan = json.loads(raw)
    folder = plan.get("dir", ".")
    if plan.get("sleep_s"):
        time.sleep(float(plan["sleep_s"]))
    held = unit_id in plan.get("hold", []) or (unit_id in plan.get("hold_once", []) and _once(folder, "hold", unit_id))
    if unit_id in plan.get("slow", {}) or held:
        import ray

        node = ray.get_runtime_context().get_node_id() if ray.is_initialized() else "local"
        (Path(folder) / f"running-{unit_id}-{node}-{os.getpid()}").touch()
        time.sleep(float(plan.get("slow", {}).get(unit_id, 0)))
        deadline = time.monotonic() + 600
        while held and not (Path(folder) / "release").exists() and time.monotonic() < deadline:
            time.sleep(0.1)
    if unit_id in plan.get("raise_always", []):
        raise InjectedFault(f"unit {unit_id} fails on purpose (raise_always)")
    if unit_id in plan.get("raise_once", []) and _once(folder, "raise", unit_id):
        raise InjectedFault(f"unit {unit_id} fails on purpose once (raise_once)")
    if unit_id in plan.get("crash_once", []) and _once(folder, "crash", unit_id):
        os._exit(17)


def before_commit(unit_id: str) -> None:
    """Faults between a unit's work and its commit: "stop_once" stops the worker process
    (SIGSTOP: Ray still sees it alive, it answers nothing: a hung worker)."""
    raw = os.environ.get(ENV)
    if not raw:
        return
    plan = json.loads(raw)
    if unit_id in plan.get("stop_once", []) and _once(plan.get("dir", "."), "stop", unit_id):
        os.kill(os.getpid(), signal.SIGSTOP)


def after_commit(unit_id: str, attempt: int, committed: bool) -> None:
    """With "after_commit" in the plan, say what became of this attempt's commit (a file per
    attempt and process: whether the store took it or refused it as late)."""
    raw = os.environ.get(ENV)
    if not raw:
        return
    plan = json.loads(raw)
    if plan.get("after_commit"):
        path = Path(plan.get("dir", ".")) / f"commit-{unit_id}-{attempt}-{os.getpid()}.json"
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"attempt": attempt, "committed": committed}))
        os.replace(tmp, path)  # a reader never sees half a file

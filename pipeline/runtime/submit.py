"""Submit a job to a running Ray cluster through its Jobs API, and follow it there.

`submit_job` validates the job file here (a bad spec raises `ConfigError` and nothing is sent),
then hands the cluster the project folder as the runtime_env's `working_dir` and the entrypoint
`PYTHON -m pipeline.cli run JOB --address auto ...`. So the code that runs is the code that was
submitted; the nodes need only the dependencies (the package installed with the same
constraints).

PYTHON is found on the head before the job is submitted (`check_head`): a short check job with the
same runtime_env tries the interpreters in turn (the one given, else the submitting interpreter,
`sys.executable`, which is the head's own when both share a machine or an image, then `python3`
and `python` on the head's PATH) and keeps the first that imports the package and its
dependencies. When none does, nothing is submitted and ConfigError says what each one lacked and
what to do. The same check returns the head's home folder: a relative `out` would otherwise land
in the per-upload working dir (`.../_ray_pkg_<hash>/`), which changes with every edit of the
project, so that a resubmitted job would not find its run to resume; it is resolved against the
head's home instead (`results` -> `~/results` on the head).

Submission ids are Ray's (`raysubmit_...`); `job_status`, `job_logs`, `follow_job`,
`wait_for_job` and `stop_job` take one. The address is the head's dashboard URL,
`http://HEAD:8265`; given explicitly it wins over RAY_ADDRESS / RAY_API_SERVER_ADDRESS, which
Ray's client would otherwise prefer silently.

AWS variables set here (credentials, region, endpoint) travel to the job as runtime_env
env_vars unless `forward_aws=False`. They are never printed, logged or put in an error, but
Ray keeps a job's runtime_env in its job table: whoever can reach the dashboard can read them.
On a cluster with instance roles or a Kubernetes Secret, do not forward them.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import fnmatch
import logging
import os
import posixpath
import shlex
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from datetime import datetime, timezone
from pathlib import Path, PurePosixPath
from urllib.parse import urlsplit

from pipeline.errors import ClusterError, ConfigError
from pipeline.scrub import redact_uri, scrub
from pipeline.config.job import load_job
from pipeline.config.run import RunOptions

# What never travels with the working dir: environments, history, results, caches. Ray's
# gitwildmatch patterns, matched against every path under the working dir.
EXCLUDES = (".venv", ".git", "results", ".cache", ".pytest_cache", "__pycache__", "*.egg-info", "*.parquet")
AWS_CREDENTIALS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN")
AWS_SETTINGS = ("AWS_DEFAULT_REGION", "AWS_REGION", "AWS_ENDPOINT_URL")
TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")
PROBE_SECONDS = 10.0
_ADDRESS_ENV = ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS")


def entrypoint(job: str, options: RunOptions = RunOptions(), *, python: str = "python") -> str:
    """The shell command the cluster runs: `PYTHON -m pipeline.cli run JOB --address auto [run flags]`.

    `job` is the job file's path relative to the working dir (it travels with it); the run joins
    the cluster it runs on, whatever `options.address` says.
    """
    return shlex.join([python, "-m", "pipeline.cli", "run", job, "--address", "auto", *options.run_flags()])


def aws_variables() -> list[str]:
    """The names of the AWS variables set in this process, those `forward_aws` passes on."""
    return [k for k in AWS_CREDENTIALS + AWS_SETTINGS if os.environ.get(k)]


def runtime_env(working_dir: str | os.PathLike, *, env: dict[str, str] | None = None, forward_aws: bool = True,
                excludes: Iterable[str] = ()) -> dict:
    """The runtime_env of a submission: the working dir less `EXCLUDES` (and `excludes`), and as
    env_vars the AWS variables set in this process (if `forward_aws`) plus `env`."""
    env_vars = {}
    if forward_aws:
        env_vars.update({k: os.environ[k] for k in aws_variables()})
    for key, value in (env or {}).items():
        if not key or not isinstance(value, str):
            raise ConfigError(f"env: {key!r} must be a non-empty name with a string value")
        env_vars[key] = value
    result = {"working_dir": str(Path(working_dir).resolve()), "excludes": [*EXCLUDES, *excludes]}
    if env_vars:
        result["env_vars"] = env_vars
    return result


CHECK_SECONDS = 300.0
"""How long the check job may take (the first upload of the working dir happens during it)."""
_OK, _NO = "ROBUSTSWEEP_PYTHON_OK", "ROBUSTSWEEP_PYTHON_NO"


@dataclasses.dataclass(frozen=True)
class Head:
    """What `check_head` found on the head: the interpreter that imports the package, and the home folder."""

    python: str
    home: str


def candidates(python: str | None) -> list[str]:
    """The interpreters to try on the head: `python` alone when given, else the submitting one, python3, python."""
    if python:
        return [python]
    return list(dict.fromkeys([sys.executable, "python3", "python"]))


def check_command(pythons: Iterable[str]) -> str:
    """A shell command that prints `_OK PYTHON HOME` for the first of `pythons` that imports
    pipeline.cli (and so typer, ray, torch, ...), and `_NO PYTHON: its last error line` for each before it."""
    probe = "import os, pipeline.cli; print(os.path.expanduser('~'))"
    lines = []
    for py in pythons:
        q = shlex.quote(py)
        lines.append(f"if out=$({q} -c {shlex.quote(probe)} 2>&1); then echo {_OK} {q} \"$(printf '%s' \"$out\" | tail -n 1)\"; exit 0; fi; "
                     f"echo {_NO} {q}: \"$(printf '%s' \"$out\" | tail -n 1)\"")
    return "sh -c " + shlex.quote("; ".join(lines) + "; exit 3")


def check_head(client, address: str, renv: dict, python: str | None, secrets: Iterable[str] = (),
               timeout: float = CHECK_SECONDS) -> Head:
    """Run `check_command` on the head as a job with the runtime_env `renv`; the Head it found, or
    ConfigError naming each interpreter's failure and the fixes (nothing else is submitted)."""
    pythons = candidates(python)
    try:
        sid = client.submit_job(entrypoint=check_command(pythons), runtime_env=renv,
                                metadata={"robustsweep_check": "python"})
    except Exception as exc:
        raise _cluster_error(exc, address, "submit the environment check", secrets=secrets) from None
    info = wait_for_job(address, sid, timeout=timeout, poll=0.5, client=client)
    logs = _call(client.get_job_logs, address, sid)
    for line in logs.splitlines():
        if line.startswith(_OK + " "):
            _, found, home = line.split(" ", 2)
            return Head(found, home.strip())
    lacks = [line[len(_NO) + 1:] for line in logs.splitlines() if line.startswith(_NO + " ")]
    if not lacks:  # the check did not get to run an interpreter: the runtime_env itself failed
        raise ClusterError(f"the environment check on {_shown(address)} ended {info['status']}: "
                           f"{scrub(str(info['message']), secrets)}; its log: {scrub(logs[-2000:], secrets)}")
    tried = "; ".join(lacks)
    fix = (f"install the project on the head (`pip install -c constraints.txt .` in the interpreter that runs Ray), "
           f"or give --python the head's interpreter that has it (e.g. /opt/venv/bin/python)")
    raise ConfigError(f"no interpreter on the head imports robustsweep, so the job would fail there; nothing was "
                      f"submitted. Tried: {tried}. To fix: {fix}")


def resolve_out(out: str, home: str) -> str:
    """`out` as the run on the head should see it: URIs and absolute paths as given, a relative
    folder under the head's home (never under the per-upload working dir)."""
    if "://" in out or posixpath.isabs(out):
        return out
    return posixpath.normpath(posixpath.join(home, out))


def submit_job(job: str | os.PathLike, address: str, options: RunOptions = RunOptions(), *,
               working_dir: str | os.PathLike = ".", python: str | None = None, env: dict[str, str] | None = None,
               forward_aws: bool = True, excludes: Iterable[str] = (), submission_id: str | None = None,
               found: list | None = None, notes: list[str] | None = None) -> str:
    """Validate `job`, submit it to the cluster at `address` (http://HEAD:8265); return the submission id.

    The job file must lie inside `working_dir` (the folder that travels to the cluster). `options`
    are those of `run_job` (checked when they were made). python: the head's interpreter (None:
    found by `check_head`, see the module docstring); a relative `options.out` is resolved against
    the head's home. found: a list that receives the `Head` the check found. A budget
    (options.max_gpu_hours, else the job file's max_gpu_hours) is checked here first, as `run`
    checks it (`budget_here`); notes: a list that receives what that check could not do here.
    Raises ConfigError for a bad job, address or env, or a head without the package, and
    BudgetError for a job above its budget (nothing is sent), and ClusterError when the cluster
    cannot be reached or refuses the job.
    """
    spec = load_job(job)
    budget_here(spec, options, notes)
    root = Path(working_dir).resolve()
    excludes = list(excludes)
    rel = _relative_job(Path(job), root, excludes)
    renv = runtime_env(root, env=env, forward_aws=forward_aws, excludes=excludes)
    secrets = [v for k, v in renv.get("env_vars", {}).items() if k in AWS_CREDENTIALS]
    client = _client(address)
    head = check_head(client, address, renv, python, secrets)
    if found is not None:
        found.append(head)
    options = dataclasses.replace(options, out=resolve_out(options.out, head.home))
    command = entrypoint(rel, options, python=head.python)
    try:
        return client.submit_job(entrypoint=command, runtime_env=renv, submission_id=submission_id,
                                 metadata={"robustsweep_job": rel})
    except Exception as exc:  # the SDK raises RuntimeError, ValueError, requests' errors
        raise _cluster_error(exc, address, "submit the job", secrets=secrets) from None


def budget_here(job, options: RunOptions, notes: list[str] | None = None) -> None:
    """The budget guard of `run` (runtime/estimate.py: guard), before anything is sent: BudgetError
    (exit 2) when the job's estimate on options.device is above its budget. The examples are
    counted from the split here, else from the job's data.ids / data.limit; a job that names
    neither and whose split is not here is left to the run's own guard on the cluster (a note
    says so)."""
    if (options.max_gpu_hours if options.max_gpu_hours is not None else job.spec.max_gpu_hours) is None:
        return
    from pipeline.errors import DatasetError
    from pipeline.runtime.estimate import guard, split_size
    from pipeline.runtime.plan import plan

    try:
        n, note = split_size(job)
    except DatasetError as exc:
        if notes is not None:
            notes.append(f"budget not checked before submitting ({exc}); the run checks it on the cluster")
        return
    if note and notes is not None:
        notes.append(note)
    guard(job, plan(job, n), options)


def job_status(address: str, submission_id: str) -> dict:
    """The state of a submission: {"submission_id", "status", "message", "entrypoint", "start_time",
    "end_time", "driver_exit_code", "error_type"} (times ISO 8601 UTC; no runtime_env, which may
    hold credentials). Raises ClusterError for an unknown id or an unreachable cluster."""
    return _describe(_info(_client(address), address, submission_id))


def job_logs(address: str, submission_id: str) -> str:
    """Everything the job's entrypoint has written so far (stdout and stderr)."""
    client = _client(address)
    _info(client, address, submission_id)
    return _call(client.get_job_logs, address, submission_id)


def follow_job(address: str, submission_id: str, write: Callable[[str], object], poll: float = 1.0) -> dict:
    """Stream the job's logs to `write` until the job ends; return its final `job_status`.

    Follows Ray's log tail (a websocket); if that stream breaks or cannot run (inside a running
    event loop), it falls back to polling the logs every `poll` seconds. Interrupting this
    (Ctrl-C) leaves the job running.
    """
    client = _client(address)
    _info(client, address, submission_id)
    printed = 0

    def emit(text: str) -> None:
        nonlocal printed
        printed += len(text)
        write(text)

    async def tail() -> None:
        async for chunk in client.tail_job_logs(submission_id):
            emit(chunk)

    streamed = False
    if not _loop_running():
        try:
            asyncio.run(tail())
            streamed = True
        except Exception:  # a dropped websocket: the polling below picks up where it stopped
            pass
    while True:
        info = _info(client, address, submission_id)
        if not streamed:
            logs = _call(client.get_job_logs, address, submission_id)
            if len(logs) > printed:
                emit(logs[printed:])
        if str(info.status) in TERMINAL:
            return _describe(info)
        streamed = False  # the stream ended before the job did: poll from here on
        time.sleep(poll)


def wait_for_job(address: str, submission_id: str, timeout: float | None = None, poll: float = 1.0,
                 until: Iterable[str] = TERMINAL, client=None) -> dict:
    """Poll until the job's status is one of `until` (default: ended); return its `job_status`.
    Raises ClusterError when `timeout` seconds pass first."""
    client = client or _client(address)
    wanted = set(until)
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        info = _info(client, address, submission_id)
        if str(info.status) in wanted:
            return _describe(info)
        if deadline is not None and time.monotonic() > deadline:
            raise ClusterError(f"job {submission_id} on {_shown(address)} is still {info.status} after {timeout:g} s")
        time.sleep(poll)


def stop_job(address: str, submission_id: str, wait: bool = True, timeout: float = 60.0) -> dict:
    """Ask the cluster to stop a job (SIGTERM to its entrypoint, SIGKILL later); with `wait`,
    poll until it has ended (at most `timeout` s). Returns its `job_status`; stopping a job that
    has already ended changes nothing."""
    client = _client(address)
    _info(client, address, submission_id)
    _call(client.stop_job, address, submission_id)
    if not wait:
        return _describe(_info(client, address, submission_id))
    deadline = time.monotonic() + timeout
    while True:
        info = _info(client, address, submission_id)
        if str(info.status) in TERMINAL or time.monotonic() > deadline:
            return _describe(info)
        time.sleep(0.5)


def _relative_job(job: Path, root: Path, excludes: list[str]) -> str:
    """The job file's path inside the working dir, as the cluster will see it."""
    try:
        rel = PurePosixPath(job.resolve().relative_to(root).as_posix())
    except ValueError:
        raise ConfigError(f"job file {job} lies outside the working dir {root}, so it would not travel to the "
                          f"cluster: move it under {root} or pass --working-dir") from None
    for pattern in [*EXCLUDES, *excludes]:
        bare = pattern.strip("/")
        if any(fnmatch.fnmatch(part, bare) for part in rel.parts) or fnmatch.fnmatch(str(rel), bare):
            raise ConfigError(f"job file {rel} is excluded from the upload by {pattern!r}: move it elsewhere in {root}")
    return str(rel)


def _shown(address: str) -> str:
    """The address without user:password, for messages."""
    return redact_uri(address)


def _check_address(address: str) -> str:
    address = (address or "").strip()
    if not address.startswith(("http://", "https://")) or not urlsplit(address).hostname:
        raise ConfigError(f"address: the cluster's dashboard URL is needed, e.g. http://HEAD:8265 (got {_shown(address)!r})")
    return address.rstrip("/")


def _probe(address: str) -> None:
    """Fail fast and clearly on an unreachable head: the SDK's own requests have no timeout."""
    import requests

    try:
        requests.get(f"{address}/api/version", timeout=PROBE_SECONDS)
    except requests.Timeout:
        reason = f"no answer in {PROBE_SECONDS:g} s"
    except requests.ConnectionError as exc:
        reason = "connection refused" if "refused" in str(exc).lower() else "cannot connect"
    except requests.RequestException as exc:
        reason = type(exc).__name__
    else:
        return
    raise ClusterError(f"cannot reach the Ray dashboard at {_shown(address)} ({reason}): check that the head is up "
                       f"and that its dashboard port (8265) is reachable from here, e.g. through "
                       f"`ray dashboard cluster/ray-up-gpu.yaml` or `kubectl port-forward`")


@contextlib.contextmanager
def _explicit_address() -> Iterator[None]:
    """Hide RAY_ADDRESS / RAY_API_SERVER_ADDRESS while the client resolves the address we pass."""
    saved = {k: os.environ.pop(k) for k in _ADDRESS_ENV if k in os.environ}
    try:
        yield
    finally:
        os.environ.update(saved)


def _client(address: str):
    from ray.job_submission import JobSubmissionClient

    address = _check_address(address)
    _probe(address)
    # The SDK logs each request's JSON body (runtime_env env_vars included) at DEBUG.
    logging.getLogger("ray.dashboard.modules.dashboard_sdk").setLevel(logging.INFO)
    with _explicit_address():
        try:
            return JobSubmissionClient(address)
        except Exception as exc:
            raise _cluster_error(exc, address, "connect") from None


def _call(method, address: str, submission_id: str):
    try:
        return method(submission_id)
    except Exception as exc:
        raise _cluster_error(exc, address, f"reach job {submission_id}", submission_id=submission_id) from None


def _info(client, address: str, submission_id: str):
    return _call(client.get_job_info, address, submission_id)


def _cluster_error(exc: Exception, address: str, doing: str, *, submission_id: str | None = None,
                   secrets: Iterable[str] = ()) -> ClusterError:
    from ray.exceptions import AuthenticationError

    where = _shown(address)
    if isinstance(exc, AuthenticationError):
        return ClusterError(f"the cluster at {where} requires a token: export RAY_AUTH_MODE=token and "
                            f"RAY_AUTH_TOKEN (or put the token in ~/.ray/auth_token), then retry")
    text = str(exc)
    if submission_id is not None and "does not exist" in text:
        return ClusterError(f"no job with submission id {submission_id!r} on {where} "
                            f"(ids look like raysubmit_...; `ray job list --address {where}` lists them)")
    text = scrub(text, secrets)
    return ClusterError(f"could not {doing} on {where}: {text}")


def _describe(info) -> dict:
    return {"submission_id": info.submission_id, "status": str(info.status), "message": info.message,
            "entrypoint": info.entrypoint, "start_time": _iso(info.start_time), "end_time": _iso(info.end_time),
            "driver_exit_code": info.driver_exit_code, "error_type": info.error_type}


def _iso(ms: int | None) -> str | None:
    return None if ms is None else datetime.fromtimestamp(ms / 1000, timezone.utc).isoformat(timespec="seconds")


def _loop_running() -> bool:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True

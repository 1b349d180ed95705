"""Everything `run` would trip over in a job, checked before any work starts (`validate` and
`run` both call it, through pipeline.runtime.preflight, which adds the models each defense and
surrogate names, `model_refs`): a bad value costs nothing and is named by its field.

The table specs validate each field; what they cannot see is checked here, on the expanded
job: numbers that are booleans or strings in the file (pydantic would take `eps = true` as 1
and `limit = "4"` as 4), numbers that are not finite or do not fit the int64 columns they
end up in, budgets larger than the image they perturb, names that do not fit a file name, an
output URI whose file system the workers do not share, and worker counts below one.
"""

from __future__ import annotations

import math
import os
import re
from pathlib import Path
from typing import Any

from pipeline.atomic import check_writable
from pipeline.config.job import Job
from pipeline.config.model_ref import ModelRef
from pipeline.errors import ConfigError
from pipeline.names import check_name, clashes, describe_clashes

INT64_MAX = 2**63 - 1
NAME_MAX = 200  # bytes of a name in a path segment ("defense=NAME"); file systems allow 255
IMAGE_SIZE = {"digits": 1 * 8 * 8, "cifar10": 3 * 32 * 32, "cifar100": 3 * 32 * 32}
NOT_SHARED = ("memory",)  # fsspec file systems that live in one process: each worker would write its own


def preflight(job: Job) -> None:
    """ConfigError naming the field for anything in `job` that `run` would fail on later."""
    check_name(job.spec.name, "name")
    size = IMAGE_SIZE.get(job.spec.data.dataset)
    for i, raw in enumerate(job.spec.defenses):
        where = f"defenses[{i}]"
        _finite(raw, where)
    for i, raw in enumerate(job.spec.attacks):
        _finite(raw, f"attacks[{i}]")
    if groups := clashes(d.name for d in job.defenses):
        raise ConfigError(f"defenses: names that differ only in characters a file name cannot hold become one file "
                          f"name, so their exports and figures would overwrite each other: {describe_clashes(groups)}. "
                          f"Rename one (`name = ...`)")
    for d in job.defenses:
        where = f"defense {d.name!r}"
        _long_name(d.name, where)
        _numbers_are_numbers(d.table, d.spec.model_dump(), where)
    for a in job.attacks:
        where = f"attack {a.name!r}"
        _long_name(a.name, where)
        _numbers_are_numbers(a.table, a.spec.model_dump(), where)
        _budget({"eps": a.spec.eps, "norm": a.spec.norm}, size, where)  # a transfer's: its crafting attack's


def check_output(out: str, run_id: str | None = None) -> None:
    """ConfigError for an output URI that the workers cannot share (memory://: each worker
    process would commit into its own memory and the driver would find nothing), and for a
    local folder the run cannot use (see `check_local_output`)."""
    protocol = str(out).split("://", 1)[0].lower() if "://" in str(out) else "file"
    if protocol in NOT_SHARED:
        raise ConfigError(f"out (--out): {out!r} lives in one process's memory; the workers run in other processes "
                          f"and their results would be lost. Give a folder or s3://bucket/prefix")
    if protocol == "file":
        check_local_output(str(out).removeprefix("file://"), run_id)


def check_local_output(out: str, run_id: str | None = None) -> None:
    """ConfigError naming the path when the folder `out` (and its run folder `out/run_id`) is a
    file, sits under a file, is a symbolic link loop, has a lease.json that is not a file, or
    cannot be written. A read-only run folder that holds a plan passes: resuming a finished run
    only reads it (the run says what is left otherwise)."""
    folder = Path(out).absolute()
    run = folder / run_id if run_id else folder
    try:
        check_writable(run, "out (--out)")
    except ConfigError:
        if not (run != folder and (run / "plan.json").is_file() and os.path.isdir(run)):
            raise  # a read-only run folder with a plan: resuming it only reads (runtime/run.py)
    writable_at = run if run.is_dir() else None
    if run_id and writable_at is not None:
        lease = writable_at / "lease.json"
        if lease.is_symlink() or (lease.exists() and not lease.is_file()):
            raise ConfigError(f"out (--out): {lease} is not a file; it is the run's lease, which robustsweep "
                              f"writes. Remove it")


def check_workers(workers: Any) -> None:
    if workers is not None and (isinstance(workers, bool) or not isinstance(workers, int) or workers < 1):
        raise ConfigError(f"workers (--workers) must be an integer >= 1, got {workers!r}; leave it out for one per "
                          f"GPU or CPU")


def _finite(value: Any, where: str) -> None:
    """Every float finite, every integer within int64 (seeds and counts land in int64 columns)."""
    if isinstance(value, dict):
        for k, v in value.items():
            _finite(v, f"{where}.{k}")
    elif isinstance(value, list):
        for j, v in enumerate(value):
            _finite(v, f"{where}[{j}]")
    elif isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"{where}: must be a finite number, got {value!r}")
    elif isinstance(value, int) and not isinstance(value, bool) and not -INT64_MAX - 1 <= value <= INT64_MAX:
        raise ConfigError(f"{where}: {value} does not fit in a 64-bit integer")


def _numbers_are_numbers(raw: Any, parsed: Any, where: str) -> None:
    """A boolean or a string in the file where the spec holds a number is refused."""
    if isinstance(raw, dict) and isinstance(parsed, dict):
        for k, v in raw.items():
            if k in parsed:
                _numbers_are_numbers(v, parsed[k], f"{where}.{k}")
    elif isinstance(raw, list) and isinstance(parsed, (list, tuple)) and len(raw) == len(parsed):
        for j, (r, p) in enumerate(zip(raw, parsed)):
            _numbers_are_numbers(r, p, f"{where}[{j}]")
    elif isinstance(parsed, (int, float)) and not isinstance(parsed, bool):
        if isinstance(raw, bool):
            raise ConfigError(f"{where}: expected a number, got the boolean {str(raw).lower()}")
        if isinstance(raw, str):
            raise ConfigError(f"{where}: expected a number, got the string {raw!r}")


def _budget(spec: dict, size: int | None, where: str) -> None:
    """eps no larger than the largest perturbation of an image in [0, 1]: 1 (Linf), sqrt(d) (L2), d (L1)."""
    eps, norm = spec.get("eps"), spec.get("norm", "Linf")
    if size is None or not isinstance(eps, (int, float)):
        return
    bound = {"Linf": 1.0, "L2": math.sqrt(size), "L1": float(size)}.get(norm)
    if bound is not None and eps > bound:
        raise ConfigError(f"{where}.eps: {eps:g} exceeds the largest {norm} perturbation of a {size}-value image "
                          f"in [0, 1] ({bound:g})")


def _long_name(name: str, where: str) -> None:
    if len(name.encode()) > NAME_MAX:
        raise ConfigError(f"{where}: the name is {len(name.encode())} bytes; it becomes a folder name, at most "
                          f"{NAME_MAX} (give a shorter `name`)")


def model_refs(job: Job) -> list[tuple[str, ModelRef, str, int | None]]:
    """(field, model, dataset, classes) of every model a defense or transfer surrogate names: the
    runtime checks each for what its kind is, and against the dataset it will see. classes: the
    class count it must have where that is not the dataset's (0: the unconditional network of the
    authors' LM)."""
    specs = [(f"defense {d.name!r}", d.spec) for d in job.defenses]
    specs += [(f"attack {a.name!r} (on {target!r}).surrogate", spec)
              for a in job.attacks for target, spec in a.surrogates.items()]
    refs = []
    for where, spec in specs:
        refs.append((f"{where}.model", spec.model, spec.dataset, None))
        lm = getattr(spec, "lm", None)
        if lm is not None and getattr(lm, "variant", None) == "authors":
            refs.append((f"{where}.lm.model", lm.model, spec.dataset, 0))
    return refs

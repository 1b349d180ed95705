"""Committing one unit: its adversarial images, then its records (the order every reader relies on)."""

from __future__ import annotations

import pyarrow as pa

from pipeline.errors import CommitRefusedError
from pipeline.store.adversarial import adversarial_path, write_adversarial
from pipeline.store.io import Store


def commit_unit(store: Store, path: str, table: pa.Table, example_ids, extras: dict, *, unit_id: str,
                run_id: str, job_hash: str, attempt: int = 1) -> bool:
    """Write a unit at `path` (its records file, relative to `store`); True if this call wrote it,
    False if another attempt of the unit had committed it first (its file is left as it was).

    The adversarial images go first (`extras` from attacks.evaluate: x_adv (N, C, H, W) and
    forward_per_prediction), so that every unit whose records are committed has them; the
    records file follows, one atomic commit with unit_id, run_id, job_hash and the attempt in
    its footer (and the seal: rows, schema, checksum; see pipeline.store.seal).

    The commit is fenced: the records file is created only if absent (an exclusive create
    locally, a conditional PUT on S3), so a worker the driver gave up on (a paused node, a
    speculative copy that lost) never replaces what another attempt committed. Every attempt
    computes the same rows, so the first commit is the unit's result. A file already there that
    is not this unit's whole file is an error (the driver sets such files aside before it
    reissues their unit).
    """
    if store.committed(path, len(example_ids)):
        return False  # committed already: do not rewrite its images either
    write_adversarial(store, adversarial_path(path), example_ids, extras["x_adv"].cpu().numpy(),
                      extras["forward_per_prediction"])
    try:
        store.write_table(path, table, {"unit_id": unit_id, "run_id": run_id, "job_hash": job_hash,
                                        "attempt": attempt}, exclusive=True)
    except CommitRefusedError:
        found = store.check([path], {path: len(example_ids)}, expect={path: {"unit_id": unit_id}})[path]
        if found is not None:
            raise CommitRefusedError(f"{store.join(path)} is already there and fails its checks ({found}); "
                                     f"rerun the job to set it aside and redo the unit") from None
        return False
    return True


def check_units(store: Store, run_id: str, units, job_hash: str | None = None) -> dict[str, str | None]:
    """{unit_id: None when the unit's records file under `{run_id}/` is whole and its own (see
    Store.check), "missing" when absent, else why it must be redone}. `units`: objects with
    unit_id, path and example_ids (runtime.plan.Unit). Its own: its footer names the unit, this
    run and (given job_hash) this job, as the readers require (store/verify.py)."""
    rels = {f"{run_id}/{u.path}": u for u in units}
    own = {"run_id": run_id, **({"job_hash": job_hash} if job_hash is not None else {})}
    found = store.check(list(rels), {rel: len(u.example_ids) for rel, u in rels.items()},
                        expect={rel: {"unit_id": u.unit_id, **own} for rel, u in rels.items()})
    return {rels[rel].unit_id: reason for rel, reason in found.items()}

"""Committing one unit: its adversarial images, then its records (the order every reader relies on)."""

from __future__ import annotations

import pyarrow as pa

from pipeline.store.adversarial import adversarial_path, write_adversarial
from pipeline.store.io import Store


def commit_unit(store: Store, path: str, table: pa.Table, example_ids, extras: dict, *, unit_id: str,
                run_id: str) -> None:
    """Write a unit at `path` (its records file, relative to `store`).

    The adversarial images go first (`extras` from attacks.evaluate: x_adv (N, C, H, W) and
    forward_per_prediction), so that every unit whose records are committed has them; the
    records file follows, one atomic commit with unit_id and run_id in its footer.
    """
    write_adversarial(store, adversarial_path(path), example_ids, extras["x_adv"].cpu().numpy(),
                      extras["forward_per_prediction"])
    store.write_table(path, table, {"unit_id": unit_id, "run_id": run_id})

"""The adversarial inputs of a unit, kept beside its records for the analytics' image grid.

`{run}/adversarial/defense=.../attack=.../unit-{id}.parquet` mirrors the unit's records file and
holds one row per example: its id, the image shape and the adversarial image exactly as it was
scored (float32, C*H*W values in [0, 1]; float16 or 8-bit would round away an 8/255
perturbation on some images). The footer also says how many network evaluations one prediction
of the defense costs (`robustsweep.forward_per_prediction`), measured on the scoring passes.

The worker writes this file before the unit's records, so a committed unit has it; runs from
before this file existed simply have none, and the analytics say so. The records never depend
on it, and deleting the folder only loses the image grid. Size: 4 bytes per pixel value (256 B
per digits example, 12 KiB per CIFAR example).
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.errors import StoreError
from pipeline.store.io import META_PREFIX, Store

FOLDER = "adversarial"
SCHEMA = pa.schema([
    pa.field("example_id", pa.int64(), nullable=False),
    pa.field("shape", pa.list_(pa.int32()), nullable=False),
    pa.field("adv_image", pa.list_(pa.float32()), nullable=False),
])
"""example_id; shape (C, H, W); adv_image: the C*H*W values in C-order."""

FORWARD_KEY = "forward_per_prediction"


def adversarial_path(records_path: str) -> str:
    """The side file of a unit's records file: records/... -> adversarial/... (same name)."""
    head, sep, rest = records_path.partition("records/")
    if not sep:
        raise StoreError(f"{records_path!r} is not a records path (expected .../records/...)")
    return f"{head}{FOLDER}/{rest}"


def adversarial_table(example_ids, images: np.ndarray) -> pa.Table:
    """A table of SCHEMA from example ids (B,) and images float (B, C, H, W)."""
    images = np.ascontiguousarray(images, dtype=np.float32)
    ids = np.asarray(list(example_ids), dtype=np.int64)
    if images.ndim != 4 or images.shape[0] != ids.shape[0]:
        raise StoreError(f"adversarial images must be (B, C, H, W) with one per example id; got {images.shape} "
                         f"for {ids.shape[0]} ids")
    b, per = images.shape[0], int(np.prod(images.shape[1:]))
    values = pa.ListArray.from_arrays(pa.array(np.arange(0, b * per + 1, per, dtype=np.int32)),
                                      pa.array(images.reshape(-1)))
    shape = pa.array([list(images.shape[1:])] * b, pa.list_(pa.int32()))
    return pa.Table.from_arrays([pa.array(ids), shape, values], schema=SCHEMA)


def write_adversarial(store: Store, rel: str, example_ids, images: np.ndarray,
                      forward_per_prediction: float | None = None) -> None:
    """Commit the side file at `rel` (see adversarial_path), atomically, like a records file."""
    meta = {} if forward_per_prediction is None else {FORWARD_KEY: repr(float(forward_per_prediction))}
    store.write_table(rel, adversarial_table(example_ids, images), meta, schema=None)


def read_adversarial(store: Store, rel: str) -> tuple[np.ndarray, np.ndarray, float | None]:
    """(example ids (B,), images float32 (B, C, H, W), forward_per_prediction or None) of one
    side file. StoreError naming the file when it is missing or does not fit SCHEMA."""
    table = store.read_table(rel)
    if [f.name for f in table.schema] != SCHEMA.names:
        raise StoreError(f"{store.join(rel)} is not an adversarial-images file (columns {table.schema.names})")
    meta = table.schema.metadata or {}
    ids = table.column("example_id").to_numpy()
    if table.num_rows == 0:
        return ids, np.zeros((0, 0, 0, 0), np.float32), _forward(meta)
    shape = tuple(table.column("shape")[0].as_py())
    flat = table.column("adv_image").combine_chunks().flatten().to_numpy(zero_copy_only=False)
    return ids, flat.astype(np.float32).reshape((table.num_rows,) + shape), _forward(meta)


def forward_per_prediction(store: Store, rel: str) -> float | None:
    """The footer's forward_per_prediction of one side file, reading only its footer; None when
    the file or the key is absent."""
    if not store.exists(rel):
        return None
    try:
        with store.fs.open(store.join(rel), "rb") as f:
            meta = pq.read_metadata(f).metadata or {}
    except Exception as exc:
        raise StoreError(f"cannot read the footer of {store.join(rel)} ({type(exc).__name__}: {exc})") from None
    return _forward(meta)


def _forward(meta: dict) -> float | None:
    value = meta.get((META_PREFIX + FORWARD_KEY).encode())
    return float(value) if value is not None else None

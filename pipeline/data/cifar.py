"""CIFAR-10 and CIFAR-100 readers for the official binary and python releases and for Parquet PNG tables.

Layouts accepted under `root` (a local folder or an fsspec URI such as s3://bucket/prefix):

- binary release: CIFAR-10 `data_batch_1.bin` .. `data_batch_5.bin` (train) and
  `test_batch.bin` (test); each record is 1 label byte + 3072 pixel bytes. CIFAR-100
  `train.bin` / `test.bin`; each record is 2 label bytes (coarse, fine) + 3072 pixel bytes.
  Pixels are the R plane, then G, then B, each 32x32 row-major. The files may lie in `root`
  or in its usual subfolder (`cifar-10-batches-bin`, `cifar-100-binary`).
- python release (what RobustBench and torchvision download): CIFAR-10 `data_batch_1` ..
  `data_batch_5` and `test_batch`, CIFAR-100 `train` / `test`, each a pickled dict with `data`
  (uint8 (n, 3072), the same R, G, B planes) and `labels` (CIFAR-100: `fine_labels`), in `root`
  or in `cifar-10-batches-py` / `cifar-100-python`. They are read through the allow-list
  unpickler (pipeline.unpickle: numpy arrays of plain numbers, lists, dicts; nothing imported,
  nothing executed): a file naming any other global is refused.
- Parquet tables: `{root}/{split}.parquet`, `{root}/{split}-*.parquet` or, as Hugging Face
  lays them out, `{root}/**/{split}-*.parquet`. An image column `img` or `image` holds PNG
  bytes (binary, or a struct with a `bytes` field); a label column `label` (CIFAR-10) or
  `fine_label` / `label` (CIFAR-100).

Every reader returns x float32 (N, 3, 32, 32) in [0, 1] and y int64 (N,) in [0, num_classes).
"""

from __future__ import annotations

import io
import posixpath
from dataclasses import dataclass

import fsspec
import numpy as np
import torch

from pipeline.config.datasets import DATASETS
from pipeline.errors import DatasetError
from pipeline.unpickle import NUMPY, arrays, load_allowlisted

SHAPE = DATASETS["cifar10"].shape
PIXELS = SHAPE[0] * SHAPE[1] * SHAPE[2]
PARQUET_BATCH_ROWS = 2048


@dataclass(frozen=True)
class Variant:
    """What differs between CIFAR-10 and CIFAR-100 on disk."""

    name: str
    num_classes: int
    subfolder: str
    label_bytes: int  # label bytes in front of each binary record
    label_offset: int  # which of them is the label we use (CIFAR-100: the fine one)
    train_files: tuple[str, ...]
    test_files: tuple[str, ...]
    label_columns: tuple[str, ...]  # Parquet label columns, first present wins
    python_subfolder: str = ""
    python_train: tuple[str, ...] = ()
    python_test: tuple[str, ...] = ()
    python_label: str = "labels"  # the key of the labels in a python-release batch

    @property
    def record_size(self) -> int:
        return self.label_bytes + PIXELS

    def binary_files(self, split: str) -> tuple[str, ...]:
        return self.train_files if split == "train" else self.test_files

    def python_files(self, split: str) -> tuple[str, ...]:
        return self.python_train if split == "train" else self.python_test


CIFAR10 = Variant(
    name="cifar10",
    num_classes=DATASETS["cifar10"].classes,
    subfolder="cifar-10-batches-bin",
    label_bytes=1,
    label_offset=0,
    train_files=tuple(f"data_batch_{i}.bin" for i in range(1, 6)),
    test_files=("test_batch.bin",),
    label_columns=("label",),
    python_subfolder="cifar-10-batches-py",
    python_train=tuple(f"data_batch_{i}" for i in range(1, 6)),
    python_test=("test_batch",),
)
CIFAR100 = Variant(
    name="cifar100",
    num_classes=DATASETS["cifar100"].classes,
    subfolder="cifar-100-binary",
    label_bytes=2,
    label_offset=1,
    train_files=("train.bin",),
    test_files=("test.bin",),
    # "label" alone would be ambiguous next to "coarse_label", so fine_label is looked up first.
    label_columns=("fine_label", "label"),
    python_subfolder="cifar-100-python",
    python_train=("train",),
    python_test=("test",),
    python_label="fine_labels",
)
VARIANTS = {v.name: v for v in (CIFAR10, CIFAR100)}
IMAGE_COLUMNS = ("img", "image")


def load(name: str, split: str, root: str, storage_options: dict | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Load one split of "cifar10" or "cifar100" from `root` (local path or s3:// URI).

    Binary files win over Parquet when both are present. storage_options go to fsspec
    (e.g. {"client_kwargs": {"endpoint_url": ...}}); with none, s3fs/botocore read their
    usual environment (AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, ...).
    Returns x float32 (N, 3, 32, 32) in [0, 1] and y int64 (N,).
    """
    variant = _variant(name)
    if split not in ("train", "test"):
        raise DatasetError(f"unknown split {split!r} for {name}; expected 'train' or 'test'")
    fs, path = fsspec.core.url_to_fs(root, **(storage_options or {}))
    # A listing cached by an earlier call in this process may predate files written since.
    fs.invalidate_cache(path)
    if not fs.isdir(path):
        raise DatasetError(f"{name} folder {root!r} does not exist (or is not a folder); "
                           f"set root= or ROBUSTSWEEP_DATA to the folder holding the dataset")
    folder = _binary_folder(fs, path, variant, split)
    if folder is not None:
        return _load_binary(fs, folder, variant, split)
    folder = _binary_folder(fs, path, variant, split, python=True)
    if folder is not None:
        return _load_python(fs, folder, variant, split)
    tables = _parquet_files(fs, path, split)
    if tables:
        return _load_parquet(fs, tables, variant)
    raise DatasetError(_nothing_found_message(fs, root, path, variant, split))


def _variant(name: str) -> Variant:
    if name not in VARIANTS:
        raise DatasetError(f"unknown CIFAR dataset {name!r}; expected one of {sorted(VARIANTS)}")
    return VARIANTS[name]


def _basenames(fs, folder: str) -> set[str]:
    """Names of the entries directly in `folder`; empty when it does not exist."""
    try:
        return {posixpath.basename(p.rstrip("/")) for p in fs.ls(folder, detail=False)}
    except (FileNotFoundError, NotADirectoryError):
        return set()


def _binary_folder(fs, path: str, variant: Variant, split: str, python: bool = False) -> str | None:
    """The folder (root or its usual subfolder) holding this split's binary files (python: the
    python release's batches), or None.

    A folder with only some of the expected files is an error, not a fallback: silently
    reading four of five training batches would shrink the split without anyone noticing.
    """
    expected = variant.python_files(split) if python else variant.binary_files(split)
    subfolder = variant.python_subfolder if python else variant.subfolder
    for folder in (path, posixpath.join(path, subfolder)):
        present = _basenames(fs, folder)
        found = [f for f in expected if f in present]
        if not found:
            continue
        missing = [f for f in expected if f not in present]
        if missing:
            raise DatasetError(f"{variant.name} {split} split in {folder!r} is incomplete: "
                               f"found {found}, missing {missing}")
        return folder
    return None


def _load_binary(fs, folder: str, variant: Variant, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    parts = [_read_binary_file(fs, posixpath.join(folder, f), variant) for f in variant.binary_files(split)]
    x = np.concatenate([p[0] for p in parts])
    y = np.concatenate([p[1] for p in parts])
    return _to_tensors(x, y)


def _read_binary_file(fs, file: str, variant: Variant) -> tuple[np.ndarray, np.ndarray]:
    """(pixels uint8 (n, 3, 32, 32), labels int64 (n,)) of one binary batch file."""
    with fs.open(file, "rb") as f:
        raw = f.read()
    size, record = len(raw), variant.record_size
    if size == 0 or size % record:
        raise DatasetError(f"{file}: size {size} bytes is not a positive multiple of the "
                           f"{variant.name} record size {record} bytes; the file is truncated or not "
                           f"a {variant.name} binary batch")
    records = np.frombuffer(raw, dtype=np.uint8).reshape(-1, record)
    labels = records[:, variant.label_offset].astype(np.int64)
    _check_labels(labels, file, variant)
    # Records store the R, G and B planes one after another, which is already (C, H, W).
    pixels = records[:, variant.label_bytes:].reshape(-1, *SHAPE)
    return pixels, labels


def _load_python(fs, folder: str, variant: Variant, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    parts = [_read_python_file(fs, posixpath.join(folder, f), variant) for f in variant.python_files(split)]
    return _to_tensors(np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]))


def _read_python_file(fs, file: str, variant: Variant) -> tuple[np.ndarray, np.ndarray]:
    """(pixels uint8 (n, 3, 32, 32), labels int64 (n,)) of one python-release batch."""
    with fs.open(file, "rb") as f:
        raw = f.read()
    batch = arrays(load_allowlisted(raw, file, NUMPY, DatasetError, what=f"a {variant.name} batch"))
    if not isinstance(batch, dict):
        raise DatasetError(f"{file}: expected a pickled dict of a {variant.name} batch, got {type(batch).__name__}")
    batch = {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in batch.items()}
    data, labels = batch.get("data"), batch.get(variant.python_label)
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != PIXELS:
        shown = f"{data.dtype} {data.shape}" if isinstance(data, np.ndarray) else type(data).__name__
        raise DatasetError(f"{file}: 'data' must be uint8 (n, {PIXELS}), got {shown}")
    if not isinstance(labels, (list, np.ndarray)) or len(labels) != len(data) or \
            not all(isinstance(v, (int, np.integer)) for v in labels):
        raise DatasetError(f"{file}: {variant.python_label!r} must be {len(data)} integer labels")
    labels = np.asarray(labels, dtype=np.int64)
    _check_labels(labels, file, variant)
    return data.reshape(-1, *SHAPE), labels


def _check_labels(labels: np.ndarray, file: str, variant: Variant, first_row: int = 0) -> None:
    bad = np.flatnonzero((labels < 0) | (labels >= variant.num_classes))
    if bad.size:
        row = int(bad[0])
        raise DatasetError(f"{file}: label {int(labels[row])} at row {first_row + row} is out of range for "
                           f"{variant.name} ({variant.num_classes} classes, labels 0..{variant.num_classes - 1})")


def _parquet_files(fs, path: str, split: str) -> list[str]:
    """Parquet files of this split under `path`, sorted so the row order is fixed."""
    patterns = (f"{split}.parquet", f"{split}-*.parquet", f"**/{split}-*.parquet")
    found: set[str] = set()
    for pattern in patterns:
        found.update(fs.glob(posixpath.join(path, pattern)))
    return sorted(found)


def _nothing_found_message(fs, root: str, path: str, variant: Variant, split: str) -> str:
    expected = ", ".join(variant.binary_files(split))
    return (f"no {variant.name} {split} data found in {root!r}: expected binary files {expected} "
            f"(in the folder or in {variant.subfolder}/), python batches {', '.join(variant.python_files(split))} "
            f"(in the folder or in {variant.python_subfolder}/), or Parquet files {split}.parquet, "
            f"{split}-*.parquet or **/{split}-*.parquet")


def _load_parquet(fs, files: list[str], variant: Variant) -> tuple[torch.Tensor, torch.Tensor]:
    parts = [_read_parquet_file(fs, f, variant) for f in files]
    x = np.concatenate([p[0] for p in parts])
    y = np.concatenate([p[1] for p in parts])
    return _to_tensors(x, y)


def _read_parquet_file(fs, file: str, variant: Variant) -> tuple[np.ndarray, np.ndarray]:
    """(pixels uint8 (n, 3, 32, 32), labels int64 (n,)) of one Parquet PNG table."""
    import pyarrow.parquet as pq

    with fs.open(file, "rb") as f:
        try:
            table_file = pq.ParquetFile(f)
        except Exception as err:  # pyarrow raises several types for a file that is not Parquet
            raise DatasetError(f"{file}: not a readable Parquet file ({err})") from err
        image_col, label_col = _columns(table_file.schema_arrow, file, variant)
        n = table_file.metadata.num_rows
        pixels = np.empty((n, *SHAPE), dtype=np.uint8)
        labels = np.empty(n, dtype=np.int64)
        row = 0
        for batch in table_file.iter_batches(batch_size=PARQUET_BATCH_ROWS, columns=[image_col, label_col]):
            pngs = _png_bytes(batch.column(image_col), file, image_col, row)
            batch_labels = _labels(batch.column(label_col), file, label_col, row)
            _check_labels(batch_labels, file, variant, first_row=row)
            for i, png in enumerate(pngs):
                pixels[row + i] = _decode_png(png, file, row + i)
            labels[row:row + len(pngs)] = batch_labels
            row += len(pngs)
    return pixels, labels


def _columns(schema, file: str, variant: Variant) -> tuple[str, str]:
    """Names of the image and label columns of a table."""
    names = schema.names
    image = next((c for c in IMAGE_COLUMNS if c in names), None)
    label = next((c for c in variant.label_columns if c in names), None)
    if image is None or label is None:
        raise DatasetError(f"{file}: expected an image column {' or '.join(IMAGE_COLUMNS)} and a label column "
                           f"{' or '.join(variant.label_columns)}; the table has {names}")
    return image, label


def _png_bytes(column, file: str, name: str, first_row: int) -> list[bytes]:
    """The PNG bytes of an image column: binary, or a struct whose `bytes` field is binary."""
    import pyarrow as pa

    if pa.types.is_struct(column.type):
        if column.type.get_field_index("bytes") < 0:
            raise DatasetError(f"{file}: image column {name!r} is a struct without a 'bytes' field ({column.type})")
        if column.null_count:
            _raise_null(column, file, name, first_row)
        column = column.field("bytes")
    if not (pa.types.is_binary(column.type) or pa.types.is_large_binary(column.type)):
        raise DatasetError(f"{file}: image column {name!r} has type {column.type}; expected PNG bytes "
                           f"(binary, or a struct with a 'bytes' field)")
    if column.null_count:
        _raise_null(column, file, name, first_row)
    return column.to_pylist()


def _labels(column, file: str, name: str, first_row: int) -> np.ndarray:
    import pyarrow as pa

    if not pa.types.is_integer(column.type):
        raise DatasetError(f"{file}: label column {name!r} has type {column.type}; expected integers")
    if column.null_count:
        _raise_null(column, file, name, first_row)
    return column.to_numpy(zero_copy_only=False).astype(np.int64)


def _raise_null(column, file: str, name: str, first_row: int) -> None:
    row = first_row + int(np.flatnonzero(column.is_null().to_numpy(zero_copy_only=False))[0])
    raise DatasetError(f"{file}: column {name!r} is null at row {row}")


def _decode_png(png: bytes, file: str, row: int) -> np.ndarray:
    """uint8 (3, 32, 32) of one PNG; an RGB 32x32 image is required, nothing is converted."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(png)) as image:
            image.load()
            mode, size = image.mode, image.size
            array = np.asarray(image)
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as err:
        raise DatasetError(f"{file}: image at row {row} is not a decodable PNG ({err})") from err
    if mode != "RGB" or size != (32, 32):
        raise DatasetError(f"{file}: image at row {row} is {mode} {size[0]}x{size[1]}; expected RGB 32x32")
    return array.transpose(2, 0, 1)


def _to_tensors(pixels: np.ndarray, labels: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 (N, 3, 32, 32) and int labels -> float32 in [0, 1] and int64."""
    x = torch.from_numpy(pixels.astype(np.float32) / 255.0)
    y = torch.from_numpy(labels.astype(np.int64))
    return x.contiguous(), y

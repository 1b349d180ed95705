"""pipeline.data: digits split, CIFAR binary and Parquet readers (local and S3), sharding."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from pipeline.data import Shard, default_root, digits, load_split, make_shards, select
from pipeline.errors import ConfigError, DatasetError

# ---------------------------------------------------------------------------------------------
# helpers: each writes a small dataset and returns the arrays a correct reader must give back


def expected_tensors(pixels: np.ndarray, labels: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 (N, 3, 32, 32) -> float32 b/255, labels -> int64: what every reader must return."""
    return torch.from_numpy(pixels.astype(np.float32) / 255.0), torch.from_numpy(labels.astype(np.int64))


def random_images(n: int, seed: int, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, size=(n, 3, 32, 32), dtype=np.uint8)
    labels = rng.integers(0, num_classes, size=n).astype(np.int64)
    return pixels, labels


def binary_records(pixels: np.ndarray, labels: np.ndarray, cifar100: bool) -> bytes:
    """Official record layout: label byte(s), then the R, G, B planes row-major."""
    flat = pixels.reshape(len(pixels), -1)
    if cifar100:
        coarse = (19 - labels % 20).astype(np.uint8)  # differs from fine, so a mix-up shows
        heads = np.stack([coarse, labels.astype(np.uint8)], axis=1)
    else:
        heads = labels.astype(np.uint8)[:, None]
    return np.concatenate([heads, flat], axis=1).tobytes()


CIFAR10_TRAIN_FILES = [f"data_batch_{i}.bin" for i in range(1, 6)]


def write_cifar10_binary(folder: Path, seed: int = 0) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Five train batches of 1-2 records (7 in all) and a test batch of 3."""
    folder.mkdir(parents=True, exist_ok=True)
    parts = {"train": [], "test": []}
    for i, (name, n) in enumerate(zip(CIFAR10_TRAIN_FILES + ["test_batch.bin"], [1, 2, 1, 2, 1, 3])):
        pixels, labels = random_images(n, seed + i, 10)
        (folder / name).write_bytes(binary_records(pixels, labels, cifar100=False))
        parts["test" if name == "test_batch.bin" else "train"].append((pixels, labels))
    return {s: (np.concatenate([p for p, _ in v]), np.concatenate([l for _, l in v])) for s, v in parts.items()}


def write_cifar100_binary(folder: Path, seed: int = 0) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    folder.mkdir(parents=True, exist_ok=True)
    out = {}
    for split, n in (("train", 7), ("test", 4)):
        pixels, labels = random_images(n, seed + n, 100)
        labels[0] = 99  # the top fine label must pass
        (folder / f"{split}.bin").write_bytes(binary_records(pixels, labels, cifar100=True))
        out[split] = (pixels, labels)
    return out


def png(image_chw: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(image_chw.transpose(1, 2, 0)), "RGB").save(buffer, format="PNG")
    return buffer.getvalue()


def png_table(pixels: np.ndarray, labels: np.ndarray, image_col: str, struct: bool, cifar100: bool) -> pa.Table:
    """A table as Hugging Face stores CIFAR (struct column) or as plain PNG bytes (binary column)."""
    blobs = [png(p) for p in pixels]
    if struct:
        images = pa.array([{"bytes": b, "path": f"{i}.png"} for i, b in enumerate(blobs)],
                          type=pa.struct([("bytes", pa.binary()), ("path", pa.string())]))
    else:
        images = pa.array(blobs, type=pa.binary())
    columns = {image_col: images}
    if cifar100:
        columns["coarse_label"] = pa.array(19 - labels % 20, type=pa.int64())
        columns["fine_label"] = pa.array(labels, type=pa.int64())
    else:
        columns["label"] = pa.array(labels, type=pa.int64())
    return pa.table(columns)


# ---------------------------------------------------------------------------------------------
# digits


def test_digits_split_sizes_dtype_shape_range():
    x_train, y_train = load_split("digits", "train")
    x_test, y_test = load_split("digits", "test")
    # Every fifth image of each class (rank 4, 9, ...) is a test image: floor(n_c / 5) per class.
    assert (len(x_train), len(x_test)) == (1442, 355)
    for x, y in ((x_train, y_train), (x_test, y_test)):
        assert x.dtype == torch.float32 and y.dtype == torch.int64
        assert x.shape[1:] == (1, 8, 8) and y.shape == (len(x),)
        assert x.min() >= 0.0 and x.max() <= 1.0
        assert set(y.tolist()) == set(range(10))
    assert x_train.max() == 1.0  # pixels 0..16 are divided by 16, not by a smaller number


def test_digits_split_is_disjoint_covering_and_stratified():
    from sklearn.datasets import load_digits

    bunch = load_digits()
    train = digits.split_indices(bunch.target, "train")
    test = digits.split_indices(bunch.target, "test")
    assert not set(train) & set(test)
    assert sorted(np.concatenate([train, test]).tolist()) == list(range(1797))
    for c in range(10):
        n_class = int((bunch.target == c).sum())
        n_test = int((bunch.target[test] == c).sum())
        assert abs(n_test - 0.2 * n_class) <= 1, (c, n_test, n_class)
    # The tensors are these rows of load_digits, scaled.
    x_test, y_test = load_split("digits", "test")
    assert torch.equal(y_test, torch.from_numpy(bunch.target[test]))
    assert torch.equal(x_test[:, 0], torch.from_numpy(bunch.images[test].astype(np.float32) / 16))


def test_digits_is_deterministic():
    a, b = load_split("digits", "train"), load_split("digits", "train")
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_unknown_dataset_and_split():
    with pytest.raises(DatasetError, match="mnist"):
        load_split("mnist", "train")
    with pytest.raises(DatasetError, match="valid"):
        load_split("digits", "valid")


# ---------------------------------------------------------------------------------------------
# CIFAR binary


@pytest.mark.parametrize("subfolder", ["", "cifar-10-batches-bin"])
def test_cifar10_binary_round_trip(tmp_path, subfolder):
    written = write_cifar10_binary(tmp_path / subfolder if subfolder else tmp_path)
    for split, n in (("train", 7), ("test", 3)):
        x, y = load_split("cifar10", split, root=str(tmp_path))
        want_x, want_y = expected_tensors(*written[split])
        assert x.shape == (n, 3, 32, 32) and x.dtype == torch.float32 and y.dtype == torch.int64
        assert torch.equal(x, want_x) and torch.equal(y, want_y)


@pytest.mark.parametrize("subfolder", ["", "cifar-100-binary"])
def test_cifar100_binary_uses_fine_label(tmp_path, subfolder):
    written = write_cifar100_binary(tmp_path / subfolder if subfolder else tmp_path)
    for split in ("train", "test"):
        x, y = load_split("cifar100", split, root=str(tmp_path))
        want_x, want_y = expected_tensors(*written[split])
        assert torch.equal(x, want_x) and torch.equal(y, want_y)
        assert y[0] == 99


def test_cifar_binary_channel_order_and_row_major(tmp_path):
    # Plane c holds c*80 + (k % 64) at flat position k, so channel, row and column are all visible.
    k = np.arange(1024)
    planes = np.stack([c * 80 + (k % 64) for c in range(3)]).astype(np.uint8)
    record = bytes([7]) + planes.tobytes()
    for name in CIFAR10_TRAIN_FILES:
        (tmp_path / name).write_bytes(record)
    (tmp_path / "test_batch.bin").write_bytes(record)
    x, y = load_split("cifar10", "test", root=str(tmp_path))
    assert y.tolist() == [7]
    assert x[0, 0, 0, 0] == 0 / 255 and x[0, 1, 0, 0] == 80 / 255 and x[0, 2, 0, 0] == 160 / 255
    assert x[0, 0, 0, 5] * 255 == pytest.approx(5)  # row 0, column 5: k = 5
    assert x[0, 2, 1, 3] * 255 == pytest.approx(160 + 35)  # row 1, column 3: k = 35
    assert x[0, 1, 2, 1] * 255 == pytest.approx(80 + 1)  # row 2, column 1: k = 65 -> 65 % 64


def test_cifar_binary_truncated_file(tmp_path):
    write_cifar10_binary(tmp_path)
    path = tmp_path / "test_batch.bin"
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(DatasetError) as err:
        load_split("cifar10", "test", root=str(tmp_path))
    message = str(err.value)
    assert "test_batch.bin" in message and str(3 * 3073 - 100) in message and "3073" in message


def test_cifar_binary_cifar100_record_size_in_message(tmp_path):
    write_cifar100_binary(tmp_path)
    (tmp_path / "train.bin").write_bytes(b"\0" * 3073)  # a CIFAR-10 record is one byte short
    with pytest.raises(DatasetError, match=r"train\.bin.*3073.*3074"):
        load_split("cifar100", "train", root=str(tmp_path))


def test_cifar10_label_out_of_range(tmp_path):
    write_cifar10_binary(tmp_path)
    pixels, labels = random_images(3, 1, 10)
    labels[2] = 10
    (tmp_path / "test_batch.bin").write_bytes(binary_records(pixels, labels, cifar100=False))
    with pytest.raises(DatasetError) as err:
        load_split("cifar10", "test", root=str(tmp_path))
    message = str(err.value)
    assert "label 10" in message and "row 2" in message and "test_batch.bin" in message and "10 classes" in message


def test_cifar_missing_folder(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(DatasetError, match="nowhere.*does not exist"):
        load_split("cifar10", "train", root=str(missing))


def test_cifar_empty_folder_lists_expected_files(tmp_path):
    with pytest.raises(DatasetError) as err:
        load_split("cifar10", "train", root=str(tmp_path))
    message = str(err.value)
    assert "data_batch_1.bin" in message and "data_batch_5.bin" in message and "train.parquet" in message


def test_cifar_pickle_release_is_not_read(tmp_path):
    (tmp_path / "cifar-10-batches-py").mkdir()
    with pytest.raises(DatasetError, match="pickle"):
        load_split("cifar10", "test", root=str(tmp_path))


def test_cifar_incomplete_train_split(tmp_path):
    write_cifar10_binary(tmp_path)
    (tmp_path / "data_batch_3.bin").unlink()
    with pytest.raises(DatasetError, match="data_batch_3.bin"):
        load_split("cifar10", "train", root=str(tmp_path))


def test_default_root_from_environment(tmp_path, monkeypatch):
    written = write_cifar10_binary(tmp_path / "cifar10")
    monkeypatch.setenv("ROBUSTSWEEP_DATA", str(tmp_path))
    x, y = load_split("cifar10", "test")
    assert torch.equal(y, expected_tensors(*written["test"])[1])
    monkeypatch.setenv("ROBUSTSWEEP_DATA", "s3://bucket/datasets/")
    assert default_root("cifar100") == "s3://bucket/datasets/cifar100"
    monkeypatch.delenv("ROBUSTSWEEP_DATA")
    assert Path(default_root("cifar10")) == Path("data/cifar10")


# ---------------------------------------------------------------------------------------------
# CIFAR Parquet PNG tables


@pytest.mark.parametrize("struct", [False, True], ids=["binary", "struct"])
@pytest.mark.parametrize("image_col", ["img", "image"])
def test_cifar10_parquet_round_trip(tmp_path, struct, image_col):
    pixels, labels = random_images(5, 3, 10)
    pq.write_table(png_table(pixels, labels, image_col, struct, cifar100=False), tmp_path / "test.parquet")
    x, y = load_split("cifar10", "test", root=str(tmp_path))
    want_x, want_y = expected_tensors(pixels, labels)
    assert torch.equal(x, want_x) and torch.equal(y, want_y)


def test_cifar100_parquet_hugging_face_layout_in_file_order(tmp_path):
    pixels, labels = random_images(6, 4, 100)
    folder = tmp_path / "cifar100"
    folder.mkdir()
    # Shards written in reverse so that only sorting by name gives the right order.
    for i in (1, 0):
        rows = slice(3 * i, 3 * i + 3)
        table = png_table(pixels[rows], labels[rows], "img", struct=True, cifar100=True)
        pq.write_table(table, folder / f"train-0000{i}-of-00002.parquet")
    x, y = load_split("cifar100", "train", root=str(tmp_path))
    want_x, want_y = expected_tensors(pixels, labels)
    assert torch.equal(x, want_x) and torch.equal(y, want_y)


def test_parquet_label_out_of_range(tmp_path):
    pixels, labels = random_images(4, 5, 100)
    labels[3] = 100
    pq.write_table(png_table(pixels, labels, "img", False, cifar100=True), tmp_path / "test-00000.parquet")
    with pytest.raises(DatasetError) as err:
        load_split("cifar100", "test", root=str(tmp_path))
    message = str(err.value)
    assert "label 100" in message and "row 3" in message and "test-00000.parquet" in message and "100 classes" in message


def test_parquet_undecodable_png(tmp_path):
    pixels, labels = random_images(2, 6, 10)
    blobs = [png(pixels[0]), png(pixels[1])[:40]]
    table = pa.table({"img": pa.array(blobs, type=pa.binary()), "label": pa.array(labels)})
    pq.write_table(table, tmp_path / "test.parquet")
    with pytest.raises(DatasetError, match=r"test\.parquet.*row 1.*PNG"):
        load_split("cifar10", "test", root=str(tmp_path))


@pytest.mark.parametrize("size, mode", [((16, 32), "RGB"), ((32, 32), "L")])
def test_parquet_wrong_image_shape(tmp_path, size, mode):
    buffer = io.BytesIO()
    Image.new(mode, size).save(buffer, format="PNG")
    table = pa.table({"image": pa.array([buffer.getvalue()], type=pa.binary()), "label": pa.array([1])})
    pq.write_table(table, tmp_path / "test.parquet")
    with pytest.raises(DatasetError, match=r"row 0 is .*expected RGB 32x32"):
        load_split("cifar10", "test", root=str(tmp_path))


def test_parquet_missing_label_column(tmp_path):
    pixels, labels = random_images(1, 7, 10)
    table = png_table(pixels, labels, "img", False, cifar100=False).rename_columns(["img", "target"])
    pq.write_table(table, tmp_path / "test.parquet")
    with pytest.raises(DatasetError, match="label column"):
        load_split("cifar10", "test", root=str(tmp_path))


# ---------------------------------------------------------------------------------------------
# S3 (moto server on loopback)


def test_cifar_parquet_from_s3_matches_local(tmp_path, s3_server, s3_bucket):
    pixels, labels = random_images(6, 8, 10)
    local = tmp_path / "cifar10"
    (local / "plain_text").mkdir(parents=True)
    pq.write_table(png_table(pixels, labels, "img", True, cifar100=False),
                   local / "plain_text" / "test-00000-of-00001.parquet")
    fs = s3_server.filesystem()
    fs.put(str(local / "plain_text" / "test-00000-of-00001.parquet"),
           f"{s3_bucket}/datasets/cifar10/plain_text/test-00000-of-00001.parquet")
    x_s3, y_s3 = load_split("cifar10", "test", root=f"{s3_bucket}/datasets/cifar10",
                            storage_options=s3_server.storage_options)
    x_local, y_local = load_split("cifar10", "test", root=str(local))
    assert torch.equal(x_s3, x_local) and torch.equal(y_s3, y_local)
    assert torch.equal(y_s3, torch.from_numpy(labels))


def test_cifar_binary_from_s3_via_endpoint_env(tmp_path, s3_server, s3_bucket, monkeypatch):
    import s3fs

    written = write_cifar100_binary(tmp_path)
    s3_server.filesystem().put(str(tmp_path / "test.bin"), f"{s3_bucket}/c100/cifar-100-binary/test.bin")
    # No storage_options: the endpoint comes from AWS_ENDPOINT_URL, credentials from the
    # session's fake ones, as they would on a cluster node configured by environment.
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server.endpoint_url)
    s3fs.S3FileSystem.clear_instance_cache()
    try:
        x, y = load_split("cifar100", "test", root=f"{s3_bucket}/c100")
    finally:
        # The cached instance is bound to this endpoint; later tests must not inherit it.
        s3fs.S3FileSystem.clear_instance_cache()
    want_x, want_y = expected_tensors(*written["test"])
    assert torch.equal(x, want_x) and torch.equal(y, want_y)


def test_s3_missing_prefix(s3_server, s3_bucket):
    with pytest.raises(DatasetError, match="does not exist"):
        load_split("cifar10", "test", root=f"{s3_bucket}/nothing-here", storage_options=s3_server.storage_options)


# ---------------------------------------------------------------------------------------------
# sharding


@pytest.mark.parametrize("n, size", [(10, 3), (9, 3), (1, 5), (0, 4), (7, 1)])
def test_shards_cover_every_id_once_in_order(n, size):
    shards = make_shards(n, size)
    assert [s.index for s in shards] == list(range(len(shards)))
    assert [i for s in shards for i in s.example_ids] == list(range(n))
    assert all(len(s) == size for s in shards[:-1])
    assert all(1 <= len(s) <= size for s in shards)
    assert len(shards) == -(-n // size)
    assert make_shards(n, size) == shards


@pytest.mark.parametrize("size", [0, -1, 2.5, "3", True])
def test_bad_shard_size(size):
    with pytest.raises(ConfigError, match="shard_size"):
        make_shards(10, size)


def test_shards_of_explicit_ids_and_limit():
    shards = make_shards(100, 2, ids=[42, 7, np.int64(99), 0, 13])
    assert shards == [Shard(0, (42, 7)), Shard(1, (99, 0)), Shard(2, (13,))]
    assert all(type(i) is int for s in shards for i in s.example_ids)
    assert make_shards(100, 2, ids=[42, 7, 99, 0, 13], limit=3) == [Shard(0, (42, 7)), Shard(1, (99,))]
    assert make_shards(10, 4, limit=5) == [Shard(0, (0, 1, 2, 3)), Shard(1, (4,))]
    assert make_shards(10, 4, limit=0) == []


def test_shards_reject_bad_ids():
    with pytest.raises(DatasetError, match=r"\[10, -1\].*10 examples"):
        make_shards(10, 2, ids=[3, 10, -1])
    with pytest.raises(ConfigError, match=r"repeated: \[3\]"):
        make_shards(10, 2, ids=[3, 4, 3])
    with pytest.raises(ConfigError, match="integer"):
        make_shards(10, 2, ids=[1.0])
    with pytest.raises(ConfigError, match="limit"):
        make_shards(10, 2, limit=-1)


def test_select_rows():
    x = torch.arange(5 * 2, dtype=torch.float32).reshape(5, 2)
    y = torch.arange(5) * 10
    xs, ys = select(x, y, [4, 0, 2])
    assert torch.equal(xs, x[[4, 0, 2]]) and ys.tolist() == [40, 0, 20]
    xs, ys = select(x, y, Shard(0, (1,)))
    assert ys.tolist() == [10] and xs.shape == (1, 2)
    assert select(x, y, [])[0].shape == (0, 2)
    with pytest.raises(DatasetError, match=r"\[5\]"):
        select(x, y, [1, 5])
    with pytest.raises(DatasetError, match="rows"):
        select(x, y[:4], [1])

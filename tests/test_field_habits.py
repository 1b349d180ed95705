"""How the field writes things: eps as "8/255", CIFAR as its python release, the shipped MI job."""

from __future__ import annotations

import os
import pickle
import tomllib
from pathlib import Path

import numpy as np
import pytest

from pipeline.config.job import load_job, parse_job
from pipeline.data import load_split
from pipeline.errors import ConfigError, DatasetError
from pipeline.runtime.plan import plan

ROOT = Path(__file__).resolve().parent.parent


def job_with(*attacks) -> dict:
    return {"name": "t", "data": {"dataset": "digits", "split": "test", "limit": 4},
            "defenses": [{"kind": "plain"}], "attacks": list(attacks)}


def test_eps_as_an_exact_fraction():
    job = parse_job(job_with({"kind": "pgd", "eps": "8/255", "step_size": "2/255"},
                             {"kind": "autoattack", "eps": ["4/255", " 16 / 255 "]}))
    pgd, aa4, aa16 = job.attacks
    # The float nearest the fraction, bit for bit what 8 / 255 gives; in the table, so the plan,
    # the hashes and the records carry the number.
    assert pgd.spec.eps == 8 / 255 and pgd.table["eps"] == 8 / 255 and pgd.spec.step_size == 2 / 255
    assert (aa4.table["eps"], aa16.table["eps"]) == (4 / 255, 16 / 255)
    units = plan(job, 4)
    assert sorted({u.eps for u in units}) == [4 / 255, 8 / 255, 16 / 255]
    assert job.hash == parse_job(job_with({"kind": "pgd", "eps": 8 / 255, "step_size": 2 / 255},
                                          {"kind": "autoattack", "eps": [4 / 255, 16 / 255]})).hash
    transfer = parse_job(job_with({"kind": "transfer", "surrogate": {"kind": "plain"},
                                   "attack": {"kind": "pgd", "eps": "8/255"}})).attacks[0]
    assert transfer.table["attack"]["eps"] == 8 / 255


@pytest.mark.parametrize("eps, message", [
    ("8/0", "attacks[0].eps: Value error, '8/0' divides by zero"),
    ("eight/255", 'expected a number or an exact fraction of integers such as "8/255", got \'eight/255\''),
    ("-8/255", "exact fraction of integers"),
])
def test_a_bad_fraction_names_the_field(eps, message):
    with pytest.raises(ConfigError) as err:
        parse_job(job_with({"kind": "pgd", "eps": eps}))
    assert message in str(err.value)


# --- CIFAR-10's python release ---------------------------------------------------------------------

def stand_ins(seed: int, sizes) -> list[tuple[np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [(rng.integers(0, 256, (n, 3, 32, 32), dtype=np.uint8), rng.integers(0, 10, n)) for n in sizes]


def write_both(tmp_path: Path, classes: int = 10):
    """The same images as the binary release and as the python release (pickled dicts, as
    Python 2 wrote them: protocol 2; one batch with bytes keys and one in protocol 5)."""
    binary, python = tmp_path / "bin" / "cifar-10-batches-bin", tmp_path / "py" / "cifar-10-batches-py"
    binary.mkdir(parents=True)
    python.mkdir(parents=True)
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    for i, (name, (pixels, labels)) in enumerate(zip(names, stand_ins(0, [2, 1, 3, 1, 2, 4]))):
        flat = pixels.reshape(len(pixels), -1)
        (binary / f"{name}.bin").write_bytes(np.concatenate([labels.astype(np.uint8)[:, None], flat], 1).tobytes())
        batch = {"batch_label": f"batch {i}", "labels": [int(v) for v in labels], "data": flat,
                 "filenames": [f"img{j}.png" for j in range(len(flat))]}
        if i == 1:
            batch = {k.encode(): v for k, v in batch.items()}
        (python / name).write_bytes(pickle.dumps(batch, protocol=5 if i == 2 else 2))
    return tmp_path / "bin", tmp_path / "py"


def test_cifar10_python_release_reads_as_the_binary_one(tmp_path):
    binary, python = write_both(tmp_path)
    for split, n in (("train", 9), ("test", 4)):
        xb, yb = load_split("cifar10", split, root=str(binary))
        xp, yp = load_split("cifar10", split, root=str(python))
        assert xp.shape == (n, 3, 32, 32) and xp.dtype == xb.dtype
        assert np.array_equal(xp.numpy(), xb.numpy()) and np.array_equal(yp.numpy(), yb.numpy())
    # The folder itself works as well as its parent.
    assert np.array_equal(load_split("cifar10", "test", root=str(python / "cifar-10-batches-py"))[1].numpy(), yb.numpy())


class Hostile:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_a_hostile_pickle_is_refused_without_running(tmp_path):
    _, python = write_both(tmp_path)
    marker = tmp_path / "ran"
    batch = python / "cifar-10-batches-py" / "test_batch"
    batch.write_bytes(pickle.dumps({"data": Hostile(marker), "labels": [1]}, protocol=2))
    with pytest.raises(DatasetError, match=r"test_batch refers to posix\.system, which a cifar10 batch never needs; "
                                           r"refusing to load it \(it could run code\)"):
        load_split("cifar10", "test", root=str(python))
    assert not marker.exists()
    # An object array (a pickle of arbitrary Python objects inside numpy) is no plain array either.
    batch.write_bytes(pickle.dumps({"data": np.array([object()], dtype=object), "labels": [1]}, protocol=2))
    with pytest.raises(DatasetError, match="test_batch"):
        load_split("cifar10", "test", root=str(python))
    # Right containers, wrong shape: named.
    batch.write_bytes(pickle.dumps({"data": np.zeros((2, 10), np.uint8), "labels": [1, 2]}, protocol=2))
    with pytest.raises(DatasetError, match=r"'data' must be uint8 \(n, 3072\), got uint8 \(2, 10\)"):
        load_split("cifar10", "test", root=str(python))


def test_cifar100_python_release_uses_fine_labels(tmp_path):
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    (pixels, fine), = stand_ins(1, [3])
    for split in ("train", "test"):
        (folder / split).write_bytes(pickle.dumps({"data": pixels.reshape(3, -1), "fine_labels": [int(v) for v in fine],
                                                   "coarse_labels": [19, 19, 19]}, protocol=2))
    x, y = load_split("cifar100", "test", root=str(tmp_path))
    assert np.array_equal(y.numpy(), fine) and np.array_equal((x.numpy() * 255).round().astype(np.uint8), pixels)


# --- the shipped MI job ------------------------------------------------------------------------------

def test_mi_job_attacks_the_deterministic_classifier_with_autoattack_standard():
    job = load_job(ROOT / "jobs" / "mi_cifar10.toml")
    by_defense: dict[str, list[str]] = {}
    for a in job.attacks:
        for d in a.defenses:
            by_defense.setdefault(d, []).append(a.name)
    assert "aa-standard" in by_defense["plain-standard"] and "aa-rand" not in by_defense["plain-standard"]
    for mi in ("mi-pl-Standard", "mi-ol-Standard", "mi-combined-at"):
        assert "aa-rand" in by_defense[mi] and "aa-standard" not in by_defense[mi]
    raw = tomllib.loads((ROOT / "jobs" / "mi_cifar10.toml").read_text())
    assert all(a.get("eps") in ("8/255", None) for a in raw["attacks"])  # written as the field writes it

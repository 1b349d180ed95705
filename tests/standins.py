"""Stand-in files in the layouts researchers download, for validating shipped jobs and journeys:
CIFAR binary releases, the RDC authors' EDM state dicts, RobustBench classifier files, checkpoint
folders. Weights are zeros at full size (a validation reads names and shapes, never values); the
images are random bytes in the official record layout."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from pipeline.config.datasets import dataset_info
from pipeline.models.robustbench_zoo import buildable
from pipeline.config.model_ref import ModelRef, parse_model_ref
from pipeline.models.checkpoint import save_checkpoint
from pipeline.models.importer import CLASSIFIER_PRESETS
from pipeline.models.registry import build_model
from pipeline.models.unet import unet_config

CIFAR10_FILES = [f"data_batch_{i}.bin" for i in range(1, 6)] + ["test_batch.bin"]
CIFAR100_FILES = ["train.bin", "test.bin"]


def records(pixels: np.ndarray, labels: np.ndarray, cifar100: bool) -> bytes:
    """The official record layout: the label byte(s) (CIFAR-100: coarse, then fine), then the R, G
    and B planes, each row-major."""
    heads = labels.astype(np.uint8)[:, None]
    if cifar100:
        heads = np.concatenate([(labels // 5).astype(np.uint8)[:, None], heads], axis=1)
    return np.concatenate([heads, pixels.reshape(len(pixels), -1)], axis=1).tobytes()


def write_cifar_binary(root: Path, dataset: str = "cifar10", n_test: int = 10_000, n_train: int = 20,
                       seed: int = 0) -> Path:
    """The binary release under `root` in its usual subfolder (cifar-10-batches-bin or
    cifar-100-binary); every class present in each train file; returns the subfolder."""
    cifar100 = dataset == "cifar100"
    K = dataset_info(dataset).classes
    folder = root / ("cifar-100-binary" if cifar100 else "cifar-10-batches-bin")
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for name in CIFAR100_FILES if cifar100 else CIFAR10_FILES:
        n = n_test if name.startswith("test") else max(n_train, K)
        pixels = rng.integers(0, 256, size=(n, 3, 32, 32), dtype=np.uint8)
        labels = np.arange(n) % K
        (folder / name).write_bytes(records(pixels, labels, cifar100))
    return folder


def zeros_state(config: dict) -> dict[str, torch.Tensor]:
    """The state dict of the model `config` builds, all zeros (built on the meta device: no init cost)."""
    with torch.device("meta"):
        own = build_model(config).state_dict()
    return {k: torch.zeros(v.shape, dtype=v.dtype) for k, v in own.items()}


def write_edm_pt(path: Path, config: dict) -> Path:
    """The RDC authors' layout (DiffusionClassifier, models/unets/EDM/get_edm_nets.py): torch.save
    of an EDMPrecond's state_dict(), names under the preconditioner's `model.`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(zeros_state({"arch": "edm", **config}), path)
    return path


def write_robustbench(path: Path, preset: str, classes: int) -> Path:
    """RobustBench's layout: {"state_dict": ...} with DataParallel's `module.` prefix."""
    path.parent.mkdir(parents=True, exist_ok=True)
    config = {**CLASSIFIER_PRESETS[preset], "num_classes": classes}
    if config["arch"] in ("wrn", "preact-resnet18", "resnet18"):
        config["normalization"] = "none"  # no mu/sigma buffers in the file
    state = zeros_state(config)
    torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}}, path)
    return path


def write_zoo(path: Path, config: dict) -> Path:
    """A zoo entry's file as RobustBench keeps it: {"state_dict": ...} with DataParallel's `module.`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": {f"module.{k}": v for k, v in zeros_state(config).items()}}, path)
    return path


class _State:
    def __init__(self, state):
        self._state = state

    def state_dict(self):
        return self._state


def write_folder(path: Path, config: dict) -> Path:
    """A checkpoint folder (model.safetensors + config.json) of `config`."""
    return save_checkpoint(path, _State(zeros_state(config)), config, {"stand_in": True})


class StandIns:
    """Writes each distinct stand-in once (per test session) and links it where a job expects it."""

    def __init__(self, cache: Path):
        self.cache = cache

    def _cached(self, key: str, write) -> Path:
        target = self.cache / key
        if not target.exists():
            write(target)
        return target

    def model(self, ref: ModelRef, dataset: str, where: Path) -> None:
        """The file or folder `ref` names, under `where` (relative paths) or at its absolute path."""
        K = dataset_info(dataset).classes
        if ref.kind in ("default", "optimal") or "://" in (ref.path or ""):
            return
        if ref.zoo:
            entry = buildable(dataset, ref.threat, ref.name)
            src = self._cached(f"zoo-{dataset}-{ref.threat}-{ref.name}.pt", lambda p: write_zoo(p, entry.config))
            _link(src, where / ref.zoo_path(dataset))
            return
        if ref.kind == "edm":
            assert ref.format == "edm-pt", f"no stand-in for {ref}: only EDM state dicts (.pt) are written"
            src = self._cached(f"edm-{ref.preset}.pt", lambda p: write_edm_pt(p, {"preset": ref.preset}))
        elif ref.kind == "robustbench":
            src = self._cached(f"rb-{ref.preset}-{K}.pt", lambda p: write_robustbench(p, ref.preset, K))
        else:
            src = self._cached(f"unet-{dataset}", lambda p: write_folder(p, unet_config(dataset)))
        _link(src, where / ref.path)

    def data(self, dataset: str, root: str | None, where: Path) -> None:
        if dataset in ("cifar10", "cifar100") and root and "://" not in root:
            _link(self._cached(f"data-{dataset}", lambda p: write_cifar_binary(p, dataset)), where / root)

    def job(self, doc: dict, where: Path) -> None:
        """Everything a job document (TOML as parsed) names: its data root, and every `model` in its
        defense and attack tables at any depth (transfer surrogates, sweeps over models, nested tables)."""
        dataset = doc["data"]["dataset"]
        self.data(dataset, doc["data"].get("root"), where)
        for text in models_in(doc["defenses"]) + models_in(doc["attacks"]):
            self.model(parse_model_ref(text), dataset, where)


def models_in(value) -> list[str]:
    """Every string (or list of strings, as a sweep gives them) under a `model` key, at any depth."""
    found = []
    if isinstance(value, dict):
        for key, item in value.items():
            if key == "model" and isinstance(item, str):
                found.append(item)
            elif key == "model" and isinstance(item, list):
                found += [v for v in item if isinstance(v, str)]
            else:
                found += models_in(item)
    elif isinstance(value, list):
        for item in value:
            found += models_in(item)
    return found


def _link(src: Path, dst: Path) -> None:
    """dst -> src (a symlink); an existing link to the same target is kept."""
    if dst.is_symlink() or dst.exists():
        assert dst.resolve() == src.resolve(), f"{dst} is already something else"
        return
    dst.parent.mkdir(parents=True, exist_ok=True)
    os.symlink(src.resolve(), dst)

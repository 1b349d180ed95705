"""Datasets as float32 (N, C, H, W) images in [0, 1] with int64 labels; example id = index in the split."""

from __future__ import annotations

import os

import torch

from pipeline.config.datasets import dataset_info
from pipeline.errors import DatasetError
from pipeline.data import cifar, digits
from pipeline.data.shard import Shard, make_shards, select

DATA_ENV = "ROBUSTSWEEP_DATA"


def load_split(name: str, split: str, root: str | None = None, storage_options: dict | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Load one split of a dataset.

    name: "digits" (embedded, no root needed), "cifar10" or "cifar100" (root: a local folder
    or an s3:// URI; default: $ROBUSTSWEEP_DATA/{name}, else data/{name}). storage_options go to
    fsspec. Returns x float32 (N, C, H, W) in [0, 1] and y int64 (N,): digits (N, 1, 8, 8),
    CIFAR (N, 3, 32, 32).
    """
    info = dataset_info(name)
    if split not in info.splits:
        raise DatasetError(f"unknown split {split!r} for dataset {name!r}; expected one of {info.splits}")
    if name == "digits":
        return digits.load(split)
    return cifar.load(name, split, root or default_root(name), storage_options)


def class_names(name: str) -> tuple[str, ...]:
    """The names of the dataset's classes in label order (CIFAR-10/100), or () where it has none."""
    return dataset_info(name).class_names


def default_root(name: str) -> str:
    """Where a dataset lives when no root is given: $ROBUSTSWEEP_DATA/{name}, else data/{name}."""
    base = os.environ.get(DATA_ENV) or "data"
    if "://" in base:
        # A URI joins with "/" whatever the local OS separator is.
        return f"{base.rstrip('/')}/{name}"
    return os.path.join(base, name)


__all__ = ["load_split", "class_names", "default_root", "Shard", "make_shards", "select"]

"""Default models: found in the cache and loaded by name; never trained here.

The cache folder is $ROBUSTSWEEP_CACHE, else ~/.cache/robustsweep; each model lives in
`models/{dataset}-{role}/` as model.safetensors + config.json. Training them is the driver's
`prepare` step (pipeline.training.defaults, called by pipeline.runtime.run.prepare_models):
a worker that builds a defense on a default model that is not there gets a CheckpointError
saying how to prepare it.
"""

from __future__ import annotations

import os
from pathlib import Path

from torch import nn

from pipeline.models.checkpoint import load_checkpoint
from pipeline.data import num_classes
from pipeline.errors import CheckpointError, ConfigError
from pipeline.models.registry import build_model

ROLES = ("diffusion", "erm", "mixup", "iat", "pgd_at")


def cache_dir() -> Path:
    """Where default models are kept: $ROBUSTSWEEP_CACHE or ~/.cache/robustsweep."""
    return Path(os.environ.get("ROBUSTSWEEP_CACHE") or Path.home() / ".cache" / "robustsweep")


def default_path(dataset: str, role: str) -> Path:
    """Where the default `role` model of `dataset` lives in the cache (whether or not it is there)."""
    if role not in ROLES:
        raise ConfigError(f"unknown default model role {role!r}; expected one of {ROLES}")
    return cache_dir() / "models" / f"{dataset}-{role}"


def has_default(dataset: str, role: str) -> bool:
    """Whether the default model is in the cache (its config.json is written last, after the weights)."""
    return (default_path(dataset, role) / "config.json").exists()


def default_checkpoint(dataset: str, role: str) -> Path:
    """The folder of the default `role` model of `dataset`; CheckpointError if it has not been prepared."""
    path = default_path(dataset, role)
    if not has_default(dataset, role):
        train = ("robustsweep train diffusion" if role == "diffusion" else f"robustsweep train classifier --method {role}")
        raise CheckpointError(
            f"default {role} model of {dataset} not found at {path}: default models are trained before a run, "
            f"not while building a defense; run the job (`robustsweep run` prepares them first) or train it with "
            f"`{train} --dataset {dataset} --out {path}`")
    return path


def load_model(spec: str, dataset: str, role: str, in_channels: int | None = None) -> tuple[nn.Module, dict, dict]:
    """A model by spec: "default" (the cached default of dataset and role) or a checkpoint folder.

    The checkpoint must fit the dataset: its num_classes (and in_channels) are checked.
    """
    folder = default_checkpoint(dataset, role) if spec == "default" else Path(spec)
    if not folder.exists():
        raise CheckpointError(f"checkpoint folder {folder} does not exist")
    expected = {"num_classes": num_classes(dataset)}
    if in_channels is not None:
        expected["in_channels"] = in_channels
    model, config, meta = load_checkpoint(folder, build_model, expected=expected)
    return model.eval(), config, meta or {}

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

from pipeline.models.checkpoint import load_checkpoint, read_config
from pipeline.config.datasets import dataset_info
from pipeline.config.model_ref import parse_model_ref
from pipeline.errors import CheckpointError, ConfigError
from pipeline.models.importer import load_ref
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


def load_model(spec: str, dataset: str, role: str, in_channels: int | None = None,
               classes: int | None = None) -> tuple[nn.Module, dict, dict]:
    """A model by spec: "default" (the cached default of dataset and role), a checkpoint folder, or a
    published file ("edm:[PRESET:]PATH", "robustbench:ARCH:PATH"; see pipeline.models.importer).

    The model must fit the dataset: its class count (and input channels) are checked. classes:
    the class count (an EDM network's label_dim) it must have instead of the dataset's, 0 for an
    unconditional network.
    """
    ref = parse_model_ref(spec)
    K = dataset_info(dataset).classes if classes is None else classes
    needs = "the dataset needs" if classes is None else "expected"
    if ref.kind in ("edm", "robustbench"):
        model, config, meta = load_ref(ref, num_classes=K)
        for key, want in _expected(config, K, in_channels).items():
            if config.get(key) != want:
                raise CheckpointError(f"model {spec}: {key} is {config.get(key)!r}, {needs} {want}")
        return model.eval(), config, meta
    folder = default_checkpoint(dataset, role) if ref.kind == "default" else Path(ref.path)
    if not folder.exists():
        raise CheckpointError(f"checkpoint folder {folder} does not exist")
    expected = _expected(read_config(folder)[0], K, in_channels)
    model, config, meta = load_checkpoint(folder, build_model, expected=expected)
    return model.eval(), config, meta or {}


def _expected(config: dict, K: int, in_channels: int | None) -> dict:
    """The config entries a dataset needs: an EDM network's label_dim and img_channels, a
    classifier's num_classes and in_channels."""
    edm = config.get("arch") == "edm"
    expected = {"label_dim" if edm else "num_classes": K}
    if in_channels is not None:
        expected["img_channels" if edm else "in_channels"] = in_channels
    return expected


def model_card(spec: str, dataset: str, role: str) -> dict:
    """What a model is, for the exports: {"arch", "checkpoint", "additional_data"}, read from its
    config.json without loading weights. spec: "default" (after `default_checkpoint` trained it),
    "optimal" (the closed-form eps model: no weights) or a checkpoint folder.

    additional_data: whether it was trained on data beyond the dataset's train split, as its
    meta says; the defaults are trained on that split alone; None where a checkpoint does not say.
    """
    if spec == "optimal":
        return {"arch": "optimal", "checkpoint": None, "additional_data": False}
    ref = parse_model_ref(spec)
    if ref.kind in ("edm", "robustbench"):
        # A published file: its preset (or EDM's own pickle); what it was trained on is the publisher's to say.
        return {"arch": ref.preset or "edm", "checkpoint": spec, "additional_data": None}
    folder = cache_dir() / "models" / f"{dataset}-{role}" if spec == "default" else Path(spec)
    try:
        config, meta = read_config(folder)
    except CheckpointError:
        return {"arch": None, "checkpoint": spec, "additional_data": None}
    meta = meta or {}
    additional = meta.get("additional_data", False if spec == "default" else None)
    return {"arch": config.get("arch"), "checkpoint": spec, "additional_data": additional}

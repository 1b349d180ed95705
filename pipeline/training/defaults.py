"""Putting the default models in the cache: the training half of pipeline.models.zoo.

The zoo only finds and loads default models; it never trains, so that building a defense on a
worker can never start a training run. `ensure_default_model` is what the driver's `prepare`
step (pipeline.runtime.run.prepare_models) and the benchmarks call first. It takes a file lock,
so that processes asking for the same model at once train it once.
"""

from __future__ import annotations

import fcntl
from pathlib import Path

from pipeline.errors import ConfigError
from pipeline.models.zoo import ROLES, default_path, has_default
from pipeline.training.classifier import train_default_classifier
from pipeline.training.diffusion import train_default_diffusion


def ensure_default_model(dataset: str, role: str, progress: bool = True) -> Path:
    """The folder of the default `role` model of `dataset`, training it into the cache first if missing."""
    if role not in ROLES:
        raise ConfigError(f"unknown default model role {role!r}; expected one of {ROLES}")
    path = default_path(dataset, role)
    if has_default(dataset, role):
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.parent / f".{dataset}-{role}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one trainer; the others wait, then find it there
        if not has_default(dataset, role):
            if role == "diffusion":
                train_default_diffusion(dataset, path, progress=progress)
            else:
                train_default_classifier(dataset, role, path, progress=progress)
    return path


def role_of(spec) -> str:
    """Which default model a parsed defense spec (pipeline.config.defense) stands on: RDC's
    diffusion model, else its classifier's training method."""
    return "diffusion" if spec.kind == "rdc" else spec.method


def default_model_of(spec) -> tuple[str, str] | None:
    """(dataset, role) of the default model a parsed defense spec uses; None for any other model
    (a checkpoint folder, a published file, the optimal model)."""
    return (spec.dataset, role_of(spec)) if spec.model.kind == "default" else None


def prepare_defaults(specs, progress: bool = True) -> list[Path]:
    """Every default model the parsed defense specs use, trained into the cache where missing; their folders."""
    wanted = dict.fromkeys(m for m in map(default_model_of, specs) if m is not None)
    return [ensure_default_model(dataset, role, progress=progress) for dataset, role in wanted]


__all__ = ["ensure_default_model", "prepare_defaults", "default_model_of", "role_of"]

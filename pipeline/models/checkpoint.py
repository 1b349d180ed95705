"""Checkpoints: the weights as safetensors plus the model's config as JSON; nothing is unpickled.

A checkpoint is a directory holding

    model.safetensors   the state_dict (tensor name -> tensor)
    config.json         {"config": <the kwargs the model is built from>, "meta": <free-form, JSON-able>}

so a checkpoint read from an untrusted place can at worst hold wrong numbers, never code.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Callable

from torch import nn

from pipeline.atomic import atomic_write
from pipeline.config.tables import MAX_DEPTH, too_deep
from pipeline.errors import CheckpointError

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"


def save_checkpoint(directory: str | os.PathLike, model: nn.Module, config: dict, meta: dict | None = None) -> Path:
    """Save `model`'s state_dict and `config` (the kwargs `build` needs) under `directory`.

    `meta` is free-form provenance (dataset, training seconds, accuracy, ...); both config and
    meta must be JSON-able. Returns the directory as a Path.
    """
    from safetensors.torch import save

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    # safetensors refuses non-contiguous tensors and tensors sharing storage; clone breaks both.
    tensors = {name: t.detach().to("cpu").contiguous().clone() for name, t in model.state_dict().items()}
    try:
        text = json.dumps({"config": config, "meta": meta}, indent=2, sort_keys=True)
    except TypeError as exc:
        raise CheckpointError(f"config/meta for {directory / CONFIG_NAME} is not JSON-able: {exc}") from exc

    # Weights first: a directory whose config.json exists always has matching weights next to it.
    atomic_write(directory / WEIGHTS_NAME, lambda f: f.write(save(tensors)))
    atomic_write(directory / CONFIG_NAME, lambda f: f.write((text + "\n").encode("utf-8")))
    return directory


def read_config(directory: str | os.PathLike) -> tuple[dict, dict | None]:
    """(config, meta) of a checkpoint without loading its weights."""
    path = Path(directory) / CONFIG_NAME
    if not path.is_file():
        raise CheckpointError(f"checkpoint config {path} not found; is {Path(directory)} a checkpoint directory?")
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"checkpoint config {path} is unreadable: {exc}") from exc
    except RecursionError:
        raise CheckpointError(f"checkpoint config {path} nests its values too deeply to be a model config") from None
    if (where := too_deep(doc)) is not None:
        raise CheckpointError(f"checkpoint config {path}: {where} is nested more than {MAX_DEPTH} levels deep; a model "
                              f"config needs far fewer")
    if not isinstance(doc, dict) or not isinstance(doc.get("config"), dict):
        raise CheckpointError(f"checkpoint config {path} has no 'config' table; expected {{\"config\": {{...}}, \"meta\": ...}}")
    return doc["config"], doc.get("meta")


def load_checkpoint(
    directory: str | os.PathLike,
    build: Callable[[dict], nn.Module],
    expected: dict | None = None,
) -> tuple[nn.Module, dict, dict | None]:
    """Build a model from a checkpoint's config and load its weights strictly.

    expected: config entries the caller relies on, e.g. {"num_classes": 10, "in_channels": 1};
    a differing entry is an error rather than a silently wrong model. Returns (model in eval
    mode on CPU, config, meta). Raises CheckpointError naming the file and what does not fit.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    directory = Path(directory)
    weights = directory / WEIGHTS_NAME
    config_path = directory / CONFIG_NAME
    if not directory.is_dir():
        raise CheckpointError(f"checkpoint directory {directory} not found")
    config, meta = read_config(directory)
    for key, want in (expected or {}).items():
        found = config.get(key, "<missing>")
        # JSON turns tuples into lists; compare them as lists so (1, 2) matches [1, 2].
        if _jsonable(found) != _jsonable(want):
            raise CheckpointError(f"checkpoint {config_path}: config {key!r} is {found!r}, expected {want!r}")
    if not weights.is_file():
        raise CheckpointError(f"checkpoint weights {weights} not found")
    try:
        state = load_file(str(weights))
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"checkpoint weights {weights} are unreadable: {exc}") from exc

    model = build(config)
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing tensors {_clip(missing)}")
        if unexpected:
            parts.append(f"unexpected tensors {_clip(unexpected)}")
        raise CheckpointError(f"checkpoint weights {weights} do not fit the model built from its config: " + "; ".join(parts))
    for name, tensor in state.items():
        if tuple(tensor.shape) != tuple(own[name].shape):
            raise CheckpointError(
                f"checkpoint weights {weights}: tensor {name!r} has shape {tuple(tensor.shape)}, "
                f"the model expects {tuple(own[name].shape)}"
            )
    model.load_state_dict(state, strict=True)
    model.eval()
    return model, config, meta


def _jsonable(value):
    return json.loads(json.dumps(value, default=str))


def _clip(names: list[str], n: int = 8) -> str:
    shown = ", ".join(names[:n])
    return shown + (f", ... ({len(names) - n} more)" if len(names) > n else "")


__all__ = ["save_checkpoint", "load_checkpoint", "read_config", "WEIGHTS_NAME", "CONFIG_NAME"]

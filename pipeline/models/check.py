"""Before any work: the model a reference names is there, reads, fits its own architecture and
fits the dataset it will see, each kind checked for what it is.

    default, optimal  nothing to read (a run's prepare step trains the defaults for their dataset)
    folder            config.json reads and builds (range-checked on the meta device), and the names
                      and shapes in model.safetensors' header are the ones it builds
    edm               the file reads with the safe loader (a .pt's tensors mapped, not read) and its
                      names and shapes are those of its preset or pickled configuration
    robustbench       the file reads (weights only, mapped) and fits its architecture preset

Then its resolution, channels and classes against the dataset's: an EDM network's img_resolution,
img_channels and label_dim, a classifier's image_size (where its architecture has one),
in_channels and num_classes. A mismatch is a CheckpointError naming the model, the field and
both values: otherwise every unit of a run would fail on its first batch.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from pathlib import Path

import torch

from pipeline.config.datasets import dataset_info
from pipeline.config.model_ref import ModelRef
from pipeline.errors import CheckpointError, ConfigError
from pipeline.models.checkpoint import CONFIG_NAME, WEIGHTS_NAME, read_config
from pipeline.models.edm.config import resolve
from pipeline.models.importer import check_fit, check_preset, describe, read_published, read_weights_only
from pipeline.models.robustbench_zoo import buildable, fit_zoo_state, refuse_zoo_file, robustbench_state
from pipeline.models.registry import arch_class, build_model, check_config


@dataclass(frozen=True)
class Fit:
    """What a model takes and gives, under its config's own field names."""

    resolution: tuple[str, int] | None  # None: any image size
    channels: tuple[str, int]
    classes: tuple[str, int]


def fit_of(config: dict) -> Fit:
    """Resolution, channels and classes of a registry config (defaults from its class where left out)."""
    if config.get("arch") == "edm":
        edm = resolve(config)
        return Fit(("img_resolution", edm.get("img_resolution")), ("img_channels", edm.get("img_channels")),
                   ("label_dim", edm.get("label_dim", 0)))
    params = inspect.signature(arch_class(config["arch"])).parameters

    def value(key):
        return config.get(key, params[key].default if key in params else None)

    resolution = ("image_size", value("image_size")) if "image_size" in params else None
    return Fit(resolution, ("in_channels", value("in_channels")), ("num_classes", value("num_classes")))


def check_model(ref: ModelRef, dataset: str, where: str, classes: int | None = None) -> None:
    """ConfigError or CheckpointError, prefixed with `where` (e.g. "defense 'x'.model"), unless the
    model `ref` names is there, reads, and fits `dataset`. classes: the class count it must have
    instead of the dataset's (0: an unconditional network)."""
    if ref.kind in ("default", "optimal"):
        return
    if ref.kind == "folder":
        if "://" in ref.path:
            return  # a remote checkpoint is checked where it is loaded
        config = _folder_config(ref, where)
    elif ref.zoo:
        config = _zoo_config(ref, dataset, where)
    else:
        config = _published_config(ref, dataset, where, classes)
    _fits_dataset(ref, fit_of(config), dataset, where, classes)


def _folder_config(ref: ModelRef, where: str) -> dict:
    folder = Path(ref.path)
    if not folder.is_dir():
        raise ConfigError(f"{where}: checkpoint folder {ref.path!r} does not exist (or is not a folder); expected "
                          f"'default', 'optimal', a folder with model.safetensors and config.json, or a published "
                          f"file (edm:PRESET:PATH, robustbench:ARCH:PATH)")
    try:
        config, _ = read_config(folder)
    except CheckpointError as exc:
        raise CheckpointError(f"{where}: {exc}") from None
    try:
        check_config(config)
        with torch.device("meta"):
            own = build_model(config).state_dict()
    except ConfigError as exc:
        raise CheckpointError(f"{where}: checkpoint {ref.path}: {exc}") from None
    weights = folder / WEIGHTS_NAME
    try:
        shapes = _header_shapes(weights)
    except CheckpointError as exc:
        raise CheckpointError(f"{where}: {exc}") from None
    # Loading is strict and by name (models/checkpoint.py): so is this.
    for name in sorted(set(own) | set(shapes)):
        if name not in shapes or name not in own or tuple(shapes[name]) != tuple(own[name].shape):
            found = f"shape {tuple(shapes[name])}" if name in shapes else "missing"
            wanted = f"shape {tuple(own[name].shape)}" if name in own else "no such tensor"
            raise CheckpointError(f"{where}: checkpoint weights {weights} do not fit the model its {CONFIG_NAME} builds: "
                                  f"first mismatch: tensor {name!r}: {found} in the file, {wanted} in the model")
    return config


def _header_shapes(weights: Path) -> dict[str, list[int]]:
    """The names and shapes of a safetensors file, from its header alone."""
    from safetensors import SafetensorError, safe_open

    if not weights.is_file():
        raise CheckpointError(f"checkpoint weights {weights} not found (the folder has a config but no weights); "
                              f"train or import the model again")
    try:
        with safe_open(str(weights), "pt") as f:
            return {k: f.get_slice(k).get_shape() for k in f.keys()}
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"checkpoint weights {weights} are unreadable: {exc}") from None


def _zoo_config(ref: ModelRef, dataset: str, where: str) -> dict:
    """A RobustBench zoo entry: one we build, and its file there and fitting the entry's architecture."""
    try:
        entry = buildable(dataset, ref.threat, ref.name)
    except ConfigError as exc:
        raise ConfigError(f"{where}: {exc}") from None
    problem = ref.missing(dataset)
    if problem:
        raise CheckpointError(f"{where}: {problem}")
    path = ref.zoo_path(dataset)
    try:
        obj = read_weights_only(path, mmap=True)
        state = robustbench_state(obj, path, entry.take, entry.name)
        with torch.device("meta"):
            model = build_model(entry.config)
        fit_zoo_state(model, state, entry, str(path), assign=True)
    except (ConfigError, CheckpointError) as exc:
        raise type(exc)(f"{where}: model {ref}: {exc}") from None
    return dict(entry.config)


def _published_config(ref: ModelRef, dataset: str, where: str, classes: int | None) -> dict:
    """The file's config, after checking that its tensors' names and shapes are the ones it builds."""
    try:
        check_preset(ref)
    except ConfigError as exc:
        raise ConfigError(f"{where}: {exc}") from None
    problem = ref.missing()
    if problem:
        raise CheckpointError(f"{where}: {problem}")
    if ref.kind == "robustbench":
        try:
            refuse_zoo_file(ref, dataset)
        except ConfigError as exc:
            raise ConfigError(f"{where}: {exc}") from None
    # An EDM file keeps its own label_dim here, so that a class mismatch is named as one; a classifier
    # preset has no class count of its own and is built for the dataset's.
    build_for = None if ref.kind == "edm" else classes if classes is not None else dataset_info(dataset).classes
    try:
        state, config, _ = read_published(Path(ref.path), ref.format, preset=ref.preset, num_classes=build_for,
                                          mmap=True)
        with torch.device("meta"):
            own = build_model(config).state_dict()
        check_fit(own, state, ref.path, describe(config, ref.preset))
    except (ConfigError, CheckpointError) as exc:
        raise type(exc)(f"{where}: model {ref}: {exc}") from None
    return config


def _fits_dataset(ref: ModelRef, fit: Fit, dataset: str, where: str, classes: int | None) -> None:
    info = dataset_info(dataset)
    for_data = f"use a model made for {dataset} or change the job's dataset"
    wanted = [(fit.resolution, info.size, f"dataset {dataset} has {info.size}x{info.size} images", for_data),
              (fit.channels, info.channels, f"dataset {dataset} has {info.channels}-channel images", for_data)]
    if classes is None:
        wanted.append((fit.classes, info.classes, f"dataset {dataset} has {info.classes} classes", for_data))
    else:
        wanted.append((fit.classes, classes, "this network must be unconditional" if classes == 0 else
                       f"this network must have {classes} classes",
                       "use an unconditional EDM network (label_dim 0) there" if classes == 0 else
                       f"use a network of {classes} classes there"))
    for field, want, what, hint in wanted:
        if field is not None and field[1] != want:
            raise CheckpointError(f"{where}: model {ref} has {field[0]} = {field[1]!r}, but {what} "
                                  f"({field[0]} = {want} needed); {hint}")


__all__ = ["Fit", "fit_of", "check_model"]

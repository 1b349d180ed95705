"""Published checkpoints -> our models: NVlabs' EDM pickles, the RDC authors' EDM state dicts and
RobustBench classifiers, each read without running anything from the file.

    edm-pkl       an NVlabs network pickle (edm-cifar10-32x32-cond-vp.pkl, network-snapshot-*.pkl),
                  read by pipeline.models.safe_pickle; its `ema` network's constructor kwargs are
                  the config unless a preset or config is given
    edm-pt        a state dict saved with torch.save (the RDC authors' edm_cifar_cond_vp.pt), read
                  with torch.load(weights_only=True); needs a preset or config
    robustbench   a classifier state dict in RobustBench's format (weights_only=True), needs a
                  preset (wrn-28-10, ...) or config

A defense table names such a file directly (pipeline.config.model_ref): "edm:path/to/file.pkl",
"edm:PRESET:path/to/file.pt", "robustbench:ARCH:path/to/file.pt"; `load_ref` imports it in
memory; pipeline.models.check tells, before any work, whether it is there and fits.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import torch
from torch import nn

from pipeline.config.model_ref import ModelRef
from pipeline.errors import CheckpointError, ConfigError
from pipeline.models.checkpoint import save_checkpoint
from pipeline.models.edm import EDM_PRESETS
from pipeline.models.edm.config import resolve
from pipeline.models.registry import build_model
from pipeline.models.safe_pickle import read_network

FORMATS = ("edm-pkl", "edm-pt", "robustbench")

# RobustBench's architectures by the names of its model zoo (robustbench/model_zoo/cifar10.py):
# `Standard` is WideResNet(28, 10); TRADES and others are WRN-34-10; Wong2020Fast and
# Andriushchenko2020 are PreActResNet18; Modas2021PRIME is ResNet-18. Whether the file carries
# mu/sigma buffers or an unused sub_block1 is read from the file's keys (see _fit_state_keys).
CLASSIFIER_PRESETS: dict[str, dict] = {
    "wrn-28-10": {"arch": "wrn", "depth": 28, "widen_factor": 10, "in_channels": 3},
    "wrn-34-10": {"arch": "wrn", "depth": 34, "widen_factor": 10, "in_channels": 3},
    "wrn-34-20": {"arch": "wrn", "depth": 34, "widen_factor": 20, "in_channels": 3},
    "preact-resnet-18": {"arch": "preact-resnet18", "in_channels": 3},
    "resnet-18": {"arch": "resnet18", "in_channels": 3},
    "small-cnn": {"arch": "cnn", "in_channels": 3, "image_size": 32, "width": 32},
}
PRESETS = (*EDM_PRESETS, *CLASSIFIER_PRESETS)
PRECONDS = {"VPPrecond": "vp", "VEPrecond": "ve", "EDMPrecond": "edm"}
# Wrappers a state dict may sit under: DataParallel's "module.", and checkpoints saved as
# {"state_dict": ...} or {"model": ...} (RobustBench's loader accepts both).
WRAPPER_KEYS = ("state_dict", "model", "net", "ema")


def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def read_weights_only(path: Path, mmap: bool = False):
    """What a torch.save file holds, read with weights_only=True (tensors and plain containers only).

    mmap: map the tensors' storages instead of reading them (a zip-format file; a legacy one is
    read whole): the names and shapes of a 200 MB file for the price of its index."""
    try:
        return _torch_load(path, mmap)
    except Exception as exc:  # a corrupt file fails in many ways inside torch.load (KeyError, RuntimeError, ...)
        # torch's own message goes on to suggest weights_only=False; only its reason is relayed.
        lines = [ln.strip() for ln in str(exc).splitlines() if "WeightsUnpickler error" in ln]
        if lines:
            reason = lines[0].split("was not an allowed global")[0].strip()
            raise CheckpointError(f"{path} cannot be read as a weights-only state dict ({reason}); it holds more "
                                  "than tensors and plain containers: re-save its state dict alone") from None
        raise CheckpointError(f"{path} is not a readable torch.save file ({type(exc).__name__}: {exc})") from None


def _weights_only_state(path: Path, mmap: bool = False) -> dict[str, torch.Tensor]:
    """A state dict from a torch.save file, read with weights_only=True, unwrapped."""
    obj = read_weights_only(path, mmap)
    if isinstance(obj, dict) and not all(isinstance(v, torch.Tensor) for v in obj.values()):
        obj = next((obj[key] for key in WRAPPER_KEYS if isinstance(obj.get(key), dict)), obj)
    if not isinstance(obj, dict) or not obj or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()):
        raise CheckpointError(f"{path} holds no state dict (a mapping of names to tensors, possibly under "
                              f"one of {WRAPPER_KEYS})")
    if all(k.startswith("module.") for k in obj):  # saved from DataParallel
        obj = {k[len("module."):]: v for k, v in obj.items()}
    return obj


def _torch_load(path: Path, mmap: bool):
    if mmap:
        try:
            return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as exc:
            if "mmap can only be used with files saved with" not in str(exc):
                raise
    return torch.load(path, map_location="cpu", weights_only=True)


def _align_keys(state: dict[str, torch.Tensor], expected: list[str]) -> dict[str, torch.Tensor]:
    """The state dict under the prefixing that gives exactly the model's names, if one does.

    Tried in order: as is, without a wrapper's "model.", and a bare EDM UNet's names under the
    preconditioner's "model.". Otherwise the candidate sharing most names, so the error names
    the first real mismatch.
    """
    maps = [lambda k: k, lambda k: k[len("model."):] if k.startswith("model.") else k, lambda k: "model." + k]
    want = set(expected)
    candidates = [{f(k): v for k, v in state.items()} for f in maps]
    for cand in candidates:
        if set(cand) == want:
            return cand
    return max(candidates, key=lambda c: len(set(c) & want))


def fit_state(model: nn.Module, state: dict[str, torch.Tensor], where: str, what: str) -> None:
    """Load `state` into `model` strictly; CheckpointError names the first mismatching key and shape."""
    own = model.state_dict()
    state = check_fit(own, state, where, what)
    # torch's BatchNorm accepts a file without its counters, as RobustBench's loader does.
    model.load_state_dict(state, strict=not any(k.endswith(".num_batches_tracked") and k not in state for k in own))


def check_fit(own: dict[str, torch.Tensor], state: dict[str, torch.Tensor], where: str, what: str) -> dict[str, torch.Tensor]:
    """`state` under the names of `own` (a model's state dict, possibly on the meta device), or
    CheckpointError naming the first mismatching key and shape."""
    state = _align_keys(state, list(own))
    for name, tensor in own.items():
        if name not in state and name.endswith(".num_batches_tracked"):
            continue  # torch's BatchNorm accepts a file without its counter, as RobustBench's loader does
        if name not in state:
            raise CheckpointError(f"{where} does not fit {what}: first mismatch: tensor {name!r} "
                                  f"(shape {tuple(tensor.shape)}) is missing from the file")
        if tuple(state[name].shape) != tuple(tensor.shape):
            raise CheckpointError(f"{where} does not fit {what}: first mismatch: tensor {name!r} has shape "
                                  f"{tuple(state[name].shape)} in the file, the model expects {tuple(tensor.shape)}")
    extra = [k for k in state if k not in own]
    if extra:
        raise CheckpointError(f"{where} does not fit {what}: first mismatch: the file's tensor {extra[0]!r} "
                              f"(shape {tuple(state[extra[0]].shape)}) has no place in the model"
                              + (f" ({len(extra) - 1} more)" if len(extra) > 1 else ""))
    return state


def _fit_state_keys(config: dict, keys: set[str]) -> dict:
    """A RobustBench classifier config completed from the file's keys where it leaves them open:
    normalization ("mu_sigma" where the file has mu and sigma buffers, else "none") and a WRN's
    unused sub_block1."""
    config = dict(config)
    if config["arch"] in ("wrn", "preact-resnet18", "resnet18"):
        config.setdefault("normalization", "mu_sigma" if {"mu", "sigma"} <= keys else "none")
    if config["arch"] == "wrn":
        config.setdefault("sub_block1", any(k.startswith("sub_block1.") for k in keys))
    return config


def _edm_config(preset: str | None, config: dict | None) -> dict | None:
    if config is not None:
        return {"arch": "edm", **resolve(config)}
    if preset is not None:
        if preset not in EDM_PRESETS:
            raise ConfigError(f"--arch {preset!r} is not an EDM preset; expected one of {sorted(EDM_PRESETS)}")
        return {"arch": "edm", **EDM_PRESETS[preset]}
    return None


def import_model(src: str | os.PathLike, fmt: str, preset: str | None = None, config: dict | None = None,
                 num_classes: int | None = None) -> tuple[nn.Module, dict, dict]:
    """(model in eval mode, config, provenance) from a published file; nothing in it is run.

    preset: a name in PRESETS; config: a registry config (for EDM: build_edm's); at most one.
    num_classes: the classes a classifier preset is built for (default 10), the EDM label_dim
    override. Raises CheckpointError naming the file and the first mismatching key and shape.
    """
    src = Path(src)
    state, cfg, source = read_published(src, fmt, preset=preset, config=config, num_classes=num_classes)
    meta = {"source": {"file": src.name, "sha256": sha256_file(src), "format": fmt, "preset": preset, **source}}
    try:
        model = build_model(cfg)
    except ConfigError as exc:
        raise CheckpointError(f"{src}: its configuration does not build a model: {exc}") from None
    fit_state(model, state, str(src), describe(cfg, preset))
    return model.eval(), cfg, meta


def read_published(src: Path, fmt: str, preset: str | None = None, config: dict | None = None,
                   num_classes: int | None = None, mmap: bool = False) -> tuple[dict[str, torch.Tensor], dict, dict]:
    """(state dict, config, what the file says of itself) of a published file, nothing built;
    mmap: a torch.save file's tensors are mapped, not read (preflight)."""
    if fmt not in FORMATS:
        raise ConfigError(f"format {fmt!r} is unknown; expected one of {FORMATS}")
    if preset is not None and config is not None:
        raise ConfigError("give an architecture preset or a config, not both")
    if preset is not None and preset not in PRESETS:
        raise ConfigError(f"architecture {preset!r} is unknown; expected one of {sorted(PRESETS)}")
    if not src.is_file():
        raise CheckpointError(f"model file {src} not found")
    source: dict = {}
    if fmt == "edm-pkl":
        net = read_network(src)
        source.update(class_name=net.class_name, module_src_sha256=net.module_src_sha256)
        state = net.state_dict
        cfg = _edm_config(preset, config)
        if cfg is None:
            if net.class_name not in PRECONDS:
                raise CheckpointError(f"{src}: its network is a {net.class_name}; expected one of {sorted(PRECONDS)}")
            cfg = {"arch": "edm", "precond": PRECONDS[net.class_name], **net.init_kwargs}
    elif fmt == "edm-pt":
        state = _weights_only_state(src, mmap)
        cfg = _edm_config(preset, config)
        if cfg is None:
            raise ConfigError(f"{src}: an edm-pt state dict carries no configuration; give --arch or --config")
    else:
        from pipeline.models.robustbench_zoo import robustbench_state

        # Read as RobustBench's loader reads its files: {'last', 'best'} (last), a `state_dict`
        # entry, "module." and "model." cut from the keys.
        obj = read_weights_only(src, mmap)
        take = "last" if isinstance(obj, dict) and isinstance(obj.get("last"), dict) and "best" in obj else None
        state = robustbench_state(obj, src, take)
        if config is None and preset not in CLASSIFIER_PRESETS:
            raise ConfigError(f"{src}: a robustbench file needs --arch (one of {sorted(CLASSIFIER_PRESETS)}) or --config")
        base = CLASSIFIER_PRESETS[preset] if config is None else config
        if "arch" not in base:
            raise ConfigError(f"{src}: the config needs an 'arch' field")
        cfg = _fit_state_keys(base, set(state))
    if num_classes is not None:
        cfg["label_dim" if cfg.get("arch") == "edm" else "num_classes"] = int(num_classes)
    elif cfg.get("arch") != "edm":
        cfg.setdefault("num_classes", 10)
    return state, cfg, source


def describe(cfg: dict, preset: str | None = None) -> str:
    """What a file is fitted against, for messages: "PRESET (label_dim 10, precond edm)"."""
    if cfg.get("arch") == "edm":
        inside = f"label_dim {cfg.get('label_dim', 0)}, precond {cfg.get('precond')}"
    else:
        inside = f"{cfg.get('num_classes')} classes"
    return f"{preset or cfg.get('arch')} ({inside})"


def import_to_folder(src: str | os.PathLike, fmt: str, out: str | os.PathLike, preset: str | None = None,
                     config: dict | None = None, num_classes: int | None = None) -> tuple[Path, dict, dict]:
    """import_model, saved as our checkpoint folder (safetensors + config.json with provenance)."""
    model, cfg, meta = import_model(src, fmt, preset=preset, config=config, num_classes=num_classes)
    return save_checkpoint(out, model, cfg, meta), cfg, meta


def check_preset(ref: ModelRef) -> None:
    """ConfigError if a reference's preset is not one of its kind's."""
    presets = EDM_PRESETS if ref.kind == "edm" else CLASSIFIER_PRESETS
    if ref.preset is not None and ref.preset not in presets:
        raise ConfigError(f"model {ref.kind}:{ref.preset}:{ref.path}: {ref.preset!r} is not a {ref.kind} preset; "
                          f"expected one of {sorted(presets)}")


def load_ref(ref: ModelRef, num_classes: int | None = None) -> tuple[nn.Module, dict, dict]:
    """The model an edm: or robustbench: reference names, imported in memory."""
    if ref.kind not in ("edm", "robustbench"):
        raise ConfigError(f"load_ref loads edm: and robustbench: references, not {ref.kind!r}")
    check_preset(ref)
    problem = ref.missing()
    if problem:
        raise CheckpointError(problem)
    return import_model(ref.path, ref.format, preset=ref.preset, num_classes=num_classes)


__all__ = ["FORMATS", "PRESETS", "CLASSIFIER_PRESETS", "import_model", "import_to_folder", "load_ref", "read_published",
           "check_preset", "check_fit", "fit_state", "describe", "read_weights_only", "sha256_file"]

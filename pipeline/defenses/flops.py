"""FLOPs of one network evaluation of a defense: what one image through its network costs.

An evaluation is what the defense's `Cost` counts (pipeline/protocol/cost.py): one image
through the classifier (plain, MI), or one x_t through RDC's noise predictor (an ELBO term or
an LM sample; an EDM denoiser with its eps wrapper). It is counted once per model card by
torch's FLOP counter (torch.utils.flop_counter) on one image of a randomly initialised copy of
the architecture (FLOPs do not depend on the weights), and kept in the model cache,
`flops.json`, keyed by the model's config, the call and the torch version.
A backward evaluation is measured the same way: the input gradient only, since a defense's
weights are frozen (about one forward's FLOPs, not the two of training, which also forms the
weights' gradients).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from pipeline.atomic import atomic_write
from pipeline.config.datasets import dataset_info
from pipeline.config.model_ref import ModelRef, parse_model_ref
from pipeline.models.robustbench_zoo import zoo_entry
from pipeline.diffusion.denoiser import DenoiserEps
from pipeline.diffusion.schedule import SCHEDULES
from pipeline.errors import CheckpointError, ConfigError
from pipeline.models.checkpoint import read_config
from pipeline.models.edm import EDM_PRESETS
from pipeline.models.importer import CLASSIFIER_PRESETS
from pipeline.models.registry import build_model
from pipeline.models.zoo import cache_dir, default_path


def network_config(spec, lm: bool = False) -> dict | None:
    """The registry config of the network one evaluation of the defense `spec` runs (lm: one of
    its LM's steps, which runs the authors' LM's own unconditional network where it has one),
    read without weights; None where it is not known before the model exists (an untrained
    default, an EDM pickle that carries its own config) or where there is no network (RDC's
    optimal model)."""
    K = dataset_info(spec.dataset).classes
    role = "diffusion" if spec.kind == "rdc" else spec.method
    model = spec.model
    if lm and getattr(getattr(spec, "lm", None), "variant", None) == "authors":
        model, K = spec.lm.model, 0
    ref = model if isinstance(model, ModelRef) else parse_model_ref(model)
    if ref.kind == "optimal":
        return None
    if ref.zoo:
        try:
            return dict(zoo_entry(spec.dataset, ref.threat, ref.name).config or {}) or None
        except ConfigError:
            return None
    if ref.kind in ("default", "folder"):
        folder = default_path(spec.dataset, role) if ref.kind == "default" else Path(ref.path)
        try:
            return read_config(folder)[0]
        except CheckpointError:
            return None
    if ref.kind == "edm":
        return {"arch": "edm", **EDM_PRESETS[ref.preset], "label_dim": K} if ref.preset in EDM_PRESETS else None
    if ref.preset in CLASSIFIER_PRESETS:
        return {**CLASSIFIER_PRESETS[ref.preset], "num_classes": K}
    return None


def _key(config: dict, call: dict) -> str:
    text = json.dumps({"config": config, "call": call, "torch": torch.__version__}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:24]


def _count(config: dict, call: dict) -> list[int]:
    """[forward, backward] FLOPs of one image: the call, then its input gradient with frozen weights."""
    torch.manual_seed(0)
    net = build_model(config).eval().requires_grad_(False)
    C, S = call["shape"][0], call["shape"][1]
    x = torch.rand(1, C, S, S).requires_grad_(True)
    with FlopCounterMode(display=False) as forward:
        if call["kind"] == "classifier":
            out = net(x)
        elif call["kind"] == "denoiser":
            out = net(x * 2 - 1, torch.full((1,), call["sigma"]))
        else:
            if config.get("arch") == "edm":
                net = DenoiserEps(net, SCHEDULES[call["elbo"]](), call["classes"])
            out = net(x * 2 - 1, torch.tensor([call["t"]]), torch.zeros(1, dtype=torch.int64))
    with FlopCounterMode(display=False) as backward:
        torch.autograd.grad(out.float().sum(), x)
    return [int(forward.get_total_flops()), int(backward.get_total_flops())]


def flops_per_evaluation(spec, cache: Path | None = None, config: dict | None = None, lm: bool = False) -> int | None:
    """FLOPs of one forward evaluation of the defense `spec`'s network (lm: of its LM's network;
    None: not known, see network_config); see evaluation_flops."""
    both = evaluation_flops(spec, cache, config, lm)
    return None if both is None else both[0]


def evaluation_flops(spec, cache: Path | None = None, config: dict | None = None,
                     lm: bool = False) -> tuple[int, int] | None:
    """(forward, backward) FLOPs of one evaluation of the defense `spec`'s network (lm: of its
    LM's network; None: not known, see network_config), counted once and kept in `cache`
    (default: the model cache's flops.json). config: the network's config where the caller knows
    it (an untrained default's recipe)."""
    config = config or network_config(spec, lm)
    if config is None:
        return None
    info = dataset_info(spec.dataset)
    if lm and getattr(getattr(spec, "lm", None), "variant", None) == "authors":
        # the authors' LM calls its denoiser D(x; sigma) directly
        call = {"kind": "denoiser", "shape": [info.channels, info.size], "sigma": 0.5}
    elif spec.kind == "rdc":
        call = {"kind": "eps", "shape": [info.channels, info.size], "classes": info.classes, "elbo": spec.elbo,
                "t": 500}
    else:
        call = {"kind": "classifier", "shape": [info.channels, info.size]}
    path = cache or cache_dir() / "flops.json"
    key = _key(config, call)
    known = json.loads(path.read_text()) if path.is_file() else {}
    if key not in known:
        known[key] = _count(config, call)
        data = json.dumps(known, indent=1, sort_keys=True).encode()
        atomic_write(path, lambda f: f.write(data))
    forward, backward = known[key]
    return int(forward), int(backward)


__all__ = ["evaluation_flops", "flops_per_evaluation", "network_config"]

"""FLOPs of one network evaluation of a defense: what one image through its network costs.

An evaluation is what the defense's `Cost` counts (pipeline/protocol/cost.py): one image
through the classifier (plain, MI), or one x_t through RDC's noise predictor (an ELBO term or
an LM sample; an EDM denoiser with its eps wrapper). It is counted once per model card by
torch's FLOP counter (torch.utils.flop_counter) on one image of a randomly initialised copy of
the architecture (FLOPs do not depend on the weights), and kept in the model cache,
`flops.json`, keyed by the model's config, the call and the torch version.
A backward evaluation is taken as twice a forward one (the input gradient and the weights'
Jacobian products), unless measured.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from pipeline.atomic import atomic_write
from pipeline.config.datasets import dataset_info
from pipeline.config.model_ref import parse_model_ref
from pipeline.diffusion.denoiser import DenoiserEps
from pipeline.diffusion.schedule import SCHEDULES
from pipeline.errors import CheckpointError
from pipeline.models.checkpoint import read_config
from pipeline.models.edm import EDM_PRESETS
from pipeline.models.importer import CLASSIFIER_PRESETS
from pipeline.models.registry import build_model
from pipeline.models.zoo import cache_dir, default_path

BACKWARD_FACTOR = 2.0  # FLOPs of a backward evaluation per forward one


def network_config(spec) -> dict | None:
    """The registry config of the network one evaluation of the defense `spec` runs, read
    without weights; None where it is not known before the model exists (an untrained default,
    an EDM pickle that carries its own config) or where there is no network (RDC's optimal model)."""
    K = dataset_info(spec.dataset).classes
    role = "diffusion" if spec.kind == "rdc" else spec.method
    ref = parse_model_ref(spec.model)
    if ref.kind == "optimal":
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


def _count(config: dict, call: dict) -> int:
    torch.manual_seed(0)
    net = build_model(config).eval()
    C, S = call["shape"][0], call["shape"][1]
    x = torch.rand(1, C, S, S)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        if call["kind"] == "classifier":
            net(x)
        else:
            if config.get("arch") == "edm":
                net = DenoiserEps(net, SCHEDULES[call["elbo"]](), call["classes"])
            net(x * 2 - 1, torch.tensor([call["t"]]), torch.zeros(1, dtype=torch.int64))
    return int(counter.get_total_flops())


def flops_per_evaluation(spec, cache: Path | None = None, config: dict | None = None) -> int | None:
    """FLOPs of one forward evaluation of the defense `spec`'s network (None: not known, see
    network_config), counted once and kept in `cache` (default: the model cache's flops.json).
    config: the network's config where the caller knows it (an untrained default's recipe)."""
    config = config or network_config(spec)
    if config is None:
        return None
    info = dataset_info(spec.dataset)
    if spec.kind == "rdc":
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
    return int(known[key])


__all__ = ["BACKWARD_FACTOR", "flops_per_evaluation", "network_config"]

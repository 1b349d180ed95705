"""build_defense: a parsed defense spec (pipeline.config.defense) -> a ready nn.Module.

"default" models are loaded from the cache of pipeline.models.zoo, where a run's prepare step put
them: building a defense never trains. A path names a checkpoint folder (model.safetensors +
config.json); "edm:..." and "robustbench:..." name published files, imported in memory by
pipeline.models.importer. An EDM network (config arch "edm", a denoiser D(x; sigma, y)) runs in
RDC as eps_hat = (x - D) / sigma (diffusion/denoiser.py). RDC's `elbo` picks the ELBO's timesteps
and weights: "vp", DDPM's T = 1000 VP timesteps with weight 1 (the paper), or "edm", the RDC
authors' EDM weighting on 1000 noise levels (EDM denoisers and the optimal model only;
diffusion/schedule.py, EDMGrid).
"""

from __future__ import annotations

import torch

from pipeline.config.datasets import dataset_info
from pipeline.config.defense import DefenseSpec, RDCSpec, defense_name, parse_defense
from pipeline.data import load_split
from pipeline.defenses.base import Defense
from pipeline.defenses.execution import EngineOptions, precision
from pipeline.defenses.lm import LikelihoodMaximization
from pipeline.defenses.mi import MixupInference
from pipeline.defenses.plain import Plain
from pipeline.defenses.rdc import RDC
from pipeline.diffusion.denoiser import DenoiserEps
from pipeline.diffusion.optimal import OptimalEps
from pipeline.diffusion.schedule import SCHEDULES
from pipeline.errors import CheckpointError, ConfigError
from pipeline.models.zoo import load_model


def build_defense(spec: DefenseSpec | dict, device: str | torch.device | None = None, name: str | None = None) -> Defense:
    """The defense of a parsed spec (a table is parsed first), on `device` (default CPU).

    name: its name in records, as the job planned it (with any sweep suffix); default: the spec's.
    """
    if isinstance(spec, dict):
        spec = parse_defense(spec)
    info = dataset_info(spec.dataset)
    channels, size, K = info.channels, info.size, info.classes
    if spec.kind == "plain":
        model, _, _ = load_model(spec.model, spec.dataset, spec.method, channels)
        defense = Plain(model, K, channels, size)
    elif spec.kind == "mi":
        model, _, _ = load_model(spec.model, spec.dataset, spec.method, channels)
        pool_x, pool_y = load_split(spec.dataset, "train", root=spec.data_root)
        defense = MixupInference(model, pool_x, pool_y, K, mode=spec.mode, lam=spec.lam, n_pl=spec.n_pl,
                                 n_ol=spec.n_ol, threshold=spec.threshold, seed=spec.seed)
    else:
        defense = _build_rdc(spec, channels, size, K)
    defense.spec = spec
    defense.name = name or defense_name(spec)
    # Defenses never train: frozen weights keep compiled backward graphs from computing their gradients.
    return defense.to(device or "cpu").eval().requires_grad_(False)


def planned_precision(spec: DefenseSpec) -> dict[str, str]:
    """{device type: the precision the defense of `spec` runs in there} for "cpu" and "cuda",
    from the spec alone (plan.json keeps it; each record says which one its unit ran in)."""
    options = None
    if spec.kind == "rdc" and spec.engine is not None:
        options = EngineOptions(**spec.engine.model_dump())
    return {device: precision(options, device) for device in ("cpu", "cuda")}


def _build_rdc(spec: RDCSpec, channels: int, size: int, K: int) -> Defense:
    schedule = SCHEDULES[spec.elbo]()
    if spec.model == "optimal":
        x, y = load_split(spec.dataset, "train", root=spec.data_root)
        eps_model = OptimalEps(x, y, K, schedule=schedule)
    else:
        eps_model, config, _ = load_model(spec.model, spec.dataset, "diffusion", channels)
        if config.get("arch") == "edm":
            if config.get("img_resolution") != size:
                raise CheckpointError(f"defense.model {spec.model}: EDM network of resolution "
                                      f"{config.get('img_resolution')}, dataset {spec.dataset} has {size}x{size} images")
            eps_model = DenoiserEps(eps_model, schedule, K)
        elif spec.elbo == "edm":
            raise ConfigError(f"defense.elbo = \"edm\" evaluates a denoiser at any noise level; model {spec.model!r} "
                              "is an eps-model of the 1000 VP timesteps: use elbo = \"vp\" or an EDM checkpoint")
    lm = None
    if spec.lm is not None:
        lm = LikelihoodMaximization(eps_model, K, schedule, steps=spec.lm.steps, mu=spec.lm.mu, eta=spec.lm.eta,
                                    gamma=spec.lm.gamma, timesteps=spec.lm.timesteps, samples=spec.lm.samples,
                                    gradient=spec.lm.gradient)
    timesteps = None if spec.timesteps == "all" else spec.timesteps
    engine = EngineOptions(**spec.engine.model_dump()) if spec.engine else None
    return RDC(eps_model, K, channels, size, schedule=schedule, timesteps=timesteps, prior=spec.prior, temperature=spec.temperature,
               pruning=spec.pruning, lm=lm, batch_size=spec.batch_size, seed=spec.seed, engine=engine)

"""build_defense: a parsed defense spec (pipeline.config.defense) -> a ready nn.Module.

"default" models are loaded from the cache of pipeline.models.zoo, where a run's prepare step put
them: building a defense never trains. A path names a checkpoint folder (model.safetensors +
config.json); "edm:..." and "robustbench:..." name published files, imported in memory by
pipeline.models.importer. An EDM network (config arch "edm", a denoiser D(x; sigma, y)) runs in
RDC as eps_hat = (x - D) / sigma (diffusion/denoiser.py). RDC's `elbo` picks the ELBO's timesteps
and weights: "vp", DDPM's T = 1000 VP timesteps with weight 1 (the paper), or "edm", the RDC
authors' EDM weighting on 1000 noise levels (EDM denoisers and the optimal model only;
diffusion/schedule.py, EDMGrid); `timesteps = "authors[:N]"` is that weighting on the authors' grid
of N levels (125 by default). `lm` is the paper's LM on RDC's network, or with variant "authors"
the authors' code's LM on its own unconditional EDM network (defenses/lm.py, AuthorsLM).
"""

from __future__ import annotations

import torch
from torch import nn

from pipeline.config.datasets import dataset_info
from pipeline.config.model_ref import ModelRef
from pipeline.config.defense import AuthorsGrid, DefenseSpec, RDCSpec, defense_name
from pipeline.data import load_split
from pipeline.defenses.base import Defense
from pipeline.defenses.execution import EngineOptions, precision
from pipeline.defenses.lm import AuthorsLM, LikelihoodMaximization
from pipeline.defenses.mi import MixupInference
from pipeline.defenses.plain import Plain
from pipeline.defenses.rdc import RDC
from pipeline.diffusion.denoiser import DenoiserEps
from pipeline.diffusion.optimal import OptimalEps
from pipeline.diffusion.schedule import SCHEDULES, EDMGrid
from pipeline.errors import CheckpointError, ConfigError
from pipeline.models.zoo import load_model


def build_defense(spec: DefenseSpec, device: str | torch.device | None = None, name: str | None = None) -> Defense:
    """The defense of a parsed spec (pipeline.config.spec(table) parses a table), on `device` (default CPU).

    name: its name in records, as the job planned it (with any sweep suffix); default: the spec's.
    """
    if isinstance(spec, dict):
        raise ConfigError("build_defense takes a parsed spec; parse a table with pipeline.config.spec(table)")
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


def _edm_denoiser(model: ModelRef, dataset: str, channels: int, size: int, classes: int | None, what: str):
    """An EDM network D(x; sigma, y) named by `model`, checked against the dataset's images."""
    net, config, _ = load_model(model, dataset, "diffusion", channels, classes=classes)
    if config.get("arch") != "edm":
        raise ConfigError(f"{what} {str(model)!r} is not an EDM network (config arch {config.get('arch')!r}); "
                          "it must be a denoiser D(x; sigma)")
    if config.get("img_resolution") != size:
        raise CheckpointError(f"{what} {model}: EDM network of resolution {config.get('img_resolution')}, "
                              f"dataset {dataset} has {size}x{size} images")
    return net


def _build_lm(spec: RDCSpec, eps_model, schedule, channels: int, size: int, K: int, denoiser=None):
    """The spec's LM; denoiser: the authors' LM's network when the caller has it (else it is loaded)."""
    lm = spec.lm
    if lm is None:
        return None
    if lm.variant == "authors":
        try:
            denoiser = denoiser if denoiser is not None else _edm_denoiser(lm.model, spec.dataset, channels, size, 0, "defense.lm.model")
        except CheckpointError as exc:
            raise CheckpointError(f"defense.lm.model: the authors' LM runs an unconditional EDM network "
                                  f"(label_dim 0): {exc}") from None
        options = EngineOptions(**spec.engine.model_dump()) if spec.engine else None
        return AuthorsLM(denoiser, steps=lm.steps, lr=lm.lr, sigma=lm.sigma, options=options)
    return LikelihoodMaximization(eps_model, K, schedule, steps=lm.steps, mu=lm.mu, eta=lm.eta, gamma=lm.gamma,
                                  timesteps=lm.timesteps, samples=lm.samples, gradient=lm.gradient)


def rdc_schedule(spec: RDCSpec):
    """The ELBO's schedule of a spec: `elbo`'s, on the authors' grid of N levels where timesteps names it."""
    if isinstance(spec.timesteps, AuthorsGrid):
        return EDMGrid(T=spec.timesteps.levels)
    return SCHEDULES[spec.elbo]()


def _build_rdc(spec: RDCSpec, channels: int, size: int, K: int) -> Defense:
    schedule = rdc_schedule(spec)
    if spec.model.kind == "optimal":
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
            raise ConfigError(f"defense.elbo = \"edm\" evaluates a denoiser at any noise level; model {str(spec.model)!r} "
                              "is an eps-model of the 1000 VP timesteps: use elbo = \"vp\" or an EDM checkpoint")
    return _rdc(spec, eps_model, schedule, channels, size, K, _build_lm(spec, eps_model, schedule, channels, size, K))


def _rdc(spec: RDCSpec, eps_model: nn.Module, schedule, channels: int, size: int, K: int, lm) -> RDC:
    """The RDC of a spec around its noise predictor and LM: timesteps, pruning, engine, draws as the spec says."""
    timesteps = None if spec.timesteps == "all" or isinstance(spec.timesteps, AuthorsGrid) else spec.timesteps
    engine = EngineOptions(**spec.engine.model_dump()) if spec.engine else None
    return RDC(eps_model, K, channels, size, schedule=schedule, timesteps=timesteps, prior=spec.prior, temperature=spec.temperature,
               pruning=spec.pruning, lm=lm, batch_size=spec.batch_size, seed=spec.seed, engine=engine,
               draws=spec.draws, attack_noise=spec.attack_noise)


# --- a defense's structure, without weights or data ------------------------------------------
class _Placeholder(nn.Module):
    """A network that is never run: a defense built around it has the structure of the real one
    (cells, LM, pruning, the engine's kind of model), which is all that costing it reads."""

    def forward(self, *args):
        raise RuntimeError("a structure's placeholder network is never evaluated")


class _AllClassesPlaceholder(_Placeholder):
    """The placeholder of the optimal model, which gives every class of a pair in one call."""

    def all_classes(self, x_t, t):
        raise RuntimeError("a structure's placeholder network is never evaluated")


def defense_structure(spec: DefenseSpec, name: str | None = None) -> Defense:
    """The defense of a parsed spec as built by build_defense, but around placeholder networks
    and a one-image-per-class MI pool: it reads no weights or data (a job on a cluster's models
    is costed anywhere, pipeline/protocol/cost.py) and must never be evaluated."""
    if isinstance(spec, dict):
        raise ConfigError("defense_structure takes a parsed spec; parse a table with pipeline.config.spec(table)")
    info = dataset_info(spec.dataset)
    channels, size, K = info.channels, info.size, info.classes
    if spec.kind == "plain":
        defense = Plain(_Placeholder(), K, channels, size)
    elif spec.kind == "mi":
        pool_x, pool_y = torch.zeros(K, channels, size, size), torch.arange(K)
        defense = MixupInference(_Placeholder(), pool_x, pool_y, K, mode=spec.mode, lam=spec.lam, n_pl=spec.n_pl,
                                 n_ol=spec.n_ol, threshold=spec.threshold, seed=spec.seed)
    else:
        eps_model = _AllClassesPlaceholder() if spec.model.kind == "optimal" else _Placeholder()
        schedule = rdc_schedule(spec)
        lm = _build_lm(spec, eps_model, schedule, channels, size, K, denoiser=_Placeholder())
        defense = _rdc(spec, eps_model, schedule, channels, size, K, lm)
    defense.spec = spec
    defense.name = name or defense_name(spec)
    return defense

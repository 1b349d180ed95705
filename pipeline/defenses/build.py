"""build_defense: the table a job file uses for one defense -> a ready nn.Module.

    {"kind": "plain", "dataset": "digits", "model": "default", "method": "erm"}
    {"kind": "mi", "mode": "pl" | "ol" | "combined", "dataset": "digits", "model": "default"}
    {"kind": "rdc", "model": "optimal" | "default" | "path/to/checkpoint", "dataset": "digits",
     "timesteps": 100, "lm": {"steps": 10, "gradient": "bpda"}, "pruning": [[50, 5], [500, 1]],
     "elbo": "vp" | "edm"}

"default" models are trained on first use and cached (pipeline.models.zoo); a path names a
checkpoint folder (model.safetensors + config.json). An EDM checkpoint (config arch "edm", a
denoiser D(x; sigma, y)) runs as eps_hat = (x - D) / sigma (diffusion/denoiser.py). `elbo`
picks the ELBO's timesteps and weights: "vp", DDPM's T = 1000 VP timesteps with weight 1 (the
paper), or "edm", the RDC authors' EDM weighting on 1000 noise levels (EDM denoisers and the
optimal model only; diffusion/schedule.py, EDMGrid).
"""

from __future__ import annotations

from typing import Annotated, Literal, Union

import torch
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter

from pipeline.data import load_split, num_classes
from pipeline.config.tables import validate_table
from pipeline.defenses.base import Defense
from pipeline.errors import CheckpointError, ConfigError

IMAGE = {"digits": (1, 8), "cifar10": (3, 32), "cifar100": (3, 32)}


class _Spec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str | None = Field(None, description="name in results; default: derived from the table")
    dataset: Literal["digits", "cifar10", "cifar100"] = "digits"
    data_root: str | None = None
    seed: int = 0


class LMSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    steps: int = Field(10, ge=0)
    mu: float = Field(1.0, ge=0)
    eta: float = Field(8 / 255, ge=0)
    gamma: float | None = Field(None, gt=0)
    timesteps: Literal["random", "all"] | Annotated[int, Field(ge=1, le=1000)] = "random"
    samples: int = Field(1, ge=1)
    gradient: Literal["bpda", "exact"] = "bpda"


class EngineSpec(BaseModel):
    """How RDC's network runs (defenses/engine.py); none of it changes what is computed."""

    model_config = ConfigDict(extra="forbid")
    chunk: int | None = Field(None, ge=1)
    channels_last: bool | None = None
    autocast: Literal["auto", "off", "bf16", "fp16"] = "auto"
    compile: bool | Literal["forward"] = False
    cuda_graphs: bool = False


class PlainSpec(_Spec):
    kind: Literal["plain"]
    model: str = "default"
    method: Literal["erm", "mixup", "iat", "pgd_at"] = "erm"


class MISpec(_Spec):
    kind: Literal["mi"]
    mode: Literal["pl", "ol", "combined"] = "pl"
    model: str = "default"
    method: Literal["erm", "mixup", "iat", "pgd_at"] = "mixup"
    lam: float = Field(0.5, ge=0, le=1)
    n_pl: int | None = Field(None, ge=0)
    n_ol: int | None = Field(None, ge=0)
    threshold: float = 0.2


class RDCSpec(_Spec):
    kind: Literal["rdc"]
    model: str = "default"
    timesteps: Literal["all"] | Annotated[int, Field(ge=1, le=1000)] | list[int] = "all"
    prior: list[Annotated[float, Field(gt=0)]] | None = None
    temperature: float = Field(1.0, gt=0)
    pruning: list[tuple[Annotated[int, Field(ge=1)], Annotated[int, Field(ge=1)]]] | None = None
    lm: LMSpec | None = None
    batch_size: int = Field(4096, ge=1)
    engine: EngineSpec | None = None
    elbo: Literal["vp", "edm"] = "vp"


DefenseSpec = Annotated[Union[PlainSpec, MISpec, RDCSpec], Field(discriminator="kind")]
_ADAPTER = TypeAdapter(DefenseSpec)
KINDS = ("plain", "mi", "rdc")


def parse_defense(config: dict) -> PlainSpec | MISpec | RDCSpec:
    """Validate a defense table; ConfigError names every bad field."""
    return validate_table(_ADAPTER, config, "defense", KINDS)


def defense_name(spec) -> str:
    """A short, stable name for results: the spec's `name`, else kind and main options."""
    if spec.name:
        return spec.name
    if spec.kind == "plain":
        return f"plain-{spec.method}"
    if spec.kind == "mi":
        return f"mi-{spec.mode}"
    model = "optimal" if spec.model == "optimal" else "unet"
    return f"rdc-{model}" + ("-edmw" if spec.elbo == "edm" else "") + ("-lm" if spec.lm else "")


def build_defense(config: dict, device: str | torch.device | None = None) -> Defense:
    """The defense of a job table, on `device` (default CPU). See the module docstring."""
    spec = parse_defense(config)
    channels, size = IMAGE[spec.dataset]
    K = num_classes(spec.dataset)
    if spec.kind == "plain":
        from pipeline.models.zoo import load_model
        from pipeline.defenses.plain import Plain

        model, _, _ = load_model(spec.model, spec.dataset, spec.method, channels)
        defense = Plain(model, K, channels, size)
    elif spec.kind == "mi":
        from pipeline.models.zoo import load_model
        from pipeline.defenses.mi import MixupInference

        model, _, _ = load_model(spec.model, spec.dataset, spec.method, channels)
        pool_x, pool_y = load_split(spec.dataset, "train", root=spec.data_root)
        defense = MixupInference(model, pool_x, pool_y, K, mode=spec.mode, lam=spec.lam, n_pl=spec.n_pl,
                                 n_ol=spec.n_ol, threshold=spec.threshold, seed=spec.seed)
    else:
        defense = _build_rdc(spec, channels, size, K)
    defense.spec = spec.model_dump()
    defense.name = defense_name(spec)
    # Defenses never train: frozen weights keep compiled backward graphs from computing their gradients.
    return defense.to(device or "cpu").eval().requires_grad_(False)


def _build_rdc(spec: RDCSpec, channels: int, size: int, K: int) -> Defense:
    from pipeline.defenses.engine import EngineOptions
    from pipeline.defenses.lm import LikelihoodMaximization
    from pipeline.defenses.rdc import RDC
    from pipeline.diffusion.schedule import SCHEDULES

    schedule = SCHEDULES[spec.elbo]()
    if spec.model == "optimal":
        from pipeline.diffusion.optimal import OptimalEps

        x, y = load_split(spec.dataset, "train", root=spec.data_root)
        eps_model = OptimalEps(x, y, K, schedule=schedule)
    else:
        from pipeline.models.zoo import load_model

        eps_model, config, _ = load_model(spec.model, spec.dataset, "diffusion", channels)
        if config.get("arch") == "edm":
            from pipeline.diffusion.denoiser import DenoiserEps

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

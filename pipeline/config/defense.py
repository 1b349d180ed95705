"""Defense tables, as a job file writes them, validated with pydantic.

    {"kind": "plain", "dataset": "digits", "model": "default", "method": "erm"}
    {"kind": "mi", "mode": "pl" | "ol" | "combined", "dataset": "digits", "model": "default"}
    {"kind": "rdc", "model": "optimal" | "default" | "path/to/checkpoint", "dataset": "digits",
     "timesteps": 100, "lm": {"steps": 10, "gradient": "bpda"}, "pruning": [[50, 5], [500, 1]]}
    {"kind": "rdc", "model": "edm:PRESET:PATH", "elbo": "edm", "timesteps": "authors", "draws": "fixed",
     "attack_noise": "per-class", "lm": {"variant": "authors", "model": "edm:PRESET:PATH", "steps": 5,
     "lr": 0.1, "sigma": [0.4, 0.6]}}

"default" models are the cached defaults of pipeline.models.zoo; a path names a checkpoint
folder (model.safetensors + config.json); "robustbench:ARCH:PATH" (plain, mi) and
"edm:[PRESET:]PATH" (rdc) name published files (pipeline.config.model_ref).
pipeline.defenses.build turns a parsed spec into a module.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Annotated, Any, Literal, Union

from pydantic import (BaseModel, BeforeValidator, ConfigDict, Discriminator, Field, InstanceOf, PlainSerializer, Tag, TypeAdapter,
                      field_validator, model_validator)

from pipeline.config.datasets import DatasetName
from pipeline.config.model_ref import parse_model_ref
from pipeline.config.tables import validate_table
from pipeline.errors import ConfigError

# What a surrogate (a transfer attack's crafting model) takes from the defense it attacks, unless its table says otherwise.
INHERITED = ("data_root", "seed")


class _Spec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str | None = Field(None, description="name in results; default: derived from the table")
    dataset: DatasetName = "digits"
    data_root: str | None = None
    seed: int = 0


class LMSpec(BaseModel):
    """The paper's LM (sec. 3.4): momentum sign descent in the eta-ball on RDC's own network."""

    model_config = ConfigDict(extra="forbid")
    variant: Literal["paper"] = "paper"
    steps: int = Field(10, ge=0)
    mu: float = Field(1.0, ge=0)
    eta: float = Field(8 / 255, ge=0)
    gamma: float | None = Field(None, gt=0)
    timesteps: Literal["random", "all"] | Annotated[int, Field(ge=1, le=1000)] = "random"
    samples: int = Field(1, ge=1)
    gradient: Literal["bpda", "exact"] = "bpda"


class AuthorsLMSpec(BaseModel):
    """The RDC authors' code's LM (EDMLM.py): Adam on the unweighted denoising loss of a separate
    unconditional EDM network `model`, at noise levels uniform in `sigma`; no eps-ball."""

    model_config = ConfigDict(extra="forbid")
    variant: Literal["authors"]
    model: str
    steps: int = Field(5, ge=0)
    lr: float = Field(0.1, gt=0)
    sigma: tuple[Annotated[float, Field(gt=0)], Annotated[float, Field(gt=0)]] = (0.4, 0.6)

    @field_validator("model")
    @classmethod
    def _model(cls, value):
        return _model_ref(value, ("folder", "edm"), "the authors' LM network (an unconditional EDM denoiser)")

    @field_validator("sigma")
    @classmethod
    def _sigma(cls, value):
        if value[0] > value[1]:
            raise ValueError(f"expected [low, high] with low <= high, got {list(value)}")
        return value


def _lm_variant(value: Any) -> str:
    variant = value.get("variant", "paper") if isinstance(value, dict) else getattr(value, "variant", "paper")
    # Tags with a "-" are left out of error locations (errors.config_error).
    return f"lm-{variant}"


AnyLMSpec = Annotated[Union[Annotated[LMSpec, Tag("lm-paper")], Annotated[AuthorsLMSpec, Tag("lm-authors")]],
                      Discriminator(_lm_variant, custom_error_type="lm_variant",
                                    custom_error_message='variant must be "paper" (the default) or "authors"')]


@dataclass(frozen=True)
class AuthorsGrid:
    """The RDC authors' EDM grid of N noise levels, the left ends of linspace(1e-4, 3, N + 1)
    (diffusion/schedule.py, EDMGrid). Written "authors" (N = 125, their demo) or "authors:N"."""

    levels: int = 125

    def __str__(self) -> str:
        return "authors" if self.levels == 125 else f"authors:{self.levels}"


_AUTHORS = re.compile(r"authors(?::([0-9]+))?")


def _authors_grid(value: Any) -> Any:
    if isinstance(value, str) and value != "all":
        m = _AUTHORS.fullmatch(value)
        levels = int(m.group(1)) if m and m.group(1) else 125
        if m is None or not 1 <= levels <= 100_000:
            raise ValueError(f"expected \"all\", an integer, a list of timesteps, \"authors\" (the RDC authors' "
                             "125 EDM noise levels) or \"authors:N\" with 1 <= N <= 100000")
        return AuthorsGrid(levels)
    return value


GridName = Annotated[InstanceOf[AuthorsGrid], PlainSerializer(str)]


class EngineSpec(BaseModel):
    """How RDC's network runs (defenses/engine.py); none of it changes what is computed."""

    model_config = ConfigDict(extra="forbid")
    chunk: int | None = Field(None, ge=1)
    channels_last: bool | None = None
    autocast: Literal["auto", "off", "bf16", "fp16"] = "auto"
    compile: bool | Literal["forward"] = False
    cuda_graphs: bool = False


def _model_ref(value: str, kinds: tuple[str, ...], what: str) -> str:
    ref = parse_model_ref(value)
    if ref.kind not in kinds:
        raise ValueError(f"{ref.kind} model {value!r} cannot be {what}; expected one of {kinds}")
    return value


CLASSIFIER_REFS = ("default", "folder", "robustbench")
DIFFUSION_REFS = ("default", "optimal", "folder", "edm")


class PlainSpec(_Spec):
    kind: Literal["plain"]
    model: str = "default"
    method: Literal["erm", "mixup", "iat", "pgd_at"] = "erm"

    @field_validator("model")
    @classmethod
    def _model(cls, value):
        return _model_ref(value, CLASSIFIER_REFS, "a classifier")


class MISpec(_Spec):
    kind: Literal["mi"]
    mode: Literal["pl", "ol", "combined"] = "pl"
    model: str = "default"
    method: Literal["erm", "mixup", "iat", "pgd_at"] = "mixup"
    lam: float = Field(0.5, ge=0, le=1)
    n_pl: int | None = Field(None, ge=0)
    n_ol: int | None = Field(None, ge=0)
    threshold: float = 0.2

    @field_validator("model")
    @classmethod
    def _model(cls, value):
        return _model_ref(value, CLASSIFIER_REFS, "MI's classifier")


class RDCSpec(_Spec):
    kind: Literal["rdc"]
    model: str = "default"
    timesteps: Annotated[Literal["all"] | GridName | Annotated[int, Field(ge=1, le=1000)] | list[int],
                         BeforeValidator(_authors_grid)] = "all"
    prior: list[Annotated[float, Field(gt=0)]] | None = None
    temperature: float = Field(1.0, gt=0)
    pruning: list[tuple[Annotated[int, Field(ge=1)], Annotated[int, Field(ge=1)]]] | None = None
    lm: AnyLMSpec | None = None
    batch_size: int = Field(4096, ge=1)
    engine: EngineSpec | None = None
    elbo: Literal["vp", "edm"] = "vp"
    # "fixed": every call draws the same numbers (the authors' reseed), so the defense is a
    # deterministic function of its input; "fresh": a new draw per call (the honest protocol).
    draws: Literal["fresh", "fixed"] = "fresh"
    # The ELBO noise of the gradient path: one e per (example, level) for every class, as in
    # prediction, or one per (example, class, level), as in the authors' gradient path.
    attack_noise: Literal["shared", "per-class"] = "shared"

    @field_validator("model")
    @classmethod
    def _model(cls, value):
        return _model_ref(value, DIFFUSION_REFS, "RDC's diffusion model")

    @model_validator(mode="after")
    def _grid_needs_edm(self):
        if isinstance(self.timesteps, AuthorsGrid) and self.elbo != "edm":
            raise ValueError(f"timesteps = \"{self.timesteps}\" is the RDC authors' grid of EDM noise levels; "
                             "it needs elbo = \"edm\"")
        return self


DefenseSpec = Annotated[Union[PlainSpec, MISpec, RDCSpec], Field(discriminator="kind")]
_ADAPTER = TypeAdapter(DefenseSpec)
KINDS = ("plain", "mi", "rdc")


def parse_defense(config: dict, where: str = "defense") -> PlainSpec | MISpec | RDCSpec:
    """Validate a defense table; ConfigError names every bad field (`{where}.field: ...`)."""
    return validate_table(_ADAPTER, config, where, KINDS)


def defense_name(spec) -> str:
    """A short, stable name for results: the spec's `name`, else kind and main options.

    A job adds its sweep suffix to this (config/job.py); records carry the planned name.
    """
    if spec.name:
        return spec.name
    if spec.kind == "plain":
        return f"plain-{spec.method}"
    if spec.kind == "mi":
        return f"mi-{spec.mode}"
    model = {"optimal": "optimal", "edm": "edm"}.get(parse_model_ref(spec.model).kind, "unet")
    lm = "" if not spec.lm else "-lm" if spec.lm.variant == "paper" else "-alm"
    return f"rdc-{model}" + ("-edmw" if spec.elbo == "edm" else "") + lm + ("-fixed" if spec.draws == "fixed" else "")


def surrogate_spec(table: dict, attacked, where: str = "attack.surrogate") -> PlainSpec | MISpec | RDCSpec:
    """The surrogate of a transfer attack on the defense `attacked` (a parsed spec): its table,
    with the attacked defense's dataset, and its data root and seed unless the table sets them."""
    if not isinstance(table, dict):
        raise ConfigError(f"{where}: expected a defense table, got {type(table).__name__}")
    if table.get("dataset", attacked.dataset) != attacked.dataset:
        raise ConfigError(f"{where}.dataset: {table['dataset']!r} differs from the attacked defense's {attacked.dataset!r}")
    inherited = {k: getattr(attacked, k) for k in INHERITED}
    return parse_defense({**inherited, **table, "dataset": attacked.dataset}, where)

"""Defense tables, as a job file writes them, validated with pydantic.

    {"kind": "plain", "dataset": "digits", "model": "default", "method": "erm"}
    {"kind": "mi", "mode": "pl" | "ol" | "combined", "dataset": "digits", "model": "default"}
    {"kind": "rdc", "model": "optimal" | "default" | "path/to/checkpoint", "dataset": "digits",
     "timesteps": 100, "lm": {"steps": 10, "gradient": "bpda"}, "pruning": [[50, 5], [500, 1]]}

"default" models are the cached defaults of pipeline.models.zoo; a path names a checkpoint
folder (model.safetensors + config.json); "robustbench:ARCH:PATH" (plain, mi) and
"edm:[PRESET:]PATH" (rdc) name published files (pipeline.config.model_ref).
pipeline.defenses.build turns a parsed spec into a module.
"""

from __future__ import annotations

from typing import Annotated, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, field_validator

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
    timesteps: Literal["all"] | Annotated[int, Field(ge=1, le=1000)] | list[int] = "all"
    prior: list[Annotated[float, Field(gt=0)]] | None = None
    temperature: float = Field(1.0, gt=0)
    pruning: list[tuple[Annotated[int, Field(ge=1)], Annotated[int, Field(ge=1)]]] | None = None
    lm: LMSpec | None = None
    batch_size: int = Field(4096, ge=1)
    engine: EngineSpec | None = None
    elbo: Literal["vp", "edm"] = "vp"

    @field_validator("model")
    @classmethod
    def _model(cls, value):
        return _model_ref(value, DIFFUSION_REFS, "RDC's diffusion model")


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
    # A published model or a checkpoint folder is named by its file or folder (plain-Wong2020Fast,
    # rdc-edm-cifar10-32x32-cond-vp): the training method and "unet" describe only default models.
    label = parse_model_ref(spec.model).label
    if spec.kind == "plain":
        return f"plain-{label or spec.method}"
    if spec.kind == "mi":
        return f"mi-{spec.mode}" + (f"-{label}" if label else "")
    model = label or {"optimal": "optimal"}.get(parse_model_ref(spec.model).kind, "unet")
    return f"rdc-{model}" + ("-edmw" if spec.elbo == "edm" else "") + ("-lm" if spec.lm else "")


def surrogate_spec(table: dict, attacked, where: str = "attack.surrogate") -> PlainSpec | MISpec | RDCSpec:
    """The surrogate of a transfer attack on the defense `attacked` (a parsed spec): its table,
    with the attacked defense's dataset, and its data root and seed unless the table sets them."""
    if not isinstance(table, dict):
        raise ConfigError(f"{where}: expected a defense table, got {type(table).__name__}")
    if table.get("dataset", attacked.dataset) != attacked.dataset:
        raise ConfigError(f"{where}.dataset: {table['dataset']!r} differs from the attacked defense's {attacked.dataset!r}")
    inherited = {k: getattr(attacked, k) for k in INHERITED}
    return parse_defense({**inherited, **table, "dataset": attacked.dataset}, where)
